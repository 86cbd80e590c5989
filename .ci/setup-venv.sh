#!/usr/bin/env bash
# Creates ./.venv with torch (a CPU build where one is on hand), builds and installs glmrt with
# its native modules, plus the test dependencies. Idempotent; safe to run again after a change.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${GLMRT_TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip
if ! "$VPY" -c "import torch" 2>/dev/null; then
  echo "glmrt setup: installing $TORCH_SPEC" >&2
  "$VPY" -m pip install -q "$TORCH_SPEC"
fi
# Build dependencies are installed into the venv and the build runs without isolation, so the
# build never pulls a second copy of anything (and never a CUDA torch).
"$VPY" -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" cmake ninja
if [ "${GLMRT_SETUP_TEST_DEPS:-1}" = "1" ]; then
  "$VPY" -m pip install -q "pytest>=7" "transformers>=4.46" sentencepiece tiktoken tokenizers protobuf numpy safetensors matplotlib jsonschema jinja2 "gguf>=0.17"
fi
# HIP compiler for the compile check of glmrt._native_hip (Debian's hipcc, clang 15). Optional: without
# it the HIP target is skipped with one line. Installed only where apt can run as root.
if [ "${GLMRT_SETUP_HIPCC:-1}" = "1" ] && ! command -v hipcc >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
   && [ "$(id -u)" = "0" ]; then
  echo "glmrt setup: installing hipcc (Debian package) for the HIP build" >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq hipcc >/dev/null; } \
    || echo "glmrt setup: could not install hipcc; the HIP target will be skipped" >&2
fi
echo "glmrt setup: building and installing glmrt" >&2
"$VPY" -m pip install -q --no-build-isolation .
# Check from outside the checkout so the installed package (not the source tree) is imported.
(cd / && "$OLDPWD/$VPY" -c "import glmrt, glmrt.backends, glmrt.models; from glmrt import _native; m, why = _native.load('_native_cpu'); print('glmrt setup: installed', glmrt.__version__, '- native CPU module:', 'built' if m else why)")
