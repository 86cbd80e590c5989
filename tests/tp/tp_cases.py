"""Tiny configs of every GLM generation, in each release's own config format, for the
tensor-parallel tests: 8 heads and an MLP width that 2, 4 and 8 ranks divide, a vocabulary (300)
that they do not (so the vocab-parallel embedding and head pad their last rank)."""

from __future__ import annotations

SPECIAL = {"mask": 290, "gmask": 291, "smask": 292, "sop": 294, "eop": 295, "eos": 296}

CASES: dict[str, dict] = {
    # GLM-130B: DeepNorm, GeGLU, tied head, per-head interleaved qkv in its checkpoints, prefix mask.
    "glm-130b": {"model_type": "glm-130b", "num_layers": 2, "hidden_size": 64, "inner_hidden_size": 128,
                 "vocab_size": 300, "num_attention_heads": 8, "max_sequence_length": 64, "token_ids": SPECIAL},
    # ChatGLM-6B: 2-D RoPE, prefix mask, GELU, DeepNorm.
    "chatglm-6b": {"model_type": "chatglm", "vocab_size": 300, "hidden_size": 64, "num_layers": 2,
                   "num_attention_heads": 8, "inner_hidden_size": 128, "layernorm_epsilon": 1e-05,
                   "max_sequence_length": 64, "position_encoding_2d": True, "bos_token_id": 294,
                   "eos_token_id": 295, "mask_token_id": 290, "gmask_token_id": 291, "pad_token_id": 3},
    # ChatGLM2/3 (and GLM-4-9B's THUDM code): 2 KV groups, so tp 4 and 8 replicate them.
    "chatglm2": {"model_type": "chatglm", "num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 128,
                 "kv_channels": 8, "num_attention_heads": 8, "multi_query_attention": True,
                 "multi_query_group_num": 2, "padded_vocab_size": 300, "layernorm_epsilon": 1e-05,
                 "rmsnorm": True, "apply_residual_connection_post_layernorm": False, "post_layer_norm": True,
                 "add_bias_linear": False, "add_qkv_bias": True, "original_rope": True, "seq_length": 64,
                 "eos_token_id": 2, "pad_token_id": 0},
    # transformers' glm (GLM-4-9B-hf) and glm4 (GLM-4-0414, sandwich norms).
    "glm": {"model_type": "glm", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 8,
            "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 128, "vocab_size": 300,
            "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "partial_rotary_factor": 0.5, "attention_bias": True,
            "max_position_embeddings": 64, "tie_word_embeddings": False, "eos_token_id": 2, "pad_token_id": 0},
    "glm4-0414": {"model_type": "glm4", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 8,
                  "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 128, "vocab_size": 300,
                  "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                  "attention_bias": True, "max_position_embeddings": 64, "tie_word_embeddings": False,
                  "eos_token_id": 2, "pad_token_id": 0},
}

# The tiny SAT checkpoints of tests/models/test_glm130b_parity.py (vocabulary 200) use these.
SAT_SPECIAL = {"mask": 190, "gmask": 191, "smask": 192, "sop": 194, "eop": 195, "eos": 196}

NEW_TOKENS = 17  # one prefill + 16 cached decode steps feed the sampler


def register() -> None:
    """Make every case loadable as glmrt.load("synthetic:tp-<name>")."""
    from glmrt.models import presets
    for name, raw in CASES.items():
        presets.PRESETS[f"tp-{name}"] = dict(raw)


def load_kwargs(name: str) -> dict:
    """Extra glmrt.load arguments of a case's checkpoint directory (GLM-130B's tiny special ids)."""
    return {"token_ids": SPECIAL} if name == "glm-130b" else {"token_ids": SAT_SPECIAL} if name == "sat" else {}


def prompts(name: str) -> tuple[list[list[int]], list[list[int]]]:
    """(input_ids, attention_mask) of a left-padded batch of two prompts for the case."""
    a, b = [5, 17, 42, 7, 99, 12, 250], [8, 3, 61]
    if name in ("glm-130b", "chatglm-6b", "sat", "c6"):  # text + [gMASK] + <sop>
        # "sat", "c6": the tiny checkpoints of tests/models (vocabulary 200, [gMASK] 191, <sop> 194)
        gmask, sop = {"glm-130b": (SPECIAL["gmask"], SPECIAL["sop"]), "chatglm-6b": (291, 294),
                      "sat": (SAT_SPECIAL["gmask"], SAT_SPECIAL["sop"]), "c6": (191, 194)}[name]
        a = [t % 180 for t in a]
        a, b = a + [gmask, sop], b + [gmask, sop]
    pad = len(a) - len(b)
    return [a, [0] * pad + b], [[1] * len(a), [0] * pad + [1] * len(b)]


def run(model, name: str) -> dict:
    """What the tests compare: full-forward logits, the logits the sampler saw at every generation
    step (prefill, then cached decode steps), the greedy tokens, and the collectives per step."""
    import torch
    import glmrt.model as gm

    ids, mask = prompts(name)
    out = {"logits": model.logits(ids, attention_mask=mask)}
    seen, counts = [], []
    real = gm.next_tokens

    def spy(logits, *args, **kwargs):
        seen.append(logits.detach().float().clone())
        if model.comm is not None:
            counts.append(dict(model.comm.counts))
        return real(logits, *args, **kwargs)

    gm.next_tokens = spy
    try:
        out["tokens"] = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, eos_token_id=[])
    finally:
        gm.next_tokens = real
    out["step_logits"] = torch.stack(seen)
    out["counts"] = counts
    return out
