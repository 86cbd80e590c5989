"""The host CPU backend: torch's CPU ops plus glmrt's native C++ kernels (glmrt._native_cpu)."""

from __future__ import annotations

import os

import torch

from ..base import NATIVE, VENDOR, Backend, Capabilities, Kernel, ProbeResult, Verification
from ...quant import format_names
from . import kernels, native_ops


class CPUBackend(Backend):
    name = "cpu"
    device_type = "cpu"

    def probe(self) -> ProbeResult:
        return ProbeResult(True, f"host CPU, {torch.get_num_threads()} torch threads")

    def verification(self) -> Verification:
        return Verification("run-verified", "every CI run: op conformance and whole-model parity against the "
                                            "plain-torch reference and transformers, on x86-64 Linux")

    def capabilities(self) -> Capabilities:
        return Capabilities(dtypes=(torch.float32, torch.bfloat16, torch.float16), quant_formats=format_names(),
                            graph_capture=False, collective_backend="gloo", memory_query=True)

    def native_info(self) -> dict:
        module, reason = kernels.native()
        if module is None:
            return {"built": False, "archs": [], "module": None, "reason": reason}
        return {"built": True, "module": "glmrt._native_cpu", "archs": ["x86-64"],
                "simd": module.simd_level(), "openmp": bool(module.openmp()),
                "quant_linear_isa": module.quant_linear_isa() if hasattr(module, "quant_linear_isa") else None}

    def kernels(self):
        out = [Kernel(op, f"torch-cpu.{op}", VENDOR, fn) for op, fn in kernels.torch_ops().items()]
        if kernels.native()[0] is not None:
            out.insert(0, Kernel("norm", "native.rms_norm", NATIVE, kernels.native_rms_norm,
                                 kernels.native_rms_norm_supports))
            if hasattr(kernels.native()[0], "linear_int4"):  # a module built before the quantized kernels lacks it
                out.insert(0, Kernel("linear", "native.quant_linear", NATIVE, kernels.native_quant_linear,
                                     kernels.native_quant_linear_supports))
            if hasattr(kernels.native()[0], "linear_float"):
                out.insert(0, Kernel("linear", "native.float_gemv", NATIVE, kernels.native_float_linear,
                                     kernels.native_float_linear_supports))
                out.insert(0, Kernel("lm_head", "native.float_gemv", NATIVE, kernels.native_lm_head,
                                     kernels.native_float_linear_supports))
            out += native_ops.kernels()  # LayerNorm, RoPE, attention (native over vendor: ranked by kind)
        return out

    def memory_stats(self) -> dict:
        try:
            with open(f"/proc/{os.getpid()}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            return {"peak_bytes": int(fields["VmHWM"].split()[0]) * 1024,
                    "current_bytes": int(fields["VmRSS"].split()[0]) * 1024}
        except (OSError, KeyError, ValueError):
            return {}
