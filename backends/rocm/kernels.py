"""glmrt's native HIP kernels (glmrt._native_hip): the same kernel sources as the CUDA backend's
(native/gpu, compiled by hipcc for gfx906 / gfx90a / ...), so the same wrappers and predicates.
A ROCm / DTK torch reuses the CUDA API, so ``torch.cuda.current_stream().cuda_stream`` is the HIP
stream the wrappers pass."""

from __future__ import annotations

from ..cuda.kernels import GEMV_MAX_M, NativeGpuKernels

NATIVE_HIP = NativeGpuKernels("_native_hip")

__all__ = ["GEMV_MAX_M", "NATIVE_HIP"]
