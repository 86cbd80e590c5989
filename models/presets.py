"""Full-size configs of the released models, in each release's own config.json format.

`glmrt.load("synthetic:<name>", layers=N)` builds one of these with random weights, so the main
job, benchmarks and demos need no download. The dicts are what the release ships (trimmed to the
keys glmrt reads), so they go through the same config mapping as a real checkpoint.
"""

from __future__ import annotations

_CHATGLM2 = {
    "model_type": "chatglm", "architectures": ["ChatGLMModel"],
    "num_layers": 28, "hidden_size": 4096, "ffn_hidden_size": 13696, "kv_channels": 128,
    "num_attention_heads": 32, "multi_query_attention": True, "multi_query_group_num": 2,
    "padded_vocab_size": 65024, "layernorm_epsilon": 1e-05, "rmsnorm": True,
    "apply_residual_connection_post_layernorm": False, "post_layer_norm": True,
    "add_bias_linear": False, "add_qkv_bias": True, "original_rope": True,
    "seq_length": 32768, "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "float16",
}

PRESETS: dict[str, dict] = {
    "chatglm2-6b": dict(_CHATGLM2),
    "chatglm3-6b": dict(_CHATGLM2, seq_length=8192),
    "glm-4-9b": dict(_CHATGLM2, num_layers=40, padded_vocab_size=151552, layernorm_epsilon=1.5625e-07,
                     rope_ratio=500, seq_length=131072, eos_token_id=[151329, 151336, 151338],
                     pad_token_id=151329, torch_dtype="bfloat16"),
    "glm-4-9b-chat-1m": dict(_CHATGLM2, num_layers=40, padded_vocab_size=151552, layernorm_epsilon=1.5625e-07,
                             multi_query_group_num=4, rope_ratio=10000, seq_length=1048576,
                             eos_token_id=[151329, 151336, 151338], pad_token_id=151329, torch_dtype="bfloat16"),
    # transformers' conversion of glm-4-9b-chat: rope_theta 10000 is what the released HF config says.
    "glm-4-9b-hf": {
        "model_type": "glm", "architectures": ["GlmForCausalLM"], "hidden_size": 4096, "num_hidden_layers": 40,
        "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 128, "intermediate_size": 13696,
        "vocab_size": 151552, "rms_norm_eps": 1.5625e-07, "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
        "attention_bias": True, "max_position_embeddings": 131072, "tie_word_embeddings": False,
        "eos_token_id": [151329, 151336, 151338], "pad_token_id": 151329, "torch_dtype": "bfloat16",
    },
    "glm-4-9b-0414": {
        "model_type": "glm4", "architectures": ["Glm4ForCausalLM"], "hidden_size": 4096, "num_hidden_layers": 40,
        "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 128, "intermediate_size": 13696,
        "vocab_size": 151552, "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
        "attention_bias": True, "max_position_embeddings": 32768, "tie_word_embeddings": False,
        "eos_token_id": [151329, 151336, 151338], "pad_token_id": 151329, "torch_dtype": "bfloat16",
    },
    # Widths of GLM-4-32B-0414 are from derived copies (unconfirmed against the release).
    "glm-4-32b-0414": {
        "model_type": "glm4", "architectures": ["Glm4ForCausalLM"], "hidden_size": 6144, "num_hidden_layers": 61,
        "num_attention_heads": 48, "num_key_value_heads": 2, "head_dim": 128, "intermediate_size": 23040,
        "vocab_size": 151552, "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
        "attention_bias": False, "max_position_embeddings": 32768, "tie_word_embeddings": False,
        "eos_token_id": [151329, 151336, 151338], "pad_token_id": 151329, "torch_dtype": "bfloat16",
    },
}

PRESETS["chatglm-6b"] = {
    "model_type": "chatglm", "architectures": ["ChatGLMModel"], "vocab_size": 130528, "hidden_size": 4096,
    "num_layers": 28, "num_attention_heads": 32, "inner_hidden_size": 16384, "layernorm_epsilon": 1e-05,
    "max_sequence_length": 2048, "position_encoding_2d": True, "bos_token_id": 130004, "eos_token_id": 130005,
    "mask_token_id": 130000, "gmask_token_id": 130001, "pad_token_id": 3, "torch_dtype": "float16",
}
# GLM-130B's configs/model_glm_130b.sh, as parsed by models.glm130b.parse_model_args.
PRESETS["glm-130b"] = {
    "model_type": "glm-130b", "num_layers": 70, "hidden_size": 12288, "inner_hidden_size": 32768,
    "vocab_size": 150528, "num_attention_heads": 96, "max_sequence_length": 2048, "model_parallel_size": 8,
    "fp16": True,
}
