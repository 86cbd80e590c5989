"""Where a batched decode step of the serving engine spends its time, at batch 1, 2, 4 and 8 (no HTTP).

Loads MODEL as `glmrt serve` does, makes one glmrt.engine.Engine, and for each batch size B (rounds
alternate B = 1, 2, 4, 8, ... so a change in the machine's load hits every size alike) fills B slots
with --prompt-len random token ids, prefills them, then times --steps decode steps. Each step's time
is split into the plan's ops (every PlanStep's fn is wrapped with a timer, keyed by op and kernel) and
the engine's own work around the forward (building tokens / positions / masks, sampling, freeing).

    .venv/bin/python benchmarks/engine_decode_profile.py --model synthetic:chatglm3-6b --layers 2 \\
        --quantize int4 --dtype bfloat16 --threads 2

Prints a table per batch size: median step time, tokens/s, the x over batch 1, the process CPU time
per step (all threads; with OMP_WAIT_POLICY=passive it is the work done, which a loaded machine's
descheduling does not inflate), and per op its wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from collections import defaultdict


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="synthetic:chatglm3-6b")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--quantize", default="int4")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batches", default="1,2,4,8")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=6, help="timed decode steps per batch size per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--op-clock", choices=["wall", "cpu"], default="wall",
                    help="time each op by the wall clock or by the process CPU time (all threads)")
    ap.add_argument("--json", default=None, help="write the raw numbers here")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    import glmrt
    from glmrt.engine import Engine, Request

    model = glmrt.load(args.model, dtype=args.dtype, quantize=args.quantize, layers=args.layers, progress=False)
    batches = [int(b) for b in args.batches.split(",")]
    max_new = args.steps + 4
    engine = Engine(model, max_batch=max(batches), max_len=args.prompt_len + max_new + 2)

    op_time: dict[str, float] = defaultdict(float)
    forward_time = [0.0]
    timing = [False]

    clock = time.perf_counter if args.op_clock == "wall" else time.process_time

    def wrap(step):
        fn = step.fn
        key = f"{step.node.op}:{step.impl}"
        if step.node.op == "linear" and "weight" in step.params:
            w = step.params["weight"]
            key += f"[{tuple(w.shape)}]"

        def timed(ctx, node, inputs, params):
            if not timing[0]:
                return fn(ctx, node, inputs, params)
            t0 = clock()
            out = fn(ctx, node, inputs, params)
            op_time[key] += clock() - t0
            return out

        step.fn = timed

    for step in engine.decode_plan.steps:
        wrap(step)
    import glmrt.engine as engine_mod

    execute = engine_mod.execute

    def timed_execute(plan, ctx, ids):
        if not timing[0] or plan is not engine.decode_plan:
            return execute(plan, ctx, ids)
        t0 = clock()
        out = execute(plan, ctx, ids)
        forward_time[0] += clock() - t0
        return out

    engine_mod.execute = timed_execute
    rng = random.Random(0)
    vocab = model.config.vocab_size
    results: dict[int, list[dict]] = defaultdict(list)
    for rnd in range(args.rounds + 1):  # round 0 warms up
        for b in batches:
            reqs = [Request([rng.randrange(100, vocab - 100) for _ in range(args.prompt_len)], max_new)
                    for _ in range(b)]
            for r in reqs:
                engine.submit(r)
            while engine._n_decode < b:
                engine.step()
            op_time.clear()
            forward_time[0] = 0.0
            step_times, cpu_times = [], []
            timing[0] = True
            for _ in range(args.steps):
                t0, c0 = time.perf_counter(), time.process_time()
                engine.step()
                step_times.append(time.perf_counter() - t0)
                cpu_times.append(time.process_time() - c0)
            timing[0] = False
            assert engine._n_decode == b, "a request finished early"
            for r in reqs:
                engine.cancel(r)
            engine.step()
            if rnd:
                results[b].append({"step": statistics.median(step_times), "cpu": statistics.median(cpu_times), "forward": forward_time[0] / args.steps,
                                   "ops": {k: v / args.steps for k, v in op_time.items()}})
    print(f"# {args.model} --layers {args.layers} --quantize {args.quantize} --dtype {args.dtype}, "
          f"{args.threads} threads; load average {os.getloadavg()}")
    base = cpu_base = None
    summary = {}
    for b in batches:
        rows = results[b]
        step = statistics.median(r["step"] for r in rows)
        fwd = statistics.median(r["forward"] for r in rows)
        cpu = statistics.median(r["cpu"] for r in rows)
        ops = defaultdict(list)
        for r in rows:
            for k, v in r["ops"].items():
                ops[k].append(v)
        tps = b / step
        base = base or tps
        cpu_base = cpu_base or cpu / b
        same_clock = step if args.op_clock == "wall" else cpu  # the engine's share on the ops' clock
        print(f"\nB={b}: step {step * 1e3:.1f} ms (forward {fwd * 1e3:.1f}, engine {(same_clock - fwd) * 1e3:.1f} by the "
              f"{args.op_clock} clock), "
              f"{tps:.1f} tok/s, x{tps / base:.2f} vs B=1; forward and ops by the {args.op_clock} clock; process CPU time {cpu * 1e3:.1f} ms per step, "
              f"x{b * cpu_base / cpu:.2f} tokens per CPU second vs B=1")
        agg = sorted(((statistics.median(v), k) for k, v in ops.items()), reverse=True)
        for t, k in agg[:12]:
            print(f"  {t * 1e3:8.2f} ms  {k}")
        summary[b] = {"step_ms": step * 1e3, "cpu_ms": cpu * 1e3, "forward_ms": fwd * 1e3, "tokens_per_s": tps,
                      "ops_ms": {k: statistics.median(v) * 1e3 for k, v in ops.items()}}
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "load": os.getloadavg(), "batches": summary}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
