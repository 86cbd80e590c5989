"""Per-op timing: the fused residual + RMSNorm kernel (native.add_norm) against the two separate
ops it replaces (torch's residual add + native.rms_norm), and the torch reference of both, for a
batch-1 decode row at the chatglm3-6b width (4096), bf16 and fp32. Prints microseconds per call
(median of several repeats). Usage: python benchmarks/fused_add_norm.py [--width 4096] [--rows 1]"""

import argparse
import statistics
import time

import torch

from glmrt import ops
from glmrt.backends import get_backend
from glmrt.graph import Node, ValueSpec


def _node(op, cols, dtype, **attrs):
    spec = ValueSpec(("B", "T", cols), dtype)
    n_in = 2 if op in ("residual", "residual_norm") else 1
    return Node("n", op, ["x"] * n_in, ["y"] * (2 if op == "residual_norm" else 1), {"weight": "w"}, attrs,
                [spec] * n_in, [spec])


def _time(fn, number=2000, repeat=7):
    for _ in range(50):
        fn()
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(number):
            fn()
        runs.append((time.perf_counter() - t) / number * 1e6)
    return statistics.median(runs)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--rows", type=int, default=1)
    args = p.parse_args()
    kernels = {k.name: k for k in get_backend("cpu").kernels()}
    add_norm, rms = kernels["native.add_norm"], kernels["native.rms_norm"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, rows {args.rows}, width {args.width}")
    print(f"{'dtype':8} {'fused native':>14} {'add + native rms':>18} {'torch add + rms':>17} {'add alone':>10}")
    for dtype in (torch.bfloat16, torch.float32):
        g = torch.Generator().manual_seed(0)
        shape = (args.rows, 1, args.width)
        res, branch = torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)
        w = torch.ones(args.width, dtype=dtype)
        attrs = dict(kind="rmsnorm", eps=1e-5, round_before_weight=False)
        fused = _node("residual_norm", args.width, dtype, alpha=1.0, emit_residual=True, **attrs)
        norm, resid = _node("norm", args.width, dtype, **attrs), _node("residual", args.width, dtype, alpha=1.0)
        params = {"weight": w}

        def separate():
            h = ops.residual(None, resid, [res, branch], {})
            return h, rms.fn(None, norm, [h], params)

        def reference():
            h = ops.residual(None, resid, [res, branch], {})
            return h, ops.norm(None, norm, [h], params)

        t_fused = _time(lambda: add_norm.fn(None, fused, [res, branch], params))
        t_sep = _time(separate)
        t_ref = _time(reference)
        t_add = _time(lambda: ops.residual(None, resid, [res, branch], {}))
        print(f"{str(dtype).removeprefix('torch.'):8} {t_fused:12.2f}us {t_sep:16.2f}us {t_ref:15.2f}us "
              f"{t_add:8.2f}us")


if __name__ == "__main__":
    main()
