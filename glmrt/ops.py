"""Plain-torch reference implementations of every IR op: the oracle for every kernel and backend.

Each implementation has the kernel signature used by plans::

    fn(ctx: ForwardContext, node: Node, inputs: list[Tensor], params: dict[str, Tensor]) -> Tensor | tuple

The arithmetic follows the original model code of each release (dtypes of intermediate results
included), as documented in ../shared/GLM_FAMILY.md; they run on whatever device the tensors are on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .graph import Node

Tensor = torch.Tensor


class KVCache:
    """Preallocated per-layer key/value buffers holding the un-expanded KV groups.

    k[layer], v[layer]: (B, num_kv_heads, max_len, head_dim), written in place."""

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        shape = (batch, num_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def rows(self, start: int, stop: int) -> "KVCache":
        """A view of batch rows [start, stop) of every layer (no copy): what one forward over those
        rows reads and writes (the serving engine's slots)."""
        view = KVCache.__new__(KVCache)
        view.k = [t[start:stop] for t in self.k]
        view.v = [t[start:stop] for t in self.v]
        view.max_len = self.max_len
        return view


@dataclass
class ForwardContext:
    """What one forward step needs besides the node inputs.

    positions: (B, T) position ids, or (B, 2, T) for 2-D RoPE (position, block position).
    allowed:   (B, 1, T, S) bool, True where query t may attend to key s (S = cache_pos + T).
    cache:     the KV cache, or None for a cache-free full forward.
    cache_pos: where this step's keys are written in the cache.
    last_only: compute logits for the last position only (prefill during generation).
    """

    positions: Tensor
    allowed: Tensor
    cache: KVCache | None = None
    cache_pos: int = 0
    last_only: bool = False
    memo: dict = field(default_factory=dict)  # per-step tables shared by all layers (RoPE cos/sin)
    # Static-shape decode (CUDA/NPU graph capture): the cache position as a device tensor; one new
    # token is written at it and attention reads the whole cache under `allowed` (B, 1, 1, max_len).
    cache_pos_t: Tensor | None = None
    # Per-row cache positions (the serving engine's batched decode, rows at different lengths):
    # (B,) int64 on the device; row b writes its T keys at cache_positions[b] + t, and attention
    # reads the first S = allowed.shape[-1] positions of every row under `allowed`. Only attention
    # nodes with attrs["per_row_cache"] (a plan built for it) see such a context.
    cache_positions: Tensor | None = None
    # Each row's result must not depend on the other rows of the batch (the engine's batched
    # decode: a request's tokens are the same whatever it is batched with). Kernels whose
    # arithmetic changes with the row count keep it per row (the CPU float GEMV in chunks of rows).
    row_invariant: bool = False
    # The tensor-parallel communicator (glmrt.distributed.Communicator) the collective nodes of a
    # sharded graph use; execute() sets it from the plan.
    comm: object = None


# ----------------------------------------------------------------------------- embedding / head
def embedding(ctx: ForwardContext, node: Node, inputs: list[Tensor], params: dict[str, Tensor]) -> Tensor:
    start = node.attrs.get("vocab_start")
    if start is None:
        return F.embedding(inputs[0], params["weight"])  # (B, T, H)
    # Vocab-parallel (glmrt.shard): this rank's rows [start, start + vocab_rows); other ids give
    # zeros, and the all_reduce node after sums the ranks' rows.
    local = inputs[0] - start
    mine = (local >= 0) & (local < node.attrs["vocab_rows"])
    out = F.embedding(torch.where(mine, local, torch.zeros_like(local)), params["weight"])
    return out * mine[..., None].to(out.dtype)


def lm_head(ctx: ForwardContext, node: Node, inputs: list[Tensor], params: dict[str, Tensor]) -> Tensor:
    x = inputs[0]
    if ctx.last_only:
        # A 2-D matmul, then the length-1 time axis: torch 2.13's CPU F.linear on the strided
        # (B, 1, H) slice x[:, -1:] takes a slow path (bf16, H 4096, V 65024, 2 threads: 9-19 s, not 0.2 s).
        return F.linear(x[:, -1], params["weight"])[:, None]  # (B, 1, V)
    return F.linear(x, params["weight"])  # (B, T, V)


# ----------------------------------------------------------------------------- norms
def rms_norm(x: Tensor, weight: Tensor, eps: float, round_before_weight: bool) -> Tensor:
    variance = x.float().pow(2).mean(-1, keepdim=True)
    normed = x.float() * torch.rsqrt(variance + eps)
    if round_before_weight:  # transformers glm / glm4
        return weight * normed.to(x.dtype)
    return (weight.float() * normed).to(x.dtype)  # THUDM: fp32 product, rounded once


def norm(ctx: ForwardContext, node: Node, inputs: list[Tensor], params: dict[str, Tensor]) -> Tensor:
    x = inputs[0]
    a = node.attrs
    if a["kind"] == "layernorm":
        return F.layer_norm(x, (x.shape[-1],), params["weight"], params.get("bias"), a["eps"])
    return rms_norm(x, params["weight"], a["eps"], a["round_before_weight"])


# ----------------------------------------------------------------------------- linear / activation
def linear(ctx: ForwardContext, node: Node, inputs: list[Tensor], params: dict[str, Tensor]) -> Tensor:
    x = inputs[0]
    q = node.attrs.get("quant")
    bias = params.get("bias")
    after = bias is not None and node.attrs.get("bias_after_matmul", False)
    if q is None:
        w = params["weight"]
    else:
        # Weight-only quantized: dequantize (see glmrt.quant), then a plain matmul in the model dtype.
        from .quant import dequantize
        w = dequantize(params["weight"], params["scale"], q["bits"], q["group_size"], q["in_features"], x.dtype)
    if after:  # GLM-130B's row-parallel linears: the product rounded, then the bias (glmrt.config)
        return F.linear(x, w) + bias
    return F.linear(x, w, bias)


def activation(ctx: ForwardContext, node: Node, inputs: list[Tensor], params: dict[str, Tensor]) -> Tensor:
    x = inputs[0]
    kind = node.attrs["kind"]
    if kind == "swiglu":  # ChatGLM2+: silu(first half) * second half
        a, b = x.chunk(2, dim=-1)
        return F.silu(a) * b
    if kind == "geglu":  # GLM-130B: first half * gelu(second half)
        a, b = x.chunk(2, dim=-1)
        return a * F.gelu(b)
    if kind == "gelu_tanh":  # ChatGLM-6B
        return F.gelu(x, approximate="tanh")
    raise ValueError(f"unknown activation {kind}")


def residual(ctx: ForwardContext, node: Node, inputs: list[Tensor], params: dict[str, Tensor]) -> Tensor:
    res, branch = inputs
    alpha = node.attrs["alpha"]
    return branch + (res * alpha if alpha != 1.0 else res)


def residual_norm(ctx: ForwardContext, node: Node, inputs: list[Tensor], params: dict[str, Tensor]):
    """The fused node of glmrt.fusion: exactly ``residual`` then ``norm`` (same roundings).
    Returns (h, norm(h)), or norm(h) alone when the node does not emit h (attrs emit_residual)."""
    h = residual(ctx, node, inputs, params)
    y = norm(ctx, node, [h], params)
    return (h, y) if node.attrs.get("emit_residual", True) else y


# ----------------------------------------------------------------------------- rotary embeddings
def rope_tables(positions: Tensor, rotary_dim: int, base: float, dtype: torch.dtype,
                table_dtype: str) -> tuple[Tensor, Tensor]:
    """cos/sin of shape (B, T, rotary_dim // 2), in ``dtype``, for the frequencies 1 / base^(2i / rotary_dim).

    table_dtype "float32" (ChatGLM2 and later, transformers glm/glm4): frequencies, angles and cos/sin
    in fp32, rounded once to ``dtype`` (the releases cast their cached table to the model dtype).

    table_dtype "float16" (ChatGLM-6B, GLM-130B): their RotaryEmbedding rounds inv_freq to fp16 in
    its constructor and registers it as a buffer, which ``model.half()`` / ``.float()`` /
    ``.bfloat16()`` convert along with the weights; the tables are then built at run time in the
    buffer's dtype (``t = arange(seq_len, dtype=inv_freq.dtype)``, their product, cos/sin). So the
    table follows the model dtype from fp16-rounded frequencies:
      float16  - positions, product and cos/sin in fp16 (the released fp16 models);
      float32  - positions x fp16-rounded frequencies, and cos/sin, in fp32;
      bfloat16 - frequencies rounded to fp16 then to bf16, positions rounded to bf16 (exact up to
                 256 only), product and cos/sin in bf16. The originals' ``precision == bfloat16``
                 branch (cos/sin of fp32 angles) is never taken: ChatGLM-6B passes precision=half,
                 SwissArmyTransformer 0.2's GLM-130B mixin half or float.
    """
    idx = torch.arange(0, rotary_dim, 2, device=positions.device, dtype=torch.float32)
    inv_freq = 1.0 / (base ** (idx / rotary_dim))
    if table_dtype == "float16":
        inv_freq = inv_freq.to(torch.float16).to(dtype)
        angles = positions.to(dtype)[..., None] * inv_freq  # (B, T, rd/2), in the model dtype
        return angles.cos(), angles.sin()
    angles = positions.to(torch.float32)[..., None] * inv_freq
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope_interleaved(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """GPT-J pairing on the first 2*cos.shape[-1] dims: (x[2i], x[2i+1]) rotate by angle i.
    x: (B, T, heads, head_dim); cos/sin: (B, T, rotary_dim // 2)."""
    rd = cos.shape[-1] * 2
    rot, rest = x[..., :rd], x[..., rd:]
    pairs = rot.unflatten(-1, (rd // 2, 2))  # (B, T, heads, rd/2, 2)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = torch.stack((x0 * c - x1 * s, x1 * c + x0 * s), dim=-1).flatten(-2)
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


def apply_rope_half(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """NeoX pairing on the first 2*cos.shape[-1] dims: x*cos + rotate_half(x)*sin,
    with cos/sin tables repeated as cat(freqs, freqs)."""
    rd = cos.shape[-1] * 2
    rot, rest = x[..., :rd], x[..., rd:]
    c = torch.cat((cos, cos), dim=-1)[:, :, None, :]
    s = torch.cat((sin, sin), dim=-1)[:, :, None, :]
    x1, x2 = rot[..., : rd // 2], rot[..., rd // 2:]
    out = rot * c + torch.cat((-x2, x1), dim=-1) * s
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


def rope(ctx: ForwardContext, node: Node, inputs: list[Tensor], params: dict[str, Tensor]):
    """Split fused qkv (B, T, (nh + 2*nkv) * hd) into q (B,T,nh,hd), k, v (B,T,nkv,hd); rotate q, k."""
    a = node.attrs
    qkv = inputs[0]
    hd, nh, nkv = a["head_dim"], a["num_heads"], a["num_kv_heads"]
    q, k, v = qkv.split((nh * hd, nkv * hd, nkv * hd), dim=-1)
    q = q.unflatten(-1, (nh, hd))
    k = k.unflatten(-1, (nkv, hd))
    v = v.unflatten(-1, (nkv, hd))
    kind = a["kind"]
    key = ("rope", kind, a["rotary_dim"], a["base"], a["table_dtype"], q.dtype)
    tables = ctx.memo.get(key)
    if kind == "2d":
        # ChatGLM-6B: first half of the head rotated by position, second half by block position,
        # each half with NeoX pairing over head_dim/2 dims.
        if tables is None:
            half = a["head_dim"] // 2
            tables = (rope_tables(ctx.positions[:, 0], half, a["base"], q.dtype, a["table_dtype"]),
                      rope_tables(ctx.positions[:, 1], half, a["base"], q.dtype, a["table_dtype"]))
            ctx.memo[key] = tables
        (c1, s1), (c2, s2) = tables

        def rot2d(x: Tensor) -> Tensor:
            x1, x2 = x.chunk(2, dim=-1)
            return torch.cat((apply_rope_half(x1, c1, s1), apply_rope_half(x2, c2, s2)), dim=-1)

        return rot2d(q), rot2d(k), v
    if tables is None:
        tables = rope_tables(ctx.positions, a["rotary_dim"], a["base"], q.dtype, a["table_dtype"])
        ctx.memo[key] = tables
    cos, sin = tables
    apply = apply_rope_interleaved if kind == "interleaved" else apply_rope_half
    return apply(q, cos, sin), apply(k, cos, sin), v


# ----------------------------------------------------------------------------- attention
def update_kv_cache(ctx: ForwardContext, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Write this step's keys and values (B, T, nkv, hd) into the layer's cache and return what
    attention reads: (B, nkv, S, hd) views of the cache. Static decode (ctx.cache_pos_t, graph
    capture) writes at the device position and returns all max_len positions, which ctx.allowed
    masks; per-row positions (ctx.cache_positions, the serving engine) write each row at its own
    position and return the first allowed.shape[-1] positions; otherwise the slice at ctx.cache_pos
    is written and the first pos + T returned. Every attention kernel (reference and native) writes the cache through this one function."""
    keys, values = ctx.cache.k[layer], ctx.cache.v[layer]  # (B, nkv, max_len, hd)
    if ctx.cache_positions is not None:
        B, T = k.shape[:2]
        rows = torch.arange(B, device=k.device)[:, None]  # (B, 1)
        cols = ctx.cache_positions[:, None] + torch.arange(T, device=k.device)  # (B, T)
        keys[rows, :, cols] = k  # the indexed view is (B, T, nkv, hd), as k is
        values[rows, :, cols] = v
        S = ctx.allowed.shape[-1]
        return keys[:, :, :S], values[:, :, :S]
    if ctx.cache_pos_t is not None:
        index = ctx.cache_pos_t.view(1)
        keys.index_copy_(2, index, k.transpose(1, 2))
        values.index_copy_(2, index, v.transpose(1, 2))
        return keys, values
    pos, T = ctx.cache_pos, k.shape[1]
    keys[:, :, pos:pos + T] = k.transpose(1, 2)
    values[:, :, pos:pos + T] = v.transpose(1, 2)
    return keys[:, :, :pos + T], values[:, :, :pos + T]


def attention(ctx: ForwardContext, node: Node, inputs: list[Tensor], params: dict[str, Tensor]) -> Tensor:
    """Grouped-query attention over the cache (if any) with an explicit boolean mask.

    q: (B, T, nh, hd); k, v: (B, T, nkv, hd) -> (B, T, nh * hd). Two precision rules, each the
    original code's: GLM-130B and ChatGLM-6B ("layer_scaled") round the scores to the model dtype
    and take the softmax in fp32; ChatGLM2/3 and GLM-4 (THUDM's code on torch >= 2) and the
    transformers `glm`/`glm4` models call F.scaled_dot_product_attention, whose flash kernels (CPU
    and CUDA alike) keep the scores in fp32, round the unnormalised exp(score - max) to the model
    dtype for the product with V (fp32 accumulation) and divide by the fp32 sum of the exps at the
    end: the "standard" rule does exactly that (in fp32 it is the plain softmax)."""
    a = node.attrs
    q, k, v = inputs
    B, T, nh, hd = q.shape
    nkv = a["num_kv_heads"]
    if ctx.cache is not None:
        k, v = update_kv_cache(ctx, a["layer_index"], k, v)  # (B, nkv, S, hd)
    else:
        k = k.transpose(1, 2)  # (B, nkv, T, hd)
        v = v.transpose(1, 2)
    group = nh // nkv
    if group > 1:  # query head h reads KV group h // group
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    q = q.transpose(1, 2)  # (B, nh, T, hd)
    allowed = ctx.allowed  # (B, 1, T, S)
    if a["scaling"] == "layer_scaled":
        # GLM-130B / ChatGLM-6B: q / (sqrt(hd) * c), scores in model dtype, -10000 fill,
        # softmax(scores.float() * c), c = layer index + 1.
        c = float(a["layer_index"] + 1)
        scores = torch.matmul(q / (hd ** 0.5 * c), k.transpose(-1, -2))  # (B, nh, T, S)
        scores = scores.masked_fill(~allowed, -10000.0)
        probs = torch.softmax(scores.float() * c, dim=-1).to(q.dtype)
    else:
        dtype = q.dtype
        q, k, v = q.float(), k.float(), v.float()
        scores = torch.matmul(q, k.transpose(-1, -2)) * a["scale"]  # (B, nh, T, S), fp32
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        e = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
        out = (torch.matmul(e.to(dtype).float(), v) / e.sum(dim=-1, keepdim=True)).to(dtype)
        return out.transpose(1, 2).reshape(B, T, nh * hd)
    out = torch.matmul(probs, v)  # (B, nh, T, hd)
    return out.transpose(1, 2).reshape(B, T, nh * hd)


# ----------------------------------------------------------------------------- collectives (glmrt.shard)
def _comm(ctx: ForwardContext, node: Node):
    if ctx.comm is None:
        from .errors import BackendError
        raise BackendError(f"{node.name} is a tensor-parallel collective but the plan has no communicator: load the "
                           "model with glmrt.load(..., tensor_parallel=N) inside a torchrun process group")
    return ctx.comm


def all_reduce(ctx: ForwardContext, node: Node, inputs: list[Tensor], params: dict[str, Tensor]) -> Tensor:
    """Sum of the ranks' partial outputs, then the full bias of the row-parallel linear (once)."""
    out = _comm(ctx, node).all_reduce(inputs[0], node.name)
    bias = params.get("bias")
    return out + bias if bias is not None else out


def all_gather(ctx: ForwardContext, node: Node, inputs: list[Tensor], params: dict[str, Tensor]) -> Tensor:
    """The ranks' vocabulary slices of the logits side by side, the padding trimmed: (B, T, V)."""
    out = _comm(ctx, node).all_gather(inputs[0], node.name)
    return out[..., :node.attrs["vocab_size"]]


KernelFn = Callable[[ForwardContext, Node, list, dict], object]

REFERENCE: dict[str, KernelFn] = {
    "embedding": embedding,
    "norm": norm,
    "linear": linear,
    "rope": rope,
    "attention": attention,
    "activation": activation,
    "residual": residual,
    "residual_norm": residual_norm,
    "lm_head": lm_head,
}

# The tensor-parallel collectives (glmrt.shard): not kernels a backend offers, but the process
# group's operations (lowering binds them for every backend that declares a collective_backend).
COLLECTIVES: dict[str, KernelFn] = {
    "all_reduce": all_reduce,
    "all_gather": all_gather,
}
