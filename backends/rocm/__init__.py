"""AMD ROCm and Hygon DCU (alias ``dcu``) through a HIP build of torch (device string "cuda")."""

from __future__ import annotations

import torch

from ..base import Backend, Capabilities, ProbeResult, Verification


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
            arch = torch.cuda.get_device_properties(0).gcnArchName
            return ProbeResult(True, f"{torch.cuda.get_device_name(0)} ({arch}), HIP {hip}")
        except Exception as exc:  # noqa: BLE001
            return ProbeResult(False, f"HIP initialisation failed: {exc}")

    def verification(self) -> Verification:
        return Verification("unverified", "the ROCm/DCU backend runs torch's HIP ops only; glmrt's HIP kernels are "
                                          "not implemented yet")

    def capabilities(self) -> Capabilities:
        return Capabilities(dtypes=(torch.float32, torch.bfloat16, torch.float16), collective_backend="nccl",
                            memory_query=True)

    def synchronize(self) -> None:
        torch.cuda.synchronize()
