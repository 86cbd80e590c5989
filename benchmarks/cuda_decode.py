"""Batch-1 decode and prefill on one CUDA GPU, in one process: glmrt (CUDA-graph decode by default)
in fp16 and INT4 quantized from the same weights, against transformers eager (GlmForCausalLM,
eager attention, model.generate) on those same fp16 weights. Per setting: decode tokens/s with the
bytes each step reads and their fraction of the GPU's published and measured bandwidth, prefill
tokens/s at the given prompt lengths, and a per-step kernel profile (torch.profiler: kernels per
decode step, their device time and share) so that a missed target says where the time goes.

    python benchmarks/cuda_decode.py --preset chatglm3-6b --quantize none,int4 --prefill 512,2048 --out r.json
    python benchmarks/cuda_decode.py --preset glm-4-9b --dry-run      # no GPU needed: see below

The targets it reports against (../shared/PERF.md, issue 17): fp16 decode >= 80% of the published
bandwidth (H100 SXM 3.35 TB/s, H200 4.8 TB/s) and >= 7x transformers eager; INT4 >= 2.5x the fp16
decode tokens/s of the same run.

Weights. `--weights device` (the default) draws them on the GPU with the distribution of glmrt's
synthetic presets (N(0, 0.02) matrices and biases, norm weights 1 + N(0, 0.1)): generating 6-9 B
numbers on the CPU, as `glmrt.load("synthetic:...")` does, would take longer than every
measurement here together. Speed does not depend on the values. `--weights synthetic` uses
glmrt.load's own CPU-seeded weights. Quantized settings are quantized on the GPU from the same
float weights (glmrt.quant.quantize_weights), and the transformers baseline is built from them
(glmrt.bench's TransformersRunner: the q/k/v split of the fused qkv, views, no copy).

Timing (glmrt.bench's TokenClock / measure): warm-up runs of the same length first (so the CUDA
graph is captured before any timed step), then `--repeat` runs of `--gen` greedy tokens with the
device synchronized after each; TPOT = (end-to-end - TTFT) / (tokens - 1), median over runs.
Prefill: the time to the first token of a `--prefill` long prompt (the prompt's forward with the
LM head on its last position, plus one greedy sample), median of `--repeat` after a warm-up.

`--dry-run` needs no GPU: it checks the arguments, plans every setting for the cuda backend on
meta weights (the kernels each node would run, strict fallbacks named), computes the bytes per
decode step, and builds the transformers model on the meta device with the weight mapping
checked, so a typo costs no GPU minutes. It prints the plan and exits 0, or 2 with the problem.

The JSON (`--out FILE`; with `--append` a list of runs that grows) is rewritten after every
measurement, so a run stopped by a time limit keeps what it measured ("complete": false).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from glmrt import _native
from glmrt.backends import get_backend
from glmrt.config import dtype_name, parse_dtype
from glmrt.errors import GLMRTError

TARGETS = {"fp16_fraction_of_published_bandwidth": 0.80, "fp16_vs_transformers_eager": 7.0,
           "int4_vs_fp16_decode": 2.5}
FLOAT_SETTING = "none"
SYNTHETIC_SEED = 1234
# Kernel families of a profile, by kernel name (first match wins).
KERNEL_FAMILIES = (
    ("glmrt native", r"glmrt::gpu|rms_norm_kernel|layer_norm_kernel|rope_kernel|gemv_quant_kernel|attention_\w+_kernel"
                     r"|dequantize_kernel"),
    ("GEMM / GEMV (cuBLAS, cutlass)", r"gemm|gemv|cutlass|xmma|sm\d+_|cublas|splitK"),
    ("attention (torch)", r"softmax|flash|fmha|sdpa|attention"),
    ("copy / fill", r"[Mm]emcpy|[Mm]emset|copy|fill|Copy|Fill"),
    ("reduction", r"reduce|Reduce|argmax|max_kernel|sum"),
    ("elementwise", r"elementwise|vectorized|unrolled|Elementwise|index|cat|where"),
)


def _bench_part(part: str):
    """glmrt.bench's pieces: a package (glmrt.bench.metrics, .machine, .baselines) once it is split,
    else the one module glmrt/bench.py."""
    try:
        return importlib.import_module(f"glmrt.bench.{part}")
    except ImportError:
        return importlib.import_module("glmrt.bench")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="benchmarks/cuda_decode.py", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="chatglm3-6b", help="a synthetic preset (glmrt presets), real widths")
    ap.add_argument("--layers", type=int, default=None, help="keep the first N layers (default: full depth)")
    ap.add_argument("--dtype", default="float16", help="float16 | bfloat16 | float32 (default float16)")
    ap.add_argument("--quantize", default="none,int4",
                    help="comma-separated settings: none (the float model) and formats (int8, int4, int4-g128, ...), "
                         "each quantized from the same float weights (default none,int4)")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens for the decode runs (default 32)")
    ap.add_argument("--gen", type=int, default=128, help="tokens generated per decode run (default 128)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs per measurement (default 3)")
    ap.add_argument("--warmup", type=int, default=1, help="warm-up runs per measurement (default 1)")
    ap.add_argument("--modes", default="graph", help="glmrt decode modes: graph, static, eager (default graph)")
    ap.add_argument("--prefill", default="512,2048", help="prompt lengths for prefill tokens/s ('' for none)")
    ap.add_argument("--no-transformers", dest="transformers", action="store_false",
                    help="skip the transformers eager baseline")
    ap.add_argument("--transformers-repeat", type=int, default=2, help="timed runs of the baseline (default 2)")
    ap.add_argument("--profile-steps", type=int, default=8,
                    help="decode steps profiled per glmrt setting with torch.profiler (0: no profile)")
    ap.add_argument("--weights", choices=("device", "synthetic"), default="device",
                    help="device: drawn on the GPU (fast); synthetic: glmrt.load's CPU-seeded weights (slow)")
    ap.add_argument("--out", default=None, help="JSON file to write")
    ap.add_argument("--append", action="store_true", help="add this run to the list of runs already in --out")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: check arguments, plans and the baseline mapping")
    ap.add_argument("--backend", choices=("cuda", "cpu"), default="cuda",
                    help="cuda (default); cpu runs the same code path without a GPU, for a smoke test of this "
                         "script (its timings mean nothing for the targets)")
    args = ap.parse_args(argv)
    try:
        validate(args)
    except (GLMRTError, ValueError) as exc:
        ap.error(str(exc))
    return args


def _positive_ints(text: str, what: str) -> list[int]:
    values = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        if not item.isdigit() or int(item) < 1:
            raise ValueError(f"{what}: {item!r} is not a positive integer")
        values.append(int(item))
    return values


def validate(args: argparse.Namespace) -> None:
    """Turns the comma lists into lists and checks everything that needs no GPU."""
    from glmrt.models import config_from_dict, preset
    from glmrt.quant import parse_format

    raw = preset(args.preset)  # UnsupportedModelError names the presets
    _, cfg = config_from_dict(raw)
    args.config = cfg
    if args.layers is not None and not 1 <= args.layers <= cfg.num_layers:
        raise ValueError(f"--layers {args.layers}: {args.preset} has {cfg.num_layers} layers")
    args.torch_dtype = parse_dtype(args.dtype)
    if args.torch_dtype is None:
        raise ValueError("--dtype must name a dtype")
    args.settings = [s.strip() for s in args.quantize.split(",") if s.strip()]
    if not args.settings:
        raise ValueError("--quantize names no setting")
    for s in args.settings:
        if s != FLOAT_SETTING:
            parse_format(s)  # ConfigError for a bad format
    if args.transformers and FLOAT_SETTING not in args.settings:
        raise ValueError("the transformers baseline runs the float weights: keep 'none' in --quantize "
                         "or pass --no-transformers")
    args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.mode_list if m not in ("graph", "static", "eager")]
    if bad or not args.mode_list:
        raise ValueError(f"--modes {args.modes!r}: each must be graph, static or eager")
    args.prefill_lens = _positive_ints(args.prefill, "--prefill")
    for name in ("prompt", "gen", "repeat", "transformers_repeat"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or args.profile_steps < 0:
        raise ValueError("--warmup and --profile-steps must be >= 0")
    if args.gen < 2:
        raise ValueError("--gen must be >= 2 (TPOT needs two tokens)")
    longest = max([args.prompt + args.gen + args.warmup, args.prompt + args.profile_steps + 4]
                  + [n + 1 for n in args.prefill_lens])
    if longest > cfg.max_positions:
        raise ValueError(f"{longest} positions exceed {args.preset}'s {cfg.max_positions}")
    if args.append and not args.out:
        raise ValueError("--append needs --out")


# ----------------------------------------------------------------------------- model building
def _prepare(args, setting: str, materialize: bool):
    from glmrt.api import prepare
    backend = get_backend(args.backend)
    quantize = None if setting == FLOAT_SETTING else setting
    return prepare(f"synthetic:{args.preset}", dtypes=backend.capabilities().dtypes, backend_name=backend.name,
                   dtype=args.torch_dtype, layers=args.layers, quantize=quantize, progress=False,
                   materialize=materialize)


def _plan(args, graph, weights, strict: bool = False):
    from glmrt.fusion import backend_accepts, fuse_residual_norm
    from glmrt.lowering import lower
    backend = get_backend(args.backend)
    graph = fuse_residual_norm(graph, backend_accepts(backend))
    return graph, lower(graph, backend, weights, strict=strict)


def device_weights(graph, device, seed: int = SYNTHETIC_SEED) -> dict[str, torch.Tensor]:
    """Weights drawn on the device with glmrt.api.synthetic_weights' distribution (not its numbers)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    out = {}
    for name, spec in graph.params.items():
        t = torch.randn(spec.shape, generator=gen, device=device, dtype=torch.float32)
        if spec.role == "norm_weight":
            t.mul_(0.1).add_(1.0)
        else:
            t.mul_(0.02)
        out[name] = t.to(spec.dtype)
        del t
    return out


def build_models(args, device) -> tuple[dict, dict, object]:
    """{setting: Model} for every --quantize setting, the float weights, and the float graph."""
    from glmrt.model import Model
    from glmrt.quant import parse_format, quantize_graph, quantize_weights

    prep = _prepare(args, FLOAT_SETTING, materialize=args.weights == "synthetic")
    if args.weights == "synthetic":
        weights = {name: t.to(device) for name, t in prep.weights.items()}
    else:
        weights = device_weights(prep.graph, device)
    models = {}
    for setting in args.settings:
        if setting == FLOAT_SETTING:
            graph, w = prep.graph, weights
        else:
            graph = quantize_graph(prep.graph, *parse_format(setting))
            w = quantize_weights(prep.graph, graph, weights)  # on the GPU; norms and embedding shared
        fused, plan = _plan(args, graph, w)
        models[setting] = Model(prep.cfg, fused, plan, w, f"synthetic:{args.preset}")
    return models, weights, prep


# ----------------------------------------------------------------------------- measurements
def _label(args, setting: str) -> str:
    return dtype_name(args.torch_dtype) if setting == FLOAT_SETTING else f"{setting} ({dtype_name(args.torch_dtype)})"


_SYNC = [lambda: None]  # the backend's synchronize, set by main()


def _sync():
    _SYNC[0]()


def decode_row(model, args, setting: str, mode: str, prompt: list[int], bandwidth: dict) -> dict:
    metrics = _bench_part("metrics")
    model.decode_mode = mode

    def run_once(clock):
        for token in model.stream([prompt], args.gen, eos_token_id=[]):
            clock.tick(token)

    label = f"glmrt {mode} {_label(args, setting)}"
    timings, _ = metrics.measure(run_once, _sync, warmup=args.warmup, repeat=args.repeat, gen_len=args.gen,
                                 label=label)
    traffic = metrics.decode_traffic(model.graph, model.weights, 1, args.prompt, args.gen)
    return _decode_metrics(label, setting, timings, traffic["bytes_per_step"], bandwidth,
                           {"impl": f"glmrt-{mode}", "traffic": traffic})


def _decode_metrics(label, setting, timings, bytes_per_step, bandwidth, extra) -> dict:
    tpots = [t.tpot for t in timings]
    tpot = statistics.median(tpots)
    row = {"label": label, "setting": setting, **extra, "tpot_s": tpot, "tpot_min_s": min(tpots),
           "tpot_max_s": max(tpots), "ttft_s": statistics.median(t.ttft for t in timings),
           "decode_tokens_per_s": 1 / tpot}
    if bytes_per_step:
        row["bytes_per_step"] = bytes_per_step
        row["achieved_bytes_per_s"] = bytes_per_step / tpot
        for key in ("published", "measured_copy"):
            if bandwidth.get(key):
                row[f"fraction_of_{key}"] = row["achieved_bytes_per_s"] / bandwidth[key]
    return row


def transformers_decode_row(runner, args, prompt: list[int], bytes_per_step: int, bandwidth: dict) -> dict:
    metrics = _bench_part("metrics")
    ids = torch.tensor([prompt])
    timings, _ = metrics.measure(lambda clock: runner.generate(ids, args.gen, clock), _sync, warmup=args.warmup,
                                 repeat=args.transformers_repeat, gen_len=args.gen, label="transformers eager")
    return _decode_metrics(f"transformers eager {dtype_name(args.torch_dtype)}", FLOAT_SETTING, timings,
                           bytes_per_step, bandwidth, {"impl": "transformers-eager", "baseline": runner.label})


def _time_first_token(run, repeat: int) -> dict:
    run()  # warm-up
    times = []
    for _ in range(repeat):
        _sync()
        t0 = time.perf_counter()
        run()
        _sync()
        times.append(time.perf_counter() - t0)
    return {"ttft_s": statistics.median(times), "ttft_min_s": min(times), "ttft_max_s": max(times)}


def prefill_rows(args, label: str, impl: str, setting: str, first_token) -> list[dict]:
    """first_token(ids): runs the prompt's forward and one greedy sample."""
    rows = []
    vocab_top = min(60000, args.config.vocab_size)
    for n in args.prefill_lens:
        ids = torch.randint(0, vocab_top, (n,), generator=torch.Generator().manual_seed(n)).tolist()
        timing = _time_first_token(lambda: first_token(ids), args.repeat)
        row = {"label": label, "impl": impl, "setting": setting, "prompt_tokens": n, **timing,
               "prefill_tokens_per_s": n / timing["ttft_s"]}
        rows.append(row)
        print(f"  prefill {label}: {n} tokens in {timing['ttft_s'] * 1e3:.1f} ms "
              f"({row['prefill_tokens_per_s']:.0f} tok/s)", file=sys.stderr, flush=True)
    return rows


def _kernel_family(name: str) -> str:
    for family, pattern in KERNEL_FAMILIES:
        if re.search(pattern, name):
            return family
    return "other"


def _device_time_us(event) -> float:
    """A device event's (kernel, memcpy, memset) duration in microseconds."""
    time_range = getattr(event, "time_range", None)
    if time_range is not None:
        return float(time_range.elapsed_us())
    return float(getattr(event, "device_time_total", 0.0) or 0.0)


def profile_decode(model, args, prompt: list[int], mode: str, tpot_s: float | None) -> dict:
    """Kernels of `--profile-steps` decode steps (after the prefill and two warm-up steps): per step
    their count and device time, the share of each kernel and family, and the step time the
    kernels leave idle (launch gaps, host work) against the timed TPOT."""
    from torch.profiler import ProfilerActivity, profile, schedule

    steps = args.profile_steps
    model.decode_mode = mode
    list(model.stream([prompt], steps + 4, eos_token_id=[]))  # the decoder of this length, captured
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if model.device.type == "cuda" else [])
    with profile(activities=activities,
                 schedule=schedule(wait=1, warmup=2, active=steps, repeat=1)) as prof:
        for _ in model.stream([prompt], steps + 4, eos_token_id=[]):
            _sync()
            prof.step()  # step 0 is the prefill (waited out), then warm-up, then `steps` decode steps
    kernels: dict[str, dict] = {}
    for event in prof.events():
        if getattr(event, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        us = _device_time_us(event)
        entry = kernels.setdefault(event.name, {"calls": 0, "device_us": 0.0})
        entry["calls"] += 1
        entry["device_us"] += us
    total_us = sum(k["device_us"] for k in kernels.values())
    launches = sum(k["calls"] for k in kernels.values())
    families: dict[str, float] = {}
    for name, k in kernels.items():
        families[_kernel_family(name)] = families.get(_kernel_family(name), 0.0) + k["device_us"]
    top = sorted(kernels.items(), key=lambda kv: -kv[1]["device_us"])[:20]
    result = {
        "mode": mode, "steps": steps, "kernels_per_step": launches / steps,
        "kernel_us_per_step": total_us / steps, "distinct_kernels": len(kernels),
        "families": {f: {"us_per_step": us / steps, "share": us / total_us if total_us else None}
                     for f, us in sorted(families.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"name": name[:160], "calls_per_step": k["calls"] / steps,
                         "us_per_step": k["device_us"] / steps,
                         "share": k["device_us"] / total_us if total_us else None} for name, k in top],
    }
    if not launches:
        result["note"] = "the profiler recorded no device kernels" + (
            "" if model.device.type == "cuda" else f" (a {model.device.type} run)")
    if tpot_s:
        step_us = tpot_s * 1e6
        result["timed_tpot_us"] = step_us
        result["kernel_busy_fraction_of_tpot"] = (total_us / steps) / step_us
        result["idle_us_per_step"] = step_us - total_us / steps
    return result


def profile_with_fallback(model, args, prompt, mode, tpot_s) -> dict:
    """A graph replay's kernels are normally visible to the profiler (CUPTI records them); if far
    fewer than one per layer show up, the same step is profiled without the graph (decode_mode
    static: the same kernels, launched one by one) and the record says so."""
    try:
        result = profile_decode(model, args, prompt, mode, tpot_s)
        if mode == "graph" and result["kernels_per_step"] < model.config.num_layers:
            static = profile_decode(model, args, prompt, "static", None)
            static["note"] = (f"the graph replay showed {result['kernels_per_step']:.1f} kernels per step to the "
                              "profiler; these are the same step's kernels launched without the graph")
            static["graph_profile"] = result
            static["timed_tpot_us"] = tpot_s * 1e6 if tpot_s else None
            return static
        return result
    except Exception as exc:  # noqa: BLE001 - a profile is a diagnosis; the numbers stand without it
        return {"error": f"{type(exc).__name__}: {exc}"}


# ----------------------------------------------------------------------------- record
class Record:
    """The JSON document, rewritten after every measurement."""

    def __init__(self, args, argv):
        self.path = Path(args.out) if args.out else None
        self.runs = []
        if self.path and args.append and self.path.is_file():
            previous = json.loads(self.path.read_text())
            self.runs = previous.get("runs", []) if isinstance(previous, dict) else []
        self.doc = {"command": " ".join(["python", "benchmarks/cuda_decode.py", *argv]), "complete": False,
                    "preset": args.preset, "layers": args.layers or args.config.num_layers,
                    "full_layers": args.config.num_layers, "dtype": dtype_name(args.torch_dtype),
                    "settings": args.settings, "weights": args.weights, "prompt_tokens": args.prompt,
                    "gen_tokens": args.gen, "repeat": args.repeat, "targets": TARGETS,
                    "decode": [], "prefill": [], "profiles": {}, "errors": []}

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        tmp.write_text(json.dumps({"runs": self.runs + [self.doc]}, indent=2, default=str))
        tmp.replace(self.path)


def stamp_record(record: Record, device: torch.device) -> dict:
    machine = _bench_part("machine")
    st = machine.stamp(torch.get_num_threads())
    commit = os.environ.get("GLMRT_COMMIT")
    if commit and commit != "unknown":  # the device copy of a checkout may have no .git: the caller names the commit
        st["software"]["commit"] = commit
        st["software"]["commit_source"] = "GLMRT_COMMIT"
    record.doc.update(st)
    if device.type != "cuda":  # a smoke run: no bandwidth figures
        record.doc["gpu"] = {"name": f"none ({device.type} smoke run)"}
        return {"published": None, "measured_copy": None}
    name = torch.cuda.get_device_name(0)
    published = machine.published_bandwidth(name)
    copy = machine.device_copy_bandwidth(device, _sync)
    record.doc["gpu"] = {"name": name, "capability": list(torch.cuda.get_device_capability(0)),
                         "published_bandwidth": published, "measured_copy": copy}
    module, why = _native.load("_native_cuda")
    record.doc["native_cuda"] = ({"built": True, "archs": list(module.archs())} if module is not None
                                 else {"built": False, "reason": why})
    return {"published": published["bytes_per_s"] if published else None, "measured_copy": copy["bytes_per_s"]}


def targets(doc: dict) -> list[dict]:
    """Each target of TARGETS with the measured value and whether it is met (None: not measured)."""
    graph_rows = [r for r in doc["decode"] if r["impl"] == "glmrt-graph"] or \
                 [r for r in doc["decode"] if r["impl"].startswith("glmrt")]
    fp16 = next((r for r in graph_rows if r["setting"] == FLOAT_SETTING), None)
    int4 = next((r for r in graph_rows if r["setting"].startswith("int4")), None)
    hf = next((r for r in doc["decode"] if r["impl"] == "transformers-eager"), None)
    out = []

    def add(name, value, goal):
        out.append({"target": name, "goal": goal, "value": value, "met": None if value is None else value >= goal})

    add("fp16_fraction_of_published_bandwidth", fp16.get("fraction_of_published") if fp16 else None,
        TARGETS["fp16_fraction_of_published_bandwidth"])
    add("fp16_vs_transformers_eager", fp16["decode_tokens_per_s"] / hf["decode_tokens_per_s"] if fp16 and hf else None,
        TARGETS["fp16_vs_transformers_eager"])
    add("int4_vs_fp16_decode", int4["decode_tokens_per_s"] / fp16["decode_tokens_per_s"] if fp16 and int4 else None,
        TARGETS["int4_vs_fp16_decode"])
    return out


def print_summary(doc: dict) -> None:
    print(f"\n{doc['preset']} ({doc['layers']} layers, {doc['dtype']}) on {doc.get('gpu', {}).get('name', '?')}")
    print(f"{'setting':<34} {'decode tok/s':>12} {'TPOT ms':>8} {'% pub BW':>8} {'% copy':>7}")
    for r in doc["decode"]:
        pub = r.get("fraction_of_published")
        cp = r.get("fraction_of_measured_copy")
        print(f"{r['label']:<34} {r['decode_tokens_per_s']:>12.1f} {r['tpot_s'] * 1e3:>8.2f} "
              f"{(f'{pub:.1%}' if pub else '-'):>8} {(f'{cp:.1%}' if cp else '-'):>7}")
    for r in doc["prefill"]:
        print(f"prefill {r['label']:<26} {r['prompt_tokens']:>5} tokens: {r['prefill_tokens_per_s']:>9.0f} tok/s")
    for name, p in doc["profiles"].items():
        if "error" in p:
            print(f"profile {name}: {p['error']}")
            continue
        fams = ", ".join(f"{f} {v['share']:.0%}" for f, v in p["families"].items() if v["share"])
        busy = p.get("kernel_busy_fraction_of_tpot")
        print(f"profile {name} ({p['mode']}): {p['kernels_per_step']:.0f} kernels/step, "
              f"{p['kernel_us_per_step']:.0f} us of kernels/step"
              f"{f' ({busy:.0%} of TPOT)' if busy else ''}: {fams}")
    for t in doc.get("targets", []):
        state = "not measured" if t["met"] is None else ("met" if t["met"] else "MISSED")
        value = "-" if t["value"] is None else f"{t['value']:.3g}"
        print(f"target {t['target']} >= {t['goal']}: {value} ({state})")


# ----------------------------------------------------------------------------- dry run
def dry_run(args) -> int:
    """Everything that needs no GPU, on the real widths: plans on meta weights, bytes per step,
    the transformers model on the meta device."""
    metrics = _bench_part("metrics")
    baselines = _bench_part("baselines")
    print(f"dry run: {args.preset}, {args.layers or args.config.num_layers} of {args.config.num_layers} layers, "
          f"{dtype_name(args.torch_dtype)}, settings {args.settings}, modes {args.mode_list}, prefill "
          f"{args.prefill_lens}, weights {args.weights}")
    problems = []
    for setting in args.settings:
        prep = _prepare(args, setting, materialize=False)
        graph, plan = _plan(args, prep.graph, prep.weights)
        traffic = metrics.decode_traffic(graph, prep.weights, 1, args.prompt, args.gen)
        kinds: dict[str, int] = {}
        for step in plan.steps:
            kinds[step.kind] = kinds.get(step.kind, 0) + 1
        natives = sorted({s.impl for s in plan.steps if s.kind == "native"})
        print(f"  {setting}: {len(plan.steps)} nodes ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))}); "
              f"native kernels: {', '.join(natives) or 'none (glmrt._native_cuda not built here?)'}; "
              f"{traffic['bytes_per_step'] / 1e9:.2f} GB read per decode step")
        for s in plan.fallbacks():
            print(f"    fallback: {s.node.name} ({s.node.op}) -> {s.impl}: {s.reason}")
    if args.transformers:
        prep = _prepare(args, FLOAT_SETTING, materialize=False)
        why = baselines.transformers_incompatibility(prep.cfg)
        if why:
            problems.append(f"transformers baseline: {why}")
        else:
            try:
                baselines.TransformersRunner(prep.cfg, prep.weights, "meta")
                problems.append("transformers baseline: built on meta weights without the expected refusal")
            except baselines.BaselineUnavailable as exc:
                # Every parameter mapped and assigned; only the meta tensors themselves remain.
                if "left on the meta device" not in str(exc):
                    problems.append(f"transformers baseline: {exc}")
                else:
                    print("  transformers baseline: config and weight mapping check out on the meta device")
    from torch.profiler import ProfilerActivity  # noqa: F401 - the profile step needs it
    for p in problems:
        print(f"dry run: PROBLEM: {p}", file=sys.stderr)
    print("dry run: " + ("OK" if not problems else f"{len(problems)} problem(s)"))
    return 2 if problems else 0


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.dry_run:
        return dry_run(args)
    backend = get_backend(args.backend)
    probe = backend.probe()
    if not probe.available:
        print(f"cuda_decode: the {args.backend} backend is not available here: {probe.reason}; --dry-run checks "
              "everything that needs no GPU", file=sys.stderr)
        return 2
    _SYNC[0] = backend.synchronize
    device = backend.device()
    record = Record(args, argv)
    bandwidth = stamp_record(record, device)
    record.save()
    t0 = time.perf_counter()
    models, weights, prep = build_models(args, device)
    record.doc["build_seconds"] = time.perf_counter() - t0
    record.doc["weight_bytes"] = {s: m.weight_bytes() for s, m in models.items()}
    record.doc["plans"] = {s: m.plan.summary() for s, m in models.items()}
    record.save()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, min(60000, args.config.vocab_size), (args.prompt,), generator=g).tolist()

    # In order of value: glmrt's decode (each setting), the baseline, prefill, then the profiles.
    for setting, model in models.items():
        for mode in args.mode_list:
            try:
                record.doc["decode"].append(decode_row(model, args, setting, mode, prompt, bandwidth))
            except Exception as exc:  # noqa: BLE001 - one failed setting must not lose the others
                record.doc["errors"].append(f"decode {setting} {mode}: {type(exc).__name__}: {exc}")
            record.save()
    runner = None
    if args.transformers:
        try:
            runner = _bench_part("baselines").TransformersRunner(prep.cfg, weights, device)
            float_rows = [r for r in record.doc["decode"] if r["setting"] == FLOAT_SETTING]
            nbytes = float_rows[0]["bytes_per_step"] if float_rows else None
            record.doc["decode"].append(transformers_decode_row(runner, args, prompt, nbytes, bandwidth))
        except Exception as exc:  # noqa: BLE001
            record.doc["errors"].append(f"transformers eager: {type(exc).__name__}: {exc}")
        record.save()
    for setting, model in models.items():
        model.decode_mode = args.mode_list[0]
        try:
            record.doc["prefill"] += prefill_rows(
                args, f"glmrt {_label(args, setting)}", "glmrt", setting,
                lambda ids, m=model: list(m.stream([ids], 1, eos_token_id=[])))
        except Exception as exc:  # noqa: BLE001
            record.doc["errors"].append(f"prefill {setting}: {type(exc).__name__}: {exc}")
        record.save()
    if runner is not None:
        metrics = _bench_part("metrics")
        try:
            record.doc["prefill"] += prefill_rows(
                args, "transformers eager", "transformers-eager", FLOAT_SETTING,
                lambda ids: runner.generate(torch.tensor([ids]), 1, metrics.TokenClock(_sync)))
        except Exception as exc:  # noqa: BLE001
            record.doc["errors"].append(f"prefill transformers: {type(exc).__name__}: {exc}")
        record.save()
    if args.profile_steps:
        for setting, model in models.items():
            mode = args.mode_list[0]
            row = next((r for r in record.doc["decode"] if r["setting"] == setting and r["impl"] == f"glmrt-{mode}"),
                       None)
            record.doc["profiles"][setting] = profile_with_fallback(model, args, prompt, mode,
                                                                    row["tpot_s"] if row else None)
            record.save()
    record.doc["peak_memory_bytes"] = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    record.doc["targets"] = targets(record.doc)
    record.doc["complete"] = True
    record.save()
    print_summary(record.doc)
    return 1 if record.doc["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
