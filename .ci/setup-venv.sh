#!/usr/bin/env bash
# Creates ./.venv with torch (a CPU build where one is on hand), builds glmrt's native modules and
# installs glmrt editable (Python files used from this checkout, compiled modules from the
# environment: the same glmrt from any directory), plus the test dependencies. Idempotent; run it
# again (or just the pip install -e line) after a change to native/ or CMakeLists.txt.
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
  "$VPY" -m pip install -q "pytest>=7" "transformers>=4.46" sentencepiece tiktoken tokenizers protobuf numpy safetensors matplotlib jsonschema jinja2 "gguf>=0.17" fastapi uvicorn prometheus_client httpx openai "onnx>=1.18" "onnxruntime>=1.23"
fi
# HIP compiler for the compile check of glmrt._native_hip (Debian's hipcc, clang 15). Optional: without
# it the HIP target is skipped with one line. Installed only where apt can run as root.
if [ "${GLMRT_SETUP_HIPCC:-1}" = "1" ] && ! command -v hipcc >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
   && [ "$(id -u)" = "0" ]; then
  echo "glmrt setup: installing hipcc (Debian package) for the HIP build" >&2
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq hipcc >/dev/null; } \
    || echo "glmrt setup: could not install hipcc; the HIP target will be skipped" >&2
fi
echo "glmrt setup: building and installing glmrt (editable)" >&2
"$VPY" -m pip install -q --no-build-isolation -e .
# Checked from the checkout's root, where the current directory comes first on sys.path (what
# `python -m glmrt` there sees), without the PYTHONSAFEPATH a caller may have set.
env -u PYTHONSAFEPATH "$VPY" -c "import glmrt, glmrt.backends, glmrt.models; from glmrt import _native; m, why = _native.load('_native_cpu'); print('glmrt setup: installed', glmrt.__version__, '(editable) - native CPU module:', 'built' if m else why)"
