"""`glmrt bench` on the command line: its arguments, and what runs for them (a run, or --compare);
`register` adds it to the glmrt command.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import GLMRTError
from .metrics import _log
from .render import compare_runs, load_results, print_report, schema_problems
from .runner import run_bench
from .settings import config_from_args

DESCRIPTION = ("`glmrt bench`: the same model and the same prompts on every available backend and baseline: TTFT,\n"
               "TPOT, tokens/s, peak memory, achieved bandwidth and drift against the float32 reference (defined in\n"
               "benchmarks/README.md and in every results.md), written as JSON + markdown + a plot;\n"
               "`glmrt bench --compare A B` puts two runs side by side.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="checkpoint directory or synthetic:<preset>")
    p.add_argument("--model", dest="model_flag", default=None, help="the model (same as the positional argument)")
    p.add_argument("--layers", type=int, default=None, help="keep only the first N layers")
    p.add_argument("--backends", default="all",
                   help="comma-separated backend names or aliases, or all (default: all; unavailable ones are "
                        "skipped with the reason)")
    p.add_argument("--dtype", default="float32", help="comma-separated: float32,bfloat16,float16 (default: float32)")
    p.add_argument("--quantize", default="none",
                   help="comma-separated: none,int8,int4 (group-wise: int4-g64, ...) (default: none)")
    p.add_argument("--baseline", default="auto",
                   help="comma-separated baselines: transformers (GlmForCausalLM.generate), torch-eager (a minimal "
                        "transformers-style nn.Module), auto (transformers if installed and the model fits it, else "
                        "torch-eager) or none (default: auto)")
    p.add_argument("--batch", type=int, default=1, help="sequences per request (default: 1)")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (default: 32)")
    p.add_argument("--gen-len", type=int, default=32, help="generated tokens per request (default: 32)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs per setting (default: 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default: 1)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's default here)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompt ids (default: 0)")
    p.add_argument("--out", default=None, help="write results.json, results.md and results.png into DIR")
    p.add_argument("--json", action="store_true", help="print the results document as JSON instead of the table")
    p.add_argument("--tensor-parallel", type=int, default=None, metavar="N",
                   help="run as one of N tensor-parallel ranks under `torchrun --nproc-per-node N -m glmrt bench "
                        "...`: every rank runs the glmrt settings in lockstep (in its own process, not in worker "
                        "processes), rank 0 prints and writes the results (with the transport and the collectives' "
                        "share of a decode step); baselines are skipped")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), default=None,
                   help="print two results.json side by side (matching settings, B/A ratios) and exit")


def handle(args: argparse.Namespace) -> int:
    if args.compare:
        a, b = (load_results(p) for p in args.compare)
        for path, doc in zip(args.compare, (a, b)):
            problems = schema_problems(doc)
            if problems:
                _log(f"glmrt bench: warning: {path} does not match glmrt/bench/schema.json: {problems[0]}")
        print(compare_runs(a, b))
        return 0
    cfg = config_from_args(args)
    doc = run_bench(cfg)
    if doc is None:  # a tensor-parallel rank other than 0: rank 0 reports
        return 0
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print_report(doc)
    return 0 if all(r["status"] == "ok" for r in doc["results"]) else 1


def register(subparsers) -> None:
    """Adds `glmrt bench` to the glmrt command (glmrt.cli's _COMMAND_MODULES)."""
    p = subparsers.add_parser("bench", help="benchmark a model on every available backend (TTFT, TPOT, tokens/s, "
                                            "memory, bandwidth, drift), or compare two runs",
                              description=DESCRIPTION)
    add_arguments(p)
    p.set_defaults(handler=handle)


def main(argv: list[str] | None = None) -> int:
    """`python -m glmrt.bench ...`: the same as `glmrt bench ...`."""
    parser = argparse.ArgumentParser(prog="glmrt bench", description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return handle(args)
    except GLMRTError as exc:
        print(f"glmrt: error: {exc}", file=sys.stderr)
        return 2
