#!/usr/bin/env bash
# glmrt serve, continuous batching, chatglm3-6b widths cut to 2 layers, INT4 weights, bf16 activations, CPU.
set -euo pipefail
cd "$(dirname "$0")/../.."
.venv/bin/python benchmarks/serve_bench.py --model synthetic:chatglm3-6b --layers 2 --quantize int4 --dtype bfloat16 \
    --max-batch 16 --concurrency 1,4,8,16 --prompt-len 64 --output-len 64 --threads 2 \
    --out "benchmarks/results/$(date -u +%F)-cpu-serving-chatglm3-6b-L2-int4"
