"""glmrt.load and glmrt.list_backends."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import torch

from . import checkpoint, gguf_checkpoint
from .backends import list_backends as _list_backends
from .backends import get_backend, require_available
from .config import GLMConfig, dtype_name, parse_dtype
from .errors import BackendError, CheckpointError, ConfigError, UnsupportedModelError
from .fusion import backend_accepts, fuse_residual_norm
from .graph import Graph, build_graph
from .lowering import KERNEL_CHOICES, Plan, lower
from .model import Model
from .models import config_from_dict, glm130b, preset, tokenizer_family
from .models.common import WeightMap
from .progress import Progress
from .quant import (FORMAT_KEY, QuantizeOnLoad, QuantSpec, layout_from_entry, parse_format, quantizable_linears,
                    quantize_graph, quantize_graph_layout)
from .shard import check_quantization, param_shards, shard_graph, tp_layout

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


# A half-precision tensor larger than this many elements is drawn in row blocks of about this size,
# so its float32 draw is never whole (ChatGLM-6B's 130528-row LM head is 2.1 GB in float32).
SYNTHETIC_BLOCK = 1 << 26


def synthetic_weights(graph: Graph, seed: int = SYNTHETIC_SEED, progress=None, place=None,
                      shards: dict | None = None) -> dict[str, torch.Tensor]:
    """Random weights with a fixed seed: N(0, 0.02) matrices, norm weights near 1, small biases.
    Deterministic for a given graph, whatever the backend. ``shards`` (glmrt.shard.param_shards):
    keep only a tensor-parallel rank's part of each tensor, as soon as it is drawn. ``place(name,
    tensor)`` -> {name: tensor} takes each tensor (or that part) as it is generated (as in
    checkpoint.load_weights: quantize on load)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    items = list(graph.params.items())
    for i, (name, spec) in enumerate(items):
        t = _synthetic_tensor(spec, gen)
        if shards is not None:
            t = shards[name].take(t)
        if place is None:
            out[name] = t
        else:
            out.update(place(name, t))
        del t
        if progress is not None:
            progress(i + 1, len(items))
    return out


def _synthetic_tensor(spec, gen: torch.Generator) -> torch.Tensor:
    def draw(shape):
        # In place: no second fp32 copy of each tensor (the GLM-130B embedding alone is 7.4 GB in fp32).
        t = torch.randn(shape, generator=gen)
        if spec.role == "norm_weight":
            return t.mul_(0.1).add_(1.0)
        return t.mul_(0.02)  # matrices, biases and norm biases

    shape = tuple(spec.shape)
    row = math.prod(shape[1:]) if len(shape) > 1 else 0
    # torch's CPU randn fills blocks of 16 values, so row blocks of a multiple of 16 values draw
    # exactly the numbers one call would (tests/models/test_quantize_on_load.py checks it).
    if spec.dtype == torch.float32 or not row or row % 16 or math.prod(shape) <= SYNTHETIC_BLOCK:
        return draw(shape).to(spec.dtype)
    out = torch.empty(shape, dtype=spec.dtype)
    rows = max(1, SYNTHETIC_BLOCK // row)
    for start in range(0, shape[0], rows):
        stop = min(start + rows, shape[0])
        out[start:stop].copy_(draw((stop - start, *shape[1:])))
    return out


@dataclasses.dataclass
class Prepared:
    """Everything glmrt.load builds before lowering: the source's raw config (its own format), the
    typed config, the (possibly quantized) graph and its weights on the CPU."""

    source: str
    raw: dict
    cfg: GLMConfig
    graph: Graph
    weights: dict[str, torch.Tensor]
    directory: Path | None  # None for a synthetic preset (and a GGUF file, which carries its tokenizer)
    generation: object
    tokenizer: object = None  # a tokenizer read from the weights file itself (GGUF), with its chat family
    chat_family: str | None = None


def load(path_or_preset: str | os.PathLike, *, backend: str = "auto", dtype=None, layers: int | None = None,
         quantize: str | None = None, token_ids: dict | None = None, strict: bool = False,
         kernels: str = "auto", progress: bool = True, fuse: bool = True, tensor_parallel: int | None = None,
         distributed_timeout: float = 300.0) -> Model:
    """Load a checkpoint directory or a synthetic preset and lower it onto a backend.

    path_or_preset: a directory with config.json and weights, "synthetic:<preset>" (real widths,
        random weights with a fixed seed; see glmrt.models.PRESETS). Quantized checkpoints load as
        they are: `glmrt quantize` output, the released ChatGLM int4/int8 checkpoints
        (`quantization_bit` in config.json) and GLM-130B rank files quantized by its scripts.
        A `.gguf` file (or a directory holding one) loads too (glmrt.gguf_checkpoint): Q8_0 / Q4_0
        as INT8 / INT4 in groups of 32 exactly; k-quants only with `quantize` (re-quantized, lossy).
    backend: "auto" (first available of cuda, rocm, npu, cpu), a backend name or alias.
    dtype: torch dtype or "float32" / "bfloat16" / "float16"; None keeps the checkpoint's.
    layers: keep only the first N layers (for synthetic presets, benchmarks and demos).
    quantize: "int8" or "int4" weight-only quantization on load, per output channel, or group-wise
        with "-g32" / "-g64" / "-g128" (e.g. "int4-g64"). For an already quantized checkpoint it may
        only name the checkpoint's own format (or be None).
    token_ids: GLM-130B only: special-token ids for checkpoints trained with another tokenizer than
        icetk, e.g. {"gmask": ..., "sop": ..., "eop": ..., "eos": ..., "mask": ...}.
    strict: fail if any node would fall back to the torch reference instead of a backend kernel.
    kernels: "auto" (the backend's best kernel per node) or "reference" (every node on the plain-torch
        reference op on the backend's device: the oracle the kernels are tested against).
    fuse: apply the fusion passes (glmrt.fusion: residual + norm -> residual_norm) where the backend
        has a kernel for the fused node; the graph, and so the arithmetic, is the same whichever
        ``kernels`` is chosen. False keeps the graph as built (for comparisons and debugging).
    tensor_parallel: N to run this process as one of N tensor-parallel ranks (glmrt.shard), inside a
        process group of N processes: the one torchrun starts (`torchrun --nproc-per-node N ...`; glmrt
        initialises it from torchrun's environment with the backend's collective transport if it is not
        yet), or one the caller initialised. Every rank holds its slice of the weights and returns the
        same full logits and tokens; every rank must make the same calls.
    distributed_timeout: seconds a collective may wait for the other ranks (a rank that dies or hangs
        turns into a glmrt error), when glmrt initialises the process group.
    """
    if kernels not in KERNEL_CHOICES:  # before any weight is read
        raise ConfigError(f"kernels={kernels!r} is not one of {', '.join(KERNEL_CHOICES)}")
    from .onnx_export import is_export
    if is_export(path_or_preset):  # an ONNX export: one onnxruntime session (backend "onnxruntime[:provider]")
        from .backends.onnxruntime.session import load_export
        return load_export(path_or_preset, backend=backend, dtype=dtype, layers=layers, quantize=quantize,
                           strict=strict, kernels=kernels)
    be = require_available(backend)
    if getattr(be, "export_format", None):  # a backend that runs exported graphs only (onnxruntime)
        raise BackendError(f"backend {be.name!r} runs {be.export_format} exports, and {path_or_preset} is not one: "
                           f"glmrt export {path_or_preset} --format onnx --out DIR, then glmrt.load(DIR)")
    comm = None
    if tensor_parallel is not None:
        comm = _join_group(be, tensor_parallel, distributed_timeout)
        progress = progress and comm.rank == 0
    device = be.device()
    prep = prepare(path_or_preset, dtypes=be.capabilities().dtypes, backend_name=be.name, dtype=dtype,
                   layers=layers, quantize=quantize, token_ids=token_ids, progress=progress, device=device,
                   tensor_parallel=None if comm is None else (comm.size, comm.rank))
    weights = {name: t.to(device) for name, t in prep.weights.items()}
    graph = _fuse(prep.graph, be, fuse)
    plan = lower(graph, be, weights, strict=strict, kernels=kernels, comm=comm)
    model = Model(prep.cfg, graph, plan, weights, prep.source)
    if prep.tokenizer is not None:
        model.tokenizer, model.chat_family = prep.tokenizer, prep.chat_family
    elif prep.directory is not None:
        family = tokenizer_family(prep.cfg, prep.directory)
        if family is not None:
            from .tokenizer import load_tokenizer
            model.tokenizer = load_tokenizer(prep.directory, family)
            model.chat_family = family
    elif prep.source.startswith(SYNTHETIC_PREFIX):  # a preset: a synthetic tokenizer of its release's kind, built on first use
        import functools
        from .synthetic_tokenizer import PRESET_FAMILIES, synthetic_tokenizer
        family = PRESET_FAMILIES.get(prep.source[len(SYNTHETIC_PREFIX):])
        if family is not None:
            model._tokenizer_factory = functools.partial(synthetic_tokenizer, family)
            model.chat_family = family
    return model


def _join_group(be, size, timeout_s):
    """The communicator of this rank (glmrt.distributed); on a device backend each local rank
    takes its own device (LOCAL_RANK, as torchrun numbers them)."""
    from .distributed import init_tensor_parallel
    comm = init_tensor_parallel(size, be.capabilities().collective_backend, be.name, timeout_s)
    local = os.environ.get("LOCAL_RANK")
    dev_mod = getattr(torch, be.device_type, None) if be.device_type not in ("cpu", "") else None
    if local is not None and dev_mod is not None and hasattr(dev_mod, "set_device"):
        dev_mod.set_device(int(local))
    return comm


def plan(path_or_preset: str | os.PathLike, *, backend: str, dtype=None, layers: int | None = None,
         quantize: str | None = None, token_ids: dict | None = None, strict: bool = False,
         kernels: str = "auto", fuse: bool = True) -> Plan:
    """The plan glmrt.load would build for a model on a backend, without loading any weight and
    without needing the backend's hardware: kernel choices depend on the graph only. For porting
    (`glmrt info --backend X MODEL` on a machine without X)."""
    be = get_backend(backend)
    prep = prepare(path_or_preset, dtypes=be.capabilities().dtypes, backend_name=be.name, dtype=dtype,
                   layers=layers, quantize=quantize, token_ids=token_ids, progress=False, materialize=False)
    return lower(_fuse(prep.graph, be, fuse), be, prep.weights, strict=strict, kernels=kernels)


def _fuse(graph: Graph, backend, fuse: bool) -> Graph:
    """The fusion passes, after quantization: a pattern is fused where one of ``backend``'s kernels
    runs the fused node (elsewhere the backend keeps its kernels for the separate nodes)."""
    if not fuse:
        return graph
    return fuse_residual_norm(graph, backend_accepts(backend))


def prepare(path_or_preset: str | os.PathLike, *, dtypes=None, backend_name: str = "cpu", dtype=None,
            layers: int | None = None, quantize: str | None = None, token_ids: dict | None = None,
            progress: bool = True, materialize: bool = True, device=None,
            tensor_parallel: tuple[int, int] | None = None) -> Prepared:
    """Read config and weights and apply the quantization pass, without lowering (glmrt.load and
    `glmrt quantize` share it). ``dtypes``: the dtypes the target backend runs (None: any).
    ``materialize=False``: the weights are meta tensors of the right shapes and dtypes (nothing is
    read or generated), for planning without loading. ``device``: where each weight goes once it
    is read (and quantized); None leaves them on the CPU. ``tensor_parallel=(size, rank)``: the
    graph and weights of that rank (glmrt.shard): only the rank's slices are read, and quantized
    (when asked) after sharding, slice by slice as they are read."""
    gguf_file = gguf_checkpoint.find_gguf(path_or_preset)
    if gguf_file is not None:  # a GGUF file, or a directory holding one (glmrt.gguf_checkpoint)
        return gguf_checkpoint.prepare(gguf_file, dtypes=dtypes, backend_name=backend_name, dtype=dtype,
                                       layers=layers, quantize=quantize, token_ids=token_ids, progress=progress,
                                       materialize=materialize, device=device, tensor_parallel=tensor_parallel)
    want_dtype = parse_dtype(dtype)
    quant_format = parse_format(quantize)
    spec = str(path_or_preset)
    files = None
    directory = None
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
    glmrt_format = raw.get(FORMAT_KEY)
    generation, cfg = config_from_dict({k: v for k, v in raw.items() if k != FORMAT_KEY})
    cfg = _cut_layers(cfg, layers)
    if tensor_parallel is not None:  # refuse a size that does not divide, before reading any weight
        tp_layout(cfg, *tensor_parallel)
        if quant_format is not None:
            check_quantization(cfg, tensor_parallel[0], *quant_format)
    stored_layout, stored_dtype = (None, None)
    if glmrt_format is not None:
        stored_layout, stored_dtype = layout_from_entry(glmrt_format, f"{directory / 'config.json'}")
    dtype_ = want_dtype or (parse_dtype(stored_dtype) if stored_dtype else None) or cfg.dtype
    if dtypes is not None and dtype_ not in dtypes:
        raise ConfigError(f"backend {backend_name!r} does not run {dtype_name(dtype_)}; it supports "
                          f"{', '.join(dtype_name(d) for d in dtypes)}")
    graph = build_graph(cfg, dtype_)
    if directory is not None and files is None:
        files = checkpoint.WeightFiles(directory)

    # ---- which layout the weights are stored in: float, or quantized (and how)
    layout = None  # node name -> QuantSpec of a checkpoint that is already quantized
    if glmrt_format is not None:
        _check_shard_versions(files, glmrt_format)
        layout = {name: q for name, q in stored_layout.items() if not _beyond(name, layers)}
    elif files is not None:
        declared = getattr(generation, "checkpoint_quantization", lambda raw: None)(raw)
        has_scales = any(n.endswith(".weight_scale") for n in files.names())
        if has_scales and declared is None:
            raise CheckpointError(f"{directory} holds quantized weights (*.weight_scale tensors) but its config does "
                                  "not say their bit width (quantization_bit in config.json; "
                                  "--quantization-bit-width for GLM-130B): use the config shipped with the weights")
        if declared is not None and has_scales:
            layout = _release_layout(generation, graph, files, declared, directory)
        elif declared is not None and quant_format is None:
            quant_format = (declared, 0)  # a quantized config over FP16 weights: quantize on load, as the original
    if layout is not None and quant_format is not None:
        kinds = {(q.bits, q.group_size) for q in layout.values()}
        if kinds != {quant_format}:
            have = ", ".join(sorted({f"INT{b}" + (f" groups of {g}" if g else "") for b, g in kinds}))
            raise ConfigError(f"{source} is already quantized ({have}); quantize={quantize!r} would quantize it "
                              "again: load it with quantize=None, or quantize the FP16 checkpoint instead")

    # Quantizing on load happens tensor by tensor as the weights are read or generated (place), so
    # the peak is the quantized model plus about one float linear, never the whole float model.
    # Under tensor parallelism the rank reads its slices of the full parameters (param_shards of
    # the full graph) and quantizes them with the rank's graph: quantization after sharding.
    def rank_graph(g: Graph) -> Graph:
        return g if tensor_parallel is None else shard_graph(g, *tensor_parallel)

    quantized = place = None
    if quant_format is not None and layout is None:
        local = rank_graph(graph)
        quantized = quantize_graph(local, *quant_format)
        if materialize:
            place = QuantizeOnLoad(local, quantized, device)
    elif device is not None and materialize:
        place = _MoveTo(device)
    what = f"loading {source}"
    if place is not None and quantized is not None:
        bits, group = quant_format
        what = f"quantizing to INT{bits}" + (f" groups of {group}" if group else "") + f" while loading {source}"
    bar = Progress(what, len(graph.params), enabled=progress and materialize)
    try:
        if not materialize:
            if layout is not None:
                graph = quantize_graph_layout(graph, layout)
            weights = {name: torch.empty(p.shape, dtype=p.dtype, device="meta")
                       for name, p in (quantized or rank_graph(graph)).params.items()}
        elif layout is not None:
            float_graph = graph
            graph = quantize_graph_layout(graph, layout)
            if glmrt_format is not None:
                wmap = WeightMap()
                for name in graph.params:
                    wmap.add(name, name)
            else:
                wmap = generation.weight_map(cfg)
                weight_of = {node.name: node.params["weight"] for node in float_graph.nodes if node.name in layout}
                wmap.add_quant_scales(weight_of[n] for n in layout)
            weights = _load(files, wmap, graph, raw, layers, bar, place, _shards(graph, tensor_parallel))
        elif files is not None and _sat_rank_files(files, cfg, tensor_parallel):
            weights = _load_sat_rank(files, generation, cfg, graph, raw, layers, bar, tensor_parallel, place)
        elif files is not None:
            weights = _load(files, generation.weight_map(cfg), graph, raw, layers, bar, place,
                            _shards(graph, tensor_parallel))
        else:
            weights = synthetic_weights(graph, progress=bar, place=place, shards=_shards(graph, tensor_parallel))
    finally:
        bar.close()
    graph = rank_graph(graph)  # this rank's graph (its weights were read as slices)
    if quantized is not None:
        graph = quantized
        if place is not None:
            weights = place.scales_last(weights)
    return Prepared(source, raw, cfg, graph, weights, directory, generation)


def _beyond(node_name: str, layers: int | None) -> bool:
    """Whether a per-layer node name lies past a depth cut."""
    if layers is None or not node_name.startswith("layers."):
        return False
    return int(node_name.split(".")[1]) >= layers


class _MoveTo:
    """A loader's ``place`` that puts each tensor on ``device`` as soon as it is read."""

    def __init__(self, device):
        self.device = device

    def __call__(self, name: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: value.to(self.device)}


def _shards(graph: Graph, tensor_parallel):
    return None if tensor_parallel is None else param_shards(graph, *tensor_parallel)


def _load(files, wmap, graph: Graph, raw: dict, layers: int | None, bar, place=None, shards=None,
          expected=None) -> dict[str, torch.Tensor]:
    expected = expected or {name: (p.shape, p.dtype) for name, p in graph.params.items()}
    if layers is not None:  # a depth-cut load drops the checkpoint's deeper layers on purpose
        wmap.ignore = wmap.ignore + tuple(
            rf".*layers\.{i}\..*" for i in range(layers, int(raw.get("num_layers") or
                                                              raw.get("num_hidden_layers") or layers)))
    return checkpoint.load_weights(files, wmap, expected, progress=bar, place=place, shards=shards)


def _sat_rank_files(files, cfg: GLMConfig, tensor_parallel) -> bool:
    """A float GLM-130B SAT checkpoint whose rank files split evenly over the tensor-parallel ranks:
    each rank reads its own files only (glm130b.SATShards.select_ranks)."""
    if tensor_parallel is None or not isinstance(files, glm130b.SATShards):
        return False
    if cfg.vocab_size % tensor_parallel[0]:
        return False
    return files.select_ranks(*tensor_parallel)


def _load_sat_rank(files, generation, cfg: GLMConfig, graph: Graph, raw: dict, layers, bar, tensor_parallel,
                   place=None):
    """The rank's weights from its SAT rank files: their merged view is the model of the rank's
    heads, MLP columns and vocabulary rows, so it reads with the name map of that smaller model."""
    lay = tp_layout(cfg, *tensor_parallel)
    local_cfg = cfg.replace(num_heads=lay.heads, num_kv_heads=lay.heads, ffn_hidden_size=lay.ffn, vocab_size=lay.vocab)
    local = shard_graph(graph, *tensor_parallel)
    expected = {name: (p.shape, p.dtype) for name, p in local.params.items()}
    return _load(files, generation.weight_map(local_cfg), graph, raw, layers, bar, place, expected=expected)


def _release_layout(generation, graph: Graph, files, bits: int, directory) -> dict[str, QuantSpec]:
    """The per-node layout of a released quantized checkpoint: per output row, scales kept in the
    dtype they are stored in (fp16 in the releases), except GLM-130B's row-parallel layers merged from
    several ranks (one scale per row and rank, see models.glm130b.shard_scale_group)."""
    scale_dtypes = {files.dtype(n) for n in files.names() if n.endswith(".weight_scale")}
    floats = {torch.float16, torch.bfloat16, torch.float32}
    if len(scale_dtypes) != 1 or not scale_dtypes <= floats:
        raise CheckpointError(f"{directory}: the *.weight_scale tensors are {sorted(map(str, scale_dtypes))}; a "
                              "quantized checkpoint stores them all in one float dtype (fp16 in the releases)")
    scale_dtype = scale_dtypes.pop()
    if generation is glm130b:
        files.quant_bits = bits
        return glm130b.quant_layout(graph, bits, files.ranks, scale_dtype)
    return {name: QuantSpec(bits, 0, scale_dtype) for name in quantizable_linears(graph)}


def _check_shard_versions(files, entry: dict) -> None:
    """Every safetensors shard of a glmrt-quantized checkpoint names the same format version as
    config.json (so shards of two versions are never mixed)."""
    for path, meta in files.metadata().items():
        version = meta.get("glmrt_format_version")
        if version != str(entry.get("version")) or meta.get("glmrt_format") != entry.get("format"):
            raise CheckpointError(f"{path.name} is not a shard of this {entry.get('format')} version "
                                  f"{entry.get('version')} checkpoint (its header says format "
                                  f"{meta.get('glmrt_format')!r}, version {version!r}): the directory mixes files "
                                  "of different checkpoints; write it again with `glmrt quantize`")
