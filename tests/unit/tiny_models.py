"""Tiny checkpoints for the unit tests: a config.json and random weights written under the
release's tensor names through the generation's own name map (glmrt.models), so any config the
mappings read can be written. Not a test module: the tests import it."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from glmrt.api import synthetic_weights
from glmrt.graph import build_graph
from glmrt.models import config_from_dict

TINY_GLM4 = {"model_type": "glm4", "vocab_size": 300, "hidden_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 96,
             "max_position_embeddings": 256, "eos_token_id": [299], "pad_token_id": 0, "torch_dtype": "float32"}


def thudm_config(vocab: int, eos, layers: int = 1) -> dict:
    """A ChatGLM2/3 / GLM-4-9B (THUDM format) config.json of tiny widths."""
    return {"model_type": "chatglm", "architectures": ["ChatGLMModel"], "num_layers": layers, "hidden_size": 32,
            "ffn_hidden_size": 48, "kv_channels": 8, "num_attention_heads": 4, "multi_query_attention": True,
            "multi_query_group_num": 2, "padded_vocab_size": vocab, "layernorm_epsilon": 1e-5, "rmsnorm": True,
            "add_qkv_bias": True, "seq_length": 512, "eos_token_id": eos, "pad_token_id": 0,
            "torch_dtype": "float32"}


def write_checkpoint(directory: Path, raw: dict, seed: int = 7, scale: float = 1.0) -> Path:
    """config.json + model.safetensors. ``scale`` multiplies every matrix and bias (not the norm
    weights): glmrt's N(0, 0.02) synthetic weights give near-uniform logits, a larger scale gives
    logits that depend on the context."""
    directory = Path(directory)
    (directory / "config.json").write_text(json.dumps(raw))
    generation, cfg = config_from_dict(dict(raw))
    graph = build_graph(cfg)
    weights = synthetic_weights(graph, seed=seed)
    if scale != 1.0:
        for name, spec in graph.params.items():
            if spec.role != "norm_weight":
                weights[name] = weights[name] * scale
    tensors = {}
    for canonical, src in generation.weight_map(cfg).sources.items():
        parts = weights[canonical].split(list(src.part_rows)) if src.part_rows else [weights[canonical]]
        tensors.update({name: part.contiguous() for name, part in zip(src.names, parts)})
    save_file(tensors, str(directory / "model.safetensors"))
    return directory
