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
            _modules[name] = (None, _why_missing(name, exc))
    return _modules[name]


def _why_missing(name: str, exc: ImportError) -> str:
    from pathlib import Path
    package = Path(__file__).resolve().parent
    checkout = package.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "native").is_dir() and not _any_compiled():
        # Imported from a source checkout (e.g. `python -m glmrt` run in the repository root puts
        # the checkout before the installed package): the compiled modules live in the install.
        return (f"glmrt.{name} is not importable: glmrt was imported from the source checkout {package}, which "
                "holds no compiled modules (the current directory shadows the installed package); run from "
                "another directory, or install with `pip install --no-build-isolation -e .`")
    return (f"glmrt.{name} is not built ({exc}); reinstall glmrt with a C++ compiler and CMake >= 3.21 present "
            "to get native kernels")


def _any_compiled() -> bool:
    """Whether any compiled glmrt module is findable (an editable install maps them into a checkout)."""
    import importlib.util
    for module in ("_native_cpu", "_native_sunway", "_native_cuda", "_native_hip"):
        try:
            if importlib.util.find_spec(f"glmrt.{module}") is not None:
                return True
        except (ImportError, ValueError):
            pass
    return False
