"""The torch_npu ops glmrt's npu backend calls, as documented, in plain torch.

Sources: the op schemas of torch_npu 2.13.0 (`torch_npu/csrc/aten/npu_native_functions_by_codegen.yaml`
in the wheel; parameter names and defaults below are those) and op-plugin's documentation
(docs/context/torch_npu-*.md, hiascend.com API reference). Where the documentation states a
constraint on arguments, the double checks it and raises ContractError; where it states a
computation, the double computes it (in fp32, rounding once to the output dtype). What the
documentation leaves open is marked "double's choice" and chosen so that a caller relying on it
is caught (e.g. NaN where the real output is unspecified).

Every call is appended to CALLS (op name and arguments) so tests can check how ops were called.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

import torch
import torch.utils._python_dispatch

__version__ = "2.13.0+double"

FLOATS = (torch.float16, torch.bfloat16, torch.float32)
UB_BYTES = 192 * 1024  # one AI core's Unified Buffer on the Atlas A2/A3
HALVES = (torch.float16, torch.bfloat16)


class ContractError(RuntimeError):
    """The real op would refuse these arguments (an error, a crash or wrong results)."""


class Call(NamedTuple):
    op: str
    args: dict


CALLS: list[Call] = []


def reset() -> None:
    CALLS.clear()


class _Device:
    """The part of ``torch_npu.npu`` the backend reads: the product name of device 0, as
    ``torch_npu.npu.get_device_name()`` gives it. Tests set ``device_name``."""

    device_name = "Ascend910B3"
    jit_compile = False  # torch.npu.set_compile_mode(jit_compile=...); False is torch_npu's default

    def get_device_name(self, device=None) -> str:
        return self.device_name

    def is_jit_compile_false(self) -> bool:
        """torch_npu.npu.is_jit_compile_false() (torch_npu/npu/npu_config.py)."""
        return not self.jit_compile


# ----------------------------------------------------------------------------- graph capture
class _CaptureMode(torch.utils._python_dispatch.TorchDispatchMode):
    """Records every aten op run while a graph is captured, as NPUGraph/CUDAGraph capture records
    kernels: what is replayed is the recorded ops on the recorded tensors. A value read on the host
    during capture (a Python int from a tensor, a sync) would be frozen into the graph, so it is an
    error here as it is under torch.npu.graph / torch.cuda.graph."""

    HOST_READS = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::equal", "aten::nonzero"}

    def __init__(self, ops: list):
        super().__init__()
        self.ops = ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func._schema.name in self.HOST_READS:
            raise ContractError(f"{func._schema.name} reads a device value on the host during graph capture "
                                "(the captured graph would replay the value of the capture step)")
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out


def _copy_into(recorded, result) -> None:
    if isinstance(recorded, torch.Tensor):
        if result is not recorded:
            recorded.copy_(result)
    elif isinstance(recorded, (tuple, list)):
        for r, n in zip(recorded, result):
            _copy_into(r, n)


class NPUGraph:
    """torch.npu.NPUGraph (torch_npu mirrors torch.cuda.CUDAGraph): capture once, replay() reruns
    the captured ops on the captured buffers; outputs land in the tensors the capture returned."""

    def __init__(self):
        self._ops: list | None = None
        self.replays = 0

    def replay(self) -> None:
        _need(self._ops is not None, "NPUGraph.replay() before capture")
        for func, args, kwargs, out in self._ops:
            _copy_into(out, func(*args, **kwargs))
        self.replays += 1


class graph:
    """torch.npu.graph(npu_graph, pool=None, stream=None): the capture context."""

    def __init__(self, npu_graph: NPUGraph, pool=None, stream=None):
        self._graph = npu_graph
        self._ops: list = []
        self._mode = _CaptureMode(self._ops)

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        self._graph._ops = self._ops
        return False


npu = _Device()
npu.NPUGraph = NPUGraph
npu.graph = graph


def calls(op: str) -> list[Call]:
    return [c for c in CALLS if c.op == op]


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise ContractError(message)


def _not_modelled(what: str) -> None:
    raise NotImplementedError(f"the torch_npu double does not model {what}")


def bf16_supported(device_name: str | None = None) -> bool:
    """c10_npu::IsBF16Supported(): `GetSocVersion() >= SocVersion::Ascend910B1` (Ascend/pytorch
    torch_npu/csrc/core/npu/NpuVariables.cpp): the 910B1.. (A2), 310B and 910_93 (A3) SoCs; not the
    original 910 (Ascend910A/ProA/ProB/PremiumA and the plain "Ascend910B"), not the 310P."""
    name = npu.device_name if device_name is None else device_name
    return bool(re.match(r"Ascend910B\d|Ascend910_9\d|Ascend310B", name))


def _float_dtype(name: str, t: torch.Tensor, allowed=FLOATS) -> None:
    _need(t.dtype in allowed, f"{name}: dtype {t.dtype} not in {[str(d) for d in allowed]}")
    _need(t.dtype != torch.bfloat16 or bf16_supported(),
          f"{name}: bfloat16 is not supported on {npu.device_name} (IsBF16Supported() is false below Ascend910B1)")


# ----------------------------------------------------------------------------- npu_rms_norm
def npu_rms_norm(self: torch.Tensor, gamma: torch.Tensor, epsilon: float = 1e-06):
    """npu_rms_norm(Tensor self, Tensor gamma, float epsilon=1e-06) -> (Tensor, Tensor)

    y = x * rsqrt(mean(x^2 over gamma's dims) + eps) * gamma, computed in fp32 and rounded once;
    rstd in fp32. x: 2-8 dims, fp16/bf16/fp32; gamma: same dtype as x, the trailing dims of x.
    (Documented products: Atlas training series (910), A2, A3, inference series.)"""
    x = self
    CALLS.append(Call("npu_rms_norm", dict(x=x, gamma=gamma, epsilon=epsilon)))
    _float_dtype("npu_rms_norm self", x)
    _need(gamma.dtype == x.dtype, f"npu_rms_norm: gamma dtype {gamma.dtype} must equal x's {x.dtype}")
    _need(2 <= x.dim() <= 8, f"npu_rms_norm: x must have 2-8 dims, got {x.dim()}")
    _need(tuple(gamma.shape) == tuple(x.shape[x.dim() - gamma.dim():]),
          f"npu_rms_norm: gamma shape {tuple(gamma.shape)} is not the trailing dims of x {tuple(x.shape)}")
    dims = tuple(range(x.dim() - gamma.dim(), x.dim()))
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(dims, keepdim=True) + epsilon)
    return (xf * rstd * gamma.float()).to(x.dtype), rstd


def npu_add_rms_norm(x1: torch.Tensor, x2: torch.Tensor, gamma: torch.Tensor, epsilon: float = 1e-06):
    """npu_add_rms_norm(Tensor x1, Tensor x2, Tensor gamma, float epsilon=1e-06) -> (Tensor, Tensor, Tensor)

    x = x1 + x2 (the third output), y = x * rsqrt(mean(x^2 over gamma's dims) + eps) * gamma, rstd
    in fp32. x1, x2: 1-8 dims, one shape, fp16/bf16/fp32; gamma: the trailing dims of x1. (aclnnAddRmsNorm;
    products: A2, A3 and the inference series, which takes fp32/fp16 only.) The sum is rounded to
    the input dtype and normalized from the rounded value, as op-plugin's own test reference for the
    op computes it (fp16: x1 + x2 in fp16, then fp32); gamma in x1's dtype is the double's choice
    (the documentation lists the same dtypes for both, a mixed pair is not documented)."""
    CALLS.append(Call("npu_add_rms_norm", dict(x1=x1, x2=x2, gamma=gamma, epsilon=epsilon)))
    _float_dtype("npu_add_rms_norm x1", x1)
    _need(x2.dtype == x1.dtype, f"npu_add_rms_norm: x2 dtype {x2.dtype} must equal x1's {x1.dtype}")
    _need(tuple(x2.shape) == tuple(x1.shape), f"npu_add_rms_norm: x2 shape {tuple(x2.shape)} must equal x1's "
                                              f"{tuple(x1.shape)}")
    _need(1 <= x1.dim() <= 8, f"npu_add_rms_norm: x1 must have 1-8 dims, got {x1.dim()}")
    _need(gamma.dtype == x1.dtype, f"npu_add_rms_norm: gamma dtype {gamma.dtype} must equal x1's {x1.dtype}")
    _need(tuple(gamma.shape) == tuple(x1.shape[x1.dim() - gamma.dim():]),
          f"npu_add_rms_norm: gamma shape {tuple(gamma.shape)} is not the trailing dims of x1 {tuple(x1.shape)}")
    _need(not npu.device_name.startswith(("Ascend910A", "Ascend910Pro")),
          f"npu_add_rms_norm is not supported on {npu.device_name} (Atlas training series)")
    x = x1 + x2  # in the input dtype
    dims = tuple(range(x.dim() - gamma.dim(), x.dim()))
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(dims, keepdim=True) + epsilon)
    return (xf * rstd * gamma.float()).to(x.dtype), rstd, x


# ----------------------------------------------------------------------------- rotary embeddings
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotate_interleaved(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., ::2], x[..., 1::2]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


# For each layout of x (dims in that order), the table shapes each mode accepts, as patterns over
# x's named dims ("1" = broadcast). op-plugin torch_npu-npu_rotary_mul.md, jit_compile=False.
_ROTARY_MUL_TABLES = {
    "half": {"BNSD": ("11SD", "B1SD", "BNSD"), "BSND": ("1S1D", "BS1D", "BSND"), "SBND": ("S11D", "SB1D", "SBND")},
    "interleave": {"BNSD": ("11SD",), "BSND": ("1S1D",), "SBND": ("S11D",)},
}


def npu_rotary_mul(self: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor, rotary_mode: str = "half",
                   rotate: torch.Tensor | None = None) -> torch.Tensor:
    """npu_rotary_mul(Tensor self, Tensor r1, Tensor r2, str rotary_mode='half', Tensor? rotate=None) -> Tensor

    out = x * r1 + rotate(x) * r2, rotate = rotate_half ('half') or the GPT-J pair rotation
    ('interleave'). 4-D x, r1, r2 of one float dtype; D even and < 896. The layout (BNSD, BSND,
    SBND) is read from the tables' shape: 'half' takes tables broadcast over B and/or N,
    'interleave' only fully broadcast ones (11SD / 1S1D / S11D). half: B, N < 1000; interleave:
    B * N < 1000. (The A2/A3 general kernel; the original 910 has 'half' with D = 128 only.)"""
    x = self
    CALLS.append(Call("npu_rotary_mul", dict(x=x, r1=r1, r2=r2, rotary_mode=rotary_mode)))
    if rotate is not None:
        _not_modelled("npu_rotary_mul's rotate argument")
    _need(rotary_mode in _ROTARY_MUL_TABLES, f"npu_rotary_mul: rotary_mode {rotary_mode!r} is not 'half' or 'interleave'")
    # op-plugin runs aclnnRotaryPositionEmbedding only from Ascend910B1 on with jit_compile=False;
    # elsewhere the aclop kernel, which refuses anything but 'half' (RotaryMulKernelNpuOpApi.cpp,
    # aclops/RotaryMulKernelNpu.cpp). (A CANN without the aclnn op: not modelled.)
    if rotary_mode != "half":
        _need(bf16_supported() and not npu.jit_compile,
              f"npu_rotary_mul in aclop only support rotary_mode with half, but got {rotary_mode} "
              f"({npu.device_name}, jit_compile={npu.jit_compile})")
    _need(x.dim() == 4 and r1.dim() == 4 and r2.dim() == 4, "npu_rotary_mul: x, r1 and r2 must be 4-D")
    _float_dtype("npu_rotary_mul x", x)
    _need(r1.dtype == x.dtype and r2.dtype == x.dtype, f"npu_rotary_mul: r1/r2 dtype must equal x's {x.dtype}")
    _need(r1.shape == r2.shape, f"npu_rotary_mul: r1 {tuple(r1.shape)} and r2 {tuple(r2.shape)} differ")
    D = x.shape[-1]
    _need(D % 2 == 0 and D < 896, f"npu_rotary_mul: D must be even and < 896, got {D}")
    fits = []
    for layout, patterns in _ROTARY_MUL_TABLES[rotary_mode].items():
        dims = dict(zip(layout, x.shape))
        for pattern in patterns:
            if tuple(r1.shape) == tuple(1 if c == "1" else dims[c] for c in pattern):
                fits.append(dims)
    _need(bool(fits), f"npu_rotary_mul: tables {tuple(r1.shape)} are not a supported broadcast of x {tuple(x.shape)} "
                      f"in rotary_mode={rotary_mode!r}"
                      + (" (interleave needs fully broadcast 11SD/1S1D/S11D tables)" if rotary_mode == "interleave" else ""))
    if rotary_mode == "half":
        _need(any(d["B"] < 1000 and d["N"] < 1000 for d in fits), "npu_rotary_mul: half mode needs B, N < 1000")
    else:
        _need(any(d["B"] * d["N"] < 1000 for d in fits), "npu_rotary_mul: interleave mode needs B * N < 1000")
    rot = _rotate_half if rotary_mode == "half" else _rotate_interleaved
    xf = x.float()
    return (xf * r1.float() + rot(xf) * r2.float()).to(x.dtype)


_REQUIRED = object()


def npu_apply_rotary_pos_emb(query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                             layout=_REQUIRED, rotary_mode: str = "half"):
    """npu_apply_rotary_pos_emb(Tensor query, Tensor key, Tensor cos, Tensor sin, str layout='BSND',
    str rotary_mode='half') -> (Tensor, Tensor), updating query and key IN PLACE.

    NeoX pairing over the whole last dim: x * cos + rotate_half(x) * sin. BSND: query (b, s, qn, d),
    key (b, s, kn, d), cos/sin (b, s, 1, d); b, s, d equal; one dtype; d 64 or 128; 'half' only on
    A2/A3. The double requires `layout` to be passed (the default changed between releases)."""
    CALLS.append(Call("npu_apply_rotary_pos_emb", dict(query=query, key=key, cos=cos, sin=sin, layout=layout,
                                                       rotary_mode=rotary_mode)))
    _need(layout is not _REQUIRED, "npu_apply_rotary_pos_emb: pass layout explicitly (its default changed "
                                   "between releases)")
    if layout != "BSND":
        _not_modelled(f"npu_apply_rotary_pos_emb layout {layout!r}")
    _need(rotary_mode == "half", f"npu_apply_rotary_pos_emb: rotary_mode {rotary_mode!r}: only 'half' on A2/A3")
    _need(all(t.dim() == 4 for t in (query, key, cos, sin)), "npu_apply_rotary_pos_emb: all inputs must be 4-D")
    _float_dtype("npu_apply_rotary_pos_emb query", query)
    _need(key.dtype == query.dtype and cos.dtype == query.dtype and sin.dtype == query.dtype,
          "npu_apply_rotary_pos_emb: query, key, cos and sin must have one dtype")
    b, s, _, d = query.shape
    _need(d in (64, 128), f"npu_apply_rotary_pos_emb: head dim must be 64 or 128, got {d}")
    _need(key.shape[0] == b and key.shape[1] == s and key.shape[3] == d,
          f"npu_apply_rotary_pos_emb: key {tuple(key.shape)} must share b, s, d with query {tuple(query.shape)}")
    _need(tuple(cos.shape) == (b, s, 1, d) and tuple(sin.shape) == (b, s, 1, d),
          f"npu_apply_rotary_pos_emb: cos/sin must be {(b, s, 1, d)}, got {tuple(cos.shape)}, {tuple(sin.shape)}")
    # "ub_required = (q_n + k_n) * d * cast_size * 5 + d * dtype_size * 4 + cast * d * 8" must fit
    # the AI core's UB (CANN op proto nn_other.h, REG_OP(ApplyRotaryPosEmb)); 192 KiB on A2/A3,
    # taken for every product here (double's choice where the figure is not documented).
    dtype_size = torch.finfo(query.dtype).bits // 8
    cast = 1 if query.dtype == torch.bfloat16 else 0
    ub_required = (query.shape[2] + key.shape[2]) * d * (4 if cast else dtype_size) * 5 + d * dtype_size * 4 + cast * d * 8
    _need(ub_required <= UB_BYTES, f"npu_apply_rotary_pos_emb: ub_required {ub_required} exceeds the UB ({UB_BYTES} bytes)")
    c, sn = cos.float(), sin.float()
    q_out = query.float() * c + _rotate_half(query.float()) * sn
    k_out = key.float() * c + _rotate_half(key.float()) * sn
    query.copy_(q_out)
    key.copy_(k_out)
    return query, key


# ----------------------------------------------------------------------------- npu_swiglu
def npu_swiglu(self: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """npu_swiglu(Tensor self, int dim=-1) -> Tensor: silu(A) * B, A/B the halves of x along dim.
    x: 1-8 dims, fp16/bf16/fp32, contiguous, not empty, its `dim` size even."""
    x = self
    CALLS.append(Call("npu_swiglu", dict(x=x, dim=dim)))
    _float_dtype("npu_swiglu x", x)
    _need(1 <= x.dim() <= 8, f"npu_swiglu: 1-8 dims, got {x.dim()}")
    _need(-x.dim() <= dim < x.dim(), f"npu_swiglu: dim {dim} out of range for {x.dim()} dims")
    _need(x.is_contiguous(), "npu_swiglu: the input must be contiguous")
    _need(x.numel() > 0, "npu_swiglu: empty input")
    _need(x.shape[dim] % 2 == 0, f"npu_swiglu: size {x.shape[dim]} along dim {dim} is odd")
    a, b = x.float().chunk(2, dim=dim)
    return (torch.nn.functional.silu(a) * b).to(x.dtype)


# ----------------------------------------------------------------------------- attention
_FIA_UNMODELLED = ("pse_shift", "actual_seq_lengths", "dequant_scale1", "quant_scale1", "dequant_scale2",
                   "quant_scale2", "quant_offset2", "antiquant_scale", "antiquant_offset", "key_antiquant_scale",
                   "key_antiquant_offset", "value_antiquant_scale", "value_antiquant_offset", "block_table",
                   "query_padding_size", "kv_padding_size", "key_shared_prefix", "value_shared_prefix",
                   "actual_shared_prefix_len", "query_rope", "key_rope", "key_rope_antiquant_scale")
INT_MAX = 2147483647


def npu_fused_infer_attention_score(
        query, key, value, *, pse_shift=None, atten_mask=None, actual_seq_lengths=None, actual_seq_lengths_kv=None,
        dequant_scale1=None, quant_scale1=None, dequant_scale2=None, quant_scale2=None, quant_offset2=None,
        antiquant_scale=None, antiquant_offset=None, key_antiquant_scale=None, key_antiquant_offset=None,
        value_antiquant_scale=None, value_antiquant_offset=None, block_table=None, query_padding_size=None,
        kv_padding_size=None, key_shared_prefix=None, value_shared_prefix=None, actual_shared_prefix_len=None,
        query_rope=None, key_rope=None, key_rope_antiquant_scale=None, num_heads=1, scale=1.0,
        pre_tokens=INT_MAX, next_tokens=INT_MAX, input_layout="BSH", num_key_value_heads=0, sparse_mode=0,
        inner_precise=0, block_size=0, antiquant_mode=0, key_antiquant_mode=0, value_antiquant_mode=0,
        softmax_lse_flag=False):
    """npu_fused_infer_attention_score(...) -> (attention_out, softmax_lse); Atlas A2/A3.

    softmax(scale * q k^T, masked) v, per query head h over KV group h // (num_heads / kv heads).
    Modelled: layouts BSH/BSND/BNSD, float16/bfloat16 q/k/v (contiguous, k and v of one shape),
    atten_mask bool/int8/uint8 with 1 = masked in the documented shapes, sparse_mode 0,
    actual_seq_lengths_kv, inner_precise, softmax_lse_flag. scale defaults to 1.0 (not 1/sqrt(d));
    num_heads defaults to 1 and must equal the query's head count; num_key_value_heads 0 means
    num_heads, must divide it with a ratio <= 64 and equal the key's head count.
    Rows whose every key is masked: zeros with row-invalid correction (inner_precise 2/3), else
    unspecified ("precision may be lost") -> NaN here (double's choice)."""
    args = dict(locals())
    CALLS.append(Call("npu_fused_infer_attention_score", args))
    for name in _FIA_UNMODELLED:
        if args[name] is not None:
            _not_modelled(f"npu_fused_infer_attention_score's {name}")
    if input_layout not in ("BSH", "BSND", "BNSD"):
        _not_modelled(f"input_layout {input_layout!r}")
    _need(sparse_mode in (0, 1, 2, 3, 4), f"sparse_mode {sparse_mode} is not 0-4")
    if sparse_mode != 0:
        if sparse_mode in (2, 3, 4):
            _need(atten_mask is not None and tuple(atten_mask.shape[-2:]) == (2048, 2048),
                  f"sparse_mode {sparse_mode} takes the compressed 2048x2048 lower-triangular atten_mask")
        _not_modelled(f"sparse_mode {sparse_mode}")
    if (pre_tokens, next_tokens) != (INT_MAX, INT_MAX):
        _not_modelled("pre_tokens/next_tokens bands")
    _need(block_size == 0 and antiquant_mode == 0 and key_antiquant_mode == 0 and value_antiquant_mode == 0,
          "block_size / antiquant modes need page attention or quantized KV (not modelled)")
    _float_dtype("query", query, HALVES)
    _need(key.dtype == query.dtype and value.dtype == query.dtype,
          f"key/value dtype ({key.dtype}, {value.dtype}) must equal query's {query.dtype} (no int8 KV here)")
    for name, t in (("query", query), ("key", key), ("value", value)):
        _need(t.is_contiguous(), f"npu_fused_infer_attention_score: {name} must be contiguous")
    _need(key.shape == value.shape, f"key {tuple(key.shape)} and value {tuple(value.shape)} must have one shape")
    _need(isinstance(num_heads, int) and num_heads >= 1, f"num_heads must be a positive int, got {num_heads!r}")
    kv_heads = num_key_value_heads or num_heads

    if input_layout == "BSH":
        _need(query.dim() == 3 and key.dim() == 3, "BSH inputs are 3-D")
        _need(query.shape[2] % num_heads == 0, f"H {query.shape[2]} is not a multiple of num_heads {num_heads}")
        D = query.shape[2] // num_heads
        _need(key.shape[2] == kv_heads * D, f"key H {key.shape[2]} != num_key_value_heads * D = {kv_heads * D}")
        q = query.unflatten(-1, (num_heads, D)).transpose(1, 2)  # (B, N, Sq, D)
        k = key.unflatten(-1, (kv_heads, D)).transpose(1, 2)
        v = value.unflatten(-1, (kv_heads, D)).transpose(1, 2)
    else:
        _need(query.dim() == 4 and key.dim() == 4, f"{input_layout} inputs are 4-D")
        to_bnsd = (lambda t: t.transpose(1, 2)) if input_layout == "BSND" else (lambda t: t)
        q, k, v = to_bnsd(query), to_bnsd(key), to_bnsd(value)  # (B, N, S, D)
        _need(q.shape[1] == num_heads, f"num_heads={num_heads} but the query has {q.shape[1]} heads "
                                       f"({input_layout} {tuple(query.shape)})")
        _need(k.shape[1] == kv_heads, f"num_key_value_heads={num_key_value_heads} but the key has {k.shape[1]} heads "
                                      f"({input_layout} {tuple(key.shape)})")
        _need(k.shape[3] == q.shape[3], "query and key head dims differ")
    B, N, Sq, D = q.shape
    Skv = k.shape[2]
    _need(k.shape[0] == B, f"key batch {k.shape[0]} != query batch {B}")
    _need(N % kv_heads == 0 and N // kv_heads <= 64,
          f"num_heads {N} must be a multiple of num_key_value_heads {kv_heads}, ratio <= 64")
    _need(N <= 256 and D <= 512, f"at most 256 heads and head dim 512, got N={N}, D={D}")
    if Sq > 1:
        _need(D % 16 == 0, f"Q_S > 1 with float16/bfloat16 inputs needs D a multiple of 16, got {D}")
        _need(B <= 65536, f"batch {B} > 65536")
        if input_layout in ("BSH", "BSND"):
            _need(N * D < 65535, f"Q_S > 1 in layout {input_layout} needs N*D < 65535, got {N * D}")
        _need(inner_precise in (0, 1, 2, 3), f"inner_precise {inner_precise} is not 0-3")
    else:
        _need(inner_precise in (0, 1), f"Q_S = 1 takes inner_precise 0 or 1, got {inner_precise}")
        _need(B <= 65536 and Skv <= 262144, f"Q_S = 1 takes B <= 65536 and KV_S <= 262144, got B={B}, KV_S={Skv}")
    _need(isinstance(scale, (int, float)), f"scale must be a float, got {type(scale).__name__}")

    # The mask, broadcast to (B, 1, Sq, Skv); shapes as documented, sizes may be rounded up.
    masked = torch.zeros(B, 1, Sq, Skv, dtype=torch.bool, device=q.device)
    if atten_mask is not None:
        _need(atten_mask.dtype in (torch.bool, torch.int8, torch.uint8), f"atten_mask dtype {atten_mask.dtype}")
        _need(atten_mask.is_contiguous(), "atten_mask must be contiguous")
        m = atten_mask
        # sparse_mode 0/1: (1, Q_S, KV_S), (B, 1, Q_S, KV_S), (1, 1, Q_S, KV_S); also (Q_S, KV_S)
        # when Q_S > 1 and (B, KV_S) when Q_S = 1. Q_S and KV_S may be rounded up (alignment).
        if m.dim() == 2 and Sq > 1:
            m = m[None, None]
        elif m.dim() == 2:
            _need(m.shape[0] == B, f"atten_mask {tuple(m.shape)}: the 2-D form for Q_S = 1 is (B, KV_S), B={B}")
            m = m[:, None, None, :]
        elif m.dim() == 3:
            _need(m.shape[0] == 1, f"atten_mask {tuple(m.shape)}: the 3-D form is (1, Q_S, KV_S)")
            m = m[None]
        else:
            _need(m.dim() == 4 and m.shape[0] in (1, B) and m.shape[1] == 1,
                  f"atten_mask {tuple(m.shape)}: takes (1, Q_S, KV_S), (B, 1, Q_S, KV_S) or (1, 1, Q_S, KV_S)")
        _need(m.shape[-2] >= Sq and m.shape[-1] >= Skv,
              f"atten_mask {tuple(atten_mask.shape)} is smaller than Q_S={Sq} x KV_S={Skv}")
        m = m[..., :Sq, :Skv]
        masked = masked | m.bool()
    if actual_seq_lengths_kv is not None:
        lengths = list(actual_seq_lengths_kv)
        _need(len(lengths) == 1 or len(lengths) >= B, f"actual_seq_lengths_kv has {len(lengths)} entries for batch {B}")
        lengths = lengths * B if len(lengths) == 1 else lengths[:B]
        _need(all(0 <= int(n) <= Skv for n in lengths), f"actual_seq_lengths_kv {lengths} exceeds KV_S={Skv}")
        beyond = torch.arange(Skv, device=q.device)[None, :] >= torch.tensor(lengths, device=q.device)[:, None]
        masked = masked | beyond[:, None, None, :]

    group = N // kv_heads
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    scores = torch.matmul(q.float(), kf.transpose(-1, -2)) * float(scale)  # (B, N, Sq, Skv)
    scores = scores.masked_fill(masked, float("-inf"))
    row_dead = masked.all(dim=-1, keepdim=True)  # (B, 1, Sq, 1)
    probs = torch.softmax(scores.masked_fill(row_dead, 0.0), dim=-1)
    out = torch.matmul(probs, vf)
    out = out.masked_fill(row_dead, 0.0 if inner_precise & 2 else float("nan")).to(query.dtype)
    if input_layout == "BSH":
        out = out.transpose(1, 2).flatten(-2)
    elif input_layout == "BSND":
        out = out.transpose(1, 2)
    if softmax_lse_flag:
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    else:
        lse = torch.zeros(1, dtype=torch.float32, device=q.device)
    return out.contiguous(), lse


# ----------------------------------------------------------------------------- weight-only quantized matmul
def npu_convert_weight_to_int4pack(weight: torch.Tensor, inner_k_tiles: int = 0) -> torch.Tensor:
    """npu_convert_weight_to_int4pack(Tensor weight, int inner_k_tiles=0) -> Tensor

    int32 (k, n) (or (n, k)) values in [-8, 7], contiguous, last dim a multiple of 8 -> int32
    (k, n/8), eight int4 per int32. The documentation does not spell out the bit order; the
    double puts element 8c+j in nibble j, lowest first (double's choice; only
    npu_weight_quant_batchmatmul reads it)."""
    CALLS.append(Call("npu_convert_weight_to_int4pack", dict(weight=weight, inner_k_tiles=inner_k_tiles)))
    _need(weight.dtype == torch.int32, f"npu_convert_weight_to_int4pack takes int32, got {weight.dtype}")
    _need(weight.dim() == 2, "npu_convert_weight_to_int4pack takes a 2-D weight")
    _need(weight.is_contiguous(), "npu_convert_weight_to_int4pack: the weight must be contiguous")
    _need(weight.shape[-1] % 8 == 0, f"npu_convert_weight_to_int4pack: last dim {weight.shape[-1]} not 8-aligned")
    _need(bool(((weight >= -8) & (weight <= 7)).all()), "npu_convert_weight_to_int4pack: values outside [-8, 7]")
    nibbles = (weight.to(torch.int64) & 0xF).unflatten(-1, (-1, 8))  # (k, n/8, 8)
    shifts = torch.arange(0, 32, 4, device=weight.device, dtype=torch.int64)
    packed = (nibbles << shifts).sum(-1)  # 0 .. 2^32 - 1
    return torch.where(packed >= 2 ** 31, packed - 2 ** 32, packed).to(torch.int32)


def _unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int64)
    nibbles = (packed.to(torch.int64)[..., None] >> shifts) & 0xF  # (k, n/8, 8)
    values = torch.where(nibbles >= 8, nibbles - 16, nibbles)
    return values.flatten(-2)  # (k, n)


def _is_transposed(t: torch.Tensor) -> bool:
    """IsTransposeLastTwoDims: a 2-D view whose storage is the contiguous (cols, rows) matrix."""
    return t.dim() == 2 and not t.is_contiguous() and t.t().is_contiguous()


def _antiquant_param_as_read(name: str, t: torch.Tensor, weight_transposed: bool) -> torch.Tensor:
    """antiquant_scale / antiquant_offset as aclnnWeightQuantBatchMatmulV2 reads them.

    Weight not transposed: the tensor must be contiguous (else ACLNN_ERR_PARAM_INVALID).
    Weight transposed: the op makes a view with the last two dims swapped over the tensor's storage
    at its offset, taken as contiguous (CreateTransposedView), whatever the tensor's strides: the
    transposed view of a contiguous (N, G) reads right; a contiguous (G, N) with G > 1 is read as
    another matrix, silently. 1-D tensors are taken as they are."""
    if not weight_transposed:
        _need(t.is_contiguous(), f"only support {name} tensor is contiguous or transpose last two dims. "
                                 f"({name} {tuple(t.shape)} strides {t.stride()} next to a contiguous weight)")
        return t
    if t.dim() == 1:
        return t
    rows, cols = t.shape
    return t.as_strided((cols, rows), (rows, 1), t.storage_offset()).t()  # what the kernel reads, (rows, cols)


def npu_weight_quant_batchmatmul(x, weight, antiquant_scale, antiquant_offset=None, quant_scale=None,
                                 quant_offset=None, bias=None, antiquant_group_size=0, inner_precise=0,
                                 weight_dtype=None):
    """npu_weight_quant_batchmatmul(Tensor x, Tensor weight, Tensor antiquant_scale, Tensor? antiquant_offset=None,
    Tensor? quant_scale=None, Tensor? quant_offset=None, Tensor? bias=None, int antiquant_group_size=0,
    int inner_precise=0, int? weight_dtype=None) -> Tensor      (Atlas A2/A3)

    y = x @ ((weight + antiquant_offset) * antiquant_scale) + bias, in x's dtype.
    x: 2-D (M, K) float16/bfloat16. weight: (K, N) int8 (a transposed view is fine), or int32
    (K, N/8) from npu_convert_weight_to_int4pack. The scale's layout must follow the weight's: a
    contiguous scale next to a contiguous weight; next to a transposed weight the scale's storage
    is read as the contiguous (N, G) (see _antiquant_param_as_read). K, N in [1, 65535]. antiquant_scale: x's dtype,
    (1,)/(1, 1) per tensor, (N,)/(1, N) per channel, (ceil(K/g), N) per group with g =
    antiquant_group_size a multiple of 32 in [32, K-1]; antiquant_offset: scale's shape and dtype.
    bias: (N,) or (1, N), contiguous, float32 with bfloat16 x, float16 with float16 x."""
    CALLS.append(Call("npu_weight_quant_batchmatmul", dict(
        x=x, weight=weight, antiquant_scale=antiquant_scale, antiquant_offset=antiquant_offset, bias=bias,
        antiquant_group_size=antiquant_group_size, inner_precise=inner_precise)))
    if quant_scale is not None or quant_offset is not None:
        _not_modelled("output quantization (quant_scale/quant_offset)")
    if weight_dtype is not None:
        _not_modelled("weight_dtype")
    _need(x.dim() == 2, f"x must be 2-D (M, K), got {tuple(x.shape)}")
    _float_dtype("x", x, HALVES)
    M, K = x.shape
    _need(M >= 1, "empty x")
    _need(weight.dim() == 2, f"weight must be 2-D, got {tuple(weight.shape)}")
    weight_transposed = _is_transposed(weight)
    _need(weight_transposed or weight.is_contiguous(),
          "only support weight tensor is contiguous or transpose last two dims.")
    if weight.dtype == torch.int8:
        _need(weight.shape[0] == K, f"weight must be (K, N) = ({K}, N); got {tuple(weight.shape)} "
                                    "(an (N, K) linear weight must be passed transposed)")
        N = weight.shape[1]
        values = weight.to(torch.float32)
    elif weight.dtype == torch.int32:
        _need(weight.is_contiguous(), "the double models the (K, N/8) int4 pack only, not its transposed form")
        _need(weight.shape[0] == K, f"int4-packed weight must be (K, N/8) = ({K}, N/8); got {tuple(weight.shape)}")
        N = weight.shape[1] * 8
        values = _unpack_int4(weight).to(torch.float32)
    else:
        raise ContractError(f"weight dtype {weight.dtype}: int8, or int32 carrying int4")
    _need(1 <= K <= 65535 and 1 <= N <= 65535, f"K and N must be in [1, 65535], got K={K}, N={N}")
    if antiquant_scale.dtype == torch.int64:
        _not_modelled("int64 antiquant_scale")
    _need(antiquant_scale.dtype == x.dtype, f"antiquant_scale dtype {antiquant_scale.dtype} must equal x's {x.dtype}")
    g = antiquant_group_size
    shape = tuple(antiquant_scale.shape)
    if g:
        _need(g % 32 == 0 and 32 <= g <= K - 1, f"antiquant_group_size {g} must be a multiple of 32 in [32, K-1={K - 1}]")
        _need(shape == (math.ceil(K / g), N), f"per-group antiquant_scale must be (ceil(K/g), N) = "
                                              f"({math.ceil(K / g)}, {N}), got {shape}")
    else:
        _need(shape in ((1,), (1, 1), (N,), (1, N)), f"antiquant_scale {shape}: per tensor (1,), per channel (N,) or (1, N)")
    if antiquant_offset is not None:
        _need(tuple(antiquant_offset.shape) == shape and antiquant_offset.dtype == antiquant_scale.dtype,
              "antiquant_offset must have antiquant_scale's shape and dtype")
    # The scale's (and offset's) layout follows the weight's, as aclnnWeightQuantBatchMatmulV2 reads
    # them on A2/A3/310P (hicann/ops-nn matmul/weight_quant_batch_matmul_v2/op_host/op_api/
    # aclnn_weight_quant_batch_matmul_v2.cpp: AntiQuantScaleAndOffsetContiguousCheck, CheckContiguous).
    antiquant_scale = _antiquant_param_as_read("antiquant_scale", antiquant_scale, weight_transposed)
    if g:
        scale = antiquant_scale.float().repeat_interleave(g, dim=0)[:K]  # (K, N)
    else:
        scale = antiquant_scale.float().reshape(1, -1)
    if antiquant_offset is not None:
        offset = _antiquant_param_as_read("antiquant_offset", antiquant_offset, weight_transposed).float()
        values = values + (offset.repeat_interleave(g, dim=0)[:K] if g else offset.reshape(1, -1))
    if bias is not None:
        want = torch.float32 if x.dtype == torch.bfloat16 else torch.float16
        _need(bias.dtype == want, f"bias dtype {bias.dtype}: with {x.dtype} x the bias must be {want}")
        _need(tuple(bias.shape) in ((N,), (1, N)), f"bias must be (N,) or (1, N), got {tuple(bias.shape)}")
        _need(bias.is_contiguous(), "bias must be contiguous")
    _need(inner_precise in (0, 1), f"inner_precise {inner_precise} is not 0 or 1")
    y = x.float() @ (values * scale)
    if bias is not None:
        y = y + bias.float().reshape(1, -1)
    return y.to(x.dtype)
