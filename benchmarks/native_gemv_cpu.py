"""Decode GEMV throughput of _native_cpu.linear_int8 / linear_int4 at ChatGLM3-6B widths, against the
machine's read bandwidth measured in the same run. Prints one JSON document.

    OMP_NUM_THREADS=2 python benchmarks/native_gemv_cpu.py [--threads 2] [--repeats 5]

Every timed call reads weights that are not in any cache: each shape is allocated in enough copies
to exceed the last-level cache several times over, and the calls cycle through them, as a model's
layers do during decode.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds per case (min/median/max reported)")
    ap.add_argument("--min-bytes", type=float, default=512e6, help="weight bytes cycled through per case")
    ap.add_argument("--isa", default=None, help="force a path: avx512vnni, avx2 or scalar")
    ap.add_argument("--x-dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--group-size", type=int, default=0)
    ap.add_argument("--m", type=int, default=1, help="activation rows (1 = decode; > 1 = prefill, compared "
                    "with torch's F.linear on the dequantized fp32/bf16 weights)")
    return ap.parse_args()


args = parse_args()
os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before the OpenMP runtime starts

import numpy as np  # noqa: E402
import torch  # noqa: E402

try:
    from glmrt import _native_cpu as native
except ImportError:
    native = None
if native is None or not hasattr(native, "linear_int4"):  # e.g. a standalone CMake build on PYTHONPATH
    import _native_cpu as native

torch.set_num_threads(args.threads)
CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
SHAPES = [(4608, 4096), (27392, 4096), (4096, 13696)]  # ChatGLM3-6B: qkv, h_to_4h (SwiGLU), 4h_to_h


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def git_commit():
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return subprocess.check_output(["git", "-C", root, "rev-parse", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return None


def summary(values):
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def read_bandwidth(nbytes=1 << 30, repeats=5):
    """STREAM-like read: sum of a 1 GiB array (torch: args.threads threads; numpy: one thread)."""
    t = torch.ones(nbytes // 4, dtype=torch.float32)
    a = t.numpy()
    out = {}
    for name, fn in (("torch_sum_gbs", lambda: t.sum()), ("numpy_sum_1thread_gbs", lambda: a.sum())):
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name] = summary([nbytes / s / 1e9 for s in times])
    del t, a
    return out


def bench_case(fmt, n, k, x_dtype, group_size):
    row_bytes = k if fmt == "int8" else (k + 1) // 2
    groups = 1 if group_size == 0 else (k + group_size - 1) // group_size
    scale_dtype = x_dtype if x_dtype != torch.float32 else torch.float16
    wbytes = n * row_bytes
    sbytes = n * groups * torch.finfo(scale_dtype).bits // 8
    copies = max(2, int(args.min_bytes // (wbytes + sbytes)) + 1) if args.m == 1 else 2  # prefill: compute-bound
    g = torch.Generator().manual_seed(0)
    ws = [torch.randint(-128, 128, (n, row_bytes), generator=g, dtype=torch.int8) for _ in range(copies)]
    scales = [(0.01 + 0.01 * torch.rand(n * groups, generator=g)).to(scale_dtype) for _ in range(copies)]
    m = args.m
    x = torch.randn(m, k, generator=g).to(x_dtype)
    out = torch.empty(m, n, dtype=x_dtype)
    fn = native.linear_int8 if fmt == "int8" else native.linear_int4
    calls = [(x.data_ptr(), CODES[x_dtype], w.data_ptr(), s.data_ptr(), CODES[scale_dtype], 0, 0, out.data_ptr(),
              m, n, k, group_size) for w, s in zip(ws, scales)]
    for c in calls:  # warm up (page faults, OpenMP pool)
        fn(*c)
    per_call = []
    rounds = 4 if args.m == 1 else 1  # passes over all the copies per timed repeat
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for _ in range(rounds):
            for c in calls:
                fn(*c)
        per_call.append((time.perf_counter() - t0) / (rounds * len(calls)))
    us = summary([t * 1e6 for t in per_call])
    gbs = summary([(wbytes + sbytes) / t / 1e9 for t in per_call])
    result = {}
    if m > 1:  # what torch does with the same product in floating point (weights already dequantized)
        wf = torch.randn(n, k, generator=g)
        for dt in (torch.float32, torch.bfloat16):
            xw, ww = x.to(dt), wf.to(dt)
            torch.nn.functional.linear(xw, ww)
            ts = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                torch.nn.functional.linear(xw, ww)
                ts.append(time.perf_counter() - t0)
            result[f"torch_linear_{str(dt).replace('torch.', '')}_us"] = summary([t * 1e6 for t in ts])
        del wf
    return {"format": fmt, "M": m, "N": n, "K": k, "group_size": group_size, "x_dtype": str(x_dtype).replace("torch.", ""),
            "scale_dtype": str(scale_dtype).replace("torch.", ""), "weight_bytes": wbytes, "scale_bytes": sbytes,
            "copies_cycled": copies, "us_per_call": us, "weight_gbs": gbs, **result}


def main():
    if args.isa and not native.set_quant_linear_isa(args.isa):
        sys.exit(f"this CPU cannot run the {args.isa} path")
    x_dtype = getattr(torch, args.x_dtype)
    bw_before = read_bandwidth()
    cases = [bench_case(fmt, n, k, x_dtype, args.group_size) for fmt in ("int8", "int4") for n, k in SHAPES]
    bw_after = read_bandwidth()
    ref = max(bw_before["torch_sum_gbs"]["median"], bw_after["torch_sum_gbs"]["median"])
    for c in cases:
        c["fraction_of_read_bandwidth"] = round(c["weight_gbs"]["median"] / ref, 3)
    print(json.dumps({
        "benchmark": "native_gemv_cpu",
        "command": " ".join([f"OMP_NUM_THREADS={args.threads}", os.path.basename(sys.executable)] + sys.argv),
        "hardware": {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "threads": args.threads,
                     "isa": native.quant_linear_isa()},
        "software": {"torch": torch.__version__, "numpy": np.__version__, "python": platform.python_version(),
                     "glmrt_commit": git_commit()},
        "read_bandwidth_gbs": {"before": bw_before, "after": bw_after, "reference_median": ref},
        "note": "weight_gbs counts weight + scale bytes read per call; fraction is against the torch sum",
        "cases": cases,
    }, indent=1))


if __name__ == "__main__":
    main()
