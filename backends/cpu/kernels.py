"""CPU kernels: wrappers that call glmrt._native_cpu with raw pointers, and their predicates."""

from __future__ import annotations

import torch

from ... import _native, ops

_NATIVE_NAME = "_native_cpu"


def native():
    return _native.load(_NATIVE_NAME)


def torch_ops() -> dict:
    """torch's own CPU ops (ATen / oneDNN) for every IR op: the core reference functions are
    written in plain torch, so on the CPU they are exactly the library path."""
    return dict(ops.REFERENCE)


def native_rms_norm_supports(node) -> str | None:
    if node.attrs.get("kind") != "rmsnorm":
        return f"{node.attrs.get('kind')} is not RMSNorm"
    dtype = node.input_specs[0].dtype
    if dtype not in _native.DTYPE_CODES:
        return f"dtype {dtype} not supported"
    return None


def native_rms_norm(ctx, node, inputs, params):
    module, _ = native()
    x = inputs[0].contiguous()
    w = params["weight"].contiguous()
    out = torch.empty_like(x)
    cols = x.shape[-1]
    module.rms_norm(x.data_ptr(), _native.DTYPE_CODES[x.dtype], w.data_ptr(), _native.DTYPE_CODES[w.dtype],
                    out.data_ptr(), x.numel() // cols, cols, float(node.attrs["eps"]),
                    bool(node.attrs["round_before_weight"]))
    return out
