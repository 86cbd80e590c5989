"""NVIDIA CUDA through torch.cuda: glmrt's native CUDA kernels (glmrt._native_cuda, built from
native/gpu when nvcc is found: RMSNorm, LayerNorm, fused residual+RMSNorm / +LayerNorm, the three
RoPE kinds (interleaved, half, 2-D), decode attention over the KV cache, the W8A16 / W4A16 decode
GEMV and, for INT8 / INT4 prefill, a native dequantize before cuBLAS; see kernels.py), and torch's
CUDA ops (cuBLAS / cuDNN through ATen) for everything else."""

from __future__ import annotations

import torch

from ..base import VENDOR, Backend, Capabilities, Kernel, ProbeResult, Verification
from ... import ops
from ...quant import format_names
from .kernels import NATIVE_CUDA


class CUDABackend(Backend):
    name = "cuda"
    device_type = "cuda"

    def probe(self) -> ProbeResult:
        if getattr(torch.version, "hip", None):
            return ProbeResult(False, f"this torch is a ROCm/HIP build ({torch.version.hip}); use the rocm backend")
        if torch.version.cuda is None:
            return ProbeResult(False, "this torch has no CUDA support (a CPU build); install a CUDA build of torch")
        try:
            if not torch.cuda.is_available():
                return ProbeResult(False, f"torch {torch.__version__} has CUDA {torch.version.cuda} but sees no "
                                          "NVIDIA GPU (check the driver and CUDA_VISIBLE_DEVICES)")
            return ProbeResult(True, f"{torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda}")
        except Exception as exc:  # noqa: BLE001
            return ProbeResult(False, f"CUDA initialisation failed: {exc}")

    def verification(self) -> Verification:
        return Verification("compile-verified", "glmrt._native_cuda builds with nvcc 13 for sm_80/86/89/90 (a "
                                                "build with GLMRT_REQUIRE_CUDA_BUILD=1 checks it) and its kernels "
                                                "pass a host emulation at warp 32; not yet run on a GPU: "
                                                "benchmarks/configs/gpu-check.sh is the prepared run (build, glmrt "
                                                "check, the conformance and parity tests, the decode benchmark), "
                                                "rehearsed on a CPU only")

    def capabilities(self) -> Capabilities:
        return Capabilities(dtypes=(torch.float32, torch.bfloat16, torch.float16), quant_formats=format_names(),
                            graph_capture=True, collective_backend="nccl", memory_query=True)

    def native_info(self) -> dict:
        return NATIVE_CUDA.info()

    def kernels(self):
        vendor = [Kernel(op, f"torch-cuda.{op}", VENDOR, fn) for op, fn in ops.REFERENCE.items()]
        return NATIVE_CUDA.kernels() + vendor

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def memory_stats(self) -> dict:
        return {"peak_bytes": torch.cuda.max_memory_allocated(), "current_bytes": torch.cuda.memory_allocated()}
