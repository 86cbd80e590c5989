"""The onnxruntime backend: runs a glmrt ONNX export (``glmrt export MODEL --format onnx``) as one
onnxruntime session on a chosen execution provider.

Unlike the kernel backends it does not lower the graph node by node: the export already is the
lowered graph. ``glmrt.load(DIR)`` on an export directory builds a Model whose plan runs the whole
session each step (glmrt.lowering.Plan.session); generation, streaming and chat are the Model's.
Providers: ``cpu`` (CPUExecutionProvider), and where the installed onnxruntime has them ``cuda``,
``cann`` (Ascend), ``migraphx`` (AMD / Hygon DCU), ``tensorrt``, ``openvino``; choose one with
``backend="onnxruntime:cuda"`` (default cpu). On every provider but the CPU the session refuses CPU
fallback (session.disable_cpu_ep_fallback=1) and the node placement is reported.

onnxruntime is imported inside the methods only, never when glmrt is imported.
"""

from __future__ import annotations

import torch

from ..base import Backend, Capabilities, ProbeResult, Verification

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "cann": "CANNExecutionProvider",
             "migraphx": "MIGraphXExecutionProvider", "tensorrt": "TensorrtExecutionProvider",
             "openvino": "OpenVINOExecutionProvider"}


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    aliases = ("ort",)
    device_type = "cpu"  # where the Model's tensors (ids, logits, the KV cache it feeds) live
    # Runs exported graphs only: glmrt.load refuses a checkpoint for it, and glmrt bench skips it
    # unless the model is an export.
    export_format = "glmrt-onnx"

    def probe(self) -> ProbeResult:
        try:
            import onnxruntime as ort
            available = ort.get_available_providers()
        except Exception as exc:  # noqa: BLE001 - probe never raises
            return ProbeResult(False, f"onnxruntime is not installed ({type(exc).__name__}: {exc}): "
                                      "pip install 'glmrt[onnx]'")
        mine = [k for k, v in PROVIDERS.items() if v in available]
        return ProbeResult(True, f"onnxruntime {ort.__version__}, providers here: {', '.join(mine) or 'none'}; runs "
                                 "ONNX exports (glmrt export MODEL --format onnx --out DIR, then glmrt.load(DIR))")

    def verification(self) -> Verification:
        return Verification("run-verified", "CPUExecutionProvider on every CI run: exports of every generation in "
                                            "both flavors against glmrt's float32 reference (tests/onnx). The CUDA, "
                                            "CANN and MIGraphX providers have never run here")

    def capabilities(self) -> Capabilities:
        from ...quant import FORMATS, GROUP_SIZES
        names = []
        for name in FORMATS:
            names += [name] + [f"{name}-g{g}" for g in GROUP_SIZES if g]
        return Capabilities(dtypes=(torch.float32, torch.float16), quant_formats=tuple(names), graph_capture=False,
                            collective_backend=None, memory_query=False)

    def native_info(self) -> dict:
        return {"built": False, "archs": [], "module": None,
                "reason": "no glmrt native module: onnxruntime runs the exported graph with its own kernels"}


__all__ = ["OnnxRuntimeBackend", "PROVIDERS"]
