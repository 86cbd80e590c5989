"""AMD ROCm and Hygon DCU (alias ``dcu``) through a HIP build of torch (device string "cuda").

glmrt's native HIP kernels (glmrt._native_hip, built from native/gpu when hipcc is found:
RMSNorm, LayerNorm, fused residual+RMSNorm / +LayerNorm, the three RoPE kinds, decode attention,
the W8A16 / W4A16 decode GEMV and the INT8 / INT4 dequantize for prefill, wavefront-64 safe) run
where they support a node;
every other op runs the core's torch reference on the device."""

from __future__ import annotations

import torch

from ...quant import format_names
from ..base import Backend, Capabilities, ProbeResult, Verification
from .kernels import NATIVE_HIP


# ISAs only Hygon's DCUs report (DTK targets them; newer DCUs). The Z100 itself reports gfx906
# like AMD's MI50, so the device name decides there.
HYGON_ARCHS = ("gfx926", "gfx928", "gfx936")


def is_hygon(device_name: str, gcn_arch: str) -> bool:
    """Whether a HIP device is a Hygon DCU: from its name (DTK names them "DCU ..." or "Hygon ...")
    or from an ISA only Hygon parts report. gcn_arch may carry feature suffixes ("gfx906:sramecc+")."""
    base = gcn_arch.split(":")[0].strip().lower()
    name = device_name.lower()
    return "hygon" in name or "dcu" in name.split() or base in HYGON_ARCHS


class ROCmBackend(Backend):
    name = "rocm"
    aliases = ("dcu", "hip")
    device_type = "cuda"  # a HIP torch reuses the CUDA device type

    def probe(self) -> ProbeResult:
        hip = getattr(torch.version, "hip", None)
        if not hip:
            return ProbeResult(False, "this torch is not a ROCm/HIP build (torch.version.hip is None); install a "
                                      "ROCm torch, or Hygon's DTK torch for a DCU")
        try:
            if not torch.cuda.is_available():
                return ProbeResult(False, f"HIP {hip} torch sees no GPU (check HIP_VISIBLE_DEVICES and the driver)")
            name = torch.cuda.get_device_name(0)
            arch = torch.cuda.get_device_properties(0).gcnArchName
            vendor = "a Hygon DCU" if is_hygon(name, arch) else "an AMD GPU"
            return ProbeResult(True, f"{name} ({arch}, {vendor}), HIP {hip}")
        except Exception as exc:  # noqa: BLE001
            return ProbeResult(False, f"HIP initialisation failed: {exc}")

    def verification(self) -> Verification:
        return Verification("compile-verified", "glmrt._native_hip builds with Debian 12's hipcc (HIP 5.2, clang 15) "
                                                "for gfx906 (Hygon Z100 ISA) and gfx90a (a build with "
                                                "GLMRT_REQUIRE_HIP_BUILD=1 checks it); never run on AMD or Hygon "
                                                "hardware")

    def capabilities(self) -> Capabilities:
        return Capabilities(dtypes=(torch.float32, torch.bfloat16, torch.float16), quant_formats=format_names(),
                            collective_backend="nccl", memory_query=True)

    def native_info(self) -> dict:
        return NATIVE_HIP.info()

    def kernels(self):
        return NATIVE_HIP.kernels()

    def synchronize(self) -> None:
        torch.cuda.synchronize()
