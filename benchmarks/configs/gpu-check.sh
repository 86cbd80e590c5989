#!/usr/bin/env bash
# gpu-check.sh: the run-verification of the cuda backend on one NVIDIA GPU (issue 17), prepared so
# that a lent GPU machine spends its minutes running, not setting up. For a fresh machine with
# torch preinstalled and no network (the lent H200: python3 with torch 2.11+cu130, nvcc 13, cmake,
# ninja, scikit-build-core, pybind11, transformers, pytest), in one call of at most 10 minutes.
#
# THE DEVICE-TOOL CALL (from this checkout; its copy there has no .git, so name the commit here):
#   run(command="GLMRT_COMMIT=<output of `git rev-parse HEAD` here> bash benchmarks/configs/gpu-check.sh $OUT",
#       timeout_s=600)
# 600 s is the tool's limit for one command; the script budgets itself to GLMRT_GPU_CHECK_BUDGET_S
# (default 570 s) so that it ends, with its summary, inside that limit: each step's time limit is
# its own cap or what is left of the budget, whichever is less, and a step that no longer fits is
# reported as skipped. The results come back in $OUT (7 files, 1 folder: within the tool's 8
# files, 16 MiB each). A second call with the names of steps runs only those (the build is redone
# only if glmrt._native_cuda is not installed), e.g. `... gpu-check.sh $OUT bench-glm4`.
#
# Usage: bash benchmarks/configs/gpu-check.sh RESULTS_DIR [STEP ...]
# Steps, in order (the most valuable first, in case the time runs out):
#   preflight      GPU visible (nvidia-smi answers, CUDA_VISIBLE_DEVICES does not hide it, torch sees
#                  it), nvcc and the build tools there; else exit 2 with a message, within seconds
#   build          pip install --no-build-isolation --no-deps --no-index . with GLMRT_CUDA=ON, HIP and
#                  Sunway off, GLMRT_CUDA_ARCHS = this GPU's compute capability only; then the module
#                  must import and list that architecture
#   check          glmrt check --backend cuda --strict: every kernel case, then synthetic:chatglm3-6b
#                  (1 layer) against the CPU float32 reference
#   (in parallel, the GPU shared by correctness checks only:)
#   check-models   glmrt check --no-kernels --strict for every generation (ChatGLM-6B, ChatGLM2-6B,
#                  GLM-4-9B, GLM-4-0414, ChatGLM3-6B in bf16 and INT8 / INT4 / INT4-g128, GLM-130B)
#   tests-kernels  pytest tests/ops/test_native_gpu.py (GLMRT_SKIP_GPU_EMULATION=1: the CPU emulation
#                  runs in CI; this runs its GPU part)
#   tests-models   GLMRT_TEST_BACKEND=cuda pytest tests/models tests/ops/test_torch_fused.py (whole-model
#                  parity, and the torch-fused ops, on the cuda backend)
#   (then alone on the GPU:)
#   bench-chatglm3 benchmarks/cuda_decode.py --preset chatglm3-6b (full depth): fp16 and INT4, CUDA
#                  graph, vs transformers eager on the same weights, prefill at 512 / 2048, profile
#   bench-glm4     the same for synthetic:glm-4-9b
# Files in RESULTS_DIR: summary.md (environment + a table of every step; also printed at the end),
# setup.log (preflight, build), check.log, tests-kernels.log, tests-models.log, bench.log, bench.json.
# Exit status: 0 every step passed; 1 a step failed, timed out or was skipped; 2 no usable GPU (or
# tools) found by the preflight; 3 bad usage.
#
# Environment: PYTHON (default python3), GLMRT_COMMIT (recorded; the device copy has no .git),
# GLMRT_GPU_CHECK_BUDGET_S (570), GLMRT_GPU_CHECK_PROBE_TIMEOUT_S (20: nvidia-smi's limit),
# GLMRT_GPU_CHECK_REHEARSE=1: the CPU rehearsal (no GPU needed, nothing built): every later step
# runs in a planning form of its own command line (glmrt check must refuse the absent backend after
# parsing its arguments, and `glmrt info MODEL --backend cuda --strict` must plan each checked model
# with no fallback; pytest --collect-only; cuda_decode.py --dry-run), so a typo costs no GPU time.
set -uo pipefail

usage() { echo "usage: bash benchmarks/configs/gpu-check.sh RESULTS_DIR [STEP ...]" >&2; exit 3; }
[[ $# -ge 1 && -n "$1" && "$1" != -* ]] || usage
OUT_DIR=$1
shift
ALL_STEPS=(preflight build check check-models tests-kernels tests-models bench-chatglm3 bench-glm4)
if [[ $# -gt 0 ]]; then
  SELECTED=("$@")
  for s in "${SELECTED[@]}"; do
    [[ " ${ALL_STEPS[*]} " == *" $s "* ]] || { echo "gpu-check: unknown step '$s' (steps: ${ALL_STEPS[*]})" >&2; exit 3; }
  done
else
  SELECTED=("${ALL_STEPS[@]}")
fi
selected() { [[ " ${SELECTED[*]} " == *" $1 "* ]]; }

cd "$(dirname "$0")/../.." || exit 3
REPO=$(pwd)
mkdir -p "$OUT_DIR" || { echo "gpu-check: cannot create $OUT_DIR" >&2; exit 3; }
OUT_DIR=$(cd "$OUT_DIR" && pwd)
PY=${PYTHON:-python3}
BUDGET=${GLMRT_GPU_CHECK_BUDGET_S:-570}
PROBE_TIMEOUT=${GLMRT_GPU_CHECK_PROBE_TIMEOUT_S:-20}
REHEARSE=${GLMRT_GPU_CHECK_REHEARSE:-0}
RESERVE=8      # seconds kept for the summary
MIN_STEP=15    # a step with less time than this left is skipped
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
export PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1  # import the installed glmrt, never the source tree
[[ -n ${GLMRT_COMMIT:-} ]] && export GLMRT_COMMIT
SETUP_LOG=$OUT_DIR/setup.log
: > "$WORK/steps.tsv"
for f in setup.log check.log tests-kernels.log tests-models.log bench.log; do : > "$OUT_DIR/$f"; done
rm -f "$OUT_DIR/bench.json"
ARCH=""

log() { echo "gpu-check: $*" | tee -a "$SETUP_LOG" >&2; }

# A failed preflight: the reason, a summary, exit 2 (nothing else can run).
preflight_fail() {
  log "PREFLIGHT FAILED: $*"
  record preflight FAIL "$SECONDS" setup.log "$*"
  write_summary
  exit 2
}

record() {  # NAME STATUS SECONDS LOG NOTE
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${5//$'\t'/ }" >> "$WORK/steps.tsv"
}

# run_step NAME CAP_S LOG [EXPECT_RC EXPECT_TEXT] -- CMD...: CMD under `timeout` (its own cap or what
# is left of the budget), output appended to OUT_DIR/LOG. Passes on exit 0, or (rehearsals) on
# EXPECT_RC with EXPECT_TEXT in its output.
run_step() {
  local name=$1 cap=$2 logname=$3 expect_rc=0 expect_text=""
  shift 3
  if [[ $1 != "--" ]]; then expect_rc=$1 expect_text=$2; shift 2; fi
  shift  # --
  local left=$((BUDGET - SECONDS - RESERVE))
  if ((left < MIN_STEP)); then
    record "$name" skipped 0 "$logname" "no time left in the ${BUDGET} s budget"
    return 0
  fi
  local limit=$((cap < left ? cap : left)) start=$SECONDS logfile=$OUT_DIR/$logname
  local part
  part=$(mktemp "$WORK/part.XXXXXX")
  echo "gpu-check: [$name] started (time limit ${limit} s)" >&2
  timeout -k 10 "$limit" "$@" > "$part" 2>&1 < /dev/null
  local rc=$?
  local took=$((SECONDS - start)) status note=""
  if ((rc == 124 || rc == 137)); then
    status=TIMEOUT note="stopped after ${limit} s"
  elif ((rc == expect_rc)) && { [[ -z $expect_text ]] || grep -q -- "$expect_text" "$part"; }; then
    status=pass
    ((expect_rc != 0)) && note="rehearsal: exit $rc as expected"
  else
    status=FAIL note="exit $rc$( [[ -n $expect_text ]] && echo ", expected exit $expect_rc with '$expect_text'")"
    note="$note: $(grep -E 'Error|error|FAIL|failed|Traceback|PROBLEM' "$part" | tail -n 2 | tr '\n' ' ' | cut -c1-220)"
  fi
  # One block per command (steps that run side by side share a log): header, output, result.
  {
    echo "=== [$name] $* (time limit ${limit} s)"
    cat "$part"
    echo "=== [$name] $status in ${took} s${note:+ ($note)}"
  } > "$part.block"
  if command -v flock > /dev/null 2>&1; then
    flock "$WORK/steps.tsv" cat "$part.block" >> "$logfile"
  else
    cat "$part.block" >> "$logfile"
  fi
  rm -f "$part" "$part.block"
  record "$name" "$status" "$took" "$logname" "$note"
  echo "gpu-check: [$name] $status in ${took} s${note:+ ($note)}" >&2
  write_summary  # after every step, so that a run cut short still has one
}

write_summary() {
  local md=$OUT_DIR/summary.md
  {
    echo "# gpu-check $(date -u +%FT%TZ)"
    echo
    echo "- mode: $([[ $REHEARSE == 1 ]] && echo 'CPU rehearsal (nothing ran on a GPU)' || echo 'GPU run')"
    echo "- glmrt commit: ${GLMRT_COMMIT:-unknown (set GLMRT_COMMIT)}; budget ${BUDGET} s, used ${SECONDS} s"
    [[ -f $WORK/env.txt ]] && sed 's/^/- /' "$WORK/env.txt"
    echo
    echo "| step | status | seconds | log | note |"
    echo "| --- | --- | --- | --- | --- |"
    while IFS=$'\t' read -r name status took logname note; do
      echo "| $name | $status | $took | $logname | ${note//|//} |"
    done < "$WORK/steps.tsv"
  } > "$md"
}

print_summary() {
  echo
  echo "gpu-check summary ($([[ $REHEARSE == 1 ]] && echo 'CPU rehearsal' || echo 'GPU run'), ${SECONDS} s of ${BUDGET} s, results in $OUT_DIR):"
  printf '  %-46s %-8s %7s  %-18s %s\n' step status seconds log note
  while IFS=$'\t' read -r name status took logname note; do
    printf '  %-46s %-8s %7s  %-18s %s\n' "$name" "$status" "$took" "$logname" "$note"
  done < "$WORK/steps.tsv"
}

# ------------------------------------------------------------------------------------ preflight
preflight() {
  local start=$SECONDS
  log "preflight: repository $REPO, python '$PY', results $OUT_DIR"
  command -v "$PY" > /dev/null 2>&1 || preflight_fail "no '$PY' on PATH (set PYTHON to the python that has torch)"
  if [[ $REHEARSE == 1 ]]; then
    log "rehearsal: no GPU checks; the build is not run; the steps run their planning forms"
    timeout 120 "$PY" -c "import glmrt, torch; print('glmrt', glmrt.__version__, 'torch', torch.__version__)" \
      >> "$SETUP_LOG" 2>&1 || preflight_fail "'$PY' cannot import glmrt and torch (install glmrt first)"
    ARCH=90
    echo "rehearsal on $(uname -n): $("$PY" -c 'import torch; print("torch", torch.__version__)' 2>&1)" > "$WORK/env.txt"
    record preflight pass $((SECONDS - start)) setup.log "rehearsal: GPU checks not run"
    return
  fi
  if [[ -n ${CUDA_VISIBLE_DEVICES+set} ]] && [[ -z $CUDA_VISIBLE_DEVICES || $CUDA_VISIBLE_DEVICES == -1 ]]; then
    preflight_fail "CUDA_VISIBLE_DEVICES='${CUDA_VISIBLE_DEVICES}' hides every GPU: unset it or name a GPU"
  fi
  command -v nvidia-smi > /dev/null 2>&1 ||
    preflight_fail "no nvidia-smi on PATH: this machine has no NVIDIA driver (run this on a GPU machine)"
  local smi rc
  smi=$(timeout -k 2 "$PROBE_TIMEOUT" nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1)
  rc=$?
  ((rc == 124 || rc == 137)) && preflight_fail "nvidia-smi did not answer within ${PROBE_TIMEOUT} s (a hung driver?)"
  ((rc != 0)) && preflight_fail "nvidia-smi failed (exit $rc): $(echo "$smi" | head -n 3 | tr '\n' ' ')"
  [[ -n $smi ]] || preflight_fail "nvidia-smi lists no GPU"
  log "nvidia-smi: $smi"
  local probe
  probe=$(timeout -k 5 90 "$PY" - 2>&1 << 'EOF'
import sys
import torch
if torch.version.cuda is None:
    sys.exit(f"torch {torch.__version__} is a CPU build (no CUDA): use the python that has a CUDA torch")
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU: check the driver")
major, minor = torch.cuda.get_device_capability(0)
print(f"ARCH={major}{minor}")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}, "
      f"compute capability {major}.{minor}, {torch.cuda.device_count()} GPU(s)")
from importlib import metadata
def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"
print("packages: " + ", ".join(f"{n} {version(n)}" for n in ("transformers", "pytest", "scikit-build-core",
                                                             "pybind11", "cmake", "ninja", "gguf")))
EOF
  )
  rc=$?
  ((rc == 124 || rc == 137)) && preflight_fail "torch did not initialise CUDA within 90 s"
  ((rc != 0)) && preflight_fail "$(echo "$probe" | tail -n 1)"
  ARCH=$(echo "$probe" | sed -n 's/^ARCH=//p')
  [[ $ARCH =~ ^[0-9]+$ ]] || preflight_fail "could not read the compute capability: $probe"
  log "$(echo "$probe" | grep -v '^ARCH=')"
  if ! command -v nvcc > /dev/null 2>&1; then
    for d in /usr/local/cuda/bin /usr/local/cuda-*/bin; do
      [[ -x $d/nvcc ]] && { export PATH="$d:$PATH"; break; }
    done
  fi
  command -v nvcc > /dev/null 2>&1 || preflight_fail "no nvcc (PATH, /usr/local/cuda/bin): the CUDA module cannot be built"
  local missing
  missing=$(timeout 60 "$PY" -c "
import importlib.util, shutil
need = [m for m in ('scikit_build_core', 'pybind11') if importlib.util.find_spec(m) is None]
need += [t for t in ('cmake', 'ninja') if shutil.which(t) is None and importlib.util.find_spec(t) is None]
print(' '.join(need))" 2>&1) || preflight_fail "'$PY' failed to look for the build tools: $missing"
  [[ -z $missing ]] || preflight_fail "missing build tools for '$PY': $missing (no network here to fetch them)"
  {
    echo "GPU: $smi"
    echo "$(echo "$probe" | grep -v '^ARCH=')"
    echo "nvcc: $(nvcc --version | grep -o 'release [0-9.]*' | head -n 1); build for sm_$ARCH only"
    echo "host: $(uname -n), $(nproc) CPUs, python $("$PY" -c 'import platform; print(platform.python_version())')"
  } > "$WORK/env.txt"
  record preflight pass $((SECONDS - start)) setup.log "sm_$ARCH; $smi"
}

# ---------------------------------------------------------------------------------------- build
module_ok() {
  timeout 120 "$PY" -c "
import sys
from glmrt import _native
m, why = _native.load('_native_cuda')
if m is None:
    sys.exit(f'glmrt._native_cuda is not importable: {why}')
archs = m.archs()
print('glmrt._native_cuda', m.PLATFORM, archs)
if '$ARCH' and 'sm_$ARCH' not in archs:
    sys.exit(f'glmrt._native_cuda has no sm_$ARCH code (built for {archs})')
" >> "$SETUP_LOG" 2>&1
}

build() {
  if [[ $REHEARSE == 1 ]]; then
    echo "rehearsal: would run: GLMRT_GPU=ON GLMRT_CUDA=ON GLMRT_HIP=OFF GLMRT_SUNWAY=OFF GLMRT_CUDA_ARCHS=$ARCH $PY -m pip install --no-build-isolation --no-deps --no-index -v ." >> "$SETUP_LOG"
    run_step build-module-import 60 setup.log -- "$PY" -c "import glmrt.backends.cuda.kernels as k; print('wrappers import:', k.NATIVE_CUDA.info())"
    return
  fi
  run_step build 300 setup.log -- env GLMRT_GPU=ON GLMRT_CUDA=ON GLMRT_HIP=OFF GLMRT_SUNWAY=OFF \
    GLMRT_CUDA_ARCHS="$ARCH" "$PY" -m pip install --no-build-isolation --no-deps --no-index -v .
  if [[ $(tail -n 1 "$WORK/steps.tsv" | cut -f2) != pass ]]; then
    # Without glmrt the later steps would learn nothing: install it without the CUDA module, so that
    # they run (on torch's CUDA ops: glmrt check --strict then names every fallback).
    log "the build failed (setup.log has the compiler's errors): installing glmrt without glmrt._native_cuda"
    run_step build-without-cuda-module 240 setup.log -- env GLMRT_GPU=OFF GLMRT_SUNWAY=OFF "$PY" -m pip install \
      --no-build-isolation --no-deps --no-index -v .
  fi
  local start=$SECONDS
  if module_ok; then
    record build-module-import pass $((SECONDS - start)) setup.log "sm_$ARCH"
  else
    record build-module-import FAIL $((SECONDS - start)) setup.log "$(tail -n 1 "$SETUP_LOG")"
  fi
}

# ------------------------------------------------------------------------------------ the checks
# glmrt check; in a rehearsal the same command must get past its arguments and refuse the absent
# cuda backend (exit 2).
glmrt_check() {  # NAME CAP ARGS...
  local name=$1 cap=$2
  shift 2
  if [[ $REHEARSE == 1 ]]; then
    run_step "$name" "$cap" check.log 2 "backend 'cuda' is not available" -- "$PY" -m glmrt check --backend cuda --strict "$@"
  else
    run_step "$name" "$cap" check.log -- "$PY" -m glmrt check --backend cuda --strict "$@"
  fi
}

# A model for check-models: PRESET LAYERS DTYPE QUANTIZE CAP ('-': the model's own / none).
check_model() {
  local preset=$1 layers=$2 dtype=$3 quant=$4 cap=$5 args=()
  args=(--no-kernels --model "synthetic:$preset" --layers "$layers")
  [[ $dtype != - ]] && args+=(--dtype "$dtype")
  [[ $quant != - ]] && args+=(--quantize "$quant")
  local label="check-models $preset L$layers"
  [[ $dtype != - ]] && label+=" $dtype"
  [[ $quant != - ]] && label+=" $quant"
  if [[ $REHEARSE == 1 ]]; then  # the plan the check will make, strict, without the GPU
    local plan=(info "synthetic:$preset" --backend cuda --strict --layers "$layers")
    [[ $dtype != - ]] && plan+=(--dtype "$dtype")
    [[ $quant != - ]] && plan+=(--quantize "$quant")
    run_step "$label (plan)" 60 check.log 0 "no fallbacks" -- "$PY" -m glmrt "${plan[@]}"
  fi
  glmrt_check "$label" "$cap" "${args[@]}"
}

check_models() {
  # Every generation, 2 layers (the cross-layer residual path), in its preset's dtype; ChatGLM3-6B
  # also in bf16 and quantized; GLM-130B with 1 layer. Each check draws the synthetic weights
  # twice (model, then fp32 reference) on the CPU, one thread per process (2-7 B numbers): so
  # three lanes run side by side, GLM-130B (7.3 B) alone in one.
  local lanes=()
  check_model glm-130b 1 - - 240 &
  lanes+=($!)
  { check_model chatglm-6b 2 - - 120; check_model glm-4-9b 2 - - 120; check_model chatglm3-6b 2 - int4 120
    check_model chatglm3-6b 2 - int4-g128 120; } &
  lanes+=($!)
  { check_model chatglm2-6b 2 - - 120; check_model glm-4-9b-0414 2 - - 120; check_model chatglm3-6b 2 - int8 120
    check_model chatglm3-6b 2 bfloat16 - 120; } &
  lanes+=($!)
  wait "${lanes[@]}"
}

pytest_step() {  # NAME CAP LOG ENV... -- PYTEST ARGS...
  local name=$1 cap=$2 logname=$3 envs=()
  shift 3
  while [[ $1 != "--" ]]; do envs+=("$1"); shift; done
  shift
  if [[ $REHEARSE == 1 ]]; then
    run_step "$name (collect)" "$cap" "$logname" 0 "collected" -- env "${envs[@]}" "$PY" -m pytest -p no:cacheprovider \
      --collect-only -q "$@"
  else
    run_step "$name" "$cap" "$logname" -- env "${envs[@]}" "$PY" -m pytest -p no:cacheprovider -q -rfEs \
      --durations=15 "$@"
  fi
}

bench() {  # NAME CAP PRESET
  local name=$1 cap=$2 preset=$3
  local args=(benchmarks/cuda_decode.py --preset "$preset" --dtype float16 --quantize none,int4 --modes graph
              --prompt 32 --gen 128 --repeat 3 --prefill 512,2048 --transformers-repeat 2 --profile-steps 8
              --out "$OUT_DIR/bench.json" --append)
  if [[ $REHEARSE == 1 ]]; then
    run_step "$name (dry run)" "$cap" bench.log 0 "dry run: OK" -- "$PY" "${args[@]}" --dry-run
  else
    run_step "$name" "$cap" bench.log -- "$PY" "${args[@]}"
  fi
}

# ------------------------------------------------------------------------------------------ main
if selected preflight || [[ $REHEARSE != 1 ]]; then
  preflight  # always on a GPU run: the build needs the arch, every step the GPU
fi
if selected build; then
  build
elif [[ $REHEARSE != 1 ]] && ! module_ok; then
  log "glmrt._native_cuda for sm_$ARCH is not installed: building it first"
  build
fi
if selected check; then
  glmrt_check check 150
fi
# The correctness checks that remain, side by side (16 CPUs; the GPU is not timed here).
pids=()
if selected check-models; then (export OMP_NUM_THREADS=4; check_models) & pids+=($!); fi
if selected tests-kernels; then
  pytest_step tests-kernels 150 tests-kernels.log GLMRT_SKIP_GPU_EMULATION=1 GLMRT_REQUIRE_CUDA_BUILD=1 -- \
    tests/ops/test_native_gpu.py &
  pids+=($!)
fi
if selected tests-models; then
  pytest_step tests-models 150 tests-models.log GLMRT_TEST_BACKEND=cuda -- tests/models tests/ops/test_torch_fused.py &
  pids+=($!)
fi
for pid in "${pids[@]}"; do wait "$pid"; done
# The benchmarks, alone on the GPU.
if selected bench-chatglm3; then bench bench-chatglm3 150 chatglm3-6b; fi
if selected bench-glm4; then bench bench-glm4 150 glm-4-9b; fi

write_summary
print_summary
# The benchmark's own tables (decode, prefill, profile, targets), which its log ends each run with.
if [[ -s $OUT_DIR/bench.json ]]; then
  awk '/^=== \[/ { show = 0 } /^(chatglm3-6b|glm-4-9b) \(/ { show = 1 } show' "$OUT_DIR/bench.log"
fi
if cut -f2 "$WORK/steps.tsv" | grep -qv '^pass$'; then exit 1; fi
exit 0
