"""Native CPU kernels for LayerNorm, fused residual + norm, RoPE (all three kinds) and attention
over the KV cache.

Each wrapper computes exactly what the reference op in glmrt.ops computes for the nodes its
predicate accepts (see native/cpu/{norm,rope,attention}.h for the arithmetic); the predicates
refuse everything else with the reason, so the plan report stays honest. The wrappers pass raw
pointers, element strides and dtype codes to glmrt._native_cpu.
"""

from __future__ import annotations

import torch

from ... import _native, ops
from ..base import NATIVE, Kernel

_NATIVE_NAME = "_native_cpu"

ROPE_KIND_CODES = {"interleaved": 0, "half": 1, "2d": 2}
ROPE_TABLE_DTYPES = ("float32", "float16")
ATTENTION_SCALINGS = ("standard", "layer_scaled")


def native():
    return _native.load(_NATIVE_NAME)


def available() -> bool:
    module = native()[0]
    return module is not None and all(hasattr(module, f) for f in ("layer_norm", "rope", "attention"))


def kernels() -> list[Kernel]:
    """The CPU backend's kernels from this module; empty when the built module predates them."""
    if not available():
        return []
    out = [Kernel("norm", "native.layer_norm", NATIVE, layer_norm, layer_norm_supports),
           Kernel("rope", "native.rope", NATIVE, rope, rope_supports),
           Kernel("attention", "native.attention", NATIVE, attention, attention_supports)]
    if hasattr(native()[0], "add_norm"):  # a module built before the fused kernel lacks it
        out.append(Kernel("residual_norm", "native.add_norm", NATIVE, add_norm, add_norm_supports))
    return out


def _dtype_reason(node) -> str | None:
    dtype = node.input_specs[0].dtype if node.input_specs else None
    if dtype not in _native.DTYPE_CODES:
        return f"dtype {dtype}: the native kernels take float32, bfloat16 or float16"
    return None


# ----------------------------------------------------------------------------- LayerNorm
def layer_norm_supports(node) -> str | None:
    if node.attrs.get("kind") != "layernorm":
        return f"{node.attrs.get('kind')} is not LayerNorm"
    return _dtype_reason(node)


def layer_norm(ctx, node, inputs, params):
    """torch F.layer_norm(x, (H,), weight, bias, eps): fp32 statistics, fp32 affine, one rounding."""
    module, _ = native()
    x = inputs[0].contiguous()
    w = params["weight"].contiguous()
    bias = params.get("bias")
    cols = x.shape[-1]
    if w.numel() != cols or (bias is not None and bias.numel() != cols):
        raise ValueError(f"{node.name}: LayerNorm over {cols} features got weight {tuple(w.shape)} and bias "
                         f"{None if bias is None else tuple(bias.shape)}")
    for name, t in (("weight", w), ("bias", bias)):
        if t is not None and t.dtype not in _native.DTYPE_CODES:
            raise ValueError(f"{node.name}: LayerNorm {name} in {t.dtype}; the native kernel takes float32, "
                             "bfloat16 or float16")
    if bias is not None:
        bias = bias.contiguous()
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    module.layer_norm(x.data_ptr(), _native.DTYPE_CODES[x.dtype], w.data_ptr(), _native.DTYPE_CODES[w.dtype],
                      0 if bias is None else bias.data_ptr(), 0 if bias is None else _native.DTYPE_CODES[bias.dtype],
                      out.data_ptr(), x.numel() // cols, cols, float(node.attrs["eps"]))
    return out


# ----------------------------------------------------------------------------- residual + norm
ADD_NORM_KINDS = {"rmsnorm": 0, "layernorm": 1}


def add_norm_supports(node) -> str | None:
    kind = node.attrs.get("kind")
    if kind not in ADD_NORM_KINDS:
        return f"norm kind {kind!r}: the native add_norm kernel takes {', '.join(ADD_NORM_KINDS)}"
    dtypes = {s.dtype for s in node.input_specs}
    if len(dtypes) != 1:
        return f"residual and branch in different dtypes ({', '.join(sorted(map(str, dtypes)))})"
    return _dtype_reason(node)


def add_norm(ctx, node, inputs, params):
    """glmrt.ops.residual_norm in one native pass per row: h = branch + residual * alpha, rounded
    to the model dtype exactly as ops.residual rounds it, then RMSNorm / LayerNorm of h."""
    module, _ = native()
    a = node.attrs
    res, branch = inputs
    if res.shape != branch.shape or res.dtype != branch.dtype:
        raise ValueError(f"{node.name}: residual {tuple(res.shape)} {res.dtype} and branch {tuple(branch.shape)} "
                         f"{branch.dtype} must have one shape and dtype")
    res, branch = res.contiguous(), branch.contiguous()
    w, bias = params["weight"].contiguous(), params.get("bias")
    cols = res.shape[-1]
    if w.numel() != cols or (bias is not None and bias.numel() != cols):
        raise ValueError(f"{node.name}: norm over {cols} features got weight {tuple(w.shape)} and bias "
                         f"{None if bias is None else tuple(bias.shape)}")
    for name, t in (("weight", w), ("bias", bias)):
        if t is not None and t.dtype not in _native.DTYPE_CODES:
            raise ValueError(f"{node.name}: norm {name} in {t.dtype}; the native kernel takes float32, bfloat16 or "
                             "float16")
    if a["kind"] == "rmsnorm" and bias is not None:
        raise ValueError(f"{node.name}: RMSNorm takes no bias, got one of {tuple(bias.shape)}")
    if a["kind"] == "rmsnorm" and a["round_before_weight"] and torch.promote_types(w.dtype, res.dtype) != res.dtype:
        # The reference's norm output is promoted to the weight's dtype (say float32 under bfloat16
        # activations); the kernel writes the activation dtype, so the reference runs this node.
        return ops.residual_norm(ctx, node, inputs, params)
    if bias is not None:
        bias = bias.contiguous()
    emit = a.get("emit_residual", True)
    h = torch.empty_like(res) if emit else None
    out = torch.empty_like(res)
    if res.numel():
        module.add_norm(res.data_ptr(), branch.data_ptr(), _native.DTYPE_CODES[res.dtype], float(a["alpha"]),
                        w.data_ptr(), _native.DTYPE_CODES[w.dtype], 0 if bias is None else bias.data_ptr(),
                        0 if bias is None else _native.DTYPE_CODES[bias.dtype], 0 if h is None else h.data_ptr(),
                        out.data_ptr(), res.numel() // cols, cols, float(a["eps"]), ADD_NORM_KINDS[a["kind"]],
                        bool(a["round_before_weight"]))
    return (h, out) if emit else out


# ----------------------------------------------------------------------------- RoPE
def rope_supports(node) -> str | None:
    a = node.attrs
    if a.get("kind") not in ROPE_KIND_CODES:
        return f"rope kind {a.get('kind')!r}: the native kernel takes {', '.join(ROPE_KIND_CODES)}"
    if a.get("table_dtype") not in ROPE_TABLE_DTYPES:
        return f"rope table dtype {a.get('table_dtype')!r}: the native kernel takes {', '.join(ROPE_TABLE_DTYPES)}"
    hd, rd = a["head_dim"], a["rotary_dim"]
    if a["kind"] == "2d" and (rd != hd or hd % 4):
        return f"2-D RoPE with rotary_dim {rd}, head_dim {hd}: needs rotary_dim == head_dim, a multiple of 4"
    if not (0 < rd <= hd and rd % 2 == 0):
        return f"rotary_dim {rd} must be even and in (0, head_dim {hd}]"
    return _dtype_reason(node)


def _tables(ctx, node, dtype):
    """The cos/sin tables of this step, built by the reference's own function and memoised under
    the reference's key, so native and reference layers of one plan share them bit for bit."""
    a = node.attrs
    key = ("rope", a["kind"], a["rotary_dim"], a["base"], a["table_dtype"], dtype)
    tables = ctx.memo.get(key)
    if tables is None:
        if a["kind"] == "2d":
            half = a["head_dim"] // 2
            tables = (ops.rope_tables(ctx.positions[:, 0], half, a["base"], dtype, a["table_dtype"]),
                      ops.rope_tables(ctx.positions[:, 1], half, a["base"], dtype, a["table_dtype"]))
        else:
            tables = ops.rope_tables(ctx.positions, a["rotary_dim"], a["base"], dtype, a["table_dtype"])
        ctx.memo[key] = tables
    return tables


def rope(ctx, node, inputs, params):
    """qkv (B, T, (nh + 2*nkv) * hd) -> q (B, T, nh, hd), k (B, T, nkv, hd) rotated, v a view."""
    module, _ = native()
    a = node.attrs
    hd, nh, nkv = a["head_dim"], a["num_heads"], a["num_kv_heads"]
    qkv = inputs[0]
    B, T, width = qkv.shape
    if width != (nh + 2 * nkv) * hd:
        raise ValueError(f"{node.name}: fused qkv of width {width}, expected (num_heads {nh} + 2 * num_kv_heads "
                         f"{nkv}) * head_dim {hd} = {(nh + 2 * nkv) * hd}")
    # Rows must be evenly spaced with contiguous features (any contiguous tensor or row slice is).
    if qkv.stride(-1) != 1 or (B > 1 and qkv.stride(0) != T * qkv.stride(1)):
        qkv = qkv.contiguous()
    v = qkv[..., (nh + nkv) * hd:].unflatten(-1, (nkv, hd))  # (B, T, nkv, hd), as the reference's split
    tables = _tables(ctx, node, qkv.dtype)
    pairs = hd // 4 if a["kind"] == "2d" else a["rotary_dim"] // 2
    flat = tables[0] + tables[1] if a["kind"] == "2d" else tables
    flat = tuple(t.contiguous() for t in flat)
    for t in flat:
        if tuple(t.shape) != (B, T, pairs) or t.dtype != qkv.dtype:
            raise ValueError(f"{node.name}: RoPE tables of shape {tuple(t.shape)} {t.dtype} for qkv {tuple(qkv.shape)}; "
                             f"expected ({B}, {T}, {pairs}) {qkv.dtype}: ctx.positions must be (B, T) or (B, 2, T)")
    q_out = torch.empty((B, T, nh, hd), dtype=qkv.dtype)  # (B, T, nh, hd)
    k_out = torch.empty((B, T, nkv, hd), dtype=qkv.dtype)  # (B, T, nkv, hd)
    if B * T == 0:
        return q_out, k_out, v
    cos2, sin2 = (flat[2].data_ptr(), flat[3].data_ptr()) if a["kind"] == "2d" else (0, 0)
    module.rope(qkv.data_ptr(), _native.DTYPE_CODES[qkv.dtype], B * T, qkv.stride(1), nh, nkv, hd,
                ROPE_KIND_CODES[a["kind"]], a["rotary_dim"], flat[0].data_ptr(), flat[1].data_ptr(), cos2, sin2,
                q_out.data_ptr(), k_out.data_ptr())
    return q_out, k_out, v


# ----------------------------------------------------------------------------- attention
def attention_supports(node) -> str | None:
    a = node.attrs
    if a.get("scaling") not in ATTENTION_SCALINGS:
        return f"attention scaling {a.get('scaling')!r}: the native kernel takes {', '.join(ATTENTION_SCALINGS)}"
    if a["num_heads"] % a["num_kv_heads"]:
        return f"num_heads {a['num_heads']} is not a multiple of num_kv_heads {a['num_kv_heads']}"
    if a.get("per_row_cache") and "kv_lens" not in (native()[0].attention.__doc__ or ""):
        return "per-row cache positions: this build of glmrt._native_cpu predates them (no kv_lens); rebuild glmrt"
    return _dtype_reason(node)


def _key_strides(t: torch.Tensor, layout: str) -> tuple[int, int, int]:
    """Element strides (batch, kv head, key position) of keys/values in the cache's (B, nkv, S, hd)
    or a fresh (B, T, nkv, hd) layout."""
    if layout == "cache":
        return t.stride(0), t.stride(1), t.stride(2)
    return t.stride(0), t.stride(2), t.stride(1)


def attention(ctx, node, inputs, params):
    """q: (B, T, nh, hd); k, v: (B, T, nkv, hd) -> (B, T, nh * hd), writing k, v into the cache
    exactly where the reference writes them."""
    module, _ = native()
    a = node.attrs
    q, k, v = inputs
    B, T, nh, hd = q.shape
    nkv = a["num_kv_heads"]
    if tuple(k.shape) != (B, T, nkv, hd) or tuple(v.shape) != (B, T, nkv, hd):
        raise ValueError(f"{node.name}: q {tuple(q.shape)} with k {tuple(k.shape)}, v {tuple(v.shape)}; expected "
                         f"k and v of ({B}, {T}, {nkv}, {hd})")
    if ctx.cache is not None:
        layer = a["layer_index"]
        keys, values = ctx.cache.k[layer], ctx.cache.v[layer]  # (B, nkv, max_len, hd)
        if keys.dtype != q.dtype:
            raise ValueError(f"{node.name}: KV cache in {keys.dtype} but queries in {q.dtype}; build the cache in the "
                             "model dtype")
        keys, values = ops.update_kv_cache(ctx, layer, k, v)  # (B, nkv, S, hd) views of the cache
        S = keys.shape[2]
        layout = "cache"
    else:
        keys, values, S, layout = k, v, T, "fresh"
    if keys.stride(-1) != 1 or values.stride(-1) != 1:
        keys, values = keys.contiguous(), values.contiguous()
    if q.stride(-1) != 1:
        q = q.contiguous()
    allowed = ctx.allowed  # (B, 1, T, S)
    if allowed.dim() != 4 or allowed.shape[-1] != S or allowed.shape[-2] != T:
        raise ValueError(f"{node.name}: mask of shape {tuple(allowed.shape)} for {T} queries over {S} keys; "
                         f"expected (B, 1, {T}, {S})")
    if allowed.dtype != torch.bool:
        raise ValueError(f"{node.name}: mask must be bool (True = may attend), got {allowed.dtype}")
    allowed = allowed.expand(B, 1, T, S)  # broadcast dims get stride 0
    out = torch.empty((B, T, nh * hd), dtype=q.dtype)  # (B, T, nh * hd)
    if B * T == 0:
        return out
    kv_lens = 0
    if ctx.cache_positions is not None:  # per-row key counts: each row's arithmetic is its own
        lens = ctx.memo.get("native.attention.kv_lens")
        if lens is None:
            lens = (ctx.cache_positions.to(torch.int64) + T).contiguous()  # (B,)
            ctx.memo["native.attention.kv_lens"] = lens
        if tuple(lens.shape) != (B,) or int(lens.max()) > S:
            raise ValueError(f"{node.name}: per-row cache positions {ctx.cache_positions.tolist()} for {B} rows "
                             f"of {T} tokens over {S} keys")
        kv_lens = lens.data_ptr()
    c = float(a["layer_index"] + 1)
    layer_scaled = a["scaling"] == "layer_scaled"
    module.attention(
        _native.DTYPE_CODES[q.dtype], B, T, S, nh, nkv, hd,
        q.data_ptr(), q.stride(0), q.stride(1), q.stride(2),
        keys.data_ptr(), *_key_strides(keys, layout),
        values.data_ptr(), *_key_strides(values, layout),
        allowed.data_ptr(), allowed.stride(0), allowed.stride(2), allowed.stride(3),
        out.data_ptr(), layer_scaled, float(a["scale"]), hd ** 0.5 * c, c, kv_lens)
    return out
