"""THUDM's `model_type: chatglm` code path: ChatGLM2-6B, ChatGLM3-6B and GLM-4-9B (THUDM format).

Pre-norm RMSNorm blocks, concatenated fused QKV with bias only on QKV, SwiGLU, interleaved RoPE on
the first half of each head with base 10000 * rope_ratio, causal mask, untied output layer.
ChatGLM-6B (first generation) also says `model_type: chatglm` but is a different architecture:
it lives in models/chatglm6b.py and is told apart by its config keys.
"""

from __future__ import annotations

from ..config import GLMConfig
from ..errors import ConfigError
from .common import WeightMap, concat_rows, eos_list, quantization_bit, require

MODEL_TYPES = ("chatglm",)
NAME = "chatglm2"  # family name of this code path (ChatGLM2/3 and GLM-4-9B share it)


def is_first_generation(raw: dict) -> bool:
    """ChatGLM-6B's config has no padded_vocab_size and has 2-D position keys."""
    return "padded_vocab_size" not in raw and ("position_encoding_2d" in raw or "inner_hidden_size" in raw)


def matches(raw: dict) -> bool:
    return raw.get("model_type") == "chatglm" and not is_first_generation(raw)


def generation_name(raw: dict) -> str:
    vocab = raw.get("padded_vocab_size")
    if vocab == 151552:
        return "glm-4-9b"
    return "chatglm2"  # ChatGLM2-6B and ChatGLM3-6B configs are the same; the tokenizer tells them apart


def checkpoint_quantization(raw: dict) -> int | None:
    """chatglm2-6b-int4 / chatglm3-6b-int4 style: `quantization_bit` in config.json, and each
    quantized linear stored as `<name>.weight` int8 (INT4: two per byte, even index in the high
    nibble) plus `<name>.weight_scale` (one per output row, in the weight dtype)."""
    return quantization_bit(raw, "quantization_bit", "THUDM ChatGLM2/3 / GLM-4")


def config_from_dict(raw: dict) -> GLMConfig:
    require(raw, ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "padded_vocab_size"),
            "THUDM ChatGLM2/3 / GLM-4")
    heads = int(raw["num_attention_heads"])
    hidden = int(raw["hidden_size"])
    head_dim = int(raw.get("kv_channels") or hidden // heads)
    kv_heads = int(raw.get("multi_query_group_num", heads)) if raw.get("multi_query_attention", False) else heads
    if not raw.get("rmsnorm", True):
        raise ConfigError("THUDM chatglm config with rmsnorm=false: no released ChatGLM2/3/GLM-4 uses LayerNorm here, "
                          "and glmrt does not support it; check that the config.json belongs to this checkpoint")
    if raw.get("add_bias_linear", False):
        raise ConfigError("THUDM chatglm config with add_bias_linear=true is not a released layout and is not "
                          "supported; the releases have bias on query_key_value only")
    if not raw.get("original_rope", True):
        raise ConfigError("THUDM chatglm config with original_rope=false is not supported (no release uses it)")
    pad = raw.get("pad_token_id")
    return GLMConfig(
        generation=generation_name(raw),
        vocab_size=int(raw["padded_vocab_size"]),
        hidden_size=hidden,
        num_layers=int(raw["num_layers"]),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        ffn_hidden_size=int(raw["ffn_hidden_size"]),
        max_positions=int(raw.get("seq_length", 8192)),
        norm_kind="rmsnorm",
        norm_eps=float(raw.get("layernorm_epsilon", 1e-5)),
        norm_placement="deepnorm" if raw.get("apply_residual_connection_post_layernorm", False) else "pre",
        rmsnorm_round_before_weight=False,
        final_norm=bool(raw.get("post_layer_norm", True)),
        rope_kind="interleaved",
        rotary_dim=head_dim // 2,
        rope_base=10000.0 * float(raw.get("rope_ratio", 1.0)),
        qkv_bias=bool(raw.get("add_qkv_bias", True)),
        dense_bias=False,
        mlp_bias=False,
        activation="swiglu",
        mask_kind="causal",
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        eos_token_ids=eos_list(raw.get("eos_token_id", 2)),
        pad_token_id=int(pad if pad is not None else 0),
        # ChatGLM2/3: specials after the 64789 SentencePiece pieces; GLM-4: after 151329 ranks.
        gmask_token_id=151331 if raw["padded_vocab_size"] == 151552 else 64790,
        sop_token_id=151333 if raw["padded_vocab_size"] == 151552 else 64792,
        torch_dtype=str(raw.get("torch_dtype", "float16")),
        source_model_type="chatglm",
    )


def weight_map(cfg: GLMConfig) -> WeightMap:
    m = WeightMap(ignore=(r"transformer\.rotary_pos_emb\.inv_freq",
                          r"transformer\.encoder\.layers\.\d+\.self_attention\.rotary_emb\.inv_freq"))
    m.add("embed.weight", "transformer.embedding.word_embeddings.weight")
    for i in range(cfg.num_layers):
        src, dst = f"transformer.encoder.layers.{i}", f"layers.{i}"
        m.add(f"{dst}.attn_norm.weight", f"{src}.input_layernorm.weight")
        m.add(f"{dst}.attn.qkv.weight", f"{src}.self_attention.query_key_value.weight")
        if cfg.qkv_bias:
            m.add(f"{dst}.attn.qkv.bias", f"{src}.self_attention.query_key_value.bias")
        m.add(f"{dst}.attn.dense.weight", f"{src}.self_attention.dense.weight")
        m.add(f"{dst}.mlp_norm.weight", f"{src}.post_attention_layernorm.weight")
        m.add(f"{dst}.mlp.up.weight", f"{src}.mlp.dense_h_to_4h.weight")
        m.add(f"{dst}.mlp.down.weight", f"{src}.mlp.dense_4h_to_h.weight")
    if cfg.final_norm:
        m.add("final_norm.weight", "transformer.encoder.final_layernorm.weight")
    if not cfg.tie_word_embeddings:
        m.add("lm_head.weight", "transformer.output_layer.weight")
    return m


__all__ = ["MODEL_TYPES", "matches", "config_from_dict", "weight_map", "concat_rows"]
