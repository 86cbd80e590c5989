#!/usr/bin/env bash
# Builds benchmarks/native/gemv_bench.cpp against the working tree's GEMV kernels and, as the
# baseline in the same binary, the same two files at BASE_REF (default: main), then runs it.
#   OMP_NUM_THREADS=2 [OMP_WAIT_POLICY=passive GEMV_BENCH_CLOCK=cpu] benchmarks/native/run_gemv_bench.sh [BASE_REF] [ROUNDS] [CASE-SUBSTRING]
# GEMV_BENCH_CLOCK=cpu times by the process CPU time (for a machine shared with other jobs).
set -euo pipefail
cd "$(dirname "$0")/../.."
base=${1:-main}
out=${TMPDIR:-/tmp}/glmrt_gemv_bench.$$
mkdir -p "$out"
for f in gemv_float gemv_quant; do git show "$base:native/cpu/$f.cpp" > "$out/${f}_old.cpp"; done
cp native/cpu/*.h "$out/"
flags=(-std=c++17 -O3 -fno-math-errno -fopenmp -DGLMRT_HAVE_OPENMP=1)
for f in gemv_float gemv_quant; do
  g++ "${flags[@]}" -Dglmrt=glmrt_old -I"$out" -c "$out/${f}_old.cpp" -o "$out/${f}_old.o" &
  g++ "${flags[@]}" -Inative/cpu -c "native/cpu/$f.cpp" -o "$out/${f}_new.o" &
done
g++ "${flags[@]}" -Inative/cpu -c benchmarks/native/gemv_bench.cpp -o "$out/bench.o" &
wait
g++ -fopenmp "$out"/*.o -o "$out/gemv_bench"
echo "baseline: $base ($(git rev-parse --short "$base")), new: working tree; load: $(cut -d' ' -f1-3 /proc/loadavg)"
"$out/gemv_bench" "${2:-5}" "${3:-}"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
rm -rf "$out"
