#!/usr/bin/env bash
# glmrt serve, continuous batching, chatglm3-6b widths cut to 2 layers, INT4 weights, bf16 activations, CPU.
# One command: bash benchmarks/configs/cpu-serving-chatglm3-6b-L2-int4.sh [OUT_DIR]
# OUT_DIR defaults to benchmarks/results/DATE-cpu-serving-chatglm3-6b-L2-int4, with -b, -c, ... appended
# when that directory already holds results (an earlier run is never overwritten). Writes there:
#   results.json / results.md  the HTTP serving benchmark (benchmarks/serve_bench.py) at 1, 4, 8, 16 streams;
#   profile.json / profile.txt the engine's decode step without HTTP at batch 1, 2, 4, 8, per op
#                              (benchmarks/engine_decode_profile.py), run after it.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT="${1:-}"
if [ -z "$OUT" ]; then
  base="benchmarks/results/$(date -u +%F)-cpu-serving-chatglm3-6b-L2-int4"
  OUT="$base"
  for s in b c d e f g h; do
    [ -e "$OUT/results.json" ] || break
    OUT="$base-$s"
  done
fi
.venv/bin/python benchmarks/serve_bench.py --model synthetic:chatglm3-6b --layers 2 --quantize int4 --dtype bfloat16 \
    --max-batch 16 --concurrency 1,4,8,16 --prompt-len 64 --output-len 64 --threads 2 --out "$OUT"
OMP_NUM_THREADS=2 .venv/bin/python benchmarks/engine_decode_profile.py --model synthetic:chatglm3-6b --layers 2 \
    --quantize int4 --dtype bfloat16 --threads 2 --batches 1,2,4,8 --rounds 3 --steps 6 --json "$OUT/profile.json" \
    | tee "$OUT/profile.txt"
echo "results in $OUT"
