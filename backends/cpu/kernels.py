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


# ----------------------------------------------------------------------------- quantized linear
# Weight-only INT8 / INT4 (glmrt.quant's format: symmetric, per output channel or group-wise along
# K, INT4 packed with the even index in the high nibble). The kernels quantize each activation row
# to int8 per block of 32 along K and take exact integer dot products (see native/cpu/gemv_quant.h
# for the error bound this implies against the dequantized reference).
QUANT_LINEAR_FUNCTIONS = {8: "linear_int8", 4: "linear_int4"}
QUANT_BLOCK = 32


def native_quant_linear_supports(node) -> str | None:
    quant = node.attrs.get("quant")
    if quant is None:
        return "float weights: the native kernels take INT8 / INT4 weight-only quantized linears"
    if quant["bits"] not in QUANT_LINEAR_FUNCTIONS:
        return f"{quant['bits']}-bit weights: the native kernels take int8 and int4"
    group = quant["group_size"]
    if group < 0 or group % QUANT_BLOCK:
        return (f"quantization group of {group}: the native kernels need 0 (one scale per output channel) or a "
                f"multiple of {QUANT_BLOCK}")
    dtype = node.input_specs[0].dtype
    if dtype not in _native.DTYPE_CODES:
        return f"activations in {dtype}: the native kernels take float32, bfloat16 or float16"
    return None


def native_quant_linear(ctx, node, inputs, params):
    module, _ = native()
    quant = node.attrs["quant"]
    bits, group, k = quant["bits"], quant["group_size"], quant["in_features"]
    x, w, scale, bias = inputs[0], params["weight"], params["scale"], params.get("bias")
    n = w.shape[0]
    row_bytes = k if bits == 8 else (k + 1) // 2
    if x.shape[-1] != k or w.dtype != torch.int8 or tuple(w.shape) != (n, row_bytes):
        raise ValueError(f"{node.name}: expected x (..., {k}) and int8 weight ({n}, {row_bytes}) for {bits}-bit "
                         f"weights, got x {tuple(x.shape)} and weight {w.dtype} {tuple(w.shape)}; the weights do not "
                         "match the node's quant attributes: quantize them with glmrt.quant.quantize_weights")
    groups = 1 if group == 0 else -(-k // group)
    if scale.numel() != n * groups or scale.dtype not in _native.DTYPE_CODES:
        raise ValueError(f"{node.name}: expected {n * groups} scales in float32/bfloat16/float16, got "
                         f"{scale.dtype} {tuple(scale.shape)}; quantize the weights with glmrt.quant.quantize_weights")
    x = x.contiguous()
    w = w.contiguous()
    scale = scale.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    out = torch.empty((*x.shape[:-1], n), dtype=x.dtype)
    m = x.numel() // k if k else int(torch.Size(x.shape[:-1]).numel())
    if m == 0 or n == 0:
        return out
    getattr(module, QUANT_LINEAR_FUNCTIONS[bits])(
        x.data_ptr(), _native.DTYPE_CODES[x.dtype], w.data_ptr(), scale.data_ptr(), _native.DTYPE_CODES[scale.dtype],
        bias.data_ptr() if bias is not None else 0, _native.DTYPE_CODES[bias.dtype] if bias is not None else 0,
        out.data_ptr(), m, n, k, group)
    return out


# ----------------------------------------------------------------------------- float decode GEMV
# Unquantized linears and the LM head at decode: native/cpu/gemv_float.cpp streams the weight once
# with fp32 FMAs (bf16 / fp16 widened exactly) and rounds once, what F.linear computes up to the fp32
# summation order. Used for at most FLOAT_GEMV_MAX_M rows of activations with x, weight and bias of
# one dtype; prefill and mixed dtypes take torch's F.linear (oneDNN), which is the faster GEMM. The
# reason (2 threads, bf16, M = 1, weights from DRAM, 2026-12-02): torch's GEMV read 9.5 GB/s on the
# 4096 x 13696 down projection and 20-21 GB/s on the 27392- and 65024-row ones; this one 21-22.5.
def native_float_linear_supports(node) -> str | None:
    if node.attrs.get("quant") is not None:
        return "weight-only quantized: native.quant_linear's"
    spec = node.input_specs[0] if node.input_specs else None
    if spec is None:
        return "no input shape"
    if spec.dtype not in _native.DTYPE_CODES:
        return f"activations in {spec.dtype}: the native GEMV takes float32, bfloat16 or float16"
    return None


def _float_gemv(module, x2d: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor | None:
    """x2d (M, K) @ weight^T + bias with the native GEMV, or None when it does not apply."""
    m, k = x2d.shape
    if (m > module.FLOAT_GEMV_MAX_M or x2d.dtype not in _native.DTYPE_CODES or weight.dtype != x2d.dtype
            or weight.dim() != 2 or weight.shape[1] != k or (bias is not None and bias.dtype != x2d.dtype)):
        return None
    x2d, weight = x2d.contiguous(), weight.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    n = weight.shape[0]
    out = torch.empty((m, n), dtype=x2d.dtype)
    if m and n:
        module.linear_float(x2d.data_ptr(), weight.data_ptr(), 0 if bias is None else bias.data_ptr(),
                            out.data_ptr(), _native.DTYPE_CODES[x2d.dtype], m, n, k)
    return out


def _float_gemv_rows(ctx, module, x2d: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor | None:
    """_float_gemv, and under ctx.row_invariant (the serving engine's batched decode) also beyond
    FLOAT_GEMV_MAX_M rows, in chunks of at most that many: the GEMV computes every row alike
    whatever the row count, so a request's logits do not depend on how many others share the step
    (a GEMM from F.linear would sum in another order)."""
    limit = module.FLOAT_GEMV_MAX_M
    if not getattr(ctx, "row_invariant", False) or x2d.shape[0] <= limit:
        return _float_gemv(module, x2d, weight, bias)
    parts = [_float_gemv(module, x2d[i:i + limit], weight, bias) for i in range(0, x2d.shape[0], limit)]
    return None if any(p is None for p in parts) else torch.cat(parts)


def native_float_linear(ctx, node, inputs, params):
    module, _ = native()
    x = inputs[0]  # (..., K)
    out = _float_gemv_rows(ctx, module, x.reshape(-1, x.shape[-1]), params["weight"], params.get("bias"))
    if out is None:
        return ops.linear(ctx, node, inputs, params)
    return out.reshape(*x.shape[:-1], out.shape[-1])  # (..., N)


def native_lm_head(ctx, node, inputs, params):
    module, _ = native()
    x = inputs[0]  # (B, T, H)
    last = x[:, -1] if ctx.last_only else x.reshape(-1, x.shape[-1])  # (B, H) or (B*T, H)
    out = _float_gemv_rows(ctx, module, last, params["weight"], None)
    if out is None:
        return ops.lm_head(ctx, node, inputs, params)
    return out[:, None] if ctx.last_only else out.reshape(*x.shape[:-1], out.shape[-1])  # (B, 1, V) / (B, T, V)
