"""Sunway (SW26010-Pro) through a swDeepSpeed-compatible shim, run on the host CPU.

Two parts:
  * kernels tiled for the SW26010-Pro (256 KB LDM per compute core, 64 compute cores per core
    group): linear (float, int8, int4), lm_head, RMSNorm and LayerNorm, built as
    glmrt._native_sunway from native/sunway/; every other op runs torch's CPU ops;
  * ``glmrt.backends.sunway.swdeepspeed``, a module with DeepSpeed's public inference API
    (initialize, init_inference with tensor parallelism over gloo, init_distributed, comm), so
    code written as
    ``import swDeepSpeed as deepspeed`` runs glmrt models with
    ``from glmrt.backends.sunway import swdeepspeed as deepspeed``.

No SW26010-Pro hardware or swDeepSpeed release was available: the tiling is emulated on x86-64
and the shim mirrors DeepSpeed's API (swDeepSpeed's own is not public). See verification().
"""

from __future__ import annotations

import importlib.util
import os
import platform

import torch

from ...quant import format_names
from ..base import NATIVE, VENDOR, Backend, Capabilities, Kernel, ProbeResult, Verification
from ..cpu import CPUBackend
from . import kernels


class SunwayBackend(Backend):
    name = "sunway"
    aliases = ("sw", "swdeepspeed")
    device_type = "cpu"

    def probe(self) -> ProbeResult:
        module, why = kernels.native()
        if module is not None:
            native = (f"LDM-tiled kernels (glmrt._native_sunway, {module.LOGICAL_WORKERS} logical workers on "
                      f"{module.host_threads()} host threads)")
        else:
            native = f"glmrt._native_sunway is not built, so every op runs torch CPU ops ({why})"
        if importlib.util.find_spec("swDeepSpeed") is not None:  # finds, never imports
            comm = "swDeepSpeed is installed: the shim's collectives go through swDeepSpeed.comm"
        else:
            comm = "no swDeepSpeed installed: the shim's collectives use torch.distributed (gloo)"
        return ProbeResult(True, f"host CPU ({platform.machine()}, {os.cpu_count()} cores) emulating the "
                                 f"SW26010-Pro tiling; {native}; {comm}")

    def verification(self) -> Verification:
        return Verification(
            "contract-verified",
            "run-verified on x86-64 host CPUs emulating the Sunway tiling (kernels and whole models against "
            "the torch reference with `glmrt check --backend sunway`; tile working sets checked against the "
            "256 KB LDM); never run on SW26010-Pro hardware; the swDeepSpeed API is not public: the shim "
            "mirrors DeepSpeed's public API (0.19: initialize, init_inference, init_distributed, comm), "
            "checked against DeepSpeed's signatures and config rules; collectives and init_inference's tensor "
            "parallelism run over gloo between host processes (checked with 2 ranks against the whole model); "
            "a real swDeepSpeed's comm is called when importable, never tested against a real one")

    def capabilities(self) -> Capabilities:
        return Capabilities(dtypes=(torch.float32, torch.bfloat16, torch.float16), quant_formats=format_names(),
                            graph_capture=False, collective_backend="gloo", memory_query=True)

    def native_info(self) -> dict:
        module, why = kernels.native()
        if module is None:
            return {"built": False, "archs": [], "module": None, "reason": why}
        arch = module.target_arch() if hasattr(module, "target_arch") else platform.machine()
        paths = list(module.isa_paths()) if hasattr(module, "isa_paths") else [module.simd_level()]
        return {"built": True, "module": "glmrt._native_sunway",
                # What the module was compiled for: the host CPU (with these ISA paths), running
                # kernels tiled for the SW26010-Pro; no sw_64 build was made.
                "archs": [f"{arch}-{p}" for p in paths],
                "reason": (f"glmrt._native_sunway is built for the {arch} host: kernels tiled for the SW26010-Pro "
                           "(256 KB LDM per compute core, 64 compute cores per core group) run on host threads; "
                           "not built for or run on sw_64 hardware"),
                "emulates": "SW26010-Pro core group", "simd": module.simd_level(), "openmp": bool(module.openmp()),
                "host_threads": module.host_threads(), "ldm_bytes": module.LDM_BYTES,
                "ldm_tile_budget": module.LDM_TILE_BUDGET, "logical_workers": module.LOGICAL_WORKERS,
                "tiles": {"linear": {"tile_m": module.TILE_M, "tile_n_max": module.TILE_N_MAX,
                                     "tile_k": module.TILE_K},
                          "norm": {"chunk": module.NORM_CHUNK}}}

    def kernels(self):
        out = [Kernel(op, f"torch-cpu.{op}", VENDOR, fn) for op, fn in kernels.torch_ops().items()]
        if kernels.native()[0] is not None:
            out[:0] = [
                Kernel("linear", "sunway.tiled_linear", NATIVE, kernels.native_linear, kernels.linear_supports),
                Kernel("lm_head", "sunway.tiled_lm_head", NATIVE, kernels.native_lm_head, kernels.lm_head_supports),
                Kernel("norm", "sunway.tiled_norm", NATIVE, kernels.native_norm, kernels.norm_supports),
            ]
        return out

    def memory_stats(self) -> dict:
        return CPUBackend.memory_stats(self)  # the same host process
