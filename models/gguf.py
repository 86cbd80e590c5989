"""GGUF files of the GLM family, as llama.cpp's convert_hf_to_gguf.py writes them.

llama.cpp knows two architectures of this family (``general.architecture``):

- ``chatglm``: ChatGLM3-6B and GLM-4-9B (THUDM format, and transformers' ``glm`` conversion
  glm-4-9b-chat-hf). Either one fused ``blk.N.attn_qkv`` (rows q | k | v, the THUDM
  ``query_key_value``, not interleaved) or ``attn_q`` / ``attn_k`` / ``attn_v``; ``ffn_up`` is the
  fused gate | up projection (``dense_h_to_4h`` / ``gate_up_proj``, silu on the first half).
- ``glm4``: GLM-4-0414 (transformers ``glm4``), the same plus the sandwich norms
  ``blk.N.post_attention_norm`` (after attention) and ``blk.N.post_ffw_norm`` (after the MLP).
  GLM-OCR files add NextN/MTP layers past the main ones; llama.cpp skips them, and so does glmrt.

Both run RoPE in ggml's NORM mode (rotating pairs of adjacent values, GLM's interleaved layout) on
the first ``rope.dimension_count`` dims of each head, so the converter stores q/k rows as the
checkpoint has them: no permutation to undo. RMSNorm eps, RoPE base and rotated dims come from the
metadata. It also has ``glm4moe`` (GLM-4.5 / 4.6 / 4.7, mixture of experts) and ``glm-dsa``
(GLM-5): glmrt refuses them by name. ChatGLM-6B and GLM-130B have no llama.cpp converter.

This module maps the metadata onto GLMConfig and the GGUF tensor names onto glmrt's canonical
parameters; reading the file is glmrt.gguf_checkpoint's job.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..config import GLMConfig
from ..errors import CheckpointError, UnsupportedModelError
from .common import WeightMap, concat_rows

SUPPORTED_ARCHS = ("chatglm", "glm4")
# Architectures llama.cpp writes for other GLM models, and why glmrt does not run them.
REFUSED_ARCHS = {
    "glm4moe": "GLM-4.5 / GLM-4.6 / GLM-4.7 (mixture-of-experts layers, NeoX RoPE, q/k norms)",
    "glm-dsa": "GLM-5 (DeepSeek-style sparse attention and mixture-of-experts layers)",
}
# ggml's RoPE modes per architecture are fixed in llama.cpp (llama_model_rope_type): NORM for both.
ROPE_MODE = {"chatglm": "norm", "glm4": "norm"}

# The names llama.cpp gives these tensors (gguf.TENSOR_NAMES), spelled out so that this module does
# not need the gguf package; glmrt.gguf_checkpoint checks them against the package's table.
TOKEN_EMBD = "token_embd"
OUTPUT_NORM = "output_norm"
OUTPUT = "output"
ROPE_FREQS = "rope_freqs"
BLOCK = {
    "attn_norm": "blk.{i}.attn_norm",
    "attn_qkv": "blk.{i}.attn_qkv",
    "attn_q": "blk.{i}.attn_q",
    "attn_k": "blk.{i}.attn_k",
    "attn_v": "blk.{i}.attn_v",
    "attn_output": "blk.{i}.attn_output",
    "attn_post_norm": "blk.{i}.post_attention_norm",
    "ffn_norm": "blk.{i}.ffn_norm",
    "ffn_up": "blk.{i}.ffn_up",
    "ffn_down": "blk.{i}.ffn_down",
    "ffn_post_norm": "blk.{i}.post_ffw_norm",
}


def check_architecture(arch: Any, where: str) -> str:
    if not isinstance(arch, str) or not arch:
        raise CheckpointError(f"{where} has no general.architecture: it is not a model file llama.cpp wrote "
                              "(re-convert it with llama.cpp's convert_hf_to_gguf.py)")
    if arch in REFUSED_ARCHS:
        raise UnsupportedModelError(f"{where} is a {arch!r} GGUF, i.e. {REFUSED_ARCHS[arch]}: glmrt does not run "
                                    f"this model; it runs the GGUF architectures {', '.join(SUPPORTED_ARCHS)} "
                                    "(ChatGLM3-6B, GLM-4-9B, GLM-4-0414)")
    if arch not in SUPPORTED_ARCHS:
        raise UnsupportedModelError(f"{where} is a {arch!r} GGUF: glmrt runs GLM-family models only, the GGUF "
                                    f"architectures {', '.join(SUPPORTED_ARCHS)} (ChatGLM3-6B, GLM-4-9B, "
                                    "GLM-4-0414)")
    return arch


def _key(meta: Mapping[str, Any], arch: str, key: str, where: str, default: Any = KeyError) -> Any:
    name = f"{arch}.{key}"
    if name in meta:
        return meta[name]
    if default is KeyError:
        raise CheckpointError(f"{where} lacks the metadata key {name}: the file is incomplete or was not written "
                              "by llama.cpp's converter; re-convert it")
    return default


def _positive_int(value: Any, name: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CheckpointError(f"{where}: metadata {name} = {value!r} is not a positive integer; the file is damaged")
    return value


def config_from_metadata(meta: Mapping[str, Any], *, vocab_size: int, has_output: bool, qkv_bias: bool,
                         torch_dtype: str, generation: str, eos_token_ids: tuple[int, ...], pad_token_id: int,
                         gmask_token_id: int | None, sop_token_id: int | None, where: str) -> GLMConfig:
    """GLMConfig of a GGUF file of architecture ``general.architecture``. What the metadata cannot
    say (the vocabulary size, whether there is an LM head and q/k/v biases, the dtype, the special
    ids) the caller reads from the tensors and the vocabulary."""
    arch = check_architecture(meta.get("general.architecture"), where)
    hidden = _positive_int(_key(meta, arch, "embedding_length", where), f"{arch}.embedding_length", where)
    heads = _positive_int(_key(meta, arch, "attention.head_count", where), f"{arch}.attention.head_count", where)
    kv_heads = _positive_int(_key(meta, arch, "attention.head_count_kv", where, heads),
                             f"{arch}.attention.head_count_kv", where)
    head_dim = _key(meta, arch, "attention.key_length", where, None)
    if head_dim is None:
        if hidden % heads:
            raise CheckpointError(f"{where}: {arch}.embedding_length {hidden} is not a multiple of "
                                  f"{arch}.attention.head_count {heads}, and no {arch}.attention.key_length says the "
                                  "head size; the metadata is damaged")
        head_dim = hidden // heads
    head_dim = _positive_int(head_dim, f"{arch}.attention.key_length", where)
    value_dim = _key(meta, arch, "attention.value_length", where, head_dim)
    if value_dim != head_dim:
        raise CheckpointError(f"{where}: key length {head_dim} and value length {value_dim} differ; no GLM model "
                              "does that and glmrt does not run it")
    if heads % kv_heads:
        raise CheckpointError(f"{where}: {arch}.attention.head_count {heads} is not a multiple of "
                              f"{arch}.attention.head_count_kv {kv_heads}; the metadata is damaged")
    layers = _positive_int(_key(meta, arch, "block_count", where), f"{arch}.block_count", where)
    nextn = _key(meta, arch, "nextn_predict_layers", where, 0)
    if nextn:
        if arch != "glm4" or not isinstance(nextn, int) or not 0 < nextn < layers:
            raise CheckpointError(f"{where}: {arch}.nextn_predict_layers = {nextn!r} does not fit "
                                  f"{arch}.block_count {layers}; the metadata is damaged")
        layers -= nextn  # the NextN/MTP layers come last; llama.cpp loads and skips them, glmrt skips them
    if _key(meta, arch, "rope.dimension_sections", where, None) is not None:
        raise UnsupportedModelError(f"{where} uses M-RoPE ({arch}.rope.dimension_sections): it is a GLM-4V vision "
                                    "model, which glmrt does not run")
    scaling = _key(meta, arch, "rope.scaling.type", where, "none")
    factor = _key(meta, arch, "rope.scaling.factor", where, _key(meta, arch, "rope.scale_linear", where, 1.0))
    if scaling not in ("none", "linear") or float(factor or 1.0) != 1.0:
        raise UnsupportedModelError(f"{where} asks for RoPE scaling ({arch}.rope.scaling.type = {scaling!r}, factor "
                                    f"{factor}); the GLM releases use none and glmrt does not implement it")
    rotary_dim = _positive_int(_key(meta, arch, "rope.dimension_count", where, head_dim),
                               f"{arch}.rope.dimension_count", where)
    eps = _key(meta, arch, "attention.layer_norm_rms_epsilon", where)
    return GLMConfig(
        generation=generation,
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        ffn_hidden_size=_positive_int(_key(meta, arch, "feed_forward_length", where),
                                      f"{arch}.feed_forward_length", where),
        max_positions=_positive_int(_key(meta, arch, "context_length", where), f"{arch}.context_length", where),
        norm_kind="rmsnorm",
        norm_eps=float(eps),
        norm_placement="sandwich" if arch == "glm4" else "pre",
        # ggml normalizes and multiplies by the (F32) norm weight in fp32, rounding once.
        rmsnorm_round_before_weight=False,
        final_norm=True,
        rope_kind="interleaved",  # ggml's NORM mode: pairs (x[2i], x[2i+1])
        rotary_dim=rotary_dim,
        rope_base=float(_key(meta, arch, "rope.freq_base", where, 10000.0)),
        qkv_bias=qkv_bias,
        dense_bias=False,
        mlp_bias=False,
        activation="swiglu",
        mask_kind="causal",
        tie_word_embeddings=not has_output,
        eos_token_ids=eos_token_ids,
        pad_token_id=pad_token_id,
        gmask_token_id=gmask_token_id,
        sop_token_id=sop_token_id,
        torch_dtype=torch_dtype,
        source_model_type=f"gguf:{arch}",
    )


def weight_map(cfg: GLMConfig, arch: str, names: set[str], total_blocks: int) -> WeightMap:
    """GGUF tensor name(s) of every canonical parameter. Per layer, the attention input is the fused
    ``attn_qkv`` when the file has it, else ``attn_q`` | ``attn_k`` | ``attn_v`` (rows concatenated),
    as llama.cpp's loader accepts either. ``total_blocks``: the file's block count, NextN layers
    included; tensors of blocks past ``cfg.num_layers`` are ignored (a depth cut, or NextN)."""
    ignore = [rf"{ROPE_FREQS}\.weight"]  # the converter drops it; llama.cpp's GLM graphs never read it
    ignore += [rf"blk\.{i}\..*" for i in range(cfg.num_layers, total_blocks)]
    m = WeightMap(ignore=tuple(ignore))
    m.add("embed.weight", f"{TOKEN_EMBD}.weight")
    rows = (cfg.q_size, cfg.kv_size, cfg.kv_size)
    for i in range(cfg.num_layers):
        t = {k: v.format(i=i) for k, v in BLOCK.items()}
        dst = f"layers.{i}"
        m.add(f"{dst}.attn_norm.weight", f"{t['attn_norm']}.weight")
        if f"{t['attn_qkv']}.weight" in names or f"{t['attn_q']}.weight" not in names:
            m.add(f"{dst}.attn.qkv.weight", f"{t['attn_qkv']}.weight")
            if cfg.qkv_bias:
                m.add(f"{dst}.attn.qkv.bias", f"{t['attn_qkv']}.bias")
        else:
            parts = [t["attn_q"], t["attn_k"], t["attn_v"]]
            m.add(f"{dst}.attn.qkv.weight", *(f"{p}.weight" for p in parts), combine=concat_rows, part_rows=rows)
            if cfg.qkv_bias:
                m.add(f"{dst}.attn.qkv.bias", *(f"{p}.bias" for p in parts), combine=concat_rows, part_rows=rows)
        m.add(f"{dst}.attn.dense.weight", f"{t['attn_output']}.weight")
        m.add(f"{dst}.mlp_norm.weight", f"{t['ffn_norm']}.weight")
        m.add(f"{dst}.mlp.up.weight", f"{t['ffn_up']}.weight")
        m.add(f"{dst}.mlp.down.weight", f"{t['ffn_down']}.weight")
        if arch == "glm4":
            m.add(f"{dst}.attn_out_norm.weight", f"{t['attn_post_norm']}.weight")
            m.add(f"{dst}.mlp_out_norm.weight", f"{t['ffn_post_norm']}.weight")
    m.add("final_norm.weight", f"{OUTPUT_NORM}.weight")
    if not cfg.tie_word_embeddings:
        m.add("lm_head.weight", f"{OUTPUT}.weight")
    return m


def has_qkv_bias(names: set[str]) -> bool:
    """Whether layer 0 carries q/k/v biases (ChatGLM3, GLM-4-9B and GLM-4-9B-0414 do; GLM-4-32B-0414
    does not). Every layer must then have them: the weight map asks for each."""
    return any(f"{BLOCK[k].format(i=0)}.bias" in names for k in ("attn_qkv", "attn_q", "attn_k", "attn_v"))


def is_first_generation_layout(names: set[str]) -> bool:
    """ChatGLM-6B / GLM-130B blocks: LayerNorm with biases, biased linears. No llama.cpp converter
    writes them; a file holding them was made by something else."""
    return f"{BLOCK['attn_norm'].format(i=0)}.bias" in names or f"{BLOCK['ffn_down'].format(i=0)}.bias" in names


__all__ = ["SUPPORTED_ARCHS", "REFUSED_ARCHS", "check_architecture", "config_from_metadata", "weight_map",
           "has_qkv_bias", "is_first_generation_layout"]
