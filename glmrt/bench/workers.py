"""The worker processes of a bench run: every setting (and the float32 reference, and a GPU's
bandwidth probe) runs as one task in a fresh `python -m glmrt.bench --worker TASK RESULT` process,
so that its peak resident set is its own (VmHWM is process-wide and never goes down) and nothing
one setting allocates slows the next. run_worker starts one and returns its result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

from .baselines import EagerRunner, TransformersRunner
from .machine import device_copy_bandwidth, load_average, published_bandwidth
from .metrics import (CollectiveClock, RunTiming, TokenClock, _log, decode_traffic, device_peak_bytes, full_depth_estimate,
                      logit_drift, measure, peak_memory_note, reset_peak_memory, summarize_timings)
from .settings import Setting, weights_source


# An eos list that matches nothing: every timed run generates exactly gen_len tokens.
NO_EOS: tuple[int, ...] = ()


class _ReferenceOnly:
    """Lowering target that offers no kernels: every node runs glmrt's plain-torch reference op on the CPU."""

    @staticmethod
    def backend():
        from ..backends.base import Backend, ProbeResult, Verification

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
    from ..lowering import lower
    from ..model import Model
    t0 = time.perf_counter()
    source, layers = weights_source(task["model"], task["layers"])
    loaded = glmrt.load(source, backend="cpu", dtype="float32", layers=layers, progress=True)
    plan = lower(loaded.graph, _ReferenceOnly.backend(), loaded.weights)
    model = Model(loaded.config, loaded.graph, plan, loaded.weights, loaded.source)
    logits = model.logits(torch.tensor(task["prompt_ids"], dtype=torch.long))
    torch.save(logits, task["logits_path"])
    return {"status": "ok", "load_s": time.perf_counter() - t0,
            "description": "float32 on the CPU, every op on glmrt's plain-torch reference (glmrt.ops)"}


def _task_device_bandwidth(task: dict) -> dict:
    """Published figure and measured device-to-device copy of one backend's device."""
    import torch
    from ..backends import get_backend
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
    tp = task.get("tensor_parallel")
    model = glmrt.load(task["model"], backend=s["backend"], dtype=s["dtype"], layers=task["layers"],
                       quantize=None if s["quantize"] == "none" else s["quantize"], progress=True,
                       tensor_parallel=tp)
    load_s = time.perf_counter() - t0
    _log(f"  {label}: loaded in {load_s:.1f} s ({model.weight_bytes() / 2**20:.1f} MiB of weights)")
    backend = model.backend
    load_peak = backend.memory_stats().get("peak_bytes")
    prompt = torch.tensor(task["prompt_ids"], dtype=torch.long)

    collectives = CollectiveClock(model.comm) if model.comm is not None else None

    def run_once(clock: TokenClock) -> None:
        if collectives is not None:
            collectives.start()
        for token in model.stream(prompt, max_new_tokens=task["gen_len"], eos_token_id=NO_EOS):
            clock.tick(token)
            if collectives is not None and len(clock.times) == 1:
                collectives.first_token()
        if collectives is not None:
            collectives.stop(clock.times[-1] - clock.times[0], len(clock.times) - 1)

    was_reset = reset_peak_memory(model.device.type)
    load_before = load_average()
    timings, tokens = measure(run_once, backend.synchronize, warmup=task["warmup"], repeat=task["repeat"],
                              gen_len=task["gen_len"], label=label)
    system_load = _system_load(load_before, load_average())
    peak = {"bytes": backend.memory_stats().get("peak_bytes"), "load_peak_bytes": load_peak,
            "what": peak_memory_note(model.device.type, was_reset)}
    logits = model.logits(prompt)  # under tensor parallelism a collective call: every rank makes it
    # The reference is on rank 0 only (its process computed it): the other ranks report nothing.
    drift = logit_drift(logits, torch.load(task["reference_logits"])) if task["reference_logits"] else None
    if getattr(model, "onnx_manifest", None) is not None:  # the weights live in the session: count the graph's
        from ..api import prepare
        q = model.onnx_manifest.get("quantization")
        quant = q and f"int{q['bits']}" + (f"-g{q['group_size']}" if q["group_size"] else "")
        src, layers = weights_source(task["model"], task["layers"])
        planned = prepare(src, dtype=s["dtype"], layers=layers, quantize=quant, progress=False, materialize=False)
        traffic = decode_traffic(planned.graph, planned.weights, task["batch"], task["prompt_len"], task["gen_len"])
    else:
        traffic = decode_traffic(model.graph, model.weights, task["batch"], task["prompt_len"], task["gen_len"])
    result = _setting_metrics(task, timings, traffic, drift, peak)
    if collectives is not None:
        result["tensor_parallel"] = tensor_parallel_metrics(model.comm, collectives, task["repeat"])
    described = backend.describe()
    result.update(status="ok", label=f"glmrt on {backend.name}", load_s=load_s, weight_bytes=model.weight_bytes(),
                  system_load=system_load,
                  plan=_plan_summary(model.plan), native=described.get("native"),
                  torch_threads=torch.get_num_threads(), generated_ids=tokens)
    return result


def tensor_parallel_metrics(comm, collectives: CollectiveClock, repeat: int) -> dict:
    """What a tensor-parallel setting records beyond the single-process metrics: the size, the
    transport and the collectives' share of the timed runs' decode steps (rank 0's, and the
    slowest rank's collective time). A collective call: every rank makes it."""
    timed = collectives.runs[-repeat:]
    comm_s = sum(r["comm_s"] for r in timed)
    decode_s = sum(r["decode_s"] for r in timed)
    steps = sum(r["decode_steps"] for r in timed)
    return {"size": comm.size, "transport": comm.transport,
            "decode_comm_s_per_step": comm_s / steps if steps else None,
            "decode_comm_share": comm_s / decode_s if decode_s > 0 else None,
            "decode_comm_share_slowest_rank": (collectives.slowest_rank(comm_s) / decode_s if decode_s > 0 else None),
            "collectives_per_decode_step": timed[-1]["collectives_per_step"] if timed else {},
            "what": "wall time inside all_reduce / all_gather during the timed runs' decode steps (waiting for "
                    "the slower rank included), over their decode time; peak memory and bytes per step are rank 0's"}


def _task_baseline(task: dict) -> dict:
    import torch
    import glmrt
    s = task["setting"]
    label = Setting(**s).id
    t0 = time.perf_counter()
    # The same weights as every glmrt setting (checkpoint or synthetic seed), in this dtype.
    model, layers = weights_source(task["model"], task["layers"])
    source = glmrt.load(model, backend="cpu", dtype=s["dtype"], layers=layers, progress=True)
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


def run_in_process(task: dict) -> dict:
    """Run one task in this process; a failure is its result (the caller records it and goes on)."""
    try:
        return WORKER_TASKS[task["kind"]](task)
    except Exception as exc:  # noqa: BLE001 - the parent records the failure and goes on
        traceback.print_exc(file=sys.stderr)
        return {"status": "error", "error": f"{type(exc).__name__}: {exc}"}


def worker_main(task_path: str, result_path: str) -> int:
    """Entry point of a worker process: run one task, write its result as JSON."""
    import torch
    with open(task_path, encoding="utf-8") as f:
        task = json.load(f)
    torch.set_num_threads(int(task["threads"]))
    result = run_in_process(task)
    with open(result_path, "w", encoding="utf-8") as f:
        json.dump(result, f)
    return 0 if result.get("status") == "ok" else 1


def _worker_env(threads: int) -> dict:
    env = dict(os.environ)
    # The child imports the same glmrt as this process, and uses the same number of threads for
    # torch and for OpenMP in glmrt's native kernels.
    root = str(Path(__file__).resolve().parents[2])  # the folder that holds the glmrt package
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["OMP_NUM_THREADS"] = str(threads)
    env["MKL_NUM_THREADS"] = str(threads)
    return env


def run_worker(task: dict, workdir: Path, name: str) -> dict:
    """Run one task in a fresh process; its stderr (progress) goes to ours as it comes."""
    task_path, result_path = workdir / f"{name}.task.json", workdir / f"{name}.result.json"
    task_path.write_text(json.dumps(task), encoding="utf-8")
    cmd = [sys.executable, "-m", "glmrt.bench", "--worker", str(task_path), str(result_path)]
    # cwd: the task's directory, never the caller's: under a non-editable install a source checkout
    # there would shadow the installed package and its compiled kernels (`python -m` puts the cwd
    # first on sys.path); the README's editable install imports the same glmrt from anywhere.
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
