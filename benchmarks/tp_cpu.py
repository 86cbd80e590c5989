"""Tensor-parallel decode on the CPU over gloo: tokens/s at tp 1 and 2, and the share of each
decode step spent in the collectives.

Run under torchrun, one process per rank (benchmarks/configs/cpu-tp-gloo-chatglm3-6b-L2.sh runs
the whole set):

    torchrun --nproc-per-node 2 benchmarks/tp_cpu.py --model synthetic:chatglm3-6b --layers 2 \\
        --dtype bfloat16 --threads-per-rank 1 --out DIR
    python benchmarks/tp_cpu.py --summarize DIR        # results.json + README.md from the parts

Each run loads the model with glmrt.load(..., tensor_parallel=WORLD_SIZE) (``--plain``: without
tensor parallelism, one process, for the tp-1 baseline without collectives), decodes ``--tokens``
greedy tokens after a ``--prompt``-token prompt, ``--rounds`` times, and records per round: the
decode tokens/s (first token to last), the seconds per step, and the seconds rank 0 and the
slowest rank spent inside all_reduce / all_gather (glmrt.distributed.Communicator's timing: the
wall time of the call, which includes waiting for the other ranks). Rank 0 writes
DIR/<label>.json. Not a timed test: the numbers depend on the machine and its load, which is
recorded (load average before and after) with the hardware, the commit and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="synthetic:chatglm3-6b")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads-per-rank", type=int, default=1)
    ap.add_argument("--plain", action="store_true", help="no tensor parallelism (one process, no collectives)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--summarize", default=None, metavar="DIR", help="merge DIR's parts into results.json, README.md")
    return ap.parse_args()


def measure(args) -> dict | None:
    import torch
    import glmrt
    from glmrt.bench.machine import load_average
    from glmrt.bench.metrics import CollectiveClock
    torch.set_num_threads(args.threads_per_rank)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tp = None if args.plain else world
    load_before = load_average()
    t0 = time.perf_counter()
    model = glmrt.load(args.model, backend="cpu", dtype=args.dtype, layers=args.layers, tensor_parallel=tp,
                       progress=False)
    load_s = time.perf_counter() - t0
    comm = model.comm
    rank = comm.rank if comm else 0
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (args.prompt,), generator=g).tolist()
    clock = CollectiveClock(comm) if comm else None  # the same measure as glmrt bench --tensor-parallel
    rounds = []
    for _ in range(args.rounds + 1):  # the first round warms up
        if clock:
            clock.start()
        stamps = []
        before = dict(comm.counts) if comm else {}
        for i, _tok in enumerate(model.stream([prompt], max_new_tokens=args.tokens + 1, eos_token_id=[])):
            stamps.append(time.perf_counter())
            if i == 0 and clock:  # time the collectives of the decode steps only
                clock.first_token()
        steps = len(stamps) - 1
        decode_s = stamps[-1] - stamps[0]
        comm_s = clock.stop(decode_s, steps)["comm_s"] if clock else 0.0
        # Per forward over the prefill and the decode steps ("agree": the call check, once per generation).
        forwards = {k: (v - before.get(k, 0)) / (steps + 1) for k, v in comm.counts.items()
                    if v != before.get(k, 0)} if comm else None
        slowest = clock.slowest_rank(comm_s) if clock else 0.0
        rounds.append({"decode_steps": steps, "decode_s": decode_s, "tokens_per_s": steps / decode_s,
                       "step_s": decode_s / steps, "comm_s_rank0": comm_s, "comm_s_max_rank": slowest,
                       "comm_share_rank0": comm_s / decode_s,
                       "collectives_per_forward": forwards})
    rounds = rounds[1:]
    if rank != 0:
        return None
    med = lambda k: statistics.median(r[k] for r in rounds)  # noqa: E731
    return {"label": "plain" if args.plain else f"tp{world}", "tensor_parallel": tp, "world_size": world,
            "threads_per_rank": args.threads_per_rank, "model": args.model, "layers": args.layers,
            "dtype": args.dtype, "prompt_tokens": args.prompt, "decode_tokens": args.tokens,
            "collective_transport": comm.transport if comm else None, "load_s": load_s,
            "median": {k: med(k) for k in ("tokens_per_s", "step_s", "comm_s_rank0", "comm_share_rank0")},
            "best_tokens_per_s": max(r["tokens_per_s"] for r in rounds), "rounds": rounds,
            "load_average": {"before": load_before, "after": load_average()},
            "collectives_per_forward_expected": {"all_reduce": 2 * args.layers + 1, "all_gather": 1} if comm else None,
            "argv": sys.argv}


def summarize(directory: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from glmrt.bench.machine import stamp
    parts = {p.stem: json.loads(p.read_text()) for p in sorted(directory.glob("*.json")) if p.name != "results.json"}
    threads = max(p["threads_per_rank"] * p["world_size"] for p in parts.values())
    doc = {"kind": "glmrt-tp-cpu", **stamp(threads), "runs": parts,
           "command": "benchmarks/configs/cpu-tp-gloo-chatglm3-6b-L2.sh"}
    (directory / "results.json").write_text(json.dumps(doc, indent=2))
    lines = [f"# Tensor-parallel decode on the CPU over gloo: {next(iter(parts.values()))['model']}, "
             f"{next(iter(parts.values()))['layers']} layers", "",
             f"Commit {doc['software'].get('commit')}"
             f"{' (with uncommitted changes)' if doc['software'].get('dirty') else ''}, torch {doc['software']['torch']}, CPU "
             f"{doc['hardware']['cpu'].get('model', doc['hardware']['cpu'])}. Command: `{doc['command']}`.", "",
             "| run | ranks x threads | decode tokens/s (median) | best | step ms | collectives ms/step (rank 0) "
             "| comm share | load avg before / after |", "|---|---|---|---|---|---|---|---|"]
    for label, p in parts.items():
        m = p["median"]
        steps = p["decode_tokens"]
        lines.append(f"| {label} | {p['world_size']} x {p['threads_per_rank']} | {m['tokens_per_s']:.2f} | "
                     f"{p['best_tokens_per_s']:.2f} | {1000 * m['step_s']:.1f} | {1000 * m['comm_s_rank0'] / steps:.2f} | "
                     f"{100 * m['comm_share_rank0']:.1f}% | {p['load_average']['before']} / {p['load_average']['after']} |")
    lines += ["", "The collectives' time is the wall time of each all_reduce / all_gather call on rank 0, which "
              "includes waiting for the slower rank; `comm_s_max_rank` in results.json is the largest over the ranks. "
              "The machine is shared: compare runs only as ratios from the same invocation, and read the load "
              "average next to them.", ""]
    (directory / "README.md").write_text("\n".join(lines))


def main() -> None:
    args = parse_args()
    if args.summarize:
        summarize(Path(args.summarize))
        return
    result = measure(args)
    if result is not None:
        out = Path(args.out or ".")
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{result['label']}.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result["median"]), flush=True)


if __name__ == "__main__":
    main()
