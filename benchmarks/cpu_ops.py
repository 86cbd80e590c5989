"""Native CPU LayerNorm / RoPE / attention kernels against the torch reference ops, per op and in
whole-model decode, at ChatGLM3-6B (and ChatGLM-6B) widths. Prints one JSON document.

    OMP_NUM_THREADS=2 python benchmarks/cpu_ops.py [--threads 2] [--context 512] [--layers 2]

Per op: the same node, inputs and context through the native kernel and through glmrt.ops'
reference (plain torch), batch 1, median of --repeats rounds of --calls calls each. Whole model:
one loaded model, two plans over the same weights, "before" (the CPU backend without these three
kernels: torch's ops for norm-LayerNorm, rope and attention) and "after" (the full CPU backend),
decoding after a --context-token prompt, the two runs alternated --model-repeats times.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--context", type=int, default=512, help="cached tokens the decode step attends to")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--models", default="chatglm3-6b,chatglm-6b", help="presets for the whole-model decode ('' = none)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--model-repeats", type=int, default=3)
    return ap.parse_args()


args = parse_args()
os.environ["OMP_NUM_THREADS"] = str(args.threads)  # before the OpenMP runtime starts

import torch  # noqa: E402

torch.set_num_threads(args.threads)

from glmrt import ops  # noqa: E402
from glmrt.backends import get_backend  # noqa: E402
from glmrt.backends.base import Backend  # noqa: E402
from glmrt.backends.cpu import native_ops  # noqa: E402
from glmrt.graph import Node, ValueSpec  # noqa: E402

NATIVE_NAMES = ("native.layer_norm", "native.rope", "native.attention")


def timed(fn, calls, repeats):
    fn()
    rounds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - t0) / calls)
    return {"median_us": statistics.median(rounds) * 1e6, "min_us": min(rounds) * 1e6, "max_us": max(rounds) * 1e6}


def rope_case(dtype, nh, nkv, hd, rd, kind, table, tokens, pos):
    node = Node("rope", "rope", ["qkv"], ["q", "k", "v"],
                attrs=dict(kind=kind, rotary_dim=rd, head_dim=hd, num_heads=nh, num_kv_heads=nkv, base=10000.0,
                           table_dtype=table),
                input_specs=[ValueSpec(("B", "T", (nh + 2 * nkv) * hd), dtype)])
    qkv = torch.randn(1, tokens, (nh + 2 * nkv) * hd).to(dtype)
    positions = torch.arange(pos, pos + tokens)[None]
    if kind == "2d":
        positions = torch.stack((positions, torch.arange(tokens)[None]), dim=1)
    ctx = ops.ForwardContext(positions=positions, allowed=None)
    return node, [qkv], ctx, {}


def attention_case(dtype, nh, nkv, hd, scaling, tokens, past, static):
    node = Node("attn", "attention", ["q", "k", "v"], ["o"],
                attrs=dict(layer_index=3, num_heads=nh, num_kv_heads=nkv, head_dim=hd, scale=1 / math.sqrt(hd),
                           scaling=scaling, mask_kind="causal"),
                input_specs=[ValueSpec(("B", "T", nh, hd), dtype)])
    q = torch.randn(1, tokens, nh, hd).to(dtype)
    k, v = torch.randn(1, tokens, nkv, hd).to(dtype), torch.randn(1, tokens, nkv, hd).to(dtype)
    max_len = past + tokens + (32 if static else 0)
    cache = ops.KVCache(4, 1, nkv, max_len, hd, dtype, torch.device("cpu"))
    cache.k[3].normal_()
    cache.v[3].normal_()
    S = past + tokens
    causal = torch.arange(S)[None, :] <= torch.arange(past, S)[:, None]  # (T, S)
    if static:
        allowed = torch.zeros(1, 1, tokens, max_len, dtype=torch.bool)
        allowed[..., :S] = causal
        ctx = ops.ForwardContext(positions=None, allowed=allowed, cache=cache, cache_pos_t=torch.tensor(past))
    else:
        ctx = ops.ForwardContext(positions=None, allowed=causal[None, None], cache=cache, cache_pos=past)
    return node, [q, k, v], ctx, {}


def norm_case(dtype, hidden, rows):
    node = Node("norm", "norm", ["x"], ["y"], attrs=dict(kind="layernorm", eps=1e-5, round_before_weight=False),
                input_specs=[ValueSpec(("B", "T", hidden), dtype)])
    x = torch.randn(1, rows, hidden).to(dtype)
    return node, [x], None, {"weight": torch.randn(hidden).to(dtype), "bias": torch.randn(hidden).to(dtype)}


def op_rows(dtype):
    ctx_len = args.context
    cases = [
        ("layer_norm", "chatglm-6b decode (1 x 4096)", norm_case(dtype, 4096, 1), native_ops.layer_norm),
        ("layer_norm", "chatglm-6b prefill (512 x 4096)", norm_case(dtype, 4096, 512), native_ops.layer_norm),
        ("rope", "chatglm3-6b decode (interleaved 64/128, 32+2+2 heads)",
         rope_case(dtype, 32, 2, 128, 64, "interleaved", "float32", 1, ctx_len), native_ops.rope),
        ("rope", "chatglm-6b decode (2-D, fp16 tables, 32+32+32 heads)",
         rope_case(dtype, 32, 32, 128, 128, "2d", "float16", 1, ctx_len), native_ops.rope),
        ("rope", "chatglm3-6b prefill 512", rope_case(dtype, 32, 2, 128, 64, "interleaved", "float32", 512, 0),
         native_ops.rope),
        ("attention", f"chatglm3-6b decode, GQA 32/2, context {ctx_len}, eager cache",
         attention_case(dtype, 32, 2, 128, "standard", 1, ctx_len - 1, False), native_ops.attention),
        ("attention", f"chatglm3-6b decode, GQA 32/2, context {ctx_len}, static cache (+32 slots)",
         attention_case(dtype, 32, 2, 128, "standard", 1, ctx_len - 1, True), native_ops.attention),
        ("attention", f"chatglm-6b decode, MHA 32/32 layer-scaled, context {ctx_len}",
         attention_case(dtype, 32, 32, 128, "layer_scaled", 1, ctx_len - 1, False), native_ops.attention),
        ("attention", "chatglm3-6b prefill 512 over an empty cache",
         attention_case(dtype, 32, 2, 128, "standard", 512, 0, False), native_ops.attention),
    ]
    rows = []
    for op, what, (node, inputs, ctx, params), fn in cases:
        reference = ops.REFERENCE[node.op]
        heavy = "prefill" in what
        calls, repeats = (max(2, args.calls // 25), max(3, args.repeats // 2)) if heavy else (args.calls, args.repeats)
        if op == "rope":  # the tables are built once per step for all layers: keep them memoised for both
            reference(ctx, node, inputs, params)
        t_native = timed(lambda: fn(ctx, node, inputs, params), calls, repeats)
        t_ref = timed(lambda: reference(ctx, node, inputs, params), calls, repeats)
        rows.append({"op": op, "case": what, "dtype": str(dtype).removeprefix("torch."),
                     "native_us": round(t_native["median_us"], 2), "reference_us": round(t_ref["median_us"], 2),
                     "speedup": round(t_ref["median_us"] / t_native["median_us"], 2),
                     "native_spread_us": [round(t_native["min_us"], 2), round(t_native["max_us"], 2)],
                     "reference_spread_us": [round(t_ref["min_us"], 2), round(t_ref["max_us"], 2)]})
        print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


class Without(Backend):
    """The CPU backend minus some kernels (the 'before' plan)."""

    name = "cpu-without"
    device_type = "cpu"

    def __init__(self, base, drop):
        self.base, self.drop = base, drop

    def probe(self):
        return self.base.probe()

    def verification(self):
        return self.base.verification()

    def kernels(self):
        return [k for k in self.base.kernels() if k.name not in self.drop]


def decode_rate(model, prompt, new_tokens):
    times = []
    t = time.perf_counter()
    for _ in model.stream(prompt, max_new_tokens=new_tokens):
        now = time.perf_counter()
        times.append(now - t)
        t = now
    decode = times[1:]  # the first token comes out of the prefill
    return {"prefill_s": round(times[0], 4), "decode_tok_s": round(len(decode) / sum(decode), 3),
            "decode_ms_per_token": round(1000 * statistics.median(decode), 2)}


def model_rows(preset):
    import glmrt
    from glmrt.lowering import lower
    from glmrt.model import Model

    after = glmrt.load(f"synthetic:{preset}", layers=args.layers, backend="cpu", dtype="bfloat16", progress=False)
    before = Model(after.config, after.graph, lower(after.graph, Without(get_backend("cpu"), NATIVE_NAMES),
                                                    after.weights), after.weights, after.source)
    cfg = after.config
    g = torch.Generator().manual_seed(0)
    body = torch.randint(100, 60000, (args.context - 2,), generator=g).tolist()
    prompt = torch.tensor([after.build_inputs(body)])
    runs = {"before": [], "after": []}
    tokens = {}
    for _ in range(args.model_repeats):
        for name, model in (("before", before), ("after", after)):
            runs[name].append(decode_rate(model, prompt, args.new_tokens))
            tokens[name] = model.generate(prompt, max_new_tokens=8)[0, -8:].tolist()
    out = {"model": f"synthetic:{preset}", "layers": args.layers, "dtype": "bfloat16", "prompt_tokens": args.context,
           "new_tokens": args.new_tokens, "native_in_after": sorted({s.impl for s in after.plan.steps
                                                                     if s.kind == "native"}),
           "same_greedy_tokens": tokens["before"] == tokens["after"]}
    for name, rs in runs.items():
        out[name] = {"decode_tok_s_median": statistics.median(r["decode_tok_s"] for r in rs),
                     "decode_ms_per_token_median": statistics.median(r["decode_ms_per_token"] for r in rs),
                     "prefill_s_median": statistics.median(r["prefill_s"] for r in rs), "runs": rs}
    out["decode_speedup"] = round(out["after"]["decode_tok_s_median"] / out["before"]["decode_tok_s_median"], 3)
    out["ms_per_token_saved_per_layer"] = round((out["before"]["decode_ms_per_token_median"]
                                                 - out["after"]["decode_ms_per_token_median"]) / args.layers, 3)
    print(json.dumps({k: v for k, v in out.items() if k not in ("before", "after")}), file=sys.stderr)
    return out


def stamp():
    def run(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), None)
    module = native_ops.native()[0]
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
            "python": platform.python_version(), "commit": run(["git", "rev-parse", "HEAD"]),
            "dirty": bool(run(["git", "status", "--porcelain"])), "simd": module.simd_level() if module else None,
            "loadavg_start": os.getloadavg(), "command": " ".join([sys.executable] + sys.argv)}


def main():
    if not native_ops.available():
        sys.exit("glmrt._native_cpu lacks layer_norm/rope/attention: rebuild glmrt")
    result = {"stamp": stamp(), "ops": []}
    for name in args.dtypes.split(","):
        result["ops"] += op_rows(getattr(torch, name))
    result["models"] = [model_rows(p) for p in args.models.split(",") if p]
    result["stamp"]["loadavg_end"] = os.getloadavg()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
