"""Finds the compiled native modules (glmrt._native_cpu, ...) without ever failing an import."""

from __future__ import annotations

import importlib

import torch

_modules: dict[str, tuple[object | None, str]] = {}

# torch dtype -> the dtype code the native kernels take.
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def load(name: str):
    """(module or None, reason) for glmrt.<name>, e.g. "_native_cpu"."""
    if name not in _modules:
        try:
            module = importlib.import_module(f"glmrt.{name}")
            _modules[name] = (module, f"glmrt.{name} is built")
        except ImportError as exc:
            _modules[name] = (None, f"glmrt.{name} is not built ({exc}); reinstall glmrt with a C++ compiler "
                                    "and CMake >= 3.21 present to get native kernels")
    return _modules[name]
