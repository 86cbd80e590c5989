"""Kernels built from torch's own fused ops, shared by the torch-based backends (cpu, cuda, rocm).

`sdpa_attention` runs the attention node through torch.nn.functional.scaled_dot_product_attention
(flash / memory-efficient / math, whichever torch picks for the device), with the KV cache writes
of the reference op. It takes standard 1/sqrt(d) scaling only: the layer-scaled softmax of
GLM-130B / ChatGLM-6B is not expressible as SDPA, so supports() refuses it with that reason.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops


def sdpa_attention_supports(node) -> str | None:
    if node.attrs["scaling"] != "standard":
        return "layer-scaled attention (fp32 softmax of scores * (layer + 1)) is not expressible as SDPA"
    if node.input_specs and node.input_specs[0].dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtype {node.input_specs[0].dtype} not supported"
    return None


def sdpa_attention(ctx, node, inputs, params):
    """q: (B, T, nh, hd); k, v: (B, T, nkv, hd) -> (B, T, nh * hd)."""
    a = node.attrs
    q, k, v = inputs
    B, T, nh, hd = q.shape
    k = k.transpose(1, 2)
    v = v.transpose(1, 2)
    if ctx.cache is not None and ctx.cache_pos_t is not None:
        layer, index = a["layer_index"], ctx.cache_pos_t.view(1)
        ctx.cache.k[layer].index_copy_(2, index, k)
        ctx.cache.v[layer].index_copy_(2, index, v)
        k, v = ctx.cache.k[layer], ctx.cache.v[layer]
    elif ctx.cache is not None:
        layer, pos = a["layer_index"], ctx.cache_pos
        ctx.cache.k[layer][:, :, pos:pos + T] = k
        ctx.cache.v[layer][:, :, pos:pos + T] = v
        k, v = ctx.cache.k[layer][:, :, :pos + T], ctx.cache.v[layer][:, :, :pos + T]
    group = nh // a["num_kv_heads"]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    allowed = ctx.allowed  # (B, 1, T, S)
    # A query with no visible key (left padding) would give NaN, which would then reach the cache
    # and poison every later step through NaN * 0: let such rows see everything instead (their
    # outputs are padding and never read).
    allowed = allowed | ~allowed.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=allowed, scale=a["scale"])
    return out.transpose(1, 2).reshape(B, T, nh * hd)


def rope_supports(node) -> str | None:
    return None if node.attrs["kind"] in ("interleaved", "half", "2d") else f"unknown rope kind {node.attrs['kind']}"


__all__ = ["sdpa_attention", "sdpa_attention_supports", "ops"]
