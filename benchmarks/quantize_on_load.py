"""Peak host memory and time of quantizing on load (issue 11 item 10).

Each case runs `glmrt.load(MODEL, backend="cpu", dtype=..., quantize=...)` in a fresh process and
reports the growth of its peak resident set over the interpreter with glmrt and torch imported
(VmHWM, reset through /proc/self/clear_refs just before the load), the load time, and the weight
bytes of the loaded model. ``--old-path`` cases reproduce the path before the fix in the same run:
the float model loaded whole (glmrt.api.prepare without quantize), then glmrt.quant.quantize_weights
over it, as glmrt.load did; only run them where the machine has the memory for the float model.

    python benchmarks/quantize_on_load.py --case synthetic:chatglm3-6b:float16:int4 \
        --case synthetic:chatglm-6b:float16:int4 \
        --out benchmarks/results/$(date -u +%F)-cpu-quantize-on-load

A case is MODEL:DTYPE:QUANTIZE[:LAYERS][:old]. Not a test: speed and memory are measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

_CHILD = textwrap.dedent("""
    import json, sys, time
    model, dtype, quantize, layers, old = json.loads(sys.argv[1])
    import glmrt, torch

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status("VmRSS")
    start = time.perf_counter()
    if old:  # the path before the fix: the whole float model, then the quantization pass over it
        from glmrt.api import prepare
        from glmrt.quant import parse_format, quantize_graph, quantize_weights
        prep = prepare(model, dtype=dtype, layers=layers, progress=False)
        qgraph = quantize_graph(prep.graph, *parse_format(quantize))
        weights = quantize_weights(prep.graph, qgraph, prep.weights)
        del prep
        weight_bytes = sum(t.numel() * t.element_size() for t in weights.values())
    else:
        m = glmrt.load(model, backend="cpu", dtype=dtype, quantize=quantize, layers=layers, progress=False)
        weight_bytes = m.weight_bytes()
    seconds = time.perf_counter() - start
    print(json.dumps({"base_rss": base, "peak_rss": status("VmHWM"), "end_rss": status("VmRSS"),
                      "weight_bytes": weight_bytes, "seconds": seconds}))
""")


def parse_case(text: str) -> dict:
    parts = text.split(":")
    if parts[0] == "synthetic":
        parts = [f"synthetic:{parts[1]}"] + parts[2:]
    if len(parts) < 3:
        raise SystemExit(f"bad case {text!r}: MODEL:DTYPE:QUANTIZE[:LAYERS][:old]")
    model, dtype, quantize, *rest = parts
    old = "old" in rest
    layers = next((int(r) for r in rest if r.isdigit()), None)
    return {"model": model, "dtype": dtype, "quantize": quantize, "layers": layers, "old_path": old}


def run_case(case: dict, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    args = [case["model"], case["dtype"], case["quantize"], case["layers"], case["old_path"]]
    out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(args)], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return {**case, "error": out.stderr[-2000:]}
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["peak_growth"] = result["peak_rss"] - result["base_rss"]
    return {**case, **result}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", action="append", required=True, help="MODEL:DTYPE:QUANTIZE[:LAYERS][:old]")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    from glmrt.bench.machine import load_average, stamp
    record = stamp(args.threads)
    record["command"] = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    record["cases"] = []
    for text in args.case:
        case = parse_case(text)
        row = run_case(case, args.threads)
        row["load_average_after"] = load_average()
        record["cases"].append(row)
        print(json.dumps(row), flush=True)
    record["hardware"]["load_average"]["end"] = load_average()
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
        lines = ["| model | layers | dtype | quantize | path | peak RSS growth (GB) | weights (GB) | load (s) |",
                 "|---|---|---|---|---|---|---|---|"]
        for r in record["cases"]:
            if "error" in r:
                lines.append(f"| {r['model']} | {r['layers'] or 'all'} | {r['dtype']} | {r['quantize']} | "
                             f"{'old' if r['old_path'] else 'new'} | error | | |")
                continue
            lines.append(f"| {r['model']} | {r['layers'] or 'all'} | {r['dtype']} | {r['quantize']} | "
                         f"{'old (float model whole, then quantize)' if r['old_path'] else 'new (tensor by tensor)'} | "
                         f"{r['peak_growth'] / 1e9:.2f} | {r['weight_bytes'] / 1e9:.2f} | {r['seconds']:.1f} |")
        (args.out / "table.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
