#!/usr/bin/env bash
# CPU, 2 threads (PERF.md: this project's CPU machines), ChatGLM3-6B widths cut to 2 layers:
# glmrt float32 and bfloat16 against transformers' GlmForCausalLM.generate and a minimal torch-eager
# model built from the same weights. One new result directory per run; never edit one by hand.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-benchmarks/results/$(date -u +%F)-cpu-chatglm3-6b-L2}
# `python -m glmrt.bench` is `glmrt bench` (the same arguments).
"$PYTHON" -m glmrt.bench synthetic:chatglm3-6b --layers 2 --backends cpu --dtype float32,bfloat16 \
    --quantize none --baseline transformers,torch-eager --batch 1 --prompt-len 32 --gen-len 32 \
    --repeat 3 --warmup 1 --threads 2 --seed 0 --out "$OUT"
