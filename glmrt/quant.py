"""Weight-only INT8 / INT4 quantization, the scheme GLM-130B and ChatGLM released.

Symmetric, one scale per output row (group_size 0) or per group of `group_size` input columns:
    scale = max|W| / (2^(bits-1) - 1)      (127 for INT8, 7 for INT4)
    q     = round(W / scale)               (round half to even, as torch.round does)
INT4 values are packed two per byte with the EVEN index in the HIGH nibble:
    byte[j] = (q[2j] << 4) | (q[2j+1] & 0xF)     (odd K: the last low nibble is 0)

The quantization pass marks a linear node with ``attrs["quant"] = {"bits", "group_size",
"in_features"}`` and replaces its weight parameter by the int8 tensor (packed for INT4) plus a
``scale`` parameter; which layers are quantized follows the releases (qkv, attention output and
both MLP projections; never embeddings, LM head, norms or biases).
"""

from __future__ import annotations

import dataclasses

import torch

from .errors import ConfigError
from .graph import Graph, Node, ParamSpec

QUANT_LINEARS = ("attn.qkv", "attn.dense", "mlp.up", "mlp.down")
FORMATS = {"int8": 8, "int4": 4}
GROUP_SIZES = (0, 32, 64, 128)


def parse_format(quantize: str | None) -> tuple[int, int] | None:
    """"int4", "int8", "int4-g64", ... -> (bits, group_size); None -> None."""
    if quantize is None or quantize in ("none", ""):
        return None
    name, _, group = str(quantize).lower().partition("-g")
    if name not in FORMATS:
        raise ConfigError(f"unknown quantization {quantize!r}: use int8 or int4, optionally with a group size "
                          "(int4-g32, int4-g64, int4-g128)")
    try:
        group_size = int(group) if group else 0
    except ValueError:
        raise ConfigError(f"bad group size in {quantize!r}: use -g32, -g64 or -g128") from None
    if group_size not in GROUP_SIZES:
        raise ConfigError(f"group size {group_size} not supported: use 32, 64 or 128 (or none: per output channel)")
    return FORMATS[name], group_size


def num_groups(k: int, group_size: int) -> int:
    return 1 if group_size == 0 else -(-k // group_size)


def quantize_weight(w: torch.Tensor, bits: int, group_size: int = 0,
                    scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) float -> (q int8 (N, K) or packed (N, ceil(K/2)), scale (N,) or (N, G))."""
    n, k = w.shape
    qmax = 2 ** (bits - 1) - 1
    wf = w.float()
    if group_size == 0:
        scale = wf.abs().amax(dim=1) / qmax  # (N,)
        scale_b = scale[:, None]
    else:
        g = num_groups(k, group_size)
        padded = torch.nn.functional.pad(wf, (0, g * group_size - k))
        scale = padded.view(n, g, group_size).abs().amax(dim=2) / qmax  # (N, G)
        scale_b = scale.repeat_interleave(group_size, dim=1)[:, :k]
    scale = scale.to(scale_dtype or w.dtype)
    # Divide by the stored (rounded) scale so that dequantization uses exactly the same number.
    safe = scale_b.to(scale.dtype).float().clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(wf / safe).clamp(-qmax, qmax).to(torch.int8)
    if bits == 4:
        q = pack_int4(q)
    return q, scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], (N, K) -> (N, ceil(K/2)) bytes, even index in the high nibble."""
    n, k = q.shape
    if k % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    hi = q[:, 0::2].to(torch.int16)
    lo = q[:, 1::2].to(torch.int16)
    packed = ((hi << 4) | (lo & 0xF)) & 0xFF
    return torch.where(packed > 127, packed - 256, packed).to(torch.int8)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """(N, ceil(K/2)) bytes -> (N, K) int8, sign-extending each nibble."""
    p = packed.to(torch.int8)
    hi = p >> 4  # arithmetic shift sign-extends the high nibble
    lo = (p << 4) >> 4  # bring the low nibble up, then sign-extend it back down
    out = torch.stack((hi, lo), dim=-1).flatten(-2)
    return out[:, :k]


def dequantize(q: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int, k: int,
               dtype: torch.dtype) -> torch.Tensor:
    """The reference dequantization: (N, K) weights in ``dtype``."""
    values = unpack_int4(q, k) if bits == 4 else q
    s = scale.float()
    if group_size == 0:
        w = values.float() * s[:, None]
    else:
        w = values.float() * s.repeat_interleave(group_size, dim=1)[:, :k]
    return w.to(dtype)


def quant_bytes(n: int, k: int, bits: int, group_size: int, scale_bytes: int) -> int:
    weight = n * (k if bits == 8 else -(-k // 2))
    return weight + n * num_groups(k, group_size) * scale_bytes


def _is_quantized_linear(node: Node) -> bool:
    return node.op == "linear" and any(node.name.endswith(s) for s in QUANT_LINEARS)


def quantize_graph(graph: Graph, bits: int, group_size: int = 0) -> Graph:
    """The quantization pass over the graph (parameter specs only; see quantize_weights)."""
    params = dict(graph.params)
    nodes = []
    for node in graph.nodes:
        if not _is_quantized_linear(node) or "quant" in node.attrs:
            nodes.append(node)
            continue
        wname = node.params["weight"]
        n, k = params[wname].shape
        qshape = (n, k) if bits == 8 else (n, -(-k // 2))
        params[wname] = ParamSpec(qshape, torch.int8, "qweight")
        sname = wname.removesuffix(".weight") + ".weight_scale"
        params[sname] = ParamSpec((n,) if group_size == 0 else (n, num_groups(k, group_size)), graph.dtype, "scale")
        attrs = dict(node.attrs, quant={"bits": bits, "group_size": group_size, "in_features": k})
        nodes.append(dataclasses.replace(node, attrs=attrs, params=dict(node.params, scale=sname)))
    return graph.replace_nodes(nodes, params)


def quantize_weights(graph: Graph, quantized: Graph, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Quantize the float weights of ``graph`` into the layout ``quantized`` (from quantize_graph) expects."""
    out = dict(weights)
    for old, new in zip(graph.nodes, quantized.nodes):
        q = new.attrs.get("quant")
        if q is None or "quant" in old.attrs:
            continue
        wname = new.params["weight"]
        qweight, scale = quantize_weight(weights[wname], q["bits"], q["group_size"], quantized.dtype)
        out[wname] = qweight
        out[new.params["scale"]] = scale
    return out
