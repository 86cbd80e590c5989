"""Prefill GEMM paths of the CPU backend (backends/cpu/kernels.py PREFILL) at the ChatGLM3-6B linear
shapes, timed against each other in one process, paths alternating within each round:

    OMP_NUM_THREADS=2 python benchmarks/cpu_prefill_paths.py [--m 128,512] [--rounds 2]

For every M: bf16 weights through the fp32 panel (what bfloat16 prefill runs on CPUs without fast
bf16), fp16 weights through torch's F.linear and through native linear_float_gemm, and INT8 / INT4,
group-wise (g32) and per output channel, through the "integer" path (native linear_int8 / int4: int8
dot products) and the "fp32-panel" path (native dequantize_rows + torch's fp32 GEMM). Activations
bf16 (fp16 for the fp16 weights), as glmrt's models run them. Prints GFLOP/s per (shape, path) and,
per M, the time of one layer's four linears (the best of the rounds: the machine is shared) per
path with its ratio to bf16's; one JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import time


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--m", default="128,512", help="activation rows, comma-separated")
    ap.add_argument("--rounds", type=int, default=2,
                    help="rounds (paths alternate within a round); the best (least disturbed by other load) reported")
    ap.add_argument("--no-f16-torch", action="store_true", help="skip torch's fp16 F.linear (slow)")
    return ap.parse_args()


args = parse_args()
os.environ["OMP_NUM_THREADS"] = str(args.threads)

import torch  # noqa: E402

from glmrt import quant  # noqa: E402
from glmrt.backends.cpu import kernels  # noqa: E402

torch.set_num_threads(args.threads)
SHAPES = [(4608, 4096), (4096, 4096), (27392, 4096), (4096, 13696)]  # qkv, dense, h_to_4h, 4h_to_h (N, K)
FORMATS = [("INT8-g32", 8, 32), ("INT8", 8, 0), ("INT4-g32", 4, 32), ("INT4", 4, 0)]


class _Ctx:
    row_invariant = False


def quantized(bits, n, k, group, g):
    lo, hi = (-127, 128) if bits == 8 else (-8, 8)
    q = torch.randint(lo, hi, (n, k), generator=g, dtype=torch.int16).to(torch.int8)
    w = q if bits == 8 else quant.pack_int4(q)
    groups = 1 if group == 0 else k // group
    scale = (0.001 + 0.002 * torch.rand(n, groups, generator=g)).to(torch.bfloat16)
    return w.contiguous(), (scale[:, 0] if group == 0 else scale).contiguous()


def node(k, n, dtype, bits=None, group=0):
    from glmrt.graph import Node, ValueSpec
    attrs = {"quant": {"bits": bits, "group_size": group, "in_features": k}} if bits else {}
    return Node("l", "linear", ["x"], ["y"], attrs=attrs, input_specs=[ValueSpec(("B", "T", k), dtype)],
                output_specs=[ValueSpec(("B", "T", n), dtype)])


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main():
    ms = [int(v) for v in args.m.split(",")]
    g = torch.Generator().manual_seed(0)
    cases = {}  # (shape, path) -> callable(x_bf16, x_f16)
    for n, k in SHAPES:
        wf = (torch.randn(n, k, generator=g) * 0.02)
        wb, wh = wf.bfloat16(), wf.half()
        nb, nh = node(k, n, torch.bfloat16), node(k, n, torch.float16)
        del wf
        cases[(n, k), "bf16 fp32-panel"] = (lambda nb=nb, wb=wb: lambda x, xh: kernels.native_float_linear(
            _Ctx(), nb, [x], {"weight": wb}), "float", "fp32-panel")
        if not args.no_f16_torch:
            cases[(n, k), "fp16 F.linear"] = (lambda wh=wh: lambda x, xh: torch.nn.functional.linear(xh, wh),
                                              None, None)
        cases[(n, k), "fp16 linear_float_gemm"] = (lambda nh=nh, wh=wh: lambda x, xh: kernels.native_float_linear(
            _Ctx(), nh, [xh], {"weight": wh}), "float", "fp32-panel")
        for name, bits, group in FORMATS:
            w, s = quantized(bits, n, k, group, g)
            nq = node(k, n, torch.bfloat16, bits, group)
            for path in ("integer", "fp32-panel"):
                cases[(n, k), f"{name} {path}"] = (
                    lambda nq=nq, w=w, s=s: lambda x, xh: kernels.native_quant_linear(
                        _Ctx(), nq, [x], {"weight": w, "scale": s}), "quant", path)
    paths = sorted({p for _, p in cases}, key=lambda p: list(dict.fromkeys(p for _, p in cases)).index(p))
    result = {"threads": args.threads, "load_start": os.getloadavg(), "m": {}}
    for m in ms:
        times = {key: [] for key in cases}
        xs = {k: (torch.randn(1, m, k, generator=g).bfloat16(), None) for _, k in SHAPES}
        xs = {k: (xb, xb.half()) for k, (xb, _) in xs.items()}
        for r in range(args.rounds + 1):  # round 0 warms up
            for key, (make, kind, path) in cases.items():
                (n, k), _ = key
                saved = dict(kernels.PREFILL)
                if kind:
                    kernels.PREFILL[kind] = path
                try:
                    t = timed(lambda: make()(*xs[k]))
                finally:
                    kernels.PREFILL.update(saved)
                if r:
                    times[key].append(t)
        med = {key: min(v) for key, v in times.items()}
        print(f"M = {m} (load {os.getloadavg()[0]:.2f})")
        for (n, k) in SHAPES:
            line = "  ".join(f"{p} {2 * m * n * k / med[(n, k), p] / 1e9:6.1f}" for p in paths)
            print(f"  {n:>5} x {k:<5} GFLOP/s: {line}")
        layer = {p: sum(med[(s, p)] for s in SHAPES) for p in paths}
        base = layer["bf16 fp32-panel"]
        print("  one layer's four linears: " + ", ".join(f"{p} {1e3 * t:.0f} ms ({base / t:.2f}x bf16)"
                                                     for p, t in layer.items()))
        result["m"][m] = {"layer_s": layer, "gflops": {f"{n}x{k} {p}": 2 * m * n * k / med[(n, k), p] / 1e9
                                                        for (n, k) in SHAPES for p in paths}}
    result["load_end"] = os.getloadavg()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
