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
    installed = _installed_copy()
    if installed is not None and installed != package:
        # A regular (non-editable) install, shadowed by a checkout: `python -m glmrt` run in the
        # repository root puts the root first on sys.path, and its glmrt/ holds no compiled modules.
        return (f"glmrt.{name} is not importable: glmrt was imported from {package} (the current directory comes "
                f"first on sys.path), not from the installed copy in {installed} that holds the compiled modules; "
                "install the README's way, editable (`bash .ci/setup-venv.sh` or `pip install --no-build-isolation "
                "-e .` in the checkout), so every directory sees the same glmrt, or run from another directory")
    return (f"glmrt.{name} is not built ({exc}); reinstall glmrt (in a checkout: `bash .ci/setup-venv.sh`) with a "
            "C++ compiler and CMake >= 3.21 present to get native kernels")


def _installed_copy():
    """The package folder of a regular (non-editable) install of glmrt, or None: an editable install
    ships no glmrt/__init__.py (its Python files stay in the checkout)."""
    from importlib import metadata
    from pathlib import Path
    try:
        dist = metadata.distribution("glmrt")
    except metadata.PackageNotFoundError:
        return None
    for file in dist.files or ():
        if file.as_posix() == "glmrt/__init__.py":
            return Path(dist.locate_file(file)).resolve().parent
    return None
