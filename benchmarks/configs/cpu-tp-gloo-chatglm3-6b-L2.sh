#!/usr/bin/env bash
# CPU over gloo: ChatGLM3-6B widths cut to 2 layers, bfloat16, greedy decode of 16 tokens after a
# 32-token prompt, 3 timed rounds each: one process without tensor parallelism (2 threads), the
# same through the tensor-parallel path at world size 1 (2 threads), and 2 ranks (1 thread each),
# so every run uses the machine's 2 cores. One new result directory per run; never edit one by hand.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-benchmarks/results/$(date -u +%F)-cpu-tp-gloo-chatglm3-6b-L2}
ARGS=(--model synthetic:chatglm3-6b --layers 2 --dtype bfloat16 --prompt 32 --tokens 16 --rounds 3 --out "$OUT")
export OMP_NUM_THREADS=2
"$PYTHON" benchmarks/tp_cpu.py "${ARGS[@]}" --plain --threads-per-rank 2
"$PYTHON" -m torch.distributed.run --nproc-per-node 1 --master-port 29611 benchmarks/tp_cpu.py "${ARGS[@]}" --threads-per-rank 2
export OMP_NUM_THREADS=1
"$PYTHON" -m torch.distributed.run --nproc-per-node 2 --master-port 29612 benchmarks/tp_cpu.py "${ARGS[@]}" --threads-per-rank 1
"$PYTHON" benchmarks/tp_cpu.py --summarize "$OUT"
