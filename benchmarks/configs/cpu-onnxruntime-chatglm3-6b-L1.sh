#!/usr/bin/env bash
# CPU, 2 threads, ChatGLM3-6B widths cut to 1 layer (float32 fits the ~3 GB per-process budget of the
# shared machine): onnxruntime's CPU provider on glmrt's ort-flavor exports (float32, and INT4 as
# MatMulNBits at accuracy_level 4), through glmrt's onnxruntime backend and driven directly with
# numpy, against glmrt's cpu backend and transformers. One new result directory per run.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-benchmarks/results/$(date -u +%F)-cpu-onnxruntime-chatglm3-6b-L1}
"$PYTHON" benchmarks/onnxruntime_cpu.py --model synthetic:chatglm3-6b --layers 1 --threads 2 \
    --prompt-len 16 --gen-len 32 --repeat 2 --seed 0 --out "$OUT"
