#!/usr/bin/env bash
# CPU, 2 threads, the whole ChatGLM3-6B (28 layers, random weights): glmrt INT4 / INT8 against
# chatglm.cpp q4_0 / q8_0, built here from the chatglm-cpp 0.4.2 source distribution (pip download,
# or SDIST=path/to/chatglm_cpp-0.4.2.tar.gz), with a cross-check that both engines produce the same
# greedy tokens on the same float32 weights. Needs cmake, a C++17 compiler and ~12 GB of free disk
# in WORK for the GGML files (deleted after use). One new result directory per run.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
WORK=${WORK:-/tmp/glmrt-vs-chatglm-cpp}
OUT=${OUT:-benchmarks/results/$(date -u +%F)-cpu-vs-chatglm-cpp}
SRC_ARGS=()
if [ -n "${SDIST:-}" ]; then SRC_ARGS=(--sdist "$SDIST"); fi
"$PYTHON" benchmarks/vs_chatglm_cpp.py "${SRC_ARGS[@]}" --work "$WORK" --layers 28 --formats int4,int8 \
    --rounds 2 --tokens 32 --check-layers 2 --check-tokens 8 --threads 2 --out "$OUT"
