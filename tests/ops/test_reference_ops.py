"""The torch reference ops checked against independent formulas written here from the published
descriptions (never against the graph itself)."""

import math

import pytest
import torch

from glmrt import ops
from glmrt.graph import Node


def rope_node(kind, nh=4, nkv=2, hd=16, rotary_dim=8, base=10000.0, table_dtype="float32"):
    return Node("rope", "rope", ["qkv"], ["q", "k", "v"],
                attrs=dict(kind=kind, rotary_dim=rotary_dim, head_dim=hd, num_heads=nh, num_kv_heads=nkv, base=base,
                           table_dtype=table_dtype))


def release_angles(positions, rotary_dim, base):
    """pos * theta_i as the releases compute it: an fp32 product (so large positions carry the
    same fp32 rounding as the original code); everything after it in fp64."""
    theta = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
    return (positions.float()[..., None] * theta).double()  # (B, T, rd/2)


def gptj_rotate_complex(x, positions, rotary_dim, base):
    """GPT-J pairing as complex multiplication: (x[2i] + i x[2i+1]) * exp(i * pos * theta_i)."""
    ang = release_angles(positions, rotary_dim, base)
    z = torch.complex(x[..., 0:rotary_dim:2].double(), x[..., 1:rotary_dim:2].double())
    z = z * torch.polar(torch.ones_like(ang), ang)[:, :, None, :]
    out = x.double().clone()
    out[..., 0:rotary_dim:2] = z.real
    out[..., 1:rotary_dim:2] = z.imag
    return out


def neox_rotate_complex(x, positions, rotary_dim, base):
    """NeoX pairing: dims i and i + rd/2 form the complex pair."""
    half = rotary_dim // 2
    ang = release_angles(positions, rotary_dim, base)
    z = torch.complex(x[..., :half].double(), x[..., half:rotary_dim].double())
    z = z * torch.polar(torch.ones_like(ang), ang)[:, :, None, :]
    out = x.double().clone()
    out[..., :half] = z.real
    out[..., half:rotary_dim] = z.imag
    return out


@pytest.mark.parametrize("kind,oracle", [("interleaved", gptj_rotate_complex), ("half", neox_rotate_complex)])
@pytest.mark.parametrize("rotary_dim", [8, 16])
def test_rope_matches_complex_rotation(kind, oracle, rotary_dim, rng):
    B, T, nh, nkv, hd = 2, 5, 4, 2, 16
    node = rope_node(kind, nh, nkv, hd, rotary_dim, base=500.0)
    qkv = torch.randn(B, T, (nh + 2 * nkv) * hd, generator=rng, dtype=torch.float64).float()
    pos = torch.tensor([[0, 1, 2, 3, 4], [7, 100, 1000, 4096, 70000]])
    ctx = ops.ForwardContext(positions=pos, allowed=torch.ones(B, 1, T, T, dtype=torch.bool))
    q, k, v = ops.rope(ctx, node, [qkv], {})
    q0, k0, v0 = qkv.split((nh * hd, nkv * hd, nkv * hd), dim=-1)
    torch.testing.assert_close(q.double(), oracle(q0.unflatten(-1, (nh, hd)), pos, rotary_dim, 500.0),
                               atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(k.double(), oracle(k0.unflatten(-1, (nkv, hd)), pos, rotary_dim, 500.0),
                               atol=2e-5, rtol=1e-5)
    assert torch.equal(v, v0.unflatten(-1, (nkv, hd)))
    # Dims beyond rotary_dim pass through untouched.
    assert torch.equal(q[..., rotary_dim:], q0.unflatten(-1, (nh, hd))[..., rotary_dim:])


def test_attention_matches_naive_loop(rng):
    """GQA attention against a per-head loop with explicit softmax, causal + padding mask."""
    B, T, nh, nkv, hd = 2, 6, 4, 2, 8
    q = torch.randn(B, T, nh, hd, generator=rng)
    k = torch.randn(B, T, nkv, hd, generator=rng)
    v = torch.randn(B, T, nkv, hd, generator=rng)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :2] = False
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    allowed = causal[None, None] & valid[:, None, None, :]
    node = Node("a", "attention", ["q", "k", "v"], ["o"],
                attrs=dict(layer_index=0, num_heads=nh, num_kv_heads=nkv, head_dim=hd, scale=1 / math.sqrt(hd),
                           scaling="standard", mask_kind="causal"))
    out = ops.attention(ops.ForwardContext(positions=None, allowed=allowed), node, [q, k, v], {})
    expect = torch.zeros(B, T, nh, hd)
    for b in range(B):
        for h in range(nh):
            g = h // (nh // nkv)
            for t in range(T):
                keys = [s for s in range(T) if s <= t and valid[b, s]]
                if not keys:
                    continue
                scores = torch.stack([q[b, t, h] @ k[b, s, g] / math.sqrt(hd) for s in keys])
                p = torch.softmax(scores, 0)
                expect[b, t, h] = sum(p[i] * v[b, s, g] for i, s in enumerate(keys))
    got = out.unflatten(-1, (nh, hd))
    torch.testing.assert_close(got[0], expect[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1, 2:], expect[1, 2:], atol=1e-5, rtol=1e-5)


def test_kv_cache_decode_equals_full_attention(rng):
    B, T, nh, nkv, hd = 1, 7, 4, 1, 8
    q = torch.randn(B, T, nh, hd, generator=rng)
    k = torch.randn(B, T, nkv, hd, generator=rng)
    v = torch.randn(B, T, nkv, hd, generator=rng)
    node = Node("a", "attention", ["q", "k", "v"], ["o"],
                attrs=dict(layer_index=0, num_heads=nh, num_kv_heads=nkv, head_dim=hd, scale=1 / math.sqrt(hd),
                           scaling="standard", mask_kind="causal"))
    allowed = torch.tril(torch.ones(T, T, dtype=torch.bool))[None, None]
    full = ops.attention(ops.ForwardContext(positions=None, allowed=allowed), node, [q, k, v], {})
    cache = ops.KVCache(1, B, nkv, T, hd, torch.float32, torch.device("cpu"))
    steps = []
    for t in range(T):
        ctx = ops.ForwardContext(positions=None, allowed=torch.ones(B, 1, 1, t + 1, dtype=torch.bool), cache=cache,
                                 cache_pos=t)
        steps.append(ops.attention(ctx, node, [q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1]], {}))
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_rounding_modes(dtype, rng):
    x = torch.randn(3, 64, generator=rng).to(dtype)
    w = (1 + 0.1 * torch.randn(64, generator=rng)).to(dtype)
    x64 = x.double()
    normed = x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5)
    thudm = ops.rms_norm(x, w, 1e-5, round_before_weight=False)
    # THUDM: fp32 all the way, one rounding at the end -> within one fp32 ulp before that rounding.
    want = (normed * w.double()).float()
    torch.testing.assert_close(thudm.float(), want.to(dtype).float(), atol=1e-6, rtol=2 ** -7 if dtype != torch.float32
                               else 1e-6)
    # transformers: round the normalized value to the model dtype, then multiply in the model dtype.
    hf = ops.rms_norm(x, w, 1e-5, round_before_weight=True)
    want_hf = (w * normed.float().to(dtype))
    assert hf.dtype == dtype
    torch.testing.assert_close(hf, want_hf, atol=1e-6, rtol=1e-6)


def test_activations_follow_each_release(rng):
    x = torch.randn(2, 3, 8, generator=rng)
    a, b = x[..., :4], x[..., 4:]
    node = lambda kind: Node("act", "activation", ["x"], ["y"], attrs={"kind": kind})  # noqa: E731
    ctx = ops.ForwardContext(positions=None, allowed=None)
    torch.testing.assert_close(ops.activation(ctx, node("swiglu"), [x], {}), a * torch.sigmoid(a) * b)
    erf_gelu = 0.5 * b * (1 + torch.erf(b / math.sqrt(2)))
    torch.testing.assert_close(ops.activation(ctx, node("geglu"), [x], {}), a * erf_gelu)
    tanh_gelu = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    torch.testing.assert_close(ops.activation(ctx, node("gelu_tanh"), [x], {}), tanh_gelu)
