"""The two ONNX flavors, and the error for what a flavor cannot express (no onnx import here, so
the CLI and glmrt work without the `onnx` extra)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import GLMRTError


class ExportError(GLMRTError):
    """A model (or an option) the chosen ONNX flavor cannot express."""


@dataclass(frozen=True)
class Flavor:
    name: str
    opsets: dict
    target: str  # who the flavor is for


FLAVORS = {
    "ort": Flavor("ort", {"": 21, "com.microsoft": 1},
                  "onnxruntime (CPU, CUDA, MIGraphX execution providers): its com.microsoft contrib ops"),
    "standard": Flavor("standard", {"": 23},
                       "vendor compilers that take standard ONNX only (Ascend ATC / CANN, MIGraphX, TensorRT)"),
}

