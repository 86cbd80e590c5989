"""glmrt.load and glmrt.list_backends."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from . import checkpoint
from .backends import list_backends as _list_backends
from .backends import require_available
from .config import GLMConfig, dtype_name, parse_dtype
from .errors import ConfigError, UnsupportedModelError
from .graph import Graph, build_graph
from .lowering import lower
from .model import Model
from .models import config_from_dict, glm130b, preset, tokenizer_family
from .progress import Progress
from .quant import parse_format, quantize_graph, quantize_weights

SYNTHETIC_PREFIX = "synthetic:"
SYNTHETIC_SEED = 1234


def list_backends() -> list[dict]:
    """Every known backend: {"name", "available", "reason", "aliases", "verification", ...}."""
    return _list_backends()


def _cut_layers(cfg: GLMConfig, layers: int | None) -> GLMConfig:
    if layers is None:
        return cfg
    if not isinstance(layers, int) or layers < 1:
        raise ConfigError(f"layers must be a positive integer, got {layers!r}")
    if layers > cfg.num_layers:
        raise ConfigError(f"layers={layers} exceeds the model's {cfg.num_layers} layers")
    return cfg.replace(num_layers=layers)


def synthetic_weights(graph: Graph, seed: int = SYNTHETIC_SEED, progress=None) -> dict[str, torch.Tensor]:
    """Random weights with a fixed seed: N(0, 0.02) matrices, norm weights near 1, small biases.
    Deterministic for a given graph, whatever the backend."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    items = list(graph.params.items())
    for i, (name, spec) in enumerate(items):
        if spec.role == "norm_weight":
            t = 1.0 + 0.1 * torch.randn(spec.shape, generator=gen)
        elif spec.role in ("bias", "norm_bias"):
            t = 0.02 * torch.randn(spec.shape, generator=gen)
        else:
            t = 0.02 * torch.randn(spec.shape, generator=gen)
        out[name] = t.to(spec.dtype)
        if progress is not None:
            progress(i + 1, len(items))
    return out


def load(path_or_preset: str | os.PathLike, *, backend: str = "auto", dtype=None, layers: int | None = None,
         quantize: str | None = None, token_ids: dict | None = None, strict: bool = False,
         progress: bool = True) -> Model:
    """Load a checkpoint directory or a synthetic preset and lower it onto a backend.

    path_or_preset: a directory with config.json and weights, or "synthetic:<preset>" (real widths,
        random weights with a fixed seed; see glmrt.models.PRESETS).
    backend: "auto" (first available of cuda, rocm, npu, cpu), a backend name or alias.
    dtype: torch dtype or "float32" / "bfloat16" / "float16"; None keeps the checkpoint's.
    layers: keep only the first N layers (for synthetic presets, benchmarks and demos).
    quantize: "int8" or "int4" weight-only quantization on load, per output channel, or group-wise
        with "-g32" / "-g64" / "-g128" (e.g. "int4-g64").
    token_ids: GLM-130B only: special-token ids for checkpoints trained with another tokenizer than
        icetk, e.g. {"gmask": ..., "sop": ..., "eop": ..., "eos": ..., "mask": ...}.
    strict: fail if any node would fall back to the torch reference instead of a backend kernel.
    """
    want_dtype = parse_dtype(dtype)
    quant_format = parse_format(quantize)
    be = require_available(backend)
    spec = str(path_or_preset)
    files = None
    if spec.startswith(SYNTHETIC_PREFIX):
        raw = preset(spec[len(SYNTHETIC_PREFIX):])
        source = spec
    else:
        directory = Path(spec).expanduser()
        if not directory.exists():
            raise UnsupportedModelError(
                f"{spec!r} is neither a checkpoint directory nor a synthetic preset (synthetic:<name>); "
                "glmrt never downloads: give a local directory")
        if not directory.is_dir():
            raise UnsupportedModelError(f"{spec!r} is a file: pass the checkpoint directory that holds config.json")
        if not (directory / "config.json").is_file() and glm130b.is_sat_dir(directory):
            raw = glm130b.read_model_args(directory)
            files = glm130b.SATShards(directory, raw.get("model_parallel_size"))
        else:
            raw = checkpoint.read_config(directory)
        source = str(directory)
    if token_ids:
        if raw.get("model_type") != "glm-130b":
            raise ConfigError("token_ids overrides GLM-130B's special-token ids only; other generations read them "
                              "from config.json")
        unknown = set(token_ids) - set(glm130b.ICETK_TOKEN_IDS)
        if unknown:
            raise ConfigError(f"unknown token_ids keys {sorted(unknown)}: use {sorted(glm130b.ICETK_TOKEN_IDS)}")
        raw = dict(raw, token_ids=dict(token_ids))
    generation, cfg = config_from_dict(raw)
    cfg = _cut_layers(cfg, layers)
    dtype_ = want_dtype or cfg.dtype
    if dtype_ not in be.capabilities().dtypes:
        raise ConfigError(f"backend {be.name!r} does not run {dtype_name(dtype_)}; it supports "
                          f"{', '.join(dtype_name(d) for d in be.capabilities().dtypes)}")
    graph = build_graph(cfg, dtype_)

    bar = Progress(f"loading {source}", len(graph.params), enabled=progress)
    try:
        if not spec.startswith(SYNTHETIC_PREFIX):
            if files is None:
                files = checkpoint.WeightFiles(directory)
            expected = {name: (p.shape, p.dtype) for name, p in graph.params.items()}
            wmap = generation.weight_map(cfg)
            if layers is not None:  # a depth-cut load drops the checkpoint's deeper layers on purpose
                wmap.ignore = wmap.ignore + tuple(
                    rf".*layers\.{i}\..*" for i in range(layers, int(raw.get("num_layers") or
                                                                      raw.get("num_hidden_layers") or layers)))
            weights = checkpoint.load_weights(files, wmap, expected, progress=bar)
        else:
            weights = synthetic_weights(graph, progress=bar)
    finally:
        bar.close()
    if quant_format is not None:
        quantized = quantize_graph(graph, *quant_format)
        weights = quantize_weights(graph, quantized, weights)
        graph = quantized
    device = be.device()
    weights = {name: t.to(device) for name, t in weights.items()}
    plan = lower(graph, be, weights, strict=strict)
    model = Model(cfg, graph, plan, weights, source)
    if not spec.startswith(SYNTHETIC_PREFIX):
        family = tokenizer_family(cfg, directory)
        if family is not None:
            from .tokenizer import load_tokenizer
            model.tokenizer = load_tokenizer(directory, family)
            model.chat_family = family
    return model
