#!/usr/bin/env bash
# CPU, 2 threads: glmrt against llama.cpp on the same GGUF files (random weights at the ChatGLM3-6B
# widths, written by glmrt.gguf_writer; the quantized files keep the embedding and the LM head in
# F16), F16 / BF16 / Q8_0 / Q4_0, llama-bench's pp128 / pp512 / tg32, engines alternating round by
# round, after a cross-check that llama.cpp's greedy tokens equal glmrt's on an F32 file.
# llama.cpp is built once from the llama-cpp-python source distribution (pip download, or
# SDIST=path/to/llama_cpp_python-X.tar.gz) into WORK (default /work/llama-build, kept: build tree
# and GGUF files are reused by later runs). Needs cmake and a C++17 compiler.
#
#   bash benchmarks/configs/cpu-vs-llama-cpp-chatglm3-6b.sh             # 8 layers (~25 min here)
#   LAYERS=28 bash benchmarks/configs/cpu-vs-llama-cpp-chatglm3-6b.sh   # the whole model (~2 h, ~37 GB of
#                                                                       # files in WORK; run on a quiet machine)
# At 28 layers glmrt's worker restarts every round (--worker-per-round): a 16-bit file is 12.5 GB, and
# glmrt's copy and llama.cpp's mapping of it do not both fit in this machine's 23 GB. One new result
# directory per run.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
LAYERS=${LAYERS:-8}
WORK=${WORK:-/work/llama-build}
OUT=${OUT:-benchmarks/results/$(date -u +%F)-cpu-vs-llama-cpp-chatglm3-6b-L$LAYERS}
EXTRA=()
if [ -n "${SDIST:-}" ]; then EXTRA+=(--sdist "$SDIST"); fi
if [ "$LAYERS" -gt 8 ]; then EXTRA+=(--worker-per-round); fi
"$PYTHON" benchmarks/vs_llama_cpp.py "${EXTRA[@]}" --work "$WORK" --layers "$LAYERS" \
    --formats f16,bf16,q8_0,q4_0 --pp 128,512 --tg 32 --rounds 3 --check-layers 2 --check-tokens 8 \
    --threads 2 --profile --out "$OUT"
