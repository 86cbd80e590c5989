"""`glmrt bench`: the same model and the same prompts on every available backend, with the metrics
of ../shared/PERF.md, written as JSON + markdown + a plot; `glmrt bench --compare A B` puts two runs
side by side.

    glmrt bench synthetic:chatglm3-6b --layers 2 --backends cpu --dtype float32,bfloat16 \\
        --quantize none,int8 --repeat 3 --threads 2 --out benchmarks/results/DATE-cpu-chatglm3-6b-L2
    glmrt bench --compare A/results.json B/results.json

How a run is made
- Settings: every requested and available backend x dtype x quantization (glmrt), plus a baseline
  per device and dtype: what a user would otherwise run (see BASELINE_LABELS). Unavailable backends
  and unsupported dtypes are skipped with one line naming the reason.
- Every setting runs in a fresh worker process (`python -m glmrt.bench --worker TASK RESULT`), so
  that its peak resident set is its own (VmHWM is process-wide and never goes down) and nothing
  one setting allocates slows the next. The worker loads the model, warms up, then times `repeat`
  generations of `gen_len` tokens from the same prompt (greedy, eos disabled so every run makes
  exactly gen_len tokens), synchronizing the device after every token.
- The reference for numerical drift is the float32 model on the CPU with every op on the plain
  torch reference implementation (glmrt.ops), computed once per run in its own worker; every
  setting's `Model.logits` (a baseline's full forward) on the same prompt is compared with it.
- The device bandwidth that achieved bandwidth is compared with is measured in the same run: on a
  CPU a STREAM-like read (glmrt._native_cpu.read_stream, else torch.sum, over a buffer much
  larger than the caches, same thread count); on a GPU the published figure (matched from the device name) and a measured
  device-to-device copy.

Metric definitions (also written next to every table in results.md): see METRIC_NOTES.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from .errors import ConfigError, GLMRTError, InputError

SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).with_name("bench_schema.json")
BASELINES = ("transformers", "torch-eager")
BASELINE_CHOICES = ("auto", "none") + BASELINES
# An eos list that matches nothing: every timed run generates exactly gen_len tokens.
NO_EOS: tuple[int, ...] = ()
CPU_STREAM_MIN_BYTES = 1 << 30  # the STREAM-like read buffer: at least 1 GiB ...
CPU_STREAM_CACHE_FACTOR = 16  # ... and at least 16 x the last-level cache
CPU_STREAM_REPEATS = 7
DEVICE_COPY_BYTES = 1 << 30
DEVICE_COPY_REPEATS = 20

BASELINE_LABELS = {
    "transformers": "transformers {version} {cls}.generate (eager attention, DynamicCache grown with torch.cat, "
                    "greedy), built from the same weights",
    "torch-eager": "plain torch eager: a minimal transformers-style nn.Module (nn.Embedding / nn.Linear, fused qkv, "
                   "matmul + softmax attention, KV cache grown with torch.cat every step, greedy loop under "
                   "torch.no_grad), built from the same weights",
}

# Published memory bandwidth of GPUs, matched against torch's device name: first row whose every
# `needles` word is in the name and none of its `excluded` words is. (PERF.md's figures.)
PUBLISHED_BANDWIDTH = (
    {"needles": ("H200",), "excluded": (), "bytes_per_s": 4.8e12, "source": "NVIDIA H200: 4.8 TB/s (published)"},
    {"needles": ("H100",), "excluded": ("PCIE", "NVL"), "bytes_per_s": 3.35e12,
     "source": "NVIDIA H100 SXM: 3.35 TB/s (published)"},
    {"needles": ("A100", "80GB"), "excluded": ("PCIE",), "bytes_per_s": 2.04e12,
     "source": "NVIDIA A100-80G SXM: 2.04 TB/s (published)"},
)

METRIC_NOTES = [
    "TTFT: from the request to the first generated token (prefill + one sample), device synchronized.",
    "TPOT: (end-to-end - TTFT) / (generated tokens - 1) per run; mean over runs, p50/p90 over every "
    "decode step of every run.",
    "prefill tokens/s = batch x prompt length / TTFT; decode tokens/s = batch / TPOT mean.",
    "peak memory: a CPU device reports the worker process's resident-set peak (VmHWM) over warm-up and "
    "timed runs (reset after loading with /proc/self/clear_refs, so it includes the resident weights); a "
    "GPU reports the allocator peak (torch.cuda.max_memory_allocated) over the same runs.",
    "weight bytes: Model.weight_bytes() (quantized weights and their scales included).",
    "achieved bandwidth = bytes read per decode step / TPOT mean, where bytes = every weight a decode step "
    "reads (all layers' matrices, biases, norms, scales, the LM head, one embedding row per sequence) + "
    "the KV cache read at the mean decode context (prompt + gen/2 tokens).",
    "fraction of the device's bandwidth: CPU: of a STREAM-like read measured in the same run with the "
    "same threads; GPU: of the published figure (and of a measured device-to-device copy).",
    "drift: Model.logits (a baseline's full forward) on the prompt vs the float32 CPU reference "
    "(plain-torch reference ops) with the same weights: max |logit difference|, top-1 agreement and "
    "mean KL(reference || setting) over the prompt positions.",
    "system load: the 1-minute load average before and after each setting's timed runs; the run's own "
    "threads count in it, so load well above the thread count means other work competed for the CPUs "
    "(the average lags by about a minute).",
    "full-depth estimates (depth-cut models only) scale TPOT by bytes read per step, assuming the "
    "achieved bandwidth stays the same: an estimate, not a measurement, and a fair one only for a "
    "bandwidth-bound run (a high % of the device's bandwidth); a run bound by per-op overhead costs "
    "about the same time per layer whatever its bytes.",
]


# =============================================================================================
# configuration and settings


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
        return shlex.join(parts)


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
    from .config import dtype_name, parse_dtype
    out = []
    for name in names:
        canonical = dtype_name(parse_dtype(name))
        if canonical not in out:
            out.append(canonical)
    return out


def _canonical_quantize(names: list[str]) -> list[str]:
    from .quant import parse_format
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
    return BenchConfig(
        model=model, layers=args.layers, backends=[b.lower() for b in _split_list(args.backends)] or ["all"],
        dtypes=_canonical_dtypes(_split_list(args.dtype)) or ["float32"],
        quantize=_canonical_quantize(_split_list(args.quantize)) or ["none"], baselines=baselines,
        batch=args.batch, prompt_len=args.prompt_len, gen_len=args.gen_len, repeat=args.repeat,
        warmup=args.warmup, threads=threads, seed=args.seed, out=args.out)


def describe_model(spec: str, layers: int | None):
    """(description for results.json, depth-cut GLMConfig), read without loading any weight."""
    from . import checkpoint
    from .api import SYNTHETIC_PREFIX, _cut_layers
    from .errors import UnsupportedModelError
    from .models import config_from_dict, preset
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


def transformers_incompatibility(cfg) -> str | None:
    """Why transformers' GlmForCausalLM / Glm4ForCausalLM cannot run this config (None: it can)."""
    checks = [
        (cfg.norm_kind == "rmsnorm", f"norm {cfg.norm_kind}"),
        (cfg.norm_placement in ("pre", "sandwich"), f"norm placement {cfg.norm_placement}"),
        (cfg.rope_kind == "interleaved", f"RoPE {cfg.rope_kind}"),
        (cfg.activation == "swiglu", f"activation {cfg.activation}"),
        (cfg.mask_kind == "causal", f"mask {cfg.mask_kind}"),
        (cfg.attention_scaling == "standard", f"attention scaling {cfg.attention_scaling}"),
        (not cfg.dense_bias and not cfg.mlp_bias, "biases on the attention output or MLP"),
    ]
    bad = [what for ok, what in checks if not ok]
    if bad:
        return f"transformers' Glm/Glm4ForCausalLM has no {', '.join(bad)} (model generation {cfg.generation})"
    return None


def _transformers_version() -> str | None:
    from importlib import metadata
    try:
        return metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return None


def resolve_baselines(requested: list[str], model_cfg) -> tuple[list[str], list[dict]]:
    """(baselines to run, skipped rows) from the --baseline list."""
    wanted: list[str] = []
    skipped = []
    for name in requested:
        if name == "none":
            continue
        if name == "auto":
            ok = _transformers_version() is not None and transformers_incompatibility(model_cfg) is None
            name = "transformers" if ok else "torch-eager"
        if name in wanted:
            continue
        if name == "transformers":
            why = ("the transformers package is not installed" if _transformers_version() is None
                   else transformers_incompatibility(model_cfg))
            if why:
                skipped.append({"setting": "transformers baseline", "reason": why})
                continue
        wanted.append(name)
    return wanted, skipped


def plan_settings(cfg: BenchConfig, model_cfg) -> tuple[list[Setting], list[dict]]:
    """Every setting to run, and every requested one that cannot run here with the reason."""
    from .backends import get_backend, list_backends
    from .config import parse_dtype
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
    device_dtypes: dict[str, list[str]] = {}
    for name in names:
        row = rows.get(name)
        if row is None or not row["available"]:
            reason = row["reason"] if row else "not in the backend registry"
            skipped.append({"setting": f"backend {name}", "reason": reason})
            continue
        backend = get_backend(name)
        try:
            device = str(backend.device())
            supported = backend.capabilities().dtypes
        except Exception as exc:  # noqa: BLE001 - a third-party backend must not break the run
            skipped.append({"setting": f"backend {name}", "reason": f"{type(exc).__name__}: {exc}"})
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


def prompt_ids(vocab_size: int, batch: int, length: int, seed: int) -> list[list[int]]:
    """The benchmark prompt: uniform random ids from a fixed seed, the same for every setting."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, length), generator=gen).tolist()


# =============================================================================================
# the hardware and software stamp


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def cpu_info() -> dict:
    text = _read("/proc/cpuinfo")
    model, cores = None, set()
    physical, core = None, None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "model name" and model is None:
            model = value
        elif key == "physical id":
            physical = value
        elif key == "core id":
            core = value
        elif not line.strip() and core is not None:
            cores.add((physical, core))
            physical, core = None, None
    if core is not None:
        cores.add((physical, core))
    meminfo = _read("/proc/meminfo")
    mem_total = None
    for line in meminfo.splitlines():
        if line.startswith("MemTotal:"):
            mem_total = int(line.split()[1]) * 1024
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    return {"model": model or platform.processor() or "unknown", "logical_cpus": os.cpu_count(),
            "physical_cores": len(cores) or None, "usable_cpus": usable, "memory_bytes": mem_total,
            "last_level_cache_bytes": last_level_cache_bytes()}


def last_level_cache_bytes() -> int | None:
    """Size of the largest cache level cpu0 sees, from sysfs (None if unknown)."""
    best = None
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    for entry in sorted(base.glob("index*")) if base.is_dir() else []:
        size = _read(str(entry / "size")).strip().upper()
        if not size:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1], 1)
        try:
            value = int(size.rstrip("KMG")) * mult
        except ValueError:
            continue
        best = value if best is None else max(best, value)
    return best


def gpu_info() -> list[dict]:
    """GPUs from nvidia-smi (name, driver, memory), or [] when there is none."""
    try:
        proc = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                               "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if proc.returncode != 0:
        return []
    out = []
    for line in proc.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 3:
            try:
                memory = int(float(parts[2])) * (1 << 20)
            except ValueError:
                memory = None
            out.append({"name": parts[0], "driver": parts[1], "memory_bytes": memory})
    return out


def git_commit(package_dir: Path | None = None) -> dict:
    """The commit of the checkout glmrt was imported from, else the one an installed copy was built
    from, else "unknown"."""
    package_dir = package_dir or Path(__file__).resolve().parent

    def git(*cmd: str) -> str | None:
        try:
            proc = subprocess.run(["git", "-C", str(package_dir), *cmd], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    # An installed copy may sit inside some other repository (a .venv in a checkout): only a
    # checkout whose root holds this very package counts. An installed copy carries the commit
    # it was built from (glmrt/_build_info.json, written by CMake).
    if not top or Path(top).resolve() != package_dir.parent:
        try:
            info = json.loads((package_dir / "_build_info.json").read_text(encoding="utf-8"))
            commit = str(info.get("commit", "unknown"))
            if len(commit) == 40 and all(c in "0123456789abcdef" for c in commit):
                dirty = info.get("dirty")
                return {"commit": commit, "dirty": dirty if isinstance(dirty, bool) else None}
        except (OSError, ValueError, AttributeError):
            pass
        return {"commit": "unknown", "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD") or "unknown", "dirty": bool(status) if status is not None else None}


def load_average() -> list[float] | None:
    """The system's 1, 5 and 15 minute load averages: other work competing for the CPUs skews timings."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def stamp(threads: int) -> dict:
    import torch
    from . import __version__
    software = {"python": platform.python_version(), "torch": torch.__version__,
                "torch_cuda": torch.version.cuda, "torch_hip": getattr(torch.version, "hip", None),
                "glmrt": __version__, "transformers": _transformers_version(), **git_commit()}
    hardware = {"cpu": cpu_info(), "threads": threads, "gpus": gpu_info(), "os": platform.platform(),
                "machine": platform.machine(), "load_average": {"start": load_average(), "end": None}}
    return {"hardware": hardware, "software": software}


# =============================================================================================
# device bandwidth


def published_bandwidth(device_name: str) -> dict | None:
    """{"bytes_per_s", "source"} for a GPU name PERF.md gives a figure for, else None."""
    upper = device_name.upper()
    for row in PUBLISHED_BANDWIDTH:
        if all(n in upper for n in row["needles"]) and not any(x in upper for x in row["excluded"]):
            return {"bytes_per_s": row["bytes_per_s"], "source": row["source"]}
    return None


def cpu_read_bandwidth(threads: int, buffer_bytes: int | None = None, repeats: int = CPU_STREAM_REPEATS) -> dict:
    """STREAM-like read of a buffer much larger than the caches, on `threads` threads; the best and
    the median of `repeats` passes after a warm-up. glmrt._native_cpu's read_stream (wide vector
    loads, OpenMP, no writes: what a weight-streaming decode GEMV does) when it is built; else
    torch.sum over float32, which reads 10-25% slower than the memory allows on the machines tried,
    so fractions of it overstate a kernel's efficiency. Both are reported when both run."""
    import torch
    from . import _native
    cache = last_level_cache_bytes() or 0
    size = buffer_bytes or max(CPU_STREAM_MIN_BYTES, CPU_STREAM_CACHE_FACTOR * cache)
    size -= size % 64
    module = _native.load("_native_cpu")[0]
    if module is not None and not hasattr(module, "read_stream"):
        module = None  # a module built before the probe
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        buf = torch.ones(size // 4, dtype=torch.float32)
        probes = {"torch.sum": buf.sum}
        if module is not None:
            probes = {"native read_stream": lambda: module.read_stream(buf.data_ptr(), size, threads), **probes}
        results = {}
        for name, fn in probes.items():
            fn()  # warm-up: pages touched, threads started
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            results[name] = times
        nbytes = size
        del buf
    finally:
        torch.set_num_threads(previous)
    name, times = next(iter(results.items()))
    method = (f"{name} ({module.read_stream_isa()} loads)" if module is not None else name)
    others = "; ".join(f"{n}: {nbytes / min(t) / 1e9:.1f} GB/s" for n, t in list(results.items())[1:])
    return {"kind": "measured-read", "method": f"{method} over a {nbytes / 2**30:.2f} GiB buffer, {threads} threads, "
                                               f"best of {repeats}" + (f" (also {others})" if others else ""),
            "bytes_per_s": nbytes / min(times), "median_bytes_per_s": nbytes / statistics.median(times),
            "buffer_bytes": nbytes, "threads": threads, "last_level_cache_bytes": cache or None}


def device_copy_bandwidth(device, sync: Callable[[], None], nbytes: int = DEVICE_COPY_BYTES,
                          repeats: int = DEVICE_COPY_REPEATS) -> dict:
    """Device-to-device copy, bytes read + written per second (best and median of `repeats`)."""
    import torch
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        sync()
        times.append(time.perf_counter() - t0)
    moved = 2 * src.numel() * 4
    return {"method": f"tensor.copy_ of {nbytes / 2**30:.2f} GiB on the device, bytes read + written, "
                      f"best of {repeats}",
            "bytes_per_s": moved / min(times), "median_bytes_per_s": moved / statistics.median(times)}


# =============================================================================================
# timing


class TokenClock:
    """Records when each generated token is ready (device synchronized) during one request."""

    def __init__(self, sync: Callable[[], None]):
        self.sync = sync
        self.t0 = 0.0
        self.times: list[float] = []
        self.tokens: list = []

    def start(self) -> None:
        self.sync()
        self.times, self.tokens = [], []
        self.t0 = time.perf_counter()

    def tick(self, token) -> None:
        """Call once per generated step with the (B,) token tensor."""
        self.sync()
        self.times.append(time.perf_counter() - self.t0)
        self.tokens.append(token)


@dataclass
class RunTiming:
    times: list[float]  # seconds from the request to each token

    @property
    def ttft(self) -> float:
        return self.times[0]

    @property
    def e2e(self) -> float:
        return self.times[-1]

    @property
    def tpot(self) -> float:
        return (self.e2e - self.ttft) / (len(self.times) - 1)

    @property
    def intervals(self) -> list[float]:
        return [b - a for a, b in zip(self.times, self.times[1:])]


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def measure(run_once: Callable[[TokenClock], None], sync: Callable[[], None], *, warmup: int, repeat: int,
            gen_len: int, label: str) -> tuple[list[RunTiming], list[list[int]]]:
    """Warm-up runs, then `repeat` timed runs; returns the timings and the first timed run's tokens."""
    clock = TokenClock(sync)
    timings, first_tokens = [], None
    for i in range(warmup + repeat):
        timed = i >= warmup
        clock.start()
        run_once(clock)
        if len(clock.times) != gen_len:
            raise RuntimeError(f"{label}: generated {len(clock.times)} tokens instead of {gen_len}")
        run = RunTiming(list(clock.times))
        what = f"repeat {i - warmup + 1}/{repeat}" if timed else f"warm-up {i + 1}/{warmup}"
        _log(f"  {label}: {what}: TTFT {run.ttft * 1e3:.1f} ms, TPOT {run.tpot * 1e3:.2f} ms "
             f"({1 / run.tpot:.2f} steps/s)")
        if timed:
            timings.append(run)
            if first_tokens is None:
                first_tokens = [[int(x) for x in t.reshape(-1).tolist()] for t in clock.tokens]
    return timings, first_tokens or []


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    data = sorted(values)
    if not data:
        raise ValueError("percentile of nothing")
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def stats(values: list[float]) -> dict:
    return {"values": list(values), "min": min(values), "median": statistics.median(values), "max": max(values),
            "mean": statistics.fmean(values)}


def summarize_timings(timings: list[RunTiming], batch: int, prompt_len: int) -> dict:
    intervals = [x for t in timings for x in t.intervals]
    tpot_runs = [t.tpot for t in timings]
    tpot_mean = statistics.fmean(tpot_runs)
    decode = stats([batch / t for t in tpot_runs])
    decode["mean"] = batch / tpot_mean  # the headline: batch / TPOT mean
    return {
        "ttft_s": stats([t.ttft for t in timings]),
        "tpot_s": {"mean": tpot_mean, "p50": percentile(intervals, 50), "p90": percentile(intervals, 90),
                   "per_run": stats(tpot_runs)},
        "e2e_s": stats([t.e2e for t in timings]),
        "prefill_tokens_per_s": stats([batch * prompt_len / t.ttft for t in timings]),
        "decode_tokens_per_s": decode,
    }


# =============================================================================================
# bytes per decode step, drift, memory


def decode_traffic(graph, weights: dict, batch: int, prompt_len: int, gen_len: int) -> dict:
    """Bytes one batch-`batch` decode step reads: every weight a step touches (an embedding lookup
    reads one row per sequence; everything else is read whole, once) + the KV cache at the mean
    decode context. Also the part of the weights in one layer, for the full-depth estimate."""
    import torch
    cfg = graph.config
    counted: set[str] = set()
    weight_bytes = layer_bytes = 0
    for node in graph.nodes:
        for pname in node.params.values():
            t = weights[pname]
            if node.op == "embedding":
                nbytes = batch * t[0].numel() * t.element_size()
            elif pname in counted:
                continue
            else:
                counted.add(pname)
                nbytes = t.numel() * t.element_size()
            weight_bytes += nbytes
            if node.name.startswith("layers.0."):
                layer_bytes += nbytes
    elem = torch.empty((), dtype=graph.dtype).element_size()
    kv_per_token_layer = 2 * cfg.num_kv_heads * cfg.head_dim * elem  # K and V of one token, one layer
    mean_context = prompt_len + gen_len / 2  # decode step j (1..gen-1) attends over prompt + j keys
    kv_bytes = batch * cfg.num_layers * kv_per_token_layer * mean_context
    return {"bytes_per_step": weight_bytes + kv_bytes, "weight_bytes_per_step": weight_bytes,
            "kv_bytes_per_step": kv_bytes, "mean_context": mean_context, "layer_weight_bytes": layer_bytes,
            "kv_bytes_per_token_per_layer": kv_per_token_layer, "num_layers": cfg.num_layers}


def full_depth_estimate(traffic: dict, tpot_mean: float, batch: int, full_layers: int) -> dict | None:
    """Per-layer cost and full-depth TPOT of a depth-cut model, scaled by bytes per step."""
    layers = traffic["num_layers"]
    if full_layers <= layers:
        return None
    layer_kv = batch * traffic["kv_bytes_per_token_per_layer"] * traffic["mean_context"]
    per_layer = traffic["layer_weight_bytes"] + layer_kv
    fixed = traffic["bytes_per_step"] - layers * per_layer  # embedding row, final norm, LM head
    full_bytes = fixed + full_layers * per_layer
    seconds_per_byte = tpot_mean / traffic["bytes_per_step"]
    return {"full_num_layers": full_layers, "bytes_per_step_full": full_bytes,
            "per_layer_tpot_s": per_layer * seconds_per_byte, "fixed_tpot_s": fixed * seconds_per_byte,
            "tpot_s_full": full_bytes * seconds_per_byte, "decode_tokens_per_s_full": batch / (full_bytes *
                                                                                                 seconds_per_byte),
            "method": "TPOT scaled by bytes read per decode step (same achieved bandwidth assumed)"}


def logit_drift(logits, reference) -> dict:
    """max |difference|, top-1 agreement and mean KL(reference || logits) over all positions."""
    import torch
    got = logits.detach().to("cpu", torch.float64).reshape(-1, logits.shape[-1])
    ref = reference.detach().to("cpu", torch.float64).reshape(-1, reference.shape[-1])
    if got.shape != ref.shape:
        raise ValueError(f"logits of shape {tuple(got.shape)} vs reference {tuple(ref.shape)}")
    log_ref = torch.log_softmax(ref, dim=-1)
    log_got = torch.log_softmax(got, dim=-1)
    kl = (log_ref.exp() * (log_ref - log_got)).sum(-1)
    return {"max_abs_logit_diff": float((got - ref).abs().max()),
            "top1_agreement": float((got.argmax(-1) == ref.argmax(-1)).double().mean()),
            "mean_kl": max(float(kl.mean()), 0.0), "positions": int(ref.shape[0])}


def reset_peak_memory(device_type: str) -> bool:
    """Start a new peak-memory window; False where this device has no way to reset it."""
    if device_type == "cpu":
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # Linux >= 4.0: reset VmHWM to the current resident set
            return True
        except OSError:
            return False
    if device_type == "cuda":
        import torch
        torch.cuda.reset_peak_memory_stats()
        return True
    return False


def peak_memory_note(device_type: str, was_reset: bool) -> str:
    if device_type == "cpu":
        what = "resident-set peak (VmHWM) of the worker process"
    elif device_type == "cuda":
        what = "device allocator peak (torch.cuda.max_memory_allocated)"
    else:
        what = f"{device_type} backend memory_stats() peak"
    return what + (" over warm-up and timed runs" if was_reset else " since the worker started (load included)")


def cpu_peak_rss() -> int | None:
    for line in _read("/proc/self/status").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


def device_peak_bytes(device_type: str) -> int | None:
    if device_type == "cpu":
        return cpu_peak_rss()
    if device_type == "cuda":
        import torch
        return int(torch.cuda.max_memory_allocated())
    return None


# =============================================================================================
# baselines


class BaselineUnavailable(GLMRTError):
    """A baseline cannot run this model (the reason is in the message)."""


def eager_incompatibility(cfg) -> str | None:
    bad = []
    if cfg.rope_kind == "2d":
        bad.append("2-D RoPE")
    if cfg.mask_kind != "causal":
        bad.append(f"{cfg.mask_kind} mask")
    if cfg.attention_scaling != "standard":
        bad.append(f"{cfg.attention_scaling} attention")
    return f"the torch-eager baseline has no {', '.join(bad)}" if bad else None


def _eager_modules():
    """The minimal transformers-style eager model (defined lazily: importing glmrt.bench needs no torch.nn)."""
    import torch
    from torch import nn
    import torch.nn.functional as F

    def frozen(t):
        # Parameters as from_pretrained leaves them (requires_grad=True), run under torch.no_grad() as
        # users do. (On the CPU this also matters for speed: torch 2.13's F.linear takes a ~50x slower
        # path for a sliced 3-D input such as h[:, -1:] when the weight does not require grad.)
        return nn.Parameter(t)

    def linear(weight, bias=None) -> nn.Linear:
        out_f, in_f = weight.shape
        layer = nn.Linear(in_f, out_f, bias=bias is not None, device="meta")
        layer.weight = frozen(weight)
        if bias is not None:
            layer.bias = frozen(bias)
        return layer

    class Norm(nn.Module):
        def __init__(self, cfg, weight, bias=None):
            super().__init__()
            self.kind, self.eps, self.round = cfg.norm_kind, cfg.norm_eps, cfg.rmsnorm_round_before_weight
            self.weight = frozen(weight)
            self.bias = frozen(bias) if bias is not None else None

        def forward(self, x):
            if self.kind == "layernorm":
                return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
            h = x.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
            if self.round:
                return self.weight * h.to(x.dtype)
            return (self.weight.float() * h).to(x.dtype)

    def rotate(x, cos, sin, interleaved: bool):
        """x (B, H, T, hd); cos/sin (T, rotary_dim/2). The first rotary_dim dims rotate."""
        rd = cos.shape[-1] * 2
        rot, rest = x[..., :rd], x[..., rd:]
        if interleaved:  # pairs (2i, 2i+1)
            c, s = cos.repeat_interleave(2, -1), sin.repeat_interleave(2, -1)
            turned = torch.stack((-rot[..., 1::2], rot[..., 0::2]), dim=-1).flatten(-2)
        else:  # halves
            c, s = torch.cat((cos, cos), -1), torch.cat((sin, sin), -1)
            a, b = rot.chunk(2, -1)
            turned = torch.cat((-b, a), -1)
        return torch.cat((rot * c + turned * s, rest), -1)

    class Attention(nn.Module):
        def __init__(self, cfg, w, prefix):
            super().__init__()
            self.cfg = cfg
            self.qkv = linear(w[f"{prefix}.qkv.weight"], w.get(f"{prefix}.qkv.bias"))
            self.dense = linear(w[f"{prefix}.dense.weight"], w.get(f"{prefix}.dense.bias"))

        def forward(self, x, cos, sin, mask, past):
            cfg = self.cfg
            B, T, _ = x.shape
            nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
            q, k, v = self.qkv(x).split((nh * hd, nkv * hd, nkv * hd), dim=-1)
            q = q.view(B, T, nh, hd).transpose(1, 2)
            k = k.view(B, T, nkv, hd).transpose(1, 2)
            v = v.view(B, T, nkv, hd).transpose(1, 2)
            interleaved = cfg.rope_kind == "interleaved"
            q, k = rotate(q, cos, sin, interleaved), rotate(k, cos, sin, interleaved)
            if past is not None:  # the growing cache: a new, longer tensor every step
                k = torch.cat((past[0], k), dim=2)
                v = torch.cat((past[1], v), dim=2)
            present = (k, v)
            if nh != nkv:
                k = k.repeat_interleave(nh // nkv, dim=1)
                v = v.repeat_interleave(nh // nkv, dim=1)
            scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(hd)
            if mask is not None:
                scores = scores + mask
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            out = torch.matmul(probs, v).transpose(1, 2).reshape(B, T, nh * hd)
            return self.dense(out), present

    class MLP(nn.Module):
        def __init__(self, cfg, w, prefix):
            super().__init__()
            self.kind = cfg.activation
            self.up = linear(w[f"{prefix}.up.weight"], w.get(f"{prefix}.up.bias"))
            self.down = linear(w[f"{prefix}.down.weight"], w.get(f"{prefix}.down.bias"))

        def forward(self, x):
            h = self.up(x)
            if self.kind == "swiglu":
                a, b = h.chunk(2, dim=-1)
                h = F.silu(a) * b
            elif self.kind == "geglu":
                a, b = h.chunk(2, dim=-1)
                h = a * F.gelu(b)
            else:
                h = F.gelu(h, approximate="tanh")
            return self.down(h)

    class Block(nn.Module):
        def __init__(self, cfg, w, i):
            super().__init__()
            p = f"layers.{i}"
            self.placement, self.alpha = cfg.norm_placement, cfg.residual_alpha
            self.attn_norm = Norm(cfg, w[f"{p}.attn_norm.weight"], w.get(f"{p}.attn_norm.bias"))
            self.attn = Attention(cfg, w, f"{p}.attn")
            self.mlp_norm = Norm(cfg, w[f"{p}.mlp_norm.weight"], w.get(f"{p}.mlp_norm.bias"))
            self.mlp = MLP(cfg, w, f"{p}.mlp")
            if self.placement == "sandwich":
                self.attn_out_norm = Norm(cfg, w[f"{p}.attn_out_norm.weight"])
                self.mlp_out_norm = Norm(cfg, w[f"{p}.mlp_out_norm.weight"])

        def forward(self, h, cos, sin, mask, past):
            x = self.attn_norm(h)
            a, present = self.attn(x, cos, sin, mask, past)
            if self.placement == "sandwich":
                a = self.attn_out_norm(a)
            h = (x * self.alpha if self.placement == "deepnorm" else h) + a
            x = self.mlp_norm(h)
            m = self.mlp(x)
            if self.placement == "sandwich":
                m = self.mlp_out_norm(m)
            return (x * self.alpha if self.placement == "deepnorm" else h) + m, present

    class EagerGLM(nn.Module):
        def __init__(self, cfg, w):
            super().__init__()
            self.cfg = cfg
            self.embed = nn.Embedding.from_pretrained(w["embed.weight"], freeze=False)
            self.layers = nn.ModuleList(Block(cfg, w, i) for i in range(cfg.num_layers))
            self.final_norm = Norm(cfg, w["final_norm.weight"], w.get("final_norm.bias")) if cfg.final_norm else None
            head = w["embed.weight"] if cfg.tie_word_embeddings else w["lm_head.weight"]
            self.lm_head = linear(head)

        def forward(self, ids, past=None, last_only=False):
            cfg = self.cfg
            T = ids.shape[1]
            start = 0 if past is None else past[0][0].shape[2]
            h = self.embed(ids)
            positions = torch.arange(start, start + T, device=ids.device, dtype=torch.float32)
            inv_freq = 1.0 / (cfg.rope_base ** (torch.arange(0, cfg.rotary_dim, 2, device=ids.device,
                                                             dtype=torch.float32) / cfg.rotary_dim))
            angles = positions[:, None] * inv_freq[None, :]
            cos, sin = angles.cos().to(h.dtype), angles.sin().to(h.dtype)
            mask = None
            if T > 1:
                mask = torch.full((T, start + T), torch.finfo(h.dtype).min, device=ids.device, dtype=h.dtype)
                mask = torch.triu(mask, diagonal=start + 1)
            presents = []
            for i, layer in enumerate(self.layers):
                h, present = layer(h, cos, sin, mask, None if past is None else past[i])
                presents.append(present)
            if self.final_norm is not None:
                h = self.final_norm(h)
            if last_only:
                h = h[:, -1:]
            return self.lm_head(h), presents

    return EagerGLM


class EagerRunner:
    """The torch-eager baseline: a plain greedy loop over the minimal nn.Module."""

    runner = "torch-eager"

    def __init__(self, cfg, weights: dict, device):
        import torch
        why = eager_incompatibility(cfg)
        if why:
            raise BaselineUnavailable(why)
        self.module = _eager_modules()(cfg, weights).to(device).eval()
        self.device = torch.device(device)
        self.label = BASELINE_LABELS["torch-eager"]

    def parameter_bytes(self) -> int:
        return _unique_bytes(self.module.parameters())

    def generate(self, prompt, gen_len: int, clock: TokenClock) -> None:
        import torch
        with torch.no_grad():
            ids = prompt.to(self.device)
            logits, past = self.module(ids, last_only=True)
            for step in range(gen_len):
                token = logits[:, -1].argmax(-1)
                clock.tick(token)
                if step == gen_len - 1:
                    break
                logits, past = self.module(token[:, None], past, last_only=True)

    def logits(self, prompt):
        import torch
        with torch.no_grad():
            return self.module(prompt.to(self.device))[0].float()


def _unique_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


class TransformersRunner:
    """The transformers baseline: GlmForCausalLM (Glm4ForCausalLM for sandwich norms) with the same
    weights, run with model.generate() the way a transformers user runs it."""

    runner = "transformers"

    def __init__(self, cfg, weights: dict, device):
        import torch
        why = transformers_incompatibility(cfg)
        if why:
            raise BaselineUnavailable(why)
        try:
            import transformers
        except ImportError as exc:
            raise BaselineUnavailable(f"the transformers package does not import: {exc}") from None
        sandwich = cfg.norm_placement == "sandwich"
        config_cls = transformers.Glm4Config if sandwich else transformers.GlmConfig
        model_cls = transformers.Glm4ForCausalLM if sandwich else transformers.GlmForCausalLM
        dtype = weights["embed.weight"].dtype
        self.vocab_size = cfg.vocab_size
        self.pad_token_id = cfg.pad_token_id
        hf_config = config_cls(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
            partial_rotary_factor=cfg.rotary_dim / cfg.head_dim, rope_theta=cfg.rope_base,
            attention_bias=cfg.qkv_bias, rms_norm_eps=cfg.norm_eps, max_position_embeddings=cfg.max_positions,
            tie_word_embeddings=cfg.tie_word_embeddings, pad_token_id=cfg.pad_token_id,
            eos_token_id=list(cfg.eos_token_ids) or None)
        hf_config._attn_implementation = "eager"
        state = self.state_dict(cfg, weights)
        model = self._build(model_cls, hf_config, state, dtype)
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.label = BASELINE_LABELS["transformers"].format(version=transformers.__version__, cls=model_cls.__name__)
        self._stopping = (transformers.StoppingCriteria, transformers.StoppingCriteriaList)

    @staticmethod
    def state_dict(cfg, w: dict) -> dict:
        """glmrt's canonical names -> transformers' glm / glm4 names (q/k/v split from the fused qkv)."""
        out = {"model.embed_tokens.weight": w["embed.weight"], "model.norm.weight": w["final_norm.weight"]}
        if not cfg.tie_word_embeddings:
            out["lm_head.weight"] = w["lm_head.weight"]
        sizes = (cfg.q_size, cfg.kv_size, cfg.kv_size)
        for i in range(cfg.num_layers):
            src, dst = f"layers.{i}", f"model.layers.{i}"
            out[f"{dst}.input_layernorm.weight"] = w[f"{src}.attn_norm.weight"]
            for part in ("weight", "bias") if cfg.qkv_bias else ("weight",):
                q, k, v = w[f"{src}.attn.qkv.{part}"].split(sizes, dim=0)
                out[f"{dst}.self_attn.q_proj.{part}"] = q
                out[f"{dst}.self_attn.k_proj.{part}"] = k
                out[f"{dst}.self_attn.v_proj.{part}"] = v
            out[f"{dst}.self_attn.o_proj.weight"] = w[f"{src}.attn.dense.weight"]
            out[f"{dst}.post_attention_layernorm.weight"] = w[f"{src}.mlp_norm.weight"]
            out[f"{dst}.mlp.gate_up_proj.weight"] = w[f"{src}.mlp.up.weight"]
            out[f"{dst}.mlp.down_proj.weight"] = w[f"{src}.mlp.down.weight"]
            if cfg.norm_placement == "sandwich":
                out[f"{dst}.post_self_attn_layernorm.weight"] = w[f"{src}.attn_out_norm.weight"]
                out[f"{dst}.post_mlp_layernorm.weight"] = w[f"{src}.mlp_out_norm.weight"]
        return out

    @staticmethod
    def _build(model_cls, hf_config, state: dict, dtype):
        """The model with `state` as its parameters, without a random initialisation of real-width
        matrices: built on the meta device, parameters assigned, then the (computed, not stored)
        rotary buffers rebuilt on the CPU."""
        import torch
        with torch.device("meta"):
            model = model_cls(hf_config)
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        missing = [m for m in missing if not (hf_config.tie_word_embeddings and m == "lm_head.weight")]
        if missing or unexpected:
            raise BaselineUnavailable(f"transformers weight mapping is off: missing {missing[:5]}, "
                                      f"unexpected {unexpected[:5]}")
        if hf_config.tie_word_embeddings:
            model.tie_weights()
        for name, module in list(model.named_modules()):
            if any(b.is_meta for b in module.buffers(recurse=False)):
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, child, type(module)(config=hf_config))
        still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
        if still_meta:
            raise BaselineUnavailable(f"transformers model has tensors left on the meta device: {still_meta[:5]}")
        model.config.dtype = dtype
        return model

    def parameter_bytes(self) -> int:
        return _unique_bytes(self.model.parameters())

    def generate(self, prompt, gen_len: int, clock: TokenClock) -> None:
        import torch
        criteria_cls, list_cls = self._stopping

        class TokenTick(criteria_cls):
            """Called by generate() after every new token: records its time, never stops."""

            def __call__(self, input_ids, scores, **kwargs):
                clock.tick(input_ids[:, -1])
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        ids = prompt.to(self.device)
        with torch.no_grad():  # what generate() itself uses
            self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=gen_len,
                                do_sample=False, eos_token_id=self.vocab_size + 7, pad_token_id=self.pad_token_id,
                                stopping_criteria=list_cls([TokenTick()]))

    def logits(self, prompt):
        import torch
        with torch.no_grad():
            return self.model(input_ids=prompt.to(self.device)).logits.float()


# =============================================================================================
# workers (each setting in a fresh process)


class _ReferenceOnly:
    """Lowering target that offers no kernels: every node runs glmrt's plain-torch reference op on the CPU."""

    @staticmethod
    def backend():
        from .backends.base import Backend, ProbeResult, Verification

        class ReferenceCPU(Backend):
            name = "reference-cpu"
            device_type = "cpu"

            def probe(self):
                return ProbeResult(True, "plain-torch reference ops on the CPU")

            def verification(self):
                return Verification("run-verified", "the reference ops are the oracle")

        return ReferenceCPU()


def _task_reference(task: dict) -> dict:
    """float32 CPU logits of the prompt through the plain-torch reference ops, saved for the other workers."""
    import torch
    import glmrt
    from .lowering import lower
    from .model import Model
    t0 = time.perf_counter()
    loaded = glmrt.load(task["model"], backend="cpu", dtype="float32", layers=task["layers"], progress=True)
    plan = lower(loaded.graph, _ReferenceOnly.backend(), loaded.weights)
    model = Model(loaded.config, loaded.graph, plan, loaded.weights, loaded.source)
    logits = model.logits(torch.tensor(task["prompt_ids"], dtype=torch.long))
    torch.save(logits, task["logits_path"])
    return {"status": "ok", "load_s": time.perf_counter() - t0,
            "description": "float32 on the CPU, every op on glmrt's plain-torch reference (glmrt.ops)"}


def _task_device_bandwidth(task: dict) -> dict:
    """Published figure and measured device-to-device copy of one backend's device."""
    import torch
    from .backends import get_backend
    backend = get_backend(task["backend"])
    device = backend.device()
    name = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    copy = device_copy_bandwidth(device, backend.synchronize)
    published = published_bandwidth(name) if name else None
    out = {"status": "ok", "device_name": name or str(device), "measured_copy": copy, "published": published}
    if published:
        out.update(kind="published", bytes_per_s=published["bytes_per_s"], source=published["source"])
    else:
        out.update(kind="measured-copy", bytes_per_s=copy["bytes_per_s"],
                   source=f"no published figure known for {name or device}: measured device-to-device copy")
    return out


def _system_load(before, after) -> dict:
    """1-minute load average before and after a setting's timed runs (this worker's own threads count in
    it: load above the thread count means other work competed for the CPUs)."""
    return {"before_1min": before[0] if before else None, "after_1min": after[0] if after else None}


def _plan_summary(plan) -> dict:
    kinds = {"native": 0, "vendor": 0, "reference": 0}
    fallback_ops = set()
    for step in plan.steps:
        kinds[step.kind] = kinds.get(step.kind, 0) + 1
        if step.kind == "reference":
            fallback_ops.add(step.node.op)
    return {"nodes": kinds, "fallback_ops": sorted(fallback_ops)}


def _setting_metrics(task: dict, timings: list[RunTiming], traffic: dict, drift: dict, peak: dict) -> dict:
    summary = summarize_timings(timings, task["batch"], task["prompt_len"])
    tpot_mean = summary["tpot_s"]["mean"]
    bandwidth = dict(traffic, achieved_bytes_per_s=traffic["bytes_per_step"] / tpot_mean)
    return dict(summary, bandwidth=bandwidth, drift=drift, peak_memory=peak,
                full_depth=full_depth_estimate(traffic, tpot_mean, task["batch"], task["full_num_layers"]))


def _task_glmrt(task: dict) -> dict:
    import torch
    import glmrt
    s = task["setting"]
    label = Setting(**s).id
    t0 = time.perf_counter()
    model = glmrt.load(task["model"], backend=s["backend"], dtype=s["dtype"], layers=task["layers"],
                       quantize=None if s["quantize"] == "none" else s["quantize"], progress=True)
    load_s = time.perf_counter() - t0
    _log(f"  {label}: loaded in {load_s:.1f} s ({model.weight_bytes() / 2**20:.1f} MiB of weights)")
    backend = model.backend
    load_peak = backend.memory_stats().get("peak_bytes")
    prompt = torch.tensor(task["prompt_ids"], dtype=torch.long)

    def run_once(clock: TokenClock) -> None:
        for token in model.stream(prompt, max_new_tokens=task["gen_len"], eos_token_id=NO_EOS):
            clock.tick(token)

    was_reset = reset_peak_memory(model.device.type)
    load_before = load_average()
    timings, tokens = measure(run_once, backend.synchronize, warmup=task["warmup"], repeat=task["repeat"],
                              gen_len=task["gen_len"], label=label)
    system_load = _system_load(load_before, load_average())
    peak = {"bytes": backend.memory_stats().get("peak_bytes"), "load_peak_bytes": load_peak,
            "what": peak_memory_note(model.device.type, was_reset)}
    drift = logit_drift(model.logits(prompt), torch.load(task["reference_logits"]))
    traffic = decode_traffic(model.graph, model.weights, task["batch"], task["prompt_len"], task["gen_len"])
    result = _setting_metrics(task, timings, traffic, drift, peak)
    described = backend.describe()
    result.update(status="ok", label=f"glmrt on {backend.name}", load_s=load_s, weight_bytes=model.weight_bytes(),
                  system_load=system_load,
                  plan=_plan_summary(model.plan), native=described.get("native"),
                  torch_threads=torch.get_num_threads(), generated_ids=tokens)
    return result


def _task_baseline(task: dict) -> dict:
    import torch
    import glmrt
    s = task["setting"]
    label = Setting(**s).id
    t0 = time.perf_counter()
    # The same weights as every glmrt setting (checkpoint or synthetic seed), in this dtype.
    source = glmrt.load(task["model"], backend="cpu", dtype=s["dtype"], layers=task["layers"], progress=True)
    traffic = decode_traffic(source.graph, source.weights, task["batch"], task["prompt_len"], task["gen_len"])
    cfg, weights = source.config, dict(source.weights)
    del source
    runner_cls = TransformersRunner if s["runner"] == "transformers" else EagerRunner
    runner = runner_cls(cfg, weights, s["device"])
    del weights
    load_s = time.perf_counter() - t0
    device_type = torch.device(s["device"]).type
    sync = (lambda: torch.cuda.synchronize()) if device_type == "cuda" else (lambda: None)
    prompt = torch.tensor(task["prompt_ids"], dtype=torch.long)
    load_peak = device_peak_bytes(device_type)
    was_reset = reset_peak_memory(device_type)
    load_before = load_average()
    timings, tokens = measure(lambda clock: runner.generate(prompt, task["gen_len"], clock), sync,
                              warmup=task["warmup"], repeat=task["repeat"], gen_len=task["gen_len"], label=label)
    system_load = _system_load(load_before, load_average())
    peak = {"bytes": device_peak_bytes(device_type), "load_peak_bytes": load_peak,
            "what": peak_memory_note(device_type, was_reset)}
    drift = logit_drift(runner.logits(prompt), torch.load(task["reference_logits"]))
    result = _setting_metrics(task, timings, traffic, drift, peak)
    result.update(status="ok", label=runner.label, load_s=load_s, weight_bytes=runner.parameter_bytes(),
                  system_load=system_load,
                  plan=None, native=None, torch_threads=torch.get_num_threads(), generated_ids=tokens)
    return result


WORKER_TASKS = {"reference": _task_reference, "device_bandwidth": _task_device_bandwidth,
                "glmrt": _task_glmrt, "baseline": _task_baseline}


def worker_main(task_path: str, result_path: str) -> int:
    """Entry point of a worker process: run one task, write its result as JSON."""
    import torch
    with open(task_path, encoding="utf-8") as f:
        task = json.load(f)
    torch.set_num_threads(int(task["threads"]))
    try:
        result = WORKER_TASKS[task["kind"]](task)
        code = 0
    except Exception as exc:  # noqa: BLE001 - the parent records the failure and goes on
        traceback.print_exc(file=sys.stderr)
        result = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
        code = 1
    with open(result_path, "w", encoding="utf-8") as f:
        json.dump(result, f)
    return code


def _worker_env(threads: int) -> dict:
    env = dict(os.environ)
    # The child imports the same glmrt as this process, and uses the same number of threads for
    # torch and for OpenMP in glmrt's native kernels.
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["OMP_NUM_THREADS"] = str(threads)
    env["MKL_NUM_THREADS"] = str(threads)
    return env


def run_worker(task: dict, workdir: Path, name: str) -> dict:
    """Run one task in a fresh process; its stderr (progress) goes to ours as it comes."""
    task_path, result_path = workdir / f"{name}.task.json", workdir / f"{name}.result.json"
    task_path.write_text(json.dumps(task), encoding="utf-8")
    cmd = [sys.executable, "-m", "glmrt.bench", "--worker", str(task_path), str(result_path)]
    # cwd: the task's directory, never the caller's (a source checkout there would shadow the
    # installed package and its compiled kernels: `python -m` puts the cwd first on sys.path).
    proc = subprocess.Popen(cmd, env=_worker_env(task["threads"]), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, cwd=str(Path(task_path).parent))
    tail = b""
    assert proc.stderr is not None
    while True:
        chunk = proc.stderr.read1(4096) if hasattr(proc.stderr, "read1") else proc.stderr.read(4096)
        if not chunk:
            break
        sys.stderr.write(chunk.decode("utf-8", errors="replace"))
        sys.stderr.flush()
        tail = (tail + chunk)[-4000:]
    code = proc.wait()
    if result_path.is_file():
        return json.loads(result_path.read_text(encoding="utf-8"))
    lines = [ln for ln in tail.decode("utf-8", errors="replace").splitlines() if ln.strip()]
    return {"status": "error", "error": f"worker exited with code {code}: {lines[-1] if lines else 'no output'}"}


# =============================================================================================
# the run


def run_bench(cfg: BenchConfig, argv: list[str] | None = None) -> dict:
    """Run every setting of `cfg`; returns the results document (and writes it if cfg.out)."""
    import torch
    model_info, model_cfg = describe_model(cfg.model, cfg.layers)
    if cfg.prompt_len + cfg.gen_len > model_cfg.max_positions:
        raise InputError(f"prompt ({cfg.prompt_len}) + generated tokens ({cfg.gen_len}) exceed the model's "
                         f"{model_cfg.max_positions} positions")
    settings, skipped = plan_settings(cfg, model_cfg)
    for row in skipped:
        _log(f"glmrt bench: skipping {row['setting']}: {row['reason']}")
    if not settings:
        raise ConfigError("nothing to run: every requested backend or setting was skipped (see the lines above)")
    torch.set_num_threads(cfg.threads)
    prompts = prompt_ids(model_cfg.vocab_size, cfg.batch, cfg.prompt_len, cfg.seed)
    doc = {"schema_version": SCHEMA_VERSION, "kind": "glmrt-bench",
           "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": cfg.command(), "argv": list(sys.argv if argv is None else argv),
           "config": asdict(cfg), "model": model_info, **stamp(cfg.threads),
           "prompt_ids": prompts, "skipped": skipped, "metric_notes": METRIC_NOTES}
    _log(f"glmrt bench: {len(settings)} setting(s) of {cfg.model}"
         f"{f' (layers {cfg.layers})' if cfg.layers else ''}, {cfg.threads} thread(s): "
         f"{', '.join(s.id for s in settings)}")

    with tempfile.TemporaryDirectory(prefix="glmrt-bench-") as tmp:
        workdir = Path(tmp)
        doc["device_bandwidth"] = measure_device_bandwidth(cfg, settings, workdir)
        base_task = {"model": cfg.model, "layers": cfg.layers, "threads": cfg.threads, "batch": cfg.batch,
                     "prompt_len": cfg.prompt_len, "gen_len": cfg.gen_len, "repeat": cfg.repeat,
                     "warmup": cfg.warmup, "prompt_ids": prompts, "full_num_layers": model_info["full_num_layers"],
                     "reference_logits": str(workdir / "reference_logits.pt")}
        _log("glmrt bench: [reference] float32 CPU logits through the plain-torch reference ops")
        reference = run_worker(dict(base_task, kind="reference", logits_path=base_task["reference_logits"]),
                               workdir, "reference")
        if reference.get("status") != "ok":
            raise GLMRTError(f"the float32 CPU reference failed: {reference.get('error')}")
        doc["reference"] = {"description": reference["description"]}
        results = []
        for i, setting in enumerate(settings, 1):
            _log(f"glmrt bench: [{i}/{len(settings)}] {setting.id}")
            kind = "glmrt" if setting.runner == "glmrt" else "baseline"
            raw = run_worker(dict(base_task, kind=kind, setting=asdict(setting)), workdir, f"setting{i}")
            results.append(finish_result(setting, raw, doc["device_bandwidth"]))
            if results[-1]["status"] != "ok":
                _log(f"glmrt bench: {setting.id} failed: {results[-1]['error']}")
    doc["results"] = results
    doc["hardware"]["load_average"]["end"] = load_average()
    if cfg.out:
        write_outputs(doc, Path(cfg.out))
    return doc


def measure_device_bandwidth(cfg: BenchConfig, settings: list[Setting], workdir: Path) -> dict:
    """{device: bandwidth figure} for every device a setting runs on."""
    out: dict[str, dict] = {}
    for setting in settings:
        device = setting.device
        if device in out:
            continue
        if device.split(":")[0] == "cpu":
            _log(f"glmrt bench: measuring CPU read bandwidth ({cfg.threads} threads)")
            out[device] = cpu_read_bandwidth(cfg.threads)
            continue
        backend = setting.backend or next(s.backend for s in settings if s.device == device and s.backend)
        _log(f"glmrt bench: measuring {device} bandwidth (device-to-device copy)")
        result = run_worker({"kind": "device_bandwidth", "backend": backend, "threads": cfg.threads},
                            workdir, f"bandwidth-{len(out)}")
        if result.get("status") == "ok":
            result.pop("status")
            out[device] = result
        else:
            out[device] = {"kind": "unknown", "bytes_per_s": None, "source": f"measurement failed: {result['error']}"}
    return out


def finish_result(setting: Setting, raw: dict, device_bandwidth: dict) -> dict:
    """A worker's result with the setting's identity and its fraction of the device's bandwidth."""
    result = {"id": setting.id, **asdict(setting), "status": "ok" if raw.get("status") == "ok" else "error"}
    if result["status"] != "ok":
        result["error"] = raw.get("error", "unknown error")
        return result
    result.update((k, v) for k, v in raw.items() if k != "status")
    reference = device_bandwidth.get(setting.device) or {}
    bw = result["bandwidth"]
    bw["device_bytes_per_s"] = reference.get("bytes_per_s")
    bw["device_bandwidth_kind"] = reference.get("kind")
    bw["fraction_of_device"] = (bw["achieved_bytes_per_s"] / reference["bytes_per_s"]
                                if reference.get("bytes_per_s") else None)
    copy = (reference.get("measured_copy") or {}).get("bytes_per_s")
    bw["fraction_of_measured_copy"] = bw["achieved_bytes_per_s"] / copy if copy else None
    return result


# =============================================================================================
# output: table, markdown, plot


def _fmt(value, spec: str, scale: float = 1.0) -> str:
    if value is None:
        return "-"
    return format(value * scale, spec)


def _mib(nbytes) -> str:
    if nbytes is None:
        return "-"
    mib = nbytes / 2**20
    return f"{mib:.0f}" if mib >= 100 else f"{mib:.2f}"


def table_rows(results: list[dict]) -> tuple[list[str], list[list[str]]]:
    header = ["setting", "TTFT ms", "TPOT ms mean", "p50", "p90", "prefill tok/s", "decode tok/s",
              "peak MiB", "weights MiB", "GB/s", "% dev BW", "max|dlogit|", "top-1", "KL"]
    rows = []
    for r in results:
        if r["status"] != "ok":
            rows.append([r["id"], f"error: {r['error']}"] + [""] * (len(header) - 2))
            continue
        bw = r["bandwidth"]
        rows.append([
            r["id"], _fmt(r["ttft_s"]["median"], ".1f", 1e3), _fmt(r["tpot_s"]["mean"], ".2f", 1e3),
            _fmt(r["tpot_s"]["p50"], ".2f", 1e3), _fmt(r["tpot_s"]["p90"], ".2f", 1e3),
            _fmt(r["prefill_tokens_per_s"]["median"], ".1f"), _fmt(r["decode_tokens_per_s"]["mean"], ".2f"),
            _mib(r["peak_memory"]["bytes"]), _mib(r["weight_bytes"]),
            _fmt(bw["achieved_bytes_per_s"], ".2f", 1e-9), _fmt(bw["fraction_of_device"], ".0f", 100),
            _fmt(r["drift"]["max_abs_logit_diff"], ".2e"), _fmt(r["drift"]["top1_agreement"], ".3f"),
            _fmt(r["drift"]["mean_kl"], ".2e"),
        ])
    return header, rows


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    def esc(cell: str) -> str:
        return cell.replace("|", "\\|")
    lines = ["| " + " | ".join(esc(h) for h in header) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def stamp_lines(doc: dict) -> list[str]:
    hw, sw, cfg, model = doc["hardware"], doc["software"], doc["config"], doc["model"]
    cpu = hw["cpu"]
    gpus = "; ".join(f"{g['name']} (driver {g['driver']})" for g in hw["gpus"]) or "none"
    dirty = " (uncommitted changes)" if sw.get("dirty") else ""
    load = hw["load_average"]
    busy = ""
    others = competing_load(doc)
    if others is not None and others > 0.5:
        busy = (f" - other work competed for the CPUs (1-minute load up to {others:.1f} above this run's own "
                f"{hw['threads']} threads): CPU timings are noisy")
    return [
        f"model: {model['source']} ({model['generation']}), {model['num_layers']} of {model['full_num_layers']} "
        f"layers, {model['parameters'] / 1e9:.2f} B parameters",
        f"prompt: {cfg['batch']} x {cfg['prompt_len']} tokens (seed {cfg['seed']}), {cfg['gen_len']} generated, "
        f"greedy; warm-up {cfg['warmup']}, repeats {cfg['repeat']}",
        f"CPU: {cpu['model']}, {cpu['physical_cores'] or '?'} cores / {cpu['logical_cpus']} logical CPUs "
        f"({cpu['usable_cpus']} usable), {hw['threads']} threads",
        f"GPU: {gpus}; torch {sw['torch']} (CUDA {sw['torch_cuda'] or '-'})",
        f"glmrt {sw['glmrt']}, commit {sw['commit']}{dirty}; transformers {sw['transformers'] or 'not installed'}; "
        f"Python {sw['python']}; {hw['os']}",
        f"run at {doc['created_utc']}; system load (1/5/15 min) at start {_load_text(load['start'])}, at end "
        f"{_load_text(load['end'])}{busy}",
    ]


def competing_load(doc: dict) -> float | None:
    """The most load any CPU setting saw beyond its own threads (1-minute average), or None if unknown."""
    threads = doc["hardware"]["threads"]
    seen = [v for r in doc.get("results", []) if r.get("status") == "ok" and r["device"].startswith("cpu")
            for v in (r["system_load"]["before_1min"], r["system_load"]["after_1min"]) if v is not None]
    start = (doc["hardware"]["load_average"]["start"] or [None])[0]
    if start is not None:
        seen.append(start + threads)  # before any worker ran: all of it was other work
    return max(seen) - threads if seen else None


def _load_text(values) -> str:
    return "/".join(f"{v:.1f}" for v in values) if values else "unknown"


def bandwidth_lines(doc: dict) -> list[str]:
    out = []
    for device, bw in doc["device_bandwidth"].items():
        value = f"{bw['bytes_per_s'] / 1e9:.1f} GB/s" if bw.get("bytes_per_s") else "unknown"
        what = bw.get("method") or bw.get("source", "")
        line = f"{device}: {value} ({what})"
        copy = bw.get("measured_copy")
        if copy:
            line += f"; measured copy {copy['bytes_per_s'] / 1e9:.0f} GB/s ({copy['method']})"
        out.append(line)
    return out


def spread_rows(results: list[dict]) -> tuple[list[str], list[list[str]]]:
    """min / median / max over the timed runs of each setting."""
    columns = (("TTFT ms", ("ttft_s",), ".1f", 1e3), ("TPOT ms (per run)", ("tpot_s", "per_run"), ".2f", 1e3),
               ("decode tok/s", ("decode_tokens_per_s",), ".2f", 1),
               ("prefill tok/s", ("prefill_tokens_per_s",), ".1f", 1))
    rows = []
    for r in results:
        row = [r["id"]]
        for _, path, spec, scale in columns:
            s = r
            for key in path:
                s = s[key]
            row.append(" / ".join(_fmt(s[k], spec, scale) for k in ("min", "median", "max")))
        row.append(f"{_fmt(r['system_load']['before_1min'], '.1f')} / {_fmt(r['system_load']['after_1min'], '.1f')}")
        rows.append(row)
    return ["setting"] + [c[0] for c in columns] + ["system load before / after"], rows


def render_markdown(doc: dict) -> str:
    header, rows = table_rows(doc["results"])
    ok = [r for r in doc["results"] if r["status"] == "ok"]
    parts = [f"# glmrt bench: {doc['model']['source']}, {doc['model']['num_layers']} layers", ""]
    parts += [f"- {line}" for line in stamp_lines(doc)]
    parts += ["", "Command:", "", "```", doc["command"], "```", "", "## Results", "", markdown_table(header, rows), ""]
    parts += ["Device bandwidth the `% dev BW` column divides by:", ""]
    parts += [f"- {line}" for line in bandwidth_lines(doc)] + [""]
    parts += ["## Spread over repeats (min / median / max)", "", markdown_table(*spread_rows(ok)), ""]
    estimates = [r for r in ok if r.get("full_depth")]
    if estimates:
        full = estimates[0]["full_depth"]["full_num_layers"]
        parts += [f"## Per-layer cost and full-depth ({full} layers) estimate", "",
                  "Estimated by scaling TPOT with the bytes each decode step reads (the achieved bandwidth is "
                  "assumed to stay the same); an estimate, not a measurement, fair only where the run is "
                  "bandwidth-bound (see `% dev BW`).", "",
                  markdown_table(["setting", "bytes/step MB", "per layer ms", "LM head + embedding ms",
                                  f"TPOT ms at {full} layers", f"decode tok/s at {full} layers"],
                                 [[r["id"], _fmt(r["bandwidth"]["bytes_per_step"], ".1f", 1e-6),
                                   _fmt(r["full_depth"]["per_layer_tpot_s"], ".2f", 1e3),
                                   _fmt(r["full_depth"]["fixed_tpot_s"], ".2f", 1e3),
                                   _fmt(r["full_depth"]["tpot_s_full"], ".1f", 1e3),
                                   _fmt(r["full_depth"]["decode_tokens_per_s_full"], ".2f")] for r in estimates]), ""]
    parts += ["## What each setting is", ""]
    for r in doc["results"]:
        if r["status"] != "ok":
            parts.append(f"- `{r['id']}`: failed: {r['error']}")
            continue
        extra = ""
        if r.get("plan"):
            nodes = r["plan"]["nodes"]
            extra = (f"; plan: {nodes.get('native', 0)} native, {nodes.get('vendor', 0)} vendor, "
                     f"{nodes.get('reference', 0)} reference nodes")
            if r["plan"]["fallback_ops"]:
                extra += f" (reference fallback for {', '.join(r['plan']['fallback_ops'])})"
        if r.get("native") is not None:
            extra += f"; native module built: {r['native'].get('built')}"
        parts.append(f"- `{r['id']}`: {r['label']}{extra}")
    parts += ["", f"Drift reference: {doc['reference']['description']}.", ""]
    if doc["skipped"]:
        parts += ["## Skipped", ""] + [f"- {s['setting']}: {s['reason']}" for s in doc["skipped"]] + [""]
    parts += ["## Definitions", ""] + [f"- {n}" for n in doc["metric_notes"]] + [""]
    return "\n".join(parts)


def render_plot(doc: dict, path: Path) -> str | None:
    """decode tokens/s (bars: mean, whiskers: min-max over repeats) and drift per setting; returns
    why no plot was written, or None."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"matplotlib is not installed ({exc})"
    ok = [r for r in doc["results"] if r["status"] == "ok"]
    if not ok:
        return "no setting finished"
    ids = [r["id"] for r in ok]
    colors = ["tab:blue" if r["runner"] == "glmrt" else "tab:gray" for r in ok]
    x = list(range(len(ok)))
    fig, axes = plt.subplots(3, 1, figsize=(max(6.0, 1.1 * len(ok) + 2), 9), sharex=True)
    decode = [r["decode_tokens_per_s"]["mean"] for r in ok]
    low = [d - r["decode_tokens_per_s"]["min"] for d, r in zip(decode, ok)]
    high = [r["decode_tokens_per_s"]["max"] - d for d, r in zip(decode, ok)]
    axes[0].bar(x, decode, color=colors, yerr=[[max(v, 0) for v in low], [max(v, 0) for v in high]], capsize=3)
    axes[0].set_ylabel("decode tokens/s")
    for xi, d in zip(x, decode):
        axes[0].annotate(f"{d:.1f}", (xi, d), ha="center", va="bottom", fontsize=8)
    floor = 1e-12
    for ax, key, label in ((axes[1], "max_abs_logit_diff", "max |logit diff|"), (axes[2], "mean_kl", "mean KL")):
        values = [max(r["drift"][key], floor) for r in ok]
        ax.bar(x, values, color=colors)
        ax.set_yscale("log")
        ax.set_ylabel(f"{label}\nvs fp32 CPU reference")
        for xi, r in zip(x, ok):
            ax.annotate(f"{r['drift'][key]:.1e}", (xi, max(r["drift"][key], floor)), ha="center", va="bottom",
                        fontsize=7)
    axes[2].set_xticks(x)
    axes[2].set_xticklabels(ids, rotation=30, ha="right", fontsize=8)
    model = doc["model"]
    fig.suptitle(f"glmrt bench: {model['source']} ({model['num_layers']} layers), batch {doc['config']['batch']}, "
                 f"{doc['hardware']['threads']} threads\n{doc['hardware']['cpu']['model']}; "
                 f"commit {doc['software']['commit'][:12]} (blue: glmrt, grey: baselines)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_outputs(doc: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    (out / "results.md").write_text(render_markdown(doc), encoding="utf-8")
    why_not = render_plot(doc, out / "results.png")
    if why_not:
        _log(f"glmrt bench: no plot: {why_not}")


def print_report(doc: dict) -> None:
    print("\n".join(stamp_lines(doc)))
    print(text_table(*table_rows(doc["results"])))
    for line in bandwidth_lines(doc):
        print(f"device bandwidth: {line}")
    for r in doc["results"]:
        if r["status"] == "ok" and r["runner"] != "glmrt":
            print(f"{r['id']}: {r['label']}")
    for s in doc["skipped"]:
        print(f"skipped {s['setting']}: {s['reason']}")
    if doc["config"]["out"]:
        print(f"written: {Path(doc['config']['out']) / 'results.json'}, results.md, results.png")


# =============================================================================================
# --compare


def load_results(path: str) -> dict:
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from None
    if not isinstance(doc, dict) or doc.get("kind") != "glmrt-bench":
        raise InputError(f"{path} is not a glmrt bench results.json")
    return doc


def schema_problems(doc: dict) -> list[str]:
    """Where `doc` breaks bench_schema.json ([] if valid, or if jsonschema is not installed)."""
    try:
        import jsonschema
    except ImportError:
        return []
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{'/'.join(map(str, e.path)) or '(top)'}: {e.message}" for e in validator.iter_errors(doc)]


def _ratio(a, b) -> str:
    if a is None or b is None or a == 0:
        return "-"
    return f"{b / a:.2f}x"


def compare_runs(a: dict, b: dict, a_name: str = "A", b_name: str = "B") -> str:
    """Two runs side by side: every setting present in either, B/A ratios where both ran it."""
    lines = []
    for name, doc in ((a_name, a), (b_name, b)):
        lines.append(f"{name}: {doc['command']}")
        lines += [f"    {line}" for line in stamp_lines(doc)]
    keys = ("model", "batch", "prompt_len", "gen_len", "threads", "seed")
    differ = [k for k in keys if (a["model"]["source"] if k == "model" else a["config"][k])
              != (b["model"]["source"] if k == "model" else b["config"][k])]
    if a["model"]["num_layers"] != b["model"]["num_layers"]:
        differ.append("layers")
    if differ:
        lines.append(f"note: the runs differ in {', '.join(differ)}: the ratios compare different work")
    if a["hardware"]["cpu"]["model"] != b["hardware"]["cpu"]["model"] or \
            [g["name"] for g in a["hardware"]["gpus"]] != [g["name"] for g in b["hardware"]["gpus"]]:
        lines.append("note: the runs were made on different hardware")
    by_a = {r["id"]: r for r in a["results"]}
    by_b = {r["id"]: r for r in b["results"]}
    order = list(by_a) + [i for i in by_b if i not in by_a]

    def value(r, path):
        if r is None or r.get("status") != "ok":
            return None
        for key in path:
            r = r.get(key) if isinstance(r, dict) else None
        return r

    metrics = (("decode tok/s", ("decode_tokens_per_s", "mean"), ".2f", 1),
               ("TTFT ms", ("ttft_s", "median"), ".1f", 1e3),
               ("TPOT ms", ("tpot_s", "mean"), ".2f", 1e3),
               ("peak MiB", ("peak_memory", "bytes"), ".0f", 1 / 2**20),
               ("max|dlogit|", ("drift", "max_abs_logit_diff"), ".2e", 1))
    header = ["setting"]
    for label, *_ in metrics:
        header += [f"{a_name} {label}", f"{b_name} {label}", f"{b_name}/{a_name}"]
    rows = []
    for sid in order:
        ra, rb = by_a.get(sid), by_b.get(sid)
        row = [sid + ("" if ra and rb else f" (only in {a_name if ra else b_name})")]
        for _, path, spec, scale in metrics:
            va, vb = value(ra, path), value(rb, path)
            row += [_fmt(va, spec, scale), _fmt(vb, spec, scale), _ratio(va, vb)]
        rows.append(row)
    lines.append(text_table(header, rows))
    lines.append(f"ratios are {b_name} / {a_name}: above 1 is faster for tokens/s, slower for TTFT and TPOT")
    return "\n".join(lines)


# =============================================================================================
# command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="checkpoint directory or synthetic:<preset>")
    p.add_argument("--model", dest="model_flag", default=None, help="the model (same as the positional argument)")
    p.add_argument("--layers", type=int, default=None, help="keep only the first N layers")
    p.add_argument("--backends", default="all",
                   help="comma-separated backend names or aliases, or all (default: all; unavailable ones are "
                        "skipped with the reason)")
    p.add_argument("--dtype", default="float32", help="comma-separated: float32,bfloat16,float16 (default: float32)")
    p.add_argument("--quantize", default="none",
                   help="comma-separated: none,int8,int4 (group-wise: int4-g64, ...) (default: none)")
    p.add_argument("--baseline", default="auto",
                   help="comma-separated baselines: transformers (GlmForCausalLM.generate), torch-eager (a minimal "
                        "transformers-style nn.Module), auto (transformers if installed and the model fits it, else "
                        "torch-eager) or none (default: auto)")
    p.add_argument("--batch", type=int, default=1, help="sequences per request (default: 1)")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (default: 32)")
    p.add_argument("--gen-len", type=int, default=32, help="generated tokens per request (default: 32)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per setting (default: 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default: 1)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default here)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompt ids (default: 0)")
    p.add_argument("--out", default=None, help="write results.json, results.md and results.png into DIR")
    p.add_argument("--json", action="store_true", help="print the results document as JSON instead of the table")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), default=None,
                   help="print two results.json side by side (matching settings, B/A ratios) and exit")


def handle(args: argparse.Namespace) -> int:
    if args.compare:
        a, b = (load_results(p) for p in args.compare)
        for path, doc in zip(args.compare, (a, b)):
            problems = schema_problems(doc)
            if problems:
                _log(f"glmrt bench: warning: {path} does not match bench_schema.json: {problems[0]}")
        print(compare_runs(a, b))
        return 0
    cfg = config_from_args(args)
    doc = run_bench(cfg)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print_report(doc)
    return 0 if all(r["status"] == "ok" for r in doc["results"]) else 1


def register(subparsers) -> None:
    """Adds `glmrt bench` to the glmrt command (glmrt.cli's _COMMAND_MODULES)."""
    p = subparsers.add_parser("bench", help="benchmark a model on every available backend (TTFT, TPOT, tokens/s, "
                                            "memory, bandwidth, drift), or compare two runs",
                              description=__doc__.split("\n\n")[0])
    add_arguments(p)
    p.set_defaults(handler=handle)


def main(argv: list[str] | None = None) -> int:
    """`python -m glmrt.bench ...`: the same as `glmrt bench ...`."""
    parser = argparse.ArgumentParser(prog="glmrt bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return handle(args)
    except GLMRTError as exc:
        print(f"glmrt: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        sys.exit(worker_main(sys.argv[2], sys.argv[3]))
    sys.exit(main(sys.argv[1:]))
