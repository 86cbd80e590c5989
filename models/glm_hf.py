"""The transformers package's `glm` (GLM-4-9B-hf) and `glm4` (GLM-4-0414) formats.

Same architecture as THUDM's GLM-4-9B code with separate q/k/v projections (bias on all three)
and `gate_up_proj`; `glm4` adds the sandwich norms after attention and after the MLP.
transformers' RMSNorm rounds the normalized value before the weight multiply.
"""

from __future__ import annotations

from ..config import GLMConfig
from .common import WeightMap, concat_rows, eos_list, require

MODEL_TYPES = ("glm", "glm4")


def matches(raw: dict) -> bool:
    return raw.get("model_type") in MODEL_TYPES


def _rope(raw: dict) -> tuple[float, float]:
    """(rope_theta, partial_rotary_factor) from either the v4 (top-level) or v5 (rope_parameters)
    layout of the config."""
    params = raw.get("rope_parameters") or {}
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    factor = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 0.5))
    rope_type = params.get("rope_type", (raw.get("rope_scaling") or {}).get("rope_type", "default"))
    if rope_type not in ("default", None):
        from ..errors import ConfigError
        raise ConfigError(f"rope_type {rope_type!r} is not supported: glmrt implements the default RoPE of the "
                          "released GLM-4 models")
    return float(theta), float(factor)


def config_from_dict(raw: dict) -> GLMConfig:
    kind = raw["model_type"]
    require(raw, ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"),
            f"transformers {kind}")
    heads = int(raw["num_attention_heads"])
    hidden = int(raw["hidden_size"])
    head_dim = int(raw.get("head_dim") or hidden // heads)
    theta, factor = _rope(raw)
    pad = raw.get("pad_token_id")
    return GLMConfig(
        generation="glm4-0414" if kind == "glm4" else "glm-4-9b-hf",
        vocab_size=int(raw["vocab_size"]),
        hidden_size=hidden,
        num_layers=int(raw["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        ffn_hidden_size=int(raw["intermediate_size"]),
        max_positions=int(raw.get("max_position_embeddings", 131072)),
        norm_kind="rmsnorm",
        norm_eps=float(raw.get("rms_norm_eps", 1.5625e-07)),
        norm_placement="sandwich" if kind == "glm4" else "pre",
        rmsnorm_round_before_weight=True,
        rope_kind="interleaved",
        rotary_dim=int(head_dim * factor),
        rope_base=theta,
        qkv_bias=bool(raw.get("attention_bias", True)),
        activation="swiglu",
        mask_kind="causal",
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        eos_token_ids=eos_list(raw.get("eos_token_id")),
        pad_token_id=int(pad if pad is not None else 0),
        gmask_token_id=151331 if int(raw["vocab_size"]) == 151552 else None,
        sop_token_id=151333 if int(raw["vocab_size"]) == 151552 else None,
        torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"),
        source_model_type=kind,
    )


def weight_map(cfg: GLMConfig) -> WeightMap:
    m = WeightMap(ignore=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",))
    m.add("embed.weight", "model.embed_tokens.weight")
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}", f"layers.{i}"
        m.add(f"{dst}.attn_norm.weight", f"{src}.input_layernorm.weight")
        rows = (cfg.q_size, cfg.kv_size, cfg.kv_size)
        m.add(f"{dst}.attn.qkv.weight", *(f"{src}.self_attn.{p}_proj.weight" for p in "qkv"), combine=concat_rows,
              part_rows=rows)
        if cfg.qkv_bias:
            m.add(f"{dst}.attn.qkv.bias", *(f"{src}.self_attn.{p}_proj.bias" for p in "qkv"), combine=concat_rows,
                  part_rows=rows)
        m.add(f"{dst}.attn.dense.weight", f"{src}.self_attn.o_proj.weight")
        m.add(f"{dst}.mlp_norm.weight", f"{src}.post_attention_layernorm.weight")
        m.add(f"{dst}.mlp.up.weight", f"{src}.mlp.gate_up_proj.weight")
        m.add(f"{dst}.mlp.down.weight", f"{src}.mlp.down_proj.weight")
        if cfg.norm_placement == "sandwich":
            m.add(f"{dst}.attn_out_norm.weight", f"{src}.post_self_attn_layernorm.weight")
            m.add(f"{dst}.mlp_out_norm.weight", f"{src}.post_mlp_layernorm.weight")
    m.add("final_norm.weight", "model.norm.weight")
    if cfg.tie_word_embeddings:
        m.ignore = m.ignore + (r"lm_head\.weight",)  # tied: transformers may still save a copy
    else:
        m.add("lm_head.weight", "lm_head.weight")
    return m
