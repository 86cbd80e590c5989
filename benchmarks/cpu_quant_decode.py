"""Batch-1 decode on the CPU with INT4 / INT8 weight-only quantization, at the chatglm3-6b widths.

    OMP_NUM_THREADS=2 python benchmarks/cpu_quant_decode.py [--threads 2] [--rounds 7] [--layers 2,4]

Two parts, in one process, so that every number is measured against the same machine state:

1. The four quantized linears of one layer (qkv 4096->4608, dense 4096->4096, up 4096->27392,
   down 13696->4096), one activation row, as a decode step calls them. Several distinct copies of
   the layer are cycled through (more bytes than the last-level cache), so every weight byte comes
   from DRAM, as it does when a model's layers run one after another. Reported: time per layer,
   weight bytes read per second, and the fraction of the machine's read bandwidth measured in the
   same run, interleaved with the kernels (glmrt._native_cpu.read_stream over 1 GiB, torch's sum of
   it for comparison, and a copy). Against:
   bf16 F.linear on the float weights, and dequantize-then-matmul (glmrt.ops.linear, the reference).
2. Whole models: glmrt.load("synthetic:chatglm3-6b", layers=L, quantize=..., dtype=bfloat16), a
   32-token prompt, then greedy decode; per-token time with L = 2 and 4 layers gives the cost of a
   layer and of the rest (embedding, LM head, sampling), extrapolated to the 28 layers of the model.

The machine is shared and noisy: each measurement is repeated (--rounds) and reported as the median
and the best; ratios are taken within one round. Writes results.json and README.md under
benchmarks/results/<date>-cpu-quant-decode/ (or --out).
"""

from __future__ import annotations

import argparse
import datetime
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
    ap.add_argument("--rounds", type=int, default=7, help="repetitions of every measurement (median, best)")
    ap.add_argument("--cycle-bytes", type=float, default=1.0e9,
                    help="weight bytes cycled through per format in part 1 (more than the last-level cache)")
    ap.add_argument("--formats", default="int4,int8")
    ap.add_argument("--layers", default="2,4", help="two layer counts for the whole-model part ('' to skip it)")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=16, help="decode steps timed per whole-model run")
    ap.add_argument("--reference-tokens", type=int, default=3,
                    help="decode steps of the plain-torch reference plan (0 to skip; it dequantizes every step)")
    ap.add_argument("--omp-wait-policy", default=None, choices=["active", "passive"],
                    help="set OMP_WAIT_POLICY (default: leave the environment's). On an oversubscribed machine "
                    "'passive' keeps idle OpenMP threads from spinning on cores the working thread needs")
    ap.add_argument("--out", default=None, help="results directory (default benchmarks/results/<date>-cpu-quant-decode)")
    return ap.parse_args()


args = parse_args()
os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before the OpenMP runtime starts
if args.omp_wait_policy:
    os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import glmrt  # noqa: E402
from glmrt import _native, ops  # noqa: E402
from glmrt.quant import quantize_weight  # noqa: E402

torch.set_num_threads(args.threads)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HIDDEN, FFN, QKV = 4096, 13696, 4608
LINEARS = [("attn.qkv", QKV, HIDDEN), ("attn.dense", HIDDEN, HIDDEN), ("mlp.up", 2 * FFN, HIDDEN),
           ("mlp.down", HIDDEN, FFN)]  # (name, N out, K in)
BITS = {"int4": 4, "int8": 8}
native, why_not = _native.load("_native_cpu")
if native is None or not hasattr(native, "linear_int4"):
    sys.exit(f"the native CPU module with linear_int4 is not built: {why_not}")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def sh(*cmd) -> str | None:
    try:
        return subprocess.check_output(cmd, text=True, stderr=subprocess.DEVNULL, cwd=ROOT).strip()
    except Exception:  # noqa: BLE001 - informational only
        return None


def stats(values, higher_is_better: bool = False) -> dict:
    return {"median": statistics.median(values), "best": max(values) if higher_is_better else min(values),
            "n": len(values)}


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- part 1: one layer
class Bandwidth:
    """Read bandwidth: glmrt._native_cpu.read_stream over 1 GiB (wide vector loads on args.threads
    OpenMP threads, no writes: the access pattern of a weight-streaming GEMV); torch's sum of the
    same buffer is recorded too (it reads 10-25% slower). Copy: 512 MiB read + 512 MiB written."""

    def __init__(self, threads: int):
        self.threads = threads
        self.src = torch.ones(1 << 28, dtype=torch.float32)
        self.dst = torch.empty(1 << 27, dtype=torch.float32)
        self.module = native if hasattr(native, "read_stream") else None
        self.src.sum()
        self.dst.copy_(self.src[: 1 << 27])
        self.method = (f"glmrt._native_cpu.read_stream ({self.module.read_stream_isa()} loads) of 1 GiB"
                       if self.module is not None else "torch sum of a 1 GiB fp32 tensor")

    def read_gbs(self) -> float:
        nbytes = self.src.numel() * 4
        if self.module is None:
            return self.torch_read_gbs()
        return nbytes / timed(lambda: self.module.read_stream(self.src.data_ptr(), nbytes, self.threads)) / 1e9

    def torch_read_gbs(self) -> float:
        return self.src.numel() * 4 / timed(self.src.sum) / 1e9

    def copy_gbs(self) -> float:
        return 2 * self.dst.numel() * 4 / timed(lambda: self.dst.copy_(self.src[: 1 << 27])) / 1e9


def make_layer(fmt: str, gen: torch.Generator) -> list[dict]:
    layer = []
    for name, n, k in LINEARS:
        w = (torch.randn(n, k, generator=gen) * 0.02).to(torch.bfloat16)
        q, s = quantize_weight(w, BITS[fmt], 0, torch.bfloat16)
        layer.append({"name": name, "n": n, "k": k, "q": q, "scale": s,
                      "bytes": q.numel() + s.numel() * s.element_size()})
    return layer


def native_call(fmt, lin, x, out):
    fn = native.linear_int4 if fmt == "int4" else native.linear_int8
    return (fn, (x.data_ptr(), 1, lin["q"].data_ptr(), lin["scale"].data_ptr(), 1, 0, 0, out.data_ptr(), 1,
                 lin["n"], lin["k"], 0))


def bench_layers() -> dict:
    gen = torch.Generator().manual_seed(0)
    xs = {k: torch.randn(1, k, generator=gen).to(torch.bfloat16) for k in (HIDDEN, FFN)}
    outs = {n: torch.empty(1, n, dtype=torch.bfloat16) for _, n, _ in LINEARS}
    bw = Bandwidth(args.threads)
    result = {"shapes": [{"name": name, "N": n, "K": k} for name, n, k in LINEARS], "formats": {}}

    # Float weights (bf16), cycled the same way: the vendor path for unquantized models.
    float_layer_bytes = sum(2 * n * k for _, n, k in LINEARS)
    float_copies = max(2, int(args.cycle_bytes // float_layer_bytes) + 1)
    float_layers = [[(torch.randn(n, k, generator=gen) * 0.02).to(torch.bfloat16) for _, n, k in LINEARS]
                    for _ in range(float_copies)]

    def run_float():
        for layer in float_layers:
            for (_, n, k), w in zip(LINEARS, layer):
                F.linear(xs[k], w)

    setups = {}
    for fmt in args.formats.split(","):
        one = make_layer(fmt, gen)
        copies = max(2, int(args.cycle_bytes // sum(lin["bytes"] for lin in one)) + 1)
        layers = [one] + [make_layer(fmt, gen) for _ in range(copies - 1)]
        calls = [native_call(fmt, lin, xs[lin["k"]], outs[lin["n"]]) for layer in layers for lin in layer]
        per_linear = [[native_call(fmt, layer[i], xs[layer[i]["k"]], outs[layer[i]["n"]]) for layer in layers]
                      for i in range(len(LINEARS))]
        setups[fmt] = (layers, calls, per_linear)

    def run_calls(calls):
        for fn, a in calls:
            fn(*a)

    for fmt, (_, calls, _) in setups.items():  # warm-up: page faults, OpenMP pool
        run_calls(calls)
    run_float()

    samples = {"read_gbs": [], "torch_read_gbs": [], "copy_gbs": [], "bf16_linear_s": []}
    for fmt in setups:
        samples[f"{fmt}_layer_s"] = []
        samples[f"{fmt}_ratio_to_read"] = []
        for i in range(len(LINEARS)):
            samples[f"{fmt}_{LINEARS[i][0]}_s"] = []
    for _ in range(args.rounds):
        read = bw.read_gbs()
        samples["read_gbs"].append(read)
        samples["torch_read_gbs"].append(bw.torch_read_gbs())
        samples["copy_gbs"].append(bw.copy_gbs())
        samples["bf16_linear_s"].append(timed(run_float) / float_copies)
        for fmt, (layers, calls, per_linear) in setups.items():
            t = timed(lambda: run_calls(calls)) / len(layers)
            samples[f"{fmt}_layer_s"].append(t)
            layer_bytes = sum(lin["bytes"] for lin in layers[0])
            samples[f"{fmt}_ratio_to_read"].append(layer_bytes / t / 1e9 / read)
            for i, c in enumerate(per_linear):
                samples[f"{fmt}_{LINEARS[i][0]}_s"].append(timed(lambda: run_calls(c)) / len(layers))

    # Dequantize-then-matmul (glmrt.ops.linear: what the reference plan runs), one copy, fewer rounds.
    deq = {}
    for fmt, (layers, _, _) in setups.items():
        from glmrt.graph import Node
        nodes = [Node(lin["name"], "linear", ["x"], ["y"],
                      attrs={"quant": {"bits": BITS[fmt], "group_size": 0, "in_features": lin["k"]}})
                 for lin in layers[0]]

        def run_deq():
            for node, lin in zip(nodes, layers[0]):
                ops.linear(None, node, [xs[lin["k"]]], {"weight": lin["q"], "scale": lin["scale"]})

        run_deq()
        deq[fmt] = stats([timed(run_deq) for _ in range(max(2, args.rounds // 3))])

    read = stats(samples["read_gbs"], True)
    result["bandwidth"] = {"read_gbs": read, "torch_sum_read_gbs": stats(samples["torch_read_gbs"], True),
                           "copy_gbs": stats(samples["copy_gbs"], True),
                           "method": f"{bw.method} (read); copy of 512 MiB (read + write)"}
    result["bf16_linear"] = {"layer_s": stats(samples["bf16_linear_s"]), "layer_bytes": float_layer_bytes,
                             "copies_cycled": float_copies}
    for fmt, (layers, calls, _) in setups.items():
        layer_bytes = sum(lin["bytes"] for lin in layers[0])
        t = stats(samples[f"{fmt}_layer_s"])
        result["formats"][fmt] = {
            "layer_bytes": layer_bytes, "copies_cycled": len(layers), "layer_s": t,
            "weight_gbs": {"median": layer_bytes / t["median"] / 1e9, "best": layer_bytes / t["best"] / 1e9},
            "fraction_of_read_bandwidth": stats(samples[f"{fmt}_ratio_to_read"], True),
            "per_linear_s": {name: stats(samples[f"{fmt}_{name}_s"]) for name, _, _ in LINEARS},
            "per_linear_bytes": {lin["name"]: lin["bytes"] for lin in layers[0]},
            "dequantize_then_matmul_layer_s": deq[fmt],
        }
    del float_layers, setups, bw
    return result


# ----------------------------------------------------------------------------- part 2: whole models
def decode_times(model, steps: int) -> tuple[float, list[float]]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, args.prompt), generator=gen)
    stamps = [time.perf_counter()]
    for _ in model.stream(ids, max_new_tokens=steps + 1, eos_token_id=[]):
        stamps.append(time.perf_counter())
    prefill = stamps[1] - stamps[0]
    return prefill, [b - a for a, b in zip(stamps[1:], stamps[2:])]


def reference_plan(model):
    from glmrt.backends.base import Backend, ProbeResult, Verification
    from glmrt.lowering import lower
    from glmrt.model import Model

    class ReferenceOnly(Backend):
        name = "reference"
        device_type = "cpu"

        def probe(self):
            return ProbeResult(True, "plain torch on the host CPU")

        def verification(self):
            return Verification("unverified", "benchmark baseline")

    return Model(model.config, model.graph, lower(model.graph, ReferenceOnly(), model.weights), model.weights,
                 model.source)


def bench_models() -> dict:
    counts = [int(v) for v in args.layers.split(",") if v]
    if len(counts) != 2:
        return {}
    a, b = counts
    out = {}
    for fmt in ["none"] + args.formats.split(","):
        models, rows, steps = {}, {}, {a: [], b: []}
        for layers in counts:
            t0 = time.perf_counter()
            models[layers] = glmrt.load("synthetic:chatglm3-6b", layers=layers, dtype="bfloat16", backend="cpu",
                                        quantize=None if fmt == "none" else fmt, progress=False)
            linears = [s for s in models[layers].plan.steps if s.node.op == "linear"]
            rows[layers] = {"layers": layers, "load_s": time.perf_counter() - t0,
                            "linear_impls": sorted({s.impl for s in linears}),
                            "weight_bytes": models[layers].weight_bytes()}
            decode_times(models[layers], 2)  # warm-up
        # The two depths alternate, so that a busy spell of the machine hits both alike.
        for _ in range(max(1, args.rounds // 2)):
            for layers in counts:
                prefill, s = decode_times(models[layers], args.tokens)
                rows[layers].setdefault("prefill_s", []).append(prefill)
                steps[layers] += s
        for layers in counts:
            rows[layers]["decode_s"] = stats(steps[layers])
            rows[layers]["prefill_s"] = stats(rows[layers]["prefill_s"])
        if fmt != "none" and args.reference_tokens:
            _, ref_steps = decode_times(reference_plan(models[a]), args.reference_tokens)
            rows[a]["reference_plan_decode_s"] = stats(ref_steps)
        del models
        entry = {"runs": [rows[a], rows[b]]}
        for key in ("median", "best"):
            ta, tb = rows[a]["decode_s"][key], rows[b]["decode_s"][key]
            per_layer = (tb - ta) / (b - a)
            rest = ta - a * per_layer
            t28 = rest + 28 * per_layer
            entry[key] = {"per_layer_s": per_layer, "rest_s": rest, "s_per_token_28_layers": t28,
                          "tokens_per_s_28_layers": 1 / t28}
        if "reference_plan_decode_s" in rows[a]:
            entry[f"reference_plan_tokens_per_s_at_{a}_layers"] = 1 / rows[a]["reference_plan_decode_s"]["median"]
            entry[f"glmrt_tokens_per_s_at_{a}_layers"] = 1 / rows[a]["decode_s"]["median"]
        print(f"  {fmt}: {rows[a]['decode_s']['median'] * 1e3:.1f} / {rows[b]['decode_s']['median'] * 1e3:.1f} ms/token "
              f"at {a} / {b} layers (median)", file=sys.stderr, flush=True)
        out[fmt] = entry
    return out


# ----------------------------------------------------------------------------- report
def markdown(doc: dict) -> str:
    lines = [f"# CPU quantized decode, chatglm3-6b widths ({doc['date']})", "",
             f"- hardware: {doc['hardware']['cpu']}, {doc['hardware']['logical_cpus']} logical CPUs, "
             f"{doc['hardware']['threads']} threads, native path `{doc['hardware']['quant_isa']}`, "
             f"OMP_WAIT_POLICY {doc['hardware']['omp_wait_policy']}",
             f"- load average (1, 5, 15 min) before: {doc['hardware']['load_average']}, after: "
             f"{doc.get('load_average_after')} (the machine is shared: other processes compete for its cores)",
             f"- commit: `{doc['commit']}`{' (+ uncommitted changes)' if doc['dirty'] else ''}",
             f"- command: `{doc['command']}`",
             f"- torch {doc['software']['torch']}, python {doc['software']['python']}", ""]
    p1 = doc.get("layer_linears")
    if p1:
        read = p1["bandwidth"]["read_gbs"]
        lines += ["## One layer's four linears, batch 1 (weights from DRAM)", "",
                  f"Read bandwidth in the same run: median {read['median']:.1f} GB/s, best {read['best']:.1f} GB/s "
                  f"({p1['bandwidth']['method']}); copy {p1['bandwidth']['copy_gbs']['median']:.1f} GB/s.", "",
                  "| path | MB / layer | ms / layer (median) | ms (best) | GB/s (median) | % of read bandwidth "
                  "(median, same round) |", "|---|---|---|---|---|---|"]
        bf = p1["bf16_linear"]
        lines.append(f"| bf16 F.linear (torch) | {bf['layer_bytes'] / 1e6:.0f} | {bf['layer_s']['median'] * 1e3:.2f} | "
                     f"{bf['layer_s']['best'] * 1e3:.2f} | {bf['layer_bytes'] / bf['layer_s']['median'] / 1e9:.1f} | "
                     f"{100 * bf['layer_bytes'] / bf['layer_s']['median'] / 1e9 / read['median']:.0f}% |")
        for fmt, r in p1["formats"].items():
            lines.append(f"| glmrt native {fmt} | {r['layer_bytes'] / 1e6:.0f} | {r['layer_s']['median'] * 1e3:.2f} | "
                         f"{r['layer_s']['best'] * 1e3:.2f} | {r['weight_gbs']['median']:.1f} | "
                         f"{100 * r['fraction_of_read_bandwidth']['median']:.0f}% |")
            d = r["dequantize_then_matmul_layer_s"]
            lines.append(f"| torch dequantize + matmul {fmt} | {r['layer_bytes'] / 1e6:.0f} | {d['median'] * 1e3:.1f} | "
                         f"{d['best'] * 1e3:.1f} | {r['layer_bytes'] / d['median'] / 1e9:.2f} | "
                         f"{100 * r['layer_bytes'] / d['median'] / 1e9 / read['median']:.0f}% |")
        lines += ["", "Per linear (native, ms median / GB/s):", ""]
        for fmt, r in p1["formats"].items():
            parts = [f"{name} {s['median'] * 1e3:.2f} ms / {r['per_linear_bytes'][name] / s['median'] / 1e9:.1f} GB/s"
                     for name, s in r["per_linear_s"].items()]
            lines.append(f"- {fmt}: " + "; ".join(parts))
        lines.append("")
    p2 = doc.get("models")
    if p2:
        a, b = args.layers.split(",")
        lines += ["## Whole model decode (bf16 activations, 32-token prompt, greedy, batch 1)", "",
                  f"Per-token time at {a} and {b} layers (the depths alternate, {max(1, args.rounds // 2)} runs of "
                  f"{args.tokens} tokens each); their difference is the cost of a layer, the rest is embedding, LM "
                  "head and sampling; extrapolated to 28 layers.", "",
                  f"| weights | linears | ms/token L={a} (median / best) | ms/token L={b} (median / best) | ms / layer "
                  "(median / best) | rest, ms | 28 layers: tokens/s (median / best) | layer weight bytes / "
                  f"layer time, GB/s (median) | plain-torch reference plan, tokens/s at L={a} |",
                  "|---|---|---|---|---|---|---|---|---|"]
        layer_bytes = {"none": sum(2 * n * k for _, n, k in LINEARS)}
        p1 = doc.get("layer_linears") or {}
        for fmt, r in p1.get("formats", {}).items():
            layer_bytes[fmt] = r["layer_bytes"]
        for fmt, r in p2.items():
            ra, rb = r["runs"]
            med, best = r["median"], r["best"]
            ref = r.get(f"reference_plan_tokens_per_s_at_{ra['layers']}_layers")
            gbs = layer_bytes[fmt] / med["per_layer_s"] / 1e9 if fmt in layer_bytes and med["per_layer_s"] > 0 else None
            lines.append(f"| {fmt} | {', '.join(ra['linear_impls'])} | "
                         f"{ra['decode_s']['median'] * 1e3:.1f} / {ra['decode_s']['best'] * 1e3:.1f} | "
                         f"{rb['decode_s']['median'] * 1e3:.1f} / {rb['decode_s']['best'] * 1e3:.1f} | "
                         f"{med['per_layer_s'] * 1e3:.2f} / {best['per_layer_s'] * 1e3:.2f} | {med['rest_s'] * 1e3:.1f} | "
                         f"{med['tokens_per_s_28_layers']:.2f} / {best['tokens_per_s_28_layers']:.2f} | "
                         f"{'%.1f' % gbs if gbs else '-'} | {'%.2f' % ref if ref else '-'} |")
        lines.append("")
    return "\n".join(lines)


def main():
    date = datetime.date.today().isoformat()
    doc = {"benchmark": "cpu_quant_decode", "date": date,
           "command": " ".join([f"OMP_NUM_THREADS={args.threads}", "python", os.path.relpath(__file__, ROOT)]
                               + sys.argv[1:]),
           "commit": sh("git", "rev-parse", "HEAD"), "dirty": bool(sh("git", "status", "--porcelain")),
           "hardware": {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "threads": args.threads,
                        "quant_isa": native.quant_linear_isa(),
                        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset: libgomp spins, then sleeps)"),
                        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None},
           "software": {"torch": torch.__version__, "python": platform.python_version()}}
    print("part 1: one layer's linears", file=sys.stderr, flush=True)
    doc["layer_linears"] = bench_layers()
    print(markdown(doc), file=sys.stderr, flush=True)
    if args.layers:
        print("part 2: whole models", file=sys.stderr, flush=True)
        doc["models"] = bench_models()
    doc["load_average_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"{date}-cpu-quant-decode")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(doc, f, indent=1)
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(markdown(doc) + "\n")
    print(markdown(doc))
    print(f"wrote {out}/results.json and README.md", file=sys.stderr)


if __name__ == "__main__":
    main()
