"""glmrt._native_cpu LayerNorm, RoPE and attention kernels.

Each kernel is checked twice: against an independent float64 reference written here from the
published formulas (not glmrt.ops), with a tolerance from the storage dtype's rounding, and against
glmrt.ops' reference on the same node, which it must match bit for bit where the arithmetic is the
same elementwise rounding (RoPE; attention in bf16/fp16 up to fp32 summation order) or to an ulp.
Then whole models (tiny configs of every generation axis, and chatglm3-6b / chatglm-6b at real
widths, 2 layers) must give the same logits and greedy tokens with the native plan as with the
reference plan.
"""

from __future__ import annotations

import math
import os
import zlib

import pytest
import torch

from glmrt import _native, ops
from glmrt.backends import get_backend
from glmrt.backends.base import Backend, ProbeResult, Verification
from glmrt.graph import Node, ValueSpec

native, why = _native.load("_native_cpu")
HAVE_KERNELS = native is not None and all(hasattr(native, f) for f in ("layer_norm", "rope", "attention"))
needs_native = pytest.mark.glmrt_native(available=HAVE_KERNELS, reason=f"native CPU module without these kernels: {why}")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = {d: torch.finfo(d).eps for d in DTYPES}  # one ulp at 1.0


def test_native_layer_kernels_are_built_when_required():
    if os.environ.get("GLMRT_REQUIRE_NATIVE") == "1":
        assert HAVE_KERNELS, why


def kernel(name):
    return next(k for k in get_backend("cpu").kernels() if k.name == name)


def gen(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()))


# ----------------------------------------------------------------------------- LayerNorm
def layer_norm_node(cols, dtype, eps=1e-5):
    return Node("n", "norm", ["x"], ["y"], {"weight": "w", "bias": "b"},
                attrs=dict(kind="layernorm", eps=eps, round_before_weight=False),
                input_specs=[ValueSpec(("B", "T", cols), dtype)], output_specs=[ValueSpec(("B", "T", cols), dtype)])


def layer_norm_formula(x, w, b, eps):
    """(x - mean) / sqrt(var + eps) * w + b, biased variance, in float64."""
    x = x.double()
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps) * w.double()
    return y + b.double() if b is not None else y


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 1, 2), (1, 3, 7), (2, 5, 64), (1, 2, 4096), (3, 1, 12288), (2, 3, 4100)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_native_layer_norm(dtype, shape, with_bias):
    g = gen("ln", shape, str(dtype))
    x = (3 * torch.randn(shape, generator=g) + 0.5).to(dtype)
    w = (1 + 0.3 * torch.randn(shape[-1], generator=g)).to(dtype)
    b = (0.2 * torch.randn(shape[-1], generator=g)).to(dtype) if with_bias else None
    node = layer_norm_node(shape[-1], dtype)
    params = {"weight": w} | ({"bias": b} if with_bias else {})
    k = kernel("native.layer_norm")
    assert k.supports(node) is None
    got = k.fn(None, node, [x], params)
    assert got.dtype == dtype and got.shape == x.shape
    # Independent formula: the result is one rounding of the exact value (plus fp32 arithmetic).
    want = layer_norm_formula(x, w, b, 1e-5)
    scale = want.abs().max().item() + 1
    torch.testing.assert_close(got.double(), want, atol=(EPS[dtype] if dtype != torch.float32 else 1e-5) * scale,
                               rtol=0)
    # glmrt.ops (torch F.layer_norm): the same fp32 arithmetic up to summation order -> one ulp.
    ref = ops.norm(None, node, [x], params)
    torch.testing.assert_close(got.float(), ref.float(), atol=EPS[dtype] * scale if dtype != torch.float32 else 1e-5,
                               rtol=EPS[dtype] if dtype != torch.float32 else 1e-5)


@needs_native
def test_native_layer_norm_fp32_weights_on_bf16_activations():
    g = gen("ln-mixed")
    x = torch.randn(2, 3, 100, generator=g).to(torch.bfloat16)
    w, b = 1 + torch.randn(100, generator=g), torch.randn(100, generator=g)
    node = layer_norm_node(100, torch.bfloat16)
    got = kernel("native.layer_norm").fn(None, node, [x], {"weight": w, "bias": b})
    ref = ops.norm(None, node, [x], {"weight": w, "bias": b})
    assert got.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref.float(), atol=2 * EPS[torch.bfloat16] * ref.abs().max().item(), rtol=0)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
def test_native_layer_norm_propagates_nan_and_inf_like_torch(dtype):
    x = torch.randn(4, 40, generator=torch.Generator().manual_seed(0)).to(dtype)
    x[1, 3], x[2, 7] = float("nan"), float("inf")
    w, b = torch.ones(40, dtype=dtype), torch.zeros(40, dtype=dtype)
    node = layer_norm_node(40, dtype)
    got = kernel("native.layer_norm").fn(None, node, [x], {"weight": w, "bias": b})
    ref = ops.norm(None, node, [x], {"weight": w, "bias": b})
    assert torch.equal(got.isnan(), ref.isnan()) and bool(got[1:3].isnan().all())
    # Two ulps of the largest output (the sums run in another order): outputs reach |3|, where an
    # absolute 2 * eps was tighter than one ulp and failed at random before the seed.
    want = ref[[0, 3]].float()
    torch.testing.assert_close(got[[0, 3]].float(), want, atol=2 * EPS[dtype] * want.abs().max().item(), rtol=0)


@needs_native
def test_norm_kernels_refuse_each_others_kind():
    node = layer_norm_node(8, torch.float32)
    assert kernel("native.layer_norm").supports(node) is None
    assert "RMSNorm" in kernel("native.rms_norm").supports(node)
    node.attrs["kind"] = "rmsnorm"
    assert "not LayerNorm" in kernel("native.layer_norm").supports(node)
    node.attrs["kind"] = "layernorm"
    node.input_specs = [ValueSpec(("B", "T", 8), torch.float64)]
    assert "float64" in kernel("native.layer_norm").supports(node)


# ----------------------------------------------------------------------------- RoPE
def generation_configs():
    """(label, GLMConfig) of every generation's attention shapes, plus odd ones no kernel may assume."""
    from glmrt.config import GLMConfig
    from glmrt.models import config_from_dict, preset

    out = [(name, config_from_dict(preset(name))[1]) for name in
           ("chatglm3-6b", "glm-4-9b", "glm-4-9b-chat-1m", "glm-4-9b-0414", "glm-4-9b-hf", "chatglm-6b", "glm-130b")]
    glm130b = dict(out)["glm-130b"]
    out.append(("glm-130b-2d", glm130b.replace(rope_kind="2d", num_heads=4, num_kv_heads=4)))
    base = dict(generation="odd", num_layers=1, max_positions=64, vocab_size=101, ffn_hidden_size=8, hidden_size=8)
    out += [
        ("odd-interleaved-gqa", GLMConfig(**base, num_heads=6, num_kv_heads=3, head_dim=18, rotary_dim=6)),
        ("odd-half-mqa", GLMConfig(**base, num_heads=5, num_kv_heads=1, head_dim=20, rotary_dim=10, rope_kind="half")),
        ("odd-2d-fp16-tables", GLMConfig(**base, num_heads=3, num_kv_heads=3, head_dim=12, rotary_dim=12,
                                         rope_kind="2d", rope_table_dtype="float16")),
        ("full-interleaved", GLMConfig(**base, num_heads=2, num_kv_heads=2, head_dim=8, rotary_dim=8)),
    ]
    return out


def rope_node(cfg, dtype):
    from glmrt.graph import build_graph

    graph = build_graph(cfg.replace(num_layers=1, hidden_size=8, ffn_hidden_size=8, vocab_size=16), dtype)
    return next(n for n in graph.nodes if n.op == "rope")


def published_angles(positions, dims, base, table_dtype, dtype):
    """Rotation angles as the releases' own code builds them: theta_i = base^(-2i/dims) in fp32;
    the product with the position in fp32 (ChatGLM2+/GLM-4: torch.outer(seq_idx, theta)), or, for
    ChatGLM-6B / GLM-130B, theta rounded to fp16 (a buffer that then takes the model dtype) and
    positions and their product in the model dtype."""
    theta = 1.0 / (base ** (torch.arange(0, dims, 2, dtype=torch.float32) / dims))
    if table_dtype == "float16":
        return (positions.to(dtype)[..., None] * theta.half().to(dtype)).double()
    return (positions.float()[..., None] * theta).double()


def rotate_formula(x, angles, pairing, dtype, table_dtype):
    """x (B, T, H, d) float64; angles (B, T, n): rotate n pairs, (a, b) -> (a cos - b sin, b cos + a sin).
    cos and sin are stored in the model dtype (the releases cast the cache to it, or compute it
    in that dtype)."""
    cos, sin = angles.cos(), angles.sin()
    cos = cos.to(dtype).double()[:, :, None]  # (B, T, 1, n)
    sin = sin.to(dtype).double()[:, :, None]
    n = angles.shape[-1]
    out = x.clone()
    ia = torch.arange(n) * 2 if pairing == "interleaved" else torch.arange(n)
    ib = ia + 1 if pairing == "interleaved" else ia + n
    a, b = x[..., ia], x[..., ib]
    out[..., ia] = a * cos - b * sin
    out[..., ib] = b * cos + a * sin
    return out


def rope_formula(qkv, positions, cfg, dtype):
    nh, nkv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    x = qkv.double()
    q = x[..., :nh * hd].unflatten(-1, (nh, hd))
    k = x[..., nh * hd:(nh + nkv) * hd].unflatten(-1, (nkv, hd))
    v = x[..., (nh + nkv) * hd:].unflatten(-1, (nkv, hd))

    def apply(t):
        if cfg.rope_kind == "2d":  # halves: position, then block position; NeoX pairing in each
            half = hd // 2
            a1 = published_angles(positions[:, 0], half, cfg.rope_base, cfg.rope_table_dtype, dtype)
            a2 = published_angles(positions[:, 1], half, cfg.rope_base, cfg.rope_table_dtype, dtype)
            return torch.cat((rotate_formula(t[..., :half], a1, "half", dtype, cfg.rope_table_dtype),
                              rotate_formula(t[..., half:], a2, "half", dtype, cfg.rope_table_dtype)), dim=-1)
        angles = published_angles(positions, cfg.rotary_dim, cfg.rope_base, cfg.rope_table_dtype, dtype)
        return rotate_formula(t, angles, cfg.rope_kind, dtype, cfg.rope_table_dtype)

    return apply(q), apply(k), v


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("label,cfg", generation_configs(), ids=[c[0] for c in generation_configs()])
@pytest.mark.parametrize("batch,tokens", [(1, 1), (3, 5)])
def test_native_rope(label, cfg, dtype, batch, tokens):
    g = gen("rope", label, str(dtype), batch, tokens)
    node = rope_node(cfg, dtype)
    k = kernel("native.rope")
    assert k.supports(node) is None, k.supports(node)
    qkv = torch.randn(batch, tokens, cfg.qkv_size, generator=g).to(dtype)
    limit = 2048 if cfg.rope_table_dtype == "float16" else 30000
    if cfg.rope_kind == "2d":
        positions = torch.stack((torch.randint(0, limit, (batch, tokens), generator=g),
                                 torch.randint(0, 300, (batch, tokens), generator=g)), dim=1)  # (B, 2, T)
    else:
        positions = torch.randint(0, limit, (batch, tokens), generator=g)  # (B, T)
    got = k.fn(ops.ForwardContext(positions=positions, allowed=None), node, [qkv], {})
    want = ops.rope(ops.ForwardContext(positions=positions, allowed=None), node, [qkv], {})
    for name, a, b in zip("qkv", got, want):
        assert a.shape == b.shape and a.dtype == dtype, name
        # The same elementwise roundings as the reference: bit-identical.
        assert torch.equal(a, b), f"{name}: max diff {(a.float() - b.float()).abs().max().item()}"
    formula = rope_formula(qkv, positions, cfg, dtype)
    for name, a, b in zip("qkv", got, formula):
        # Products and sums rounded to the dtype: a few roundings of |x| at most.
        tol = (4 * EPS[dtype] if dtype != torch.float32 else 1e-6) * b.abs().max().item()
        torch.testing.assert_close(a.double(), b, atol=tol, rtol=0, msg=lambda m: f"{label} {name}: {m}")


@needs_native
def test_native_rope_shares_memoised_tables_with_the_reference():
    cfg = dict(generation_configs())["chatglm3-6b"]
    node = rope_node(cfg, torch.bfloat16)
    ctx = ops.ForwardContext(positions=torch.tensor([[3, 4]]), allowed=None)
    qkv = torch.randn(1, 2, cfg.qkv_size).to(torch.bfloat16)
    kernel("native.rope").fn(ctx, node, [qkv], {})
    assert len(ctx.memo) == 1
    ops.rope(ctx, node, [qkv], {})
    assert len(ctx.memo) == 1  # the reference found the native kernel's tables under its own key


@needs_native
def test_native_rope_takes_a_row_slice_and_refuses_what_it_cannot_run():
    cfg = dict(generation_configs())["odd-half-mqa"]
    node = rope_node(cfg, torch.float32)
    big = torch.randn(2, 6, cfg.qkv_size)
    qkv = big[:, 2:5]  # strided rows
    positions = torch.arange(3)[None].expand(2, 3)
    got = kernel("native.rope").fn(ops.ForwardContext(positions=positions, allowed=None), node, [qkv], {})
    want = ops.rope(ops.ForwardContext(positions=positions, allowed=None), node, [qkv], {})
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    supports = kernel("native.rope").supports
    bad = Node("r", "rope", ["x"], ["q", "k", "v"], attrs=dict(node.attrs, kind="yarn"), input_specs=node.input_specs)
    assert "rope kind 'yarn'" in supports(bad)
    bad.attrs = dict(node.attrs, kind="2d", rotary_dim=10)
    assert "2-D RoPE" in supports(bad)
    bad.attrs = dict(node.attrs, rotary_dim=7)
    assert "rotary_dim 7" in supports(bad)
    bad.attrs = dict(node.attrs, table_dtype="bfloat16")
    assert "table dtype" in supports(bad)
    bad.attrs = dict(node.attrs)
    bad.input_specs = [ValueSpec(("B", "T", cfg.qkv_size), torch.float64)]
    assert "float64" in supports(bad)


# ----------------------------------------------------------------------------- attention
def attention_node(nh, nkv, hd, dtype, scaling="standard", layer=0, mask_kind="causal"):
    return Node("a", "attention", ["q", "k", "v"], ["o"],
                attrs=dict(layer_index=layer, num_heads=nh, num_kv_heads=nkv, head_dim=hd, scale=1.0 / math.sqrt(hd),
                           scaling=scaling, mask_kind=mask_kind),
                input_specs=[ValueSpec(("B", "T", nh, hd), dtype), ValueSpec(("B", "T", nkv, hd), dtype),
                             ValueSpec(("B", "T", nkv, hd), dtype)],
                output_specs=[ValueSpec(("B", "T", nh * hd), dtype)])


def build_mask(batch, q_len, start, total, mask_kind, pad, context):
    """(B, 1, T, S) for queries at start..start+T-1 over keys 0..S-1: causal (s <= t), or GLM's
    prefix mask (also every key before `context`, the <sop> index); left padding of `pad[b]` keys
    is never visible."""
    S = start + q_len
    q_pos = torch.arange(start, S)[:, None]
    k_pos = torch.arange(S)[None, :]
    rows = []
    for b in range(batch):
        real = k_pos >= pad[b]
        allowed = (k_pos <= q_pos) & real
        if mask_kind == "prefix":
            allowed = allowed | ((k_pos < context[b]) & real)
        rows.append(allowed)
    full = torch.stack(rows)[:, None]  # (B, 1, T, S)
    return full[..., :total] if total < S else full


def attention_formula(q, keys, values, allowed, group):
    """softmax over the allowed keys of q . k / sqrt(d), in float64; query head h reads KV head
    h // group; a query that sees no key averages all of them (what masking with a large negative
    number gives). q (B, T, nh, d); keys/values (B, S, nkv, d); allowed (B, T, S)."""
    B, T, nh, d = q.shape
    out = torch.zeros(B, T, nh, d, dtype=torch.float64)
    for h in range(nh):
        kv = h // group
        scores = torch.einsum("btd,bsd->bts", q[:, :, h].double(), keys[:, :, kv].double()) / math.sqrt(d)
        none = ~allowed.any(-1, keepdim=True)
        scores = scores.masked_fill(~(allowed | none), float("-inf")).masked_fill(none, 0.0)
        out[:, :, h] = torch.softmax(scores, -1) @ values[:, :, kv].double()
    return out.flatten(-2)


HEADS = [(32, 2, 128), (5, 1, 20), (3, 3, 12), (8, 2, 64)]  # chatglm2/3 GQA, MQA, MHA, GQA
# (batch, new tokens, cached tokens before them, mode): mode "none" = no cache, "eager" = cache
# slice, "static" = whole preallocated cache under the mask, position as a tensor.
STEPS = [(1, 1, 0, "none"), (3, 6, 0, "none"), (2, 1, 9, "eager"), (1, 1, 40, "eager"), (3, 3, 4, "eager"),
         (2, 6, 0, "eager"), (3, 1, 7, "static")]


def _attention_case(heads, dtype, step, mask_kind, scaling, layer):
    nh, nkv, hd = heads
    B, T, past, mode = step
    g = gen("attn", heads, str(dtype), step, mask_kind, scaling, layer)
    fused = torch.randn(B, T, (nh + 2 * nkv) * hd, generator=g).to(dtype)
    # Views of one fused tensor, as the rope node's v is: the kernel must follow the strides.
    q = fused[..., :nh * hd].unflatten(-1, (nh, hd))
    k = fused[..., nh * hd:(nh + nkv) * hd].unflatten(-1, (nkv, hd))
    v = fused[..., (nh + nkv) * hd:].unflatten(-1, (nkv, hd))
    max_len = past + T + (3 if mode == "static" else 5)
    past_k = torch.randn(B, nkv, past, hd, generator=g).to(dtype)
    past_v = torch.randn(B, nkv, past, hd, generator=g).to(dtype)
    total = past + T
    pad = [0, 2, min(past + T - 1, 3)][:B] if B > 1 else [0]
    if B == 3 and mode == "none":
        pad[2] = 5  # a left-padded row whose first queries see no key at all
    context = [max(pad[b] + 1, total // 2) for b in range(B)]
    allowed = build_mask(B, T, past, total, mask_kind, pad, context)  # (B, 1, T, total)
    if mode == "static":
        allowed = torch.cat((allowed, torch.zeros(B, 1, T, max_len - total, dtype=torch.bool)), dim=-1)

    def ctx():
        if mode == "none":
            return ops.ForwardContext(positions=None, allowed=allowed)
        cache = ops.KVCache(layer + 1, B, nkv, max_len, hd, dtype, torch.device("cpu"))
        cache.k[layer][:, :, :past] = past_k
        cache.v[layer][:, :, :past] = past_v
        cache.k[layer][:, :, total:] = 7.0  # stale slots past the position: masked, never read
        cache.v[layer][:, :, total:] = 7.0
        if mode == "static":
            return ops.ForwardContext(positions=None, allowed=allowed, cache=cache, cache_pos_t=torch.tensor(past))
        return ops.ForwardContext(positions=None, allowed=allowed, cache=cache, cache_pos=past)

    keys = torch.cat((past_k.transpose(1, 2), k), dim=1)  # (B, total, nkv, hd)
    values = torch.cat((past_v.transpose(1, 2), v), dim=1)
    node = attention_node(nh, nkv, hd, dtype, scaling, layer, mask_kind)
    return node, [q, k, v], ctx, keys, values, allowed[:, 0, :, :total]


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", HEADS, ids=[f"nh{a}-nkv{b}-hd{c}" for a, b, c in HEADS])
@pytest.mark.parametrize("step", STEPS, ids=[f"B{b}-T{t}-past{p}-{m}" for b, t, p, m in STEPS])
@pytest.mark.parametrize("mask_kind,scaling,layer", [("causal", "standard", 0), ("prefix", "layer_scaled", 0),
                                                     ("prefix", "layer_scaled", 5), ("prefix", "standard", 1)])
def test_native_attention(dtype, heads, step, mask_kind, scaling, layer):
    node, inputs, make_ctx, keys, values, allowed = _attention_case(heads, dtype, step, mask_kind, scaling, layer)
    k = kernel("native.attention")
    assert k.supports(node) is None
    ctx_native, ctx_ref = make_ctx(), make_ctx()
    got = k.fn(ctx_native, node, inputs, {})
    want = ops.attention(ctx_ref, node, inputs, {})
    nh, nkv, hd = heads
    B, T = inputs[0].shape[:2]
    assert got.shape == (B, T, nh * hd) and got.dtype == dtype
    if ctx_ref.cache is not None:  # the cache holds exactly what the reference wrote
        assert torch.equal(ctx_native.cache.k[node.attrs["layer_index"]], ctx_ref.cache.k[node.attrs["layer_index"]])
        assert torch.equal(ctx_native.cache.v[node.attrs["layer_index"]], ctx_ref.cache.v[node.attrs["layer_index"]])
    vmax = values.abs().max().item()
    # Against glmrt.ops: the same roundings; only the fp32 summation order of the dot products
    # differs, which can flip a rounding of a score or a probability: at most a couple of ulps.
    tol = 2 * EPS[dtype] * vmax if dtype != torch.float32 else 1e-5 * vmax
    torch.testing.assert_close(got.double(), want.double(), atol=tol, rtol=0)
    # Against the float64 formula: scores and probabilities rounded to the dtype (~|score| ulp of
    # the logits), the output rounded once.
    formula = attention_formula(inputs[0], keys, values, allowed, nh // nkv)
    tol = {torch.float32: 2e-5, torch.bfloat16: 4e-2, torch.float16: 6e-3}[dtype] * vmax
    torch.testing.assert_close(got.double(), formula, atol=tol, rtol=0)


@needs_native
def test_native_attention_refusals_and_errors():
    node = attention_node(4, 2, 8, torch.float32)
    supports = kernel("native.attention").supports
    assert supports(node) is None
    assert "scaling 'alibi'" in supports(attention_node(4, 2, 8, torch.float32, scaling="alibi"))
    assert "float64" in supports(attention_node(4, 2, 8, torch.float64))
    q, kv = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 2, 8)
    ctx = ops.ForwardContext(positions=None, allowed=torch.ones(1, 1, 2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask of shape"):
        kernel("native.attention").fn(ctx, node, [q, kv, kv], {})
    ctx = ops.ForwardContext(positions=None, allowed=torch.ones(1, 1, 2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="expected k and v"):
        kernel("native.attention").fn(ctx, node, [q, kv[:, :, :1], kv], {})


# ----------------------------------------------------------------------------- whole models
class ReferenceOnCPU(Backend):
    """Every node on glmrt's plain-torch reference op."""

    name = "reference-cpu"
    device_type = "cpu"

    def probe(self):
        return ProbeResult(True, "host CPU")

    def verification(self):
        return Verification("run-verified", "the reference itself")


def native_and_reference(model):
    from glmrt.lowering import lower
    from glmrt.model import Model

    return model, Model(model.config, model.graph, lower(model.graph, ReferenceOnCPU(), model.weights),
                        model.weights, model.source)


def assert_same_model(model, reference, prompt, new_tokens, rtol):
    natives = {s.impl for s in model.plan.steps if s.kind == "native"}
    assert {"native.rope", "native.attention"} <= natives, natives
    if model.config.norm_kind == "layernorm":
        assert "native.layer_norm" in natives
    got, want = model.logits(prompt), reference.logits(prompt)
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= rtol * scale, (got - want).abs().max().item() / scale
    # Greedy decode over the KV cache, eager and static: the same tokens as the reference plan.
    want_tokens = reference.generate(prompt, max_new_tokens=new_tokens)
    for mode in ("eager", "static"):
        model.decode_mode = mode
        assert torch.equal(model.generate(prompt, max_new_tokens=new_tokens), want_tokens), mode
    return want_tokens


def tiny_prompt(cfg, batch):
    g = gen("prompt", cfg.generation, batch)
    body = torch.randint(5, min(cfg.vocab_size, 90), (batch, 6), generator=g)
    if cfg.mask_kind == "prefix":
        return torch.cat((body, torch.full((batch, 1), cfg.gmask_token_id), torch.full((batch, 1), cfg.sop_token_id)), 1)
    return body


@needs_native
@pytest.mark.parametrize("cfg_name", ["rmsnorm-gqa-interleaved", "layernorm-deepnorm-2d", "sandwich-half-mqa"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_tiny_models_native_plan_matches_reference_plan(cfg_name, dtype):
    from glmrt.api import synthetic_weights
    from glmrt.conformance import tiny_configs
    from glmrt.graph import build_graph
    from glmrt.lowering import lower
    from glmrt.model import Model

    cfg = tiny_configs()[cfg_name].replace(num_layers=3)
    prefix = dict(mask_kind="prefix", gmask_token_id=98, sop_token_id=99, mask_token_id=97)
    if cfg_name == "layernorm-deepnorm-2d":  # ChatGLM-6B's layout: 2-D positions need the prefix mask
        cfg = cfg.replace(**prefix)
    elif cfg_name == "sandwich-half-mqa":  # GLM-130B 1-D: half rotary, prefix mask, layer scaling, LayerNorm
        cfg = cfg.replace(**prefix, attention_scaling="layer_scaled", norm_kind="layernorm")
    graph = build_graph(cfg, dtype)
    weights = synthetic_weights(graph)
    model = Model(cfg, graph, lower(graph, get_backend("cpu"), weights), weights, cfg_name)
    model, reference = native_and_reference(model)
    rtol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
    assert_same_model(model, reference, tiny_prompt(cfg, 2), 6, rtol)


@needs_native
@pytest.mark.parametrize("preset", ["chatglm3-6b", "chatglm-6b"])
def test_real_width_two_layer_models_native_plan_matches_reference_plan(preset):
    import glmrt

    model = glmrt.load(f"synthetic:{preset}", layers=2, backend="cpu", dtype="bfloat16", progress=False)
    model, reference = native_and_reference(model)
    cfg = model.config
    g = gen("prompt", preset)
    body = torch.randint(100, 60000, (1, 12), generator=g)
    prompt = model.build_inputs(body[0].tolist()) if cfg.mask_kind == "prefix" else \
        [cfg.gmask_token_id, cfg.sop_token_id] + body[0].tolist()
    assert_same_model(model, reference, torch.tensor([prompt]), 8, 2e-2)
