#!/usr/bin/env bash
# CPU, 2 threads, ChatGLM3-6B widths cut to 2 layers: the cpu and sunway backends at float32 and
# bfloat16, unquantized and with INT8 / INT4 weights, against transformers' GlmForCausalLM.generate
# built from the same weights. One new result directory per run; never edit one by hand.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-benchmarks/results/$(date -u +%F)-cpu-sunway-chatglm3-6b-L2-quant}
"$PYTHON" -m glmrt.bench synthetic:chatglm3-6b --layers 2 --backends cpu,sunway --dtype float32,bfloat16 \
    --quantize none,int8,int4 --baseline transformers --batch 1 --prompt-len 32 --gen-len 16 \
    --repeat 3 --warmup 1 --threads 2 --seed 0 --out "$OUT"
