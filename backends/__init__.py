"""The backend registry: built-in backends plus the ``glmrt.backends`` entry-point group.

An entry point's value is a Backend subclass (or a zero-argument factory returning an instance):

    [project.entry-points."glmrt.backends"]
    mychip = "glmrt_mychip:MyChipBackend"
"""

from __future__ import annotations

import importlib
from importlib import metadata

from ..errors import BackendError
from .base import BACKEND_API_VERSION, Backend, ProbeResult, safe_probe

ENTRY_POINT_GROUP = "glmrt.backends"

# name -> "module:attribute", imported on first use so a broken backend never breaks glmrt.
BUILTIN = {
    "cpu": "glmrt.backends.cpu:CPUBackend",
    "cuda": "glmrt.backends.cuda:CUDABackend",
    "rocm": "glmrt.backends.rocm:ROCmBackend",
    "npu": "glmrt.backends.npu:NPUBackend",
    "sunway": "glmrt.backends.sunway:SunwayBackend",
    "onnxruntime": "glmrt.backends.onnxruntime:OnnxRuntimeBackend",  # runs ONNX exports (glmrt export)
}
# "auto" picks the first available of these.
AUTO_ORDER = ("cuda", "rocm", "npu", "cpu")

_cache: dict[str, Backend] = {}
_broken: dict[str, str] = {}


class _Unloadable(Backend):
    """Stands in for a backend that could not be imported or is incompatible, so that
    list_backends() can still show it with the reason."""

    def __init__(self, name: str, reason: str):
        self.name = name
        self.device_type = "none"
        self._reason = reason

    def probe(self) -> ProbeResult:
        return ProbeResult(False, self._reason)

    def verification(self):
        from .base import Verification
        return Verification("unverified", self._reason)


def _instantiate(name: str, obj) -> Backend:
    backend = obj() if callable(obj) else obj
    if not isinstance(backend, Backend):
        raise TypeError(f"{obj!r} is not a glmrt Backend")
    if backend.api_version != BACKEND_API_VERSION:
        raise TypeError(f"backend API version {backend.api_version}, glmrt needs {BACKEND_API_VERSION}")
    if not backend.name:
        backend.name = name
    return backend


def _entry_points() -> dict[str, metadata.EntryPoint]:
    try:
        return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}
    except Exception:  # noqa: BLE001 - a broken distribution must not break the registry
        return {}


def backend_names() -> list[str]:
    names = list(BUILTIN)
    names += [n for n in _entry_points() if n not in BUILTIN]
    return names


def _load(name: str) -> Backend:
    if name in _cache:
        return _cache[name]
    try:
        if name in BUILTIN:
            module_name, attr = BUILTIN[name].split(":")
            obj = getattr(importlib.import_module(module_name), attr)
        else:
            obj = _entry_points()[name].load()
        backend = _instantiate(name, obj)
    except Exception as exc:  # noqa: BLE001
        backend = _Unloadable(name, f"backend could not be loaded: {type(exc).__name__}: {exc}")
    _cache[name] = backend
    return backend


def _aliases() -> dict[str, str]:
    out = {}
    for name in backend_names():
        for alias in _load(name).aliases:
            out[alias] = name
    return out


def get_backend(name: str = "auto") -> Backend:
    """The backend called ``name`` (or an alias such as ``dcu``), available or not.

    ``"auto"`` returns the first available of cuda, rocm, npu, cpu."""
    if isinstance(name, Backend):
        return name
    key = str(name).strip().lower()
    if key == "auto":
        for candidate in AUTO_ORDER:
            backend = _load(candidate)
            if safe_probe(backend).available:
                return backend
        return _load("cpu")
    key = _aliases().get(key, key)
    if key not in backend_names():
        known = ", ".join(backend_names() + sorted(_aliases()))
        raise BackendError(f"unknown backend {name!r}: known backends are {known}, or 'auto'")
    return _load(key)


def require_available(name: str = "auto") -> Backend:
    backend = get_backend(name)
    probe = safe_probe(backend)
    if not probe.available:
        raise BackendError(f"backend {backend.name!r} is not available here: {probe.reason}. "
                           "Run `glmrt info` to see which backends are, or pass backend='cpu'.")
    return backend


def list_backends() -> list[dict]:
    """Name, availability and reason (plus verification level) of every known backend."""
    out = []
    for name in backend_names():
        backend = _load(name)
        probe = safe_probe(backend)
        try:
            verification = backend.verification()
            level, detail = verification.level, verification.detail
        except Exception as exc:  # noqa: BLE001
            level, detail = "unverified", f"verification() failed: {exc}"
        out.append({"name": name, "available": probe.available, "reason": probe.reason,
                    "aliases": list(backend.aliases), "verification": level, "verification_detail": detail})
    return out


__all__ = ["BACKEND_API_VERSION", "Backend", "get_backend", "require_available", "list_backends", "backend_names"]
