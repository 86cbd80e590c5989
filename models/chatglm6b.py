"""ChatGLM-6B (first generation, THUDM `model_type: chatglm` with 2-D position keys).

DeepNorm blocks (residual = normalized input * sqrt(2 * 28); the 28 is hard-coded in the
original GLMBlock, whatever num_layers says), LayerNorm with bias, per-head interleaved fused QKV
with bias, 2-D RoPE (dims 0-63 by position, 64-127 by block position, NeoX pairing within each
half, fp16 tables), layer-scaled attention with fp32 softmax and -10000 masking, a bidirectional
prefix up to `<sop>`, GELU (tanh) MLP with biases, separate `lm_head.weight`.
"""

from __future__ import annotations

import math

import torch

from ..config import GLMConfig
from ..errors import ConfigError
from .common import WeightMap, eos_list, quantization_bit, require

MODEL_TYPES = ("chatglm",)
RESIDUAL_ALPHA = math.sqrt(2 * 28)


def matches(raw: dict) -> bool:
    from .chatglm import is_first_generation
    return raw.get("model_type") == "chatglm" and is_first_generation(raw)


def checkpoint_quantization(raw: dict) -> int | None:
    """chatglm-6b-int4 / -int8 style: `quantization_bit` in config.json, `<name>.weight` int8 (INT4
    packed, even index in the high nibble) plus `<name>.weight_scale` in fp16, one per output row.
    The `-qe` variants also quantize the embedding and LM head (`quantization_embeddings`)."""
    if raw.get("quantization_embeddings"):
        raise ConfigError("this ChatGLM-6B checkpoint has quantized embeddings (quantization_embeddings: true, the "
                          "chatglm-6b-int4-qe layout): glmrt loads quantized linears only; use chatglm-6b-int4 or the "
                          "FP16 chatglm-6b with quantize='int4'")
    return quantization_bit(raw, "quantization_bit", "ChatGLM-6B")


def config_from_dict(raw: dict) -> GLMConfig:
    require(raw, ("num_layers", "hidden_size", "num_attention_heads", "vocab_size"), "ChatGLM-6B")
    hidden, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
    head_dim = hidden // heads
    pad = raw.get("pad_token_id")
    return GLMConfig(
        generation="chatglm-6b",
        vocab_size=int(raw["vocab_size"]),
        hidden_size=hidden,
        num_layers=int(raw["num_layers"]),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=head_dim,
        ffn_hidden_size=int(raw.get("inner_hidden_size") or 4 * hidden),
        max_positions=int(raw.get("max_sequence_length", 2048)),
        norm_kind="layernorm",
        norm_eps=float(raw.get("layernorm_epsilon", 1e-5)),
        norm_placement="deepnorm",
        residual_alpha=RESIDUAL_ALPHA,
        rope_kind="2d" if raw.get("position_encoding_2d", True) else "half",
        rotary_dim=head_dim,
        rope_base=10000.0,
        rope_table_dtype="float16",
        qkv_bias=True, dense_bias=True, mlp_bias=True,
        activation="gelu_tanh",
        mask_kind="prefix",
        attention_scaling="layer_scaled",
        tie_word_embeddings=False,
        eos_token_ids=eos_list(raw.get("eos_token_id", 130005)),
        pad_token_id=int(pad if pad is not None else 3),
        gmask_token_id=int(raw.get("gmask_token_id", 130001)),
        mask_token_id=int(raw.get("mask_token_id", 130000)),
        sop_token_id=int(raw.get("bos_token_id", 130004)),
        torch_dtype=str(raw.get("torch_dtype", "float16")),
        source_model_type="chatglm",
    )


class DeinterleaveQKV:
    """Per-head [q_h | k_h | v_h] rows -> [all q | all k | all v] (glmrt's canonical layout).
    Works for weights (rows, in) and biases (rows,), and for row-wise scales of quantized weights.
    Heads are consecutive rows, so the rows of heads [h0, h1) are one contiguous slice of the
    stored tensor, which DeinterleaveQKV(h1 - h0, head_dim) turns into those heads' q | k | v (what
    a tensor-parallel rank reads: glmrt.checkpoint)."""

    def __init__(self, num_heads: int, head_dim: int):
        self.num_heads, self.head_dim = num_heads, head_dim

    def __call__(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        t = tensors[0]
        rest = t.shape[1:]
        per_head = t.reshape(self.num_heads, 3, self.head_dim, *rest)  # (nh, 3, hd, ...)
        return per_head.transpose(0, 1).reshape(3 * self.num_heads * self.head_dim, *rest)


def deinterleave_qkv(num_heads: int, head_dim: int) -> DeinterleaveQKV:
    return DeinterleaveQKV(num_heads, head_dim)


def weight_map(cfg: GLMConfig) -> WeightMap:
    m = WeightMap(ignore=(r"transformer\.layers\.\d+\.attention\.rotary_emb\.inv_freq",))
    m.add("embed.weight", "transformer.word_embeddings.weight")
    qkv = deinterleave_qkv(cfg.num_heads, cfg.head_dim)
    for i in range(cfg.num_layers):
        src, dst = f"transformer.layers.{i}", f"layers.{i}"
        for part in ("weight", "bias"):
            m.add(f"{dst}.attn_norm.{part}", f"{src}.input_layernorm.{part}")
            m.add(f"{dst}.attn.qkv.{part}", f"{src}.attention.query_key_value.{part}", combine=qkv)
            m.add(f"{dst}.attn.dense.{part}", f"{src}.attention.dense.{part}")
            m.add(f"{dst}.mlp_norm.{part}", f"{src}.post_attention_layernorm.{part}")
            m.add(f"{dst}.mlp.up.{part}", f"{src}.mlp.dense_h_to_4h.{part}")
            m.add(f"{dst}.mlp.down.{part}", f"{src}.mlp.dense_4h_to_h.{part}")
    m.add("final_norm.weight", "transformer.final_layernorm.weight")
    m.add("final_norm.bias", "transformer.final_layernorm.bias")
    m.add("lm_head.weight", "lm_head.weight")
    return m
