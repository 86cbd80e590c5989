"""Sunway kernels: wrappers that call glmrt._native_sunway with raw pointers, and their predicates.

The native kernels are tiled for the SW26010-Pro (each tile's working set fits one compute core's
256 KB LDM; tiles are dealt to 64 logical workers) and run on the host CPU. Every other op runs
torch's CPU ops, the same library path as the cpu backend.
"""

from __future__ import annotations

import torch

from ... import _native, ops

NATIVE_MODULE = "_native_sunway"
QUANT_BITS = (8, 4)


def native():
    """(glmrt._native_sunway or None, reason)."""
    return _native.load(NATIVE_MODULE)


def torch_ops() -> dict:
    """torch's CPU ops for every IR op (the core references are plain torch: on the host CPU they
    are exactly the library path)."""
    return dict(ops.REFERENCE)


def _dtype_code(dtype: torch.dtype) -> int:
    return _native.DTYPE_CODES[dtype]


def _activation_dtype_refusal(node) -> str | None:
    dtype = node.input_specs[0].dtype
    if dtype not in _native.DTYPE_CODES:
        return f"activations in {dtype}: the tiled kernels take float32, bfloat16 or float16"
    return None


# ----------------------------------------------------------------------------- linear / lm_head
def linear_supports(node) -> str | None:
    refusal = _activation_dtype_refusal(node)
    if refusal:
        return refusal
    quant = node.attrs.get("quant")
    if quant is None:
        return None
    if quant["bits"] not in QUANT_BITS:
        return f"{quant['bits']}-bit weights: the tiled kernels take int8 and int4"
    module, _ = native()
    if not module.supported_group_size(quant["group_size"]):
        return (f"quantization group of {quant['group_size']}: a group must be a multiple of 32 that divides "
                f"the {module.TILE_K}-wide K slices")
    return None


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor | None,
            bits: int, group_size: int) -> torch.Tensor:
    module, _ = native()
    x = x.contiguous()  # (..., K)
    weight = weight.contiguous()
    k = x.shape[-1]
    n = weight.shape[0]
    out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)  # (..., N)
    m = x.numel() // k if k else 0
    if m == 0:
        return out
    if bias is not None:
        bias = bias.contiguous()
    if scale is not None:
        scale = scale.contiguous()
    module.linear(x.data_ptr(), _dtype_code(x.dtype),
                  weight.data_ptr(), bits, _dtype_code(weight.dtype) if bits == 0 else 0,
                  scale.data_ptr() if scale is not None else 0, _dtype_code(scale.dtype) if scale is not None else 0,
                  bias.data_ptr() if bias is not None else 0, _dtype_code(bias.dtype) if bias is not None else 0,
                  out.data_ptr(), m, n, k, group_size)
    return out


def native_linear(ctx, node, inputs, params):
    quant = node.attrs.get("quant")
    if quant is None:
        return _linear(inputs[0], params["weight"], params.get("bias"), None, 0, 0)
    return _linear(inputs[0], params["weight"], params.get("bias"), params["scale"], quant["bits"],
                   quant["group_size"])


def lm_head_supports(node) -> str | None:
    return _activation_dtype_refusal(node)


def native_lm_head(ctx, node, inputs, params):
    x = inputs[0]  # (B, T, H)
    if ctx is not None and ctx.last_only:
        x = x[:, -1:]
    return _linear(x, params["weight"], None, None, 0, 0)  # (B, T, V)


# ----------------------------------------------------------------------------- norms
def norm_supports(node) -> str | None:
    kind = node.attrs.get("kind")
    if kind not in ("rmsnorm", "layernorm"):
        return f"norm kind {kind!r}: the tiled kernels do RMSNorm and LayerNorm"
    return _activation_dtype_refusal(node)


def native_norm(ctx, node, inputs, params):
    module, _ = native()
    x = inputs[0].contiguous()  # (..., H)
    weight = params["weight"].contiguous()
    out = torch.empty_like(x)
    cols = x.shape[-1]
    rows = x.numel() // cols if cols else 0
    if rows == 0:
        return out
    eps = float(node.attrs["eps"])
    if node.attrs["kind"] == "rmsnorm":
        module.rms_norm(x.data_ptr(), _dtype_code(x.dtype), weight.data_ptr(), _dtype_code(weight.dtype),
                        out.data_ptr(), rows, cols, eps, bool(node.attrs["round_before_weight"]))
    else:
        bias = params.get("bias")
        bias_ptr, bias_code = (0, 0) if bias is None else (bias.contiguous().data_ptr(), _dtype_code(bias.dtype))
        module.layer_norm(x.data_ptr(), _dtype_code(x.dtype), weight.data_ptr(), _dtype_code(weight.dtype),
                          bias_ptr, bias_code, out.data_ptr(), rows, cols, eps)
    return out
