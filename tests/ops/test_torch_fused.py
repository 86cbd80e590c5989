"""backends/torch_fused.py kernels against the glmrt.ops reference (on the CPU here; the same
test runs on CUDA when GLMRT_TEST_BACKEND=cuda and a GPU is present)."""

import math
import os

import pytest
import torch

from glmrt import ops
from glmrt.backends.torch_fused import sdpa_attention, sdpa_attention_supports
from glmrt.graph import Node, ValueSpec

DEVICE = "cuda" if os.environ.get("GLMRT_TEST_BACKEND") == "cuda" and torch.cuda.is_available() else "cpu"


def node(nh, nkv, hd, scaling="standard", dtype=torch.float32):
    return Node("a", "attention", ["q", "k", "v"], ["o"],
                attrs=dict(layer_index=0, num_heads=nh, num_kv_heads=nkv, head_dim=hd, scale=1 / math.sqrt(hd),
                           scaling=scaling, mask_kind="causal"),
                input_specs=[ValueSpec(("B", "T", nh, hd), dtype)])


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("nh,nkv,hd", [(4, 2, 16), (6, 1, 8), (3, 3, 32)])
def test_sdpa_prefill_and_decode_match_reference(dtype, tol, nh, nkv, hd):
    g = torch.Generator().manual_seed(nh * 100 + hd)
    B, T, L = 2, 7, 12
    n = node(nh, nkv, hd, dtype=dtype)
    q = torch.randn(B, T, nh, hd, generator=g).to(DEVICE, dtype)
    k = torch.randn(B, T, nkv, hd, generator=g).to(DEVICE, dtype)
    v = torch.randn(B, T, nkv, hd, generator=g).to(DEVICE, dtype)
    valid = torch.ones(B, L, dtype=torch.bool, device=DEVICE)
    valid[1, :3] = False  # left padding
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool, device=DEVICE))
    allowed = causal[None, None] & valid[:, None, None, :T]
    results = []
    for fn in (ops.attention, sdpa_attention):
        cache = ops.KVCache(1, B, nkv, L, hd, dtype, torch.device(DEVICE))
        pre = fn(ops.ForwardContext(positions=None, allowed=allowed, cache=cache, cache_pos=0), n, [q, k, v], {})
        steps = []
        for t in range(T, L):  # static-shape decode steps over the whole cache
            x = [torch.randn(B, 1, h, hd, generator=torch.Generator().manual_seed(t)).to(DEVICE, dtype)
                 for h in (nh, nkv, nkv)]
            pos = torch.tensor(t, device=DEVICE)
            step_allowed = (valid & (torch.arange(L, device=DEVICE) <= pos))[:, None, None, :]
            ctx = ops.ForwardContext(positions=None, allowed=step_allowed, cache=cache, cache_pos_t=pos)
            steps.append(fn(ctx, n, x, {}))
        results.append((pre, torch.cat(steps, 1)))
    (ref_pre, ref_dec), (got_pre, got_dec) = results
    real = valid[:, :T]
    torch.testing.assert_close(got_pre[real].float(), ref_pre[real].float(), atol=tol, rtol=tol)
    torch.testing.assert_close(got_dec.float(), ref_dec.float(), atol=tol, rtol=tol)
    assert torch.isfinite(got_pre).all(), "padding rows must stay finite (they reach the KV cache)"


def test_sdpa_refuses_layer_scaling():
    assert "layer-scaled" in sdpa_attention_supports(node(4, 4, 8, scaling="layer_scaled"))
    assert sdpa_attention_supports(node(4, 2, 8)) is None
