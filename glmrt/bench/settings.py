"""What a bench run is made of: its configuration (BenchConfig, from the command line), the model
it describes without loading a weight, and the settings it runs (every available backend x dtype
x quantization, plus the baselines), with the reason for every requested setting that cannot run.
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from .baselines import BASELINE_CHOICES, eager_incompatibility, resolve_baselines


@dataclass
class BenchConfig:
    model: str
    layers: int | None
    backends: list[str]
    dtypes: list[str]
    quantize: list[str]
    baselines: list[str]
    batch: int = 1
    prompt_len: int = 32
    gen_len: int = 32
    repeat: int = 3
    warmup: int = 1
    threads: int = 1
    seed: int = 0
    out: str | None = None
    # N: every rank of a torchrun group of N runs the glmrt settings in lockstep (glmrt.shard),
    # in its own process (no worker processes: they could not join the group); rank 0 reports.
    tensor_parallel: int | None = None

    def command(self) -> str:
        """The full command, every option explicit: running it repeats this run."""
        parts = ["glmrt", "bench", self.model]
        if self.layers is not None:
            parts += ["--layers", str(self.layers)]
        parts += ["--backends", ",".join(self.backends), "--dtype", ",".join(self.dtypes),
                  "--quantize", ",".join(self.quantize), "--baseline", ",".join(self.baselines),
                  "--batch", str(self.batch), "--prompt-len", str(self.prompt_len), "--gen-len", str(self.gen_len),
                  "--repeat", str(self.repeat), "--warmup", str(self.warmup), "--threads", str(self.threads),
                  "--seed", str(self.seed)]
        if self.out:
            parts += ["--out", self.out]
        if self.tensor_parallel is not None:
            parts += ["--tensor-parallel", str(self.tensor_parallel)]
        return shlex.join(parts)

    def launch_command(self) -> str:
        """command() with its launcher: torchrun for a tensor-parallel run."""
        if self.tensor_parallel is None:
            return self.command()
        return f"torchrun --nproc-per-node {self.tensor_parallel} -m {self.command()}"


@dataclass(frozen=True)
class Setting:
    runner: str  # "glmrt" or one of BASELINES
    backend: str | None  # the glmrt backend; None for a baseline
    device: str  # torch device the work runs on
    dtype: str
    quantize: str  # "none", "int8", "int4", "int4-g64", ...

    @property
    def id(self) -> str:
        if self.runner == "glmrt":
            return f"{self.backend}/{self.dtype}/{self.quantize}"
        return f"{self.runner}@{self.device}/{self.dtype}"


def _split_list(text: str) -> list[str]:
    return [p.strip() for p in str(text).split(",") if p.strip()]


def _canonical_dtypes(names: list[str]) -> list[str]:
    from ..config import dtype_name, parse_dtype
    out = []
    for name in names:
        canonical = dtype_name(parse_dtype(name))
        if canonical not in out:
            out.append(canonical)
    return out


def _canonical_quantize(names: list[str]) -> list[str]:
    from ..quant import parse_format
    out = []
    for name in names:
        canonical = "none" if parse_format(name) is None else name.lower()
        if canonical not in out:
            out.append(canonical)
    return out


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    import torch
    model = args.model_flag or args.model
    if not model:
        raise ConfigError("glmrt bench needs a model: a checkpoint directory or synthetic:<preset> "
                          "(e.g. glmrt bench synthetic:chatglm3-6b --layers 2), or --compare A.json B.json")
    if args.model_flag and args.model and args.model_flag != args.model:
        raise ConfigError(f"two models given ({args.model!r} and --model {args.model_flag!r}): give one")
    for name in ("batch", "prompt_len", "repeat"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.gen_len < 2:
        raise ConfigError(f"--gen-len must be at least 2 (TPOT needs two generated tokens), got {args.gen_len}")
    if args.warmup < 0:
        raise ConfigError(f"--warmup must be 0 or more, got {args.warmup}")
    threads = args.threads if args.threads is not None else torch.get_num_threads()
    if threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {threads}")
    baselines = [b.lower() for b in _split_list(args.baseline)] or ["none"]
    for b in baselines:
        if b not in BASELINE_CHOICES:
            raise ConfigError(f"unknown --baseline {b!r}: choose from {', '.join(BASELINE_CHOICES)} "
                              "(comma-separated for several)")
    tp = getattr(args, "tensor_parallel", None)
    if tp is not None and (not isinstance(tp, int) or tp < 1):
        raise ConfigError(f"--tensor-parallel must be a positive integer, got {tp}")
    return BenchConfig(
        model=model, layers=args.layers, backends=[b.lower() for b in _split_list(args.backends)] or ["all"],
        dtypes=_canonical_dtypes(_split_list(args.dtype)) or ["float32"],
        quantize=_canonical_quantize(_split_list(args.quantize)) or ["none"], baselines=baselines,
        batch=args.batch, prompt_len=args.prompt_len, gen_len=args.gen_len, repeat=args.repeat,
        warmup=args.warmup, threads=threads, seed=args.seed, out=args.out, tensor_parallel=tp)


def describe_model(spec: str, layers: int | None):
    """(description for results.json, depth-cut GLMConfig), read without loading any weight."""
    from .. import checkpoint
    from ..api import SYNTHETIC_PREFIX, _cut_layers
    from ..errors import UnsupportedModelError
    from ..models import config_from_dict, preset
    export = onnx_export_manifest(spec)
    if export is not None:  # an ONNX export: its manifest holds the (already cut) config
        if layers is not None:
            raise ConfigError(f"{spec} is an ONNX export: its depth was chosen when exporting (glmrt export "
                              "--layers N); drop --layers")
        from ..config import GLMConfig
        raw = dict(export["config"], eos_token_ids=tuple(export["config"].get("eos_token_ids") or ()))
        cut = GLMConfig(**raw)
        info = {"source": spec, "generation": cut.generation, "num_layers": cut.num_layers,
                "full_num_layers": cut.num_layers, "parameters": cut.num_parameters(),
                "full_parameters": cut.num_parameters(), "config": cut.to_dict(),
                "onnx_export": {k: export[k] for k in ("source", "flavor", "dtype", "quantization", "attention")}}
        return info, cut
    if spec.startswith(SYNTHETIC_PREFIX):
        raw = preset(spec[len(SYNTHETIC_PREFIX):])
    else:
        directory = Path(spec).expanduser()
        if not directory.is_dir():
            raise UnsupportedModelError(f"{spec!r} is neither a checkpoint directory nor a synthetic preset "
                                        "(synthetic:<name>); glmrt never downloads: give a local directory")
        raw = checkpoint.read_config(directory)
    _, full = config_from_dict(raw)
    cut = _cut_layers(full, layers)
    info = {"source": spec, "generation": cut.generation, "num_layers": cut.num_layers,
            "full_num_layers": full.num_layers, "parameters": cut.num_parameters(),
            "full_parameters": full.num_parameters(), "config": cut.to_dict()}
    return info, cut


def onnx_export_manifest(spec) -> dict | None:
    """The manifest when ``spec`` is a `glmrt export --format onnx` directory, else None."""
    from ..onnx_export import is_export, read_manifest
    return read_manifest(spec) if is_export(spec) else None


def weights_source(model: str, layers: int | None) -> tuple[str, int | None]:
    """Where the reference and the baselines read their weights: an ONNX export's own source
    (checkpoint or preset, cut to the exported depth), else the model itself."""
    export = onnx_export_manifest(model)
    if export is None:
        return model, layers
    return export["source"], export["config"]["num_layers"]


def resolved_model(spec: str) -> str:
    """The model as the workers get it: a checkpoint directory made absolute (they run in a directory
    of their own, so a path relative to the caller's would not reach them); a preset as it is."""
    from ..api import SYNTHETIC_PREFIX
    if spec.startswith(SYNTHETIC_PREFIX):
        return spec
    return str(Path(spec).expanduser().resolve())


def plan_settings(cfg: BenchConfig, model_cfg) -> tuple[list[Setting], list[dict]]:
    """Every setting to run, and every requested one that cannot run here with the reason."""
    from ..backends import get_backend, list_backends
    from ..config import parse_dtype
    rows = {r["name"]: r for r in list_backends()}
    if "all" in cfg.backends:
        names = list(rows)
    else:
        names = []
        for requested in cfg.backends:
            name = get_backend(requested).name  # raises BackendError for an unknown name, resolves aliases
            if name not in names:
                names.append(name)
    settings: list[Setting] = []
    skipped: list[dict] = []
    tensor_parallel = getattr(cfg, "tensor_parallel", None)
    device_dtypes: dict[str, list[str]] = {}
    for name in names:
        row = rows.get(name)
        if row is None or not row["available"]:
            reason = row["reason"] if row else "not in the backend registry"
            skipped.append({"setting": f"backend {name}", "reason": reason})
            continue
        backend = get_backend(name)
        export = onnx_export_manifest(cfg.model)
        runs_exports = bool(getattr(backend, "export_format", None))  # onnxruntime: exported graphs only
        if runs_exports and export is None:
            skipped.append({"setting": f"backend {name}", "reason": f"backend {name} runs {backend.export_format} "
                            "exports only: glmrt export MODEL --format onnx --out DIR, then glmrt bench DIR "
                            f"--backends {name}"})
            continue
        if export is not None and not runs_exports:
            skipped.append({"setting": f"backend {name}", "reason": f"{cfg.model} is an ONNX export: it runs on "
                            "the onnxruntime backend; bench the original checkpoint for this backend"})
            continue
        if export is not None:  # dtype and quantization were fixed when exporting
            fixed = [(d, q) for d in cfg.dtypes for q in cfg.quantize if d == export["dtype"] and q == "none"]
            quant = export["quantization"]
            weights = f"INT{quant['bits']}" if quant else "float weights"
            for d in cfg.dtypes:
                for q in cfg.quantize:
                    if (d, q) not in fixed:
                        skipped.append({"setting": f"{name}/{d}/{q}", "reason": f"{cfg.model} was exported in "
                                        f"{export['dtype']} with {weights}: use --dtype {export['dtype']} "
                                        "--quantize none (the export's own), or export again"})
            device = str(backend.device())
            for d, q in fixed:
                device_dtypes.setdefault(device, [])
                if d not in device_dtypes[device]:
                    device_dtypes[device].append(d)
                settings.append(Setting("glmrt", name, device, d, q))
            continue
        try:
            device = str(backend.device())
            supported = backend.capabilities().dtypes
        except Exception as exc:  # noqa: BLE001 - a third-party backend must not break the run
            skipped.append({"setting": f"backend {name}", "reason": f"{type(exc).__name__}: {exc}"})
            continue
        if tensor_parallel is not None:
            why = _tensor_parallel_refusal(backend, settings)
            if why:
                skipped.append({"setting": f"backend {name}", "reason": why})
                continue
        for dtype in cfg.dtypes:
            if parse_dtype(dtype) not in supported:
                skipped.append({"setting": f"{name}/{dtype}", "reason": f"backend {name} does not run {dtype}"})
                continue
            device_dtypes.setdefault(device, [])
            if dtype not in device_dtypes[device]:
                device_dtypes[device].append(dtype)
            for quant in cfg.quantize:
                settings.append(Setting("glmrt", name, device, dtype, quant))
    if tensor_parallel is not None:  # a baseline is one process: it has no tensor-parallel run
        skipped += [{"setting": f"{b} baseline", "reason": "baselines run in one process; bench them without "
                     "--tensor-parallel"} for b in cfg.baselines if b != "none"]
        return settings, skipped
    baselines, baseline_skips = resolve_baselines(cfg.baselines, model_cfg)
    skipped += baseline_skips
    for runner in baselines:
        if runner == "torch-eager":
            why = eager_incompatibility(model_cfg)
            if why:
                skipped.append({"setting": "torch-eager baseline", "reason": why})
                continue
        for device, dtypes in device_dtypes.items():
            for dtype in dtypes:
                settings.append(Setting(runner, None, device, dtype, "none"))
    return settings, skipped


def _tensor_parallel_refusal(backend, settings: list[Setting]) -> str | None:
    """Why a backend cannot take part in a tensor-parallel bench run (None: it can). All settings
    of one run share the process group, so they share its transport."""
    from ..backends import get_backend
    transport = backend.capabilities().collective_backend
    if transport is None:
        return f"backend {backend.name} declares no collective backend, so it cannot run tensor-parallel"
    first = next((s.backend for s in settings), None)
    if first is not None:
        have = get_backend(first).capabilities().collective_backend
        if have != transport:
            return (f"backend {backend.name} moves tensors with {transport}, but this run's process group is "
                    f"{have} (backend {first}): bench one transport per torchrun launch (--backends {backend.name})")
    return None


def prompt_ids(vocab_size: int, batch: int, length: int, seed: int) -> list[list[int]]:
    """The benchmark prompt: uniform random ids from a fixed seed, the same for every setting."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=gen).tolist()
