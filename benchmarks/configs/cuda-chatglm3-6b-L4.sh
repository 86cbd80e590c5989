#!/usr/bin/env bash
# One CUDA GPU (a lent H100 or H200), ChatGLM3-6B widths cut to 4 layers: glmrt bfloat16 unquantized and
# INT8 against transformers' GlmForCausalLM.generate and a minimal torch-eager model on the same GPU.
# (The npu backend is asked for too, so that an unavailable one shows up as a skipped line.)
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results/$(date -u +%F)-cuda-chatglm3-6b-L4}
"$PYTHON" -m glmrt.bench synthetic:chatglm3-6b --layers 4 --backends cuda,npu --dtype bfloat16 \
    --quantize none,int8 --baseline transformers,torch-eager --prompt-len 32 --gen-len 32 \
    --repeat 3 --warmup 1 --threads 16 --out "$OUT"
