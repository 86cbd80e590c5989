"""The backend contract, version 1.

A backend is one folder under backends/ (or an out-of-tree package registered through the
``glmrt.backends`` entry-point group) that subclasses :class:`Backend`. The registry refuses a
backend whose ``api_version`` differs from :data:`BACKEND_API_VERSION`.

Required (raise ``NotImplementedError("need X")`` so a half-done port fails loudly):
  name, device_type, probe(), verification()
Optional, with defaults stated below:
  aliases, kernels(), capabilities(), native_info(), device(), synchronize(), memory_stats(),
  prepare_weights()

Only files under backends/ may import a vendor module (torch_npu, a CUDA/HIP extension,
swDeepSpeed), and only inside probe()/kernels()/methods, never at import time of glmrt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

BACKEND_API_VERSION = 1

# Kernel kinds in order of preference when lowering: a native fused kernel of glmrt's, then the
# backend's own library op (torch's CPU ops, cuBLAS via torch, a torch_npu fused op), then the
# core's plain-torch reference on the same device.
NATIVE = "native"
VENDOR = "vendor"
REFERENCE = "reference"
KIND_RANK = {NATIVE: 0, VENDOR: 1, REFERENCE: 2}

VERIFICATION_LEVELS = ("run-verified", "compile-verified", "contract-verified", "unverified")


@dataclass(frozen=True)
class ProbeResult:
    available: bool
    reason: str


@dataclass(frozen=True)
class Verification:
    level: str  # one of VERIFICATION_LEVELS
    detail: str  # what was verified, where, how


@dataclass(frozen=True)
class Capabilities:
    dtypes: tuple[torch.dtype, ...] = (torch.float32,)
    quant_formats: tuple[str, ...] = ()
    graph_capture: bool = False
    collective_backend: str | None = None
    memory_query: bool = False

    def to_dict(self) -> dict:
        return {
            "dtypes": [str(d).removeprefix("torch.") for d in self.dtypes],
            "quant_formats": list(self.quant_formats),
            "graph_capture": self.graph_capture,
            "collective_backend": self.collective_backend,
            "memory_query": self.memory_query,
        }


# supports(node) returns None when the kernel can run the node, else the reason it cannot.
SupportsFn = Callable[["object"], "str | None"]


@dataclass(frozen=True)
class Kernel:
    """One implementation of one IR op on one backend."""

    op: str
    name: str
    kind: str  # NATIVE or VENDOR (references come from the core)
    fn: Callable
    supports: SupportsFn = field(default=lambda node: None)
    # Fused kernels replace a run of nodes; 1 for a plain kernel. (Fusion is a graph pass; a fused
    # node has its own op name, so this stays 1 for now and exists to keep the contract stable.)
    nodes: int = 1


class Backend:
    """Base class of every backend. See the module docstring for the contract."""

    api_version: int = BACKEND_API_VERSION
    name: str = ""
    aliases: tuple[str, ...] = ()
    device_type: str = ""

    # ---- required
    def probe(self) -> ProbeResult:
        """Available or not, with a reason a person can act on. Must never raise and must never
        break ``import torch`` (probe vendor stacks in a subprocess where they can)."""
        raise NotImplementedError("need probe()")

    def verification(self) -> Verification:
        """The highest verification level this backend reached, and where. Never claim more."""
        raise NotImplementedError("need verification()")

    # ---- optional
    def kernels(self) -> Sequence[Kernel]:
        """Implementations this backend offers. Default: none, so every node runs the core's
        reference op on this backend's device (reported as a fallback)."""
        return ()

    def capabilities(self) -> Capabilities:
        """Default: fp32 only, no quantized formats, no graph capture, no collectives."""
        return Capabilities()

    def native_info(self) -> dict:
        """Which native module was built for this backend, and for which architectures:
        ``{"built": bool, "archs": [...], "module": "glmrt._native_x" or None, "reason": str, ...}``
        (extra keys are shown as they are). Must not need the device."""
        return {"built": False, "archs": [], "module": None,
                "reason": f"backend {self.name!r} has no glmrt native module"}

    def device(self) -> torch.device:
        """The torch device this backend runs on. Default: ``torch.device(device_type)``."""
        return torch.device(self.device_type)

    def synchronize(self) -> None:
        """Wait for queued work (needed for timing). Default: nothing to wait for."""

    def memory_stats(self) -> dict:
        """Allocator statistics in bytes (peak, current). Default: empty."""
        return {}

    def describe(self) -> dict:
        """Everything `glmrt info --backend NAME` prints. Never raises."""
        probe = safe_probe(self)
        out = {"name": self.name, "aliases": list(self.aliases), "device_type": self.device_type,
               "available": probe.available, "reason": probe.reason, "api_version": self.api_version}
        try:
            v = self.verification()
            out["verification"] = {"level": v.level, "detail": v.detail}
        except Exception as exc:  # noqa: BLE001 - describe() must never raise
            out["verification"] = {"level": "unverified", "detail": f"verification() failed: {exc}"}
        try:
            out["capabilities"] = self.capabilities().to_dict()
        except Exception as exc:  # noqa: BLE001
            out["capabilities"] = {"error": str(exc)}
        out["native"] = native_summary(self)
        try:
            out["kernels"] = [{"op": k.op, "name": k.name, "kind": k.kind} for k in self.kernels()]
        except Exception as exc:  # noqa: BLE001
            out["kernels"] = [{"error": str(exc)}]
        return out


def native_summary(backend: Backend) -> dict:
    """native_info() that cannot raise, with the four keys every backend reports: built, archs,
    module, reason (filled in where a backend's dict lacks them)."""
    try:
        info = backend.native_info()
        if not isinstance(info, dict):
            raise TypeError(f"native_info() returned {type(info).__name__}, not dict")
        info = dict(info)
    except Exception as exc:  # noqa: BLE001 - a third-party backend must not break `glmrt info`
        return {"built": False, "archs": [], "module": None,
                "reason": f"native_info() raised {type(exc).__name__}: {exc}"}
    info["built"] = bool(info.get("built", False))
    info["archs"] = [str(a) for a in (info.get("archs") or [])]
    info.setdefault("module", None)
    if not info.get("reason"):
        if info["built"]:
            archs = ", ".join(info["archs"]) or "no architecture list"
            info["reason"] = f"{info['module'] or 'the native module'} is built ({archs})"
        else:
            info["reason"] = f"backend {backend.name!r} reports no native module"
    return info


def safe_probe(backend: Backend) -> ProbeResult:
    """probe() that cannot raise, whatever a third-party backend does."""
    try:
        result = backend.probe()
        if not isinstance(result, ProbeResult):
            return ProbeResult(False, f"probe() returned {type(result).__name__}, not ProbeResult")
        return result
    except Exception as exc:  # noqa: BLE001 - a probe failure means "unavailable", never a crash
        return ProbeResult(False, f"probe() raised {type(exc).__name__}: {exc}")
