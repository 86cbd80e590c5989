"""The metrics of a bench run and their definitions (METRIC_NOTES): per-token timing of a request
(TTFT, TPOT and their spread), bytes read per decode step and the full-depth estimate of a
depth-cut model, numerical drift against the float32 reference, and peak memory.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

from .machine import _read


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


# Tensor-parallel runs (glmrt bench under torchrun) set this False on every rank but 0, so the
# progress lines are printed once.
LOG_PROGRESS = True


def _log(message: str) -> None:
    if LOG_PROGRESS:
        print(message, file=sys.stderr, flush=True)


class CollectiveClock:
    """The collectives of a tensor-parallel generation's decode steps: their wall time (which
    includes waiting for the slower rank) and count, through glmrt.distributed.Communicator's
    timing. Per run: ``start()`` before the request, ``first_token()`` when the prefill's token is
    out (from then on the collectives are timed), ``stop(decode_s, steps)`` after the last token.
    Used by glmrt bench --tensor-parallel and benchmarks/tp_cpu.py."""

    def __init__(self, comm):
        self.comm = comm
        self.runs: list[dict] = []
        self._before: dict = {}

    def start(self) -> None:
        self.comm.timing, self.comm.seconds = False, 0.0

    def first_token(self) -> None:
        self._before = dict(self.comm.counts)
        self.comm.seconds, self.comm.timing = 0.0, True

    def stop(self, decode_s: float, steps: int) -> dict:
        comm = self.comm
        comm.timing = False
        run = {"comm_s": comm.seconds, "decode_s": decode_s, "decode_steps": steps,
               "comm_share": comm.seconds / decode_s if decode_s > 0 else None,
               "collectives_per_step": {k: (v - self._before.get(k, 0)) / steps for k, v in comm.counts.items()
                                        if v != self._before.get(k, 0)} if steps else {}}
        self.runs.append(run)
        return run

    def slowest_rank(self, value: float) -> float:
        """The largest of ``value`` over the ranks (a collective: every rank calls it)."""
        return max(float(v) for v in self.comm.gather_objects(float(value), "the benchmark's timings"))


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
