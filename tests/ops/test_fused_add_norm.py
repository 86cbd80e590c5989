"""The fused residual + norm op: the reference (glmrt.ops.residual_norm) against the two ops it
replaces, and the native CPU kernel (glmrt._native_cpu.add_norm) against a formula written here,
over odd widths, fp32/bf16/fp16, both RMSNorm rounding conventions, LayerNorm with and without
bias, DeepNorm's alpha != 1, batch 1 and > 1; then whole models on the native kernels."""

import math
import zlib

import pytest
import torch

import glmrt.api
from glmrt import _native, ops
from glmrt.backends import get_backend
from glmrt.fusion import RESIDUAL_NORM
from glmrt.graph import Node, ValueSpec
from glmrt.lowering import lower
from glmrt.model import Model

native, why = _native.load("_native_cpu")
needs_native = pytest.mark.glmrt_native(available=native is not None and hasattr(native, "add_norm"),
                                        reason=f"native CPU module with add_norm not built: {why}")
FP32, BF16, FP16 = torch.float32, torch.bfloat16, torch.float16
ULP = {FP32: 2 ** -23, BF16: 2 ** -8, FP16: 2 ** -11}  # unit roundoff of each dtype


def fused_node(cols, dtype, kind="rmsnorm", round_before_weight=False, alpha=1.0, bias=False, emit=True, eps=1e-5):
    params = {"weight": "w"} | ({"bias": "b"} if bias else {})
    spec = ValueSpec(("B", "T", cols), dtype)
    return Node("layers.0.attn_residual+layers.0.mlp_norm", RESIDUAL_NORM, ["res", "branch"],
                (["h"] if emit else []) + ["y"], params,
                attrs=dict(alpha=alpha, kind=kind, eps=eps, round_before_weight=round_before_weight,
                           emit_residual=emit),
                input_specs=[spec, spec], output_specs=[spec] * (2 if emit else 1))


def expected(res, branch, w, b, alpha, kind, rbw, eps):
    """The fused op written out: each torch elementwise op rounds to the storage dtype; the norm's
    statistics are fp32 math, here in float64 (the kernel's summation order differs)."""
    dtype = res.dtype
    scaled = res if alpha == 1.0 else (res.float() * torch.tensor(alpha, dtype=torch.float32)).to(dtype)
    h = (branch.float() + scaled.float()).to(dtype)
    x = h.double()
    if kind == "layernorm":
        mean = x.mean(-1, keepdim=True)
        normed = (x - mean) / torch.sqrt(((x - mean) ** 2).mean(-1, keepdim=True) + eps)
        y = normed * w.double() + (0 if b is None else b.double())
    else:
        normed = x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + eps)
        y = (w.double() * normed.to(dtype).double()) if rbw else w.double() * normed
    return h, y


SHAPES = [(1, 1, 1), (1, 1, 7), (1, 3, 37), (2, 5, 64), (1, 1, 4096), (4, 3, 515), (3, 1, 4099)]
NORMS = [("rmsnorm", False, False), ("rmsnorm", True, False), ("layernorm", False, True), ("layernorm", False, False)]


def _data(shape, dtype, bias, seed):
    g = torch.Generator().manual_seed(seed)
    res = (2 * torch.randn(shape, generator=g)).to(dtype)
    branch = torch.randn(shape, generator=g).to(dtype)
    w = (1 + 0.2 * torch.randn(shape[-1], generator=g)).to(dtype)
    b = (0.1 * torch.randn(shape[-1], generator=g)).to(dtype) if bias else None
    return res, branch, w, b


def _kernel():
    return next(k for k in get_backend("cpu").kernels() if k.name == "native.add_norm")


@needs_native
@pytest.mark.parametrize("alpha", [1.0, math.sqrt(2 * 28)])
@pytest.mark.parametrize("kind,rbw,bias", NORMS)
@pytest.mark.parametrize("dtype", [FP32, BF16, FP16])
@pytest.mark.parametrize("shape", SHAPES)
def test_native_add_norm_matches_the_formula(shape, dtype, kind, rbw, bias, alpha):
    res, branch, w, b = _data(shape, dtype, bias, seed=zlib.crc32(repr((shape, str(dtype), kind, rbw, alpha)).encode()))
    node = fused_node(shape[-1], dtype, kind, rbw, alpha, bias)
    kernel = _kernel()
    assert kernel.supports(node) is None
    params = {"weight": w} | ({"bias": b} if bias else {})
    h, y = kernel.fn(None, node, [res, branch], params)
    want_h, want_y = expected(res, branch, w, b, alpha, kind, rbw, 1e-5)
    assert h.dtype == y.dtype == dtype and h.shape == y.shape == res.shape
    # The residual sum is elementwise: exact, and exactly what the unfused residual op gives.
    assert torch.equal(h, want_h)
    assert torch.equal(h, ops.residual(None, node, [res, branch], {}))
    # The norm: fp32 statistics in another order, one final rounding (two with rbw).
    u = ULP[dtype]
    tol = (4 if rbw else 2) * u * want_y.abs() + 64 * ULP[FP32] * (1 + want_y.abs()) + (u if dtype != FP32 else 0)
    err = (y.double() - want_y).abs()
    assert bool((err <= tol).all()), f"max error {err.max().item():.3g} (at tolerance {tol.flatten()[err.argmax()]:.3g})"
    # ... and agrees with the reference op as closely.
    ref_h, ref_y = ops.residual_norm(None, node, [res, branch], params)
    assert torch.equal(h, ref_h)
    assert bool(((y.double() - ref_y.double()).abs() <= 2 * tol).all())


@needs_native
@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_native_add_norm_without_the_residual_output(dtype):
    res, branch, w, _ = _data((2, 3, 96), dtype, False, seed=7)
    node = fused_node(96, dtype, emit=False)
    y = _kernel().fn(None, node, [res, branch], {"weight": w})
    assert isinstance(y, torch.Tensor)
    both = _kernel().fn(None, fused_node(96, dtype), [res, branch], {"weight": w})
    assert torch.equal(y, both[1])
    assert torch.equal(ops.residual_norm(None, node, [res, branch], {"weight": w}),
                       ops.residual_norm(None, fused_node(96, dtype), [res, branch], {"weight": w})[1])


@needs_native
def test_native_add_norm_takes_non_contiguous_inputs():
    res, branch, w, _ = _data((3, 4, 40), BF16, False, seed=9)
    node = fused_node(20, BF16)
    a, c = res[..., ::2], branch[..., 1::2]  # strided views
    h, y = _kernel().fn(None, node, [a, c], {"weight": w[:20]})
    ref_h, ref_y = ops.residual_norm(None, node, [a, c], {"weight": w[:20]})
    assert torch.equal(h, ref_h)
    torch.testing.assert_close(y.float(), ref_y.float(), atol=2 ** -6, rtol=2 ** -7)


@needs_native
def test_native_add_norm_errors_name_the_problem():
    k = _kernel()
    res, branch, w, _ = _data((1, 2, 8), FP32, False, seed=1)
    node = fused_node(8, FP32)
    with pytest.raises(ValueError, match="must have one shape and dtype"):
        k.fn(None, node, [res, branch[..., :4]], {"weight": w})
    with pytest.raises(ValueError, match=r"weight \(7,\)"):
        k.fn(None, node, [res, branch], {"weight": w[:7]})
    with pytest.raises(ValueError, match="RMSNorm takes no bias"):
        k.fn(None, node, [res, branch], {"weight": w, "bias": w})
    assert "norm kind 'groupnorm'" in k.supports(fused_node(8, FP32, kind="groupnorm"))
    assert "float64" in k.supports(fused_node(8, torch.float64))
    with pytest.raises(ValueError, match="kind must be 0"):
        native.add_norm(res.data_ptr(), branch.data_ptr(), 0, 1.0, w.data_ptr(), 0, 0, 0, 0, res.data_ptr(),
                        2, 8, 1e-5, 5, False)


@needs_native
@pytest.mark.parametrize("dtype", [BF16, FP16])
def test_native_add_norm_float32_weight_under_half_activations_gives_the_reference(dtype):
    # round_before_weight with a float32 weight: the reference's output is promoted to float32,
    # which the kernel does not write, so the wrapper runs the reference for this node.
    res, branch, w, _ = _data((2, 3, 40), dtype, False, seed=11)
    node = fused_node(40, dtype, round_before_weight=True)
    params = {"weight": w.float()}
    h, y = _kernel().fn(None, node, [res, branch], params)
    ref_h, ref_y = ops.residual_norm(None, node, [res, branch], params)
    assert y.dtype == ref_y.dtype == FP32
    assert torch.equal(h, ref_h) and torch.equal(y, ref_y)


def test_reference_is_the_two_ops_in_sequence():
    res, branch, w, b = _data((2, 3, 33), FP16, True, seed=4)
    for kind, bias in (("rmsnorm", False), ("layernorm", True)):
        node = fused_node(33, FP16, kind, alpha=7.48, bias=bias)
        params = {"weight": w} | ({"bias": b} if bias else {})
        h, y = ops.residual_norm(None, node, [res, branch], params)
        h2 = ops.residual(None, node, [res, branch], {})
        assert torch.equal(h, h2) and torch.equal(y, ops.norm(None, node, [h2], params))


# ----------------------------------------------------------------------------- whole models
@needs_native
@pytest.mark.parametrize("preset", ["chatglm3-6b", "chatglm-6b"])
def test_whole_model_on_native_kernels_generates_the_reference_tokens(preset):
    model = glmrt.api.load(f"synthetic:{preset}", backend="cpu", layers=2, progress=False)
    fused = [s for s in model.plan.steps if s.node.op == RESIDUAL_NORM]
    assert len(fused) == 4 and {s.impl for s in fused} == {"native.add_norm"}
    # The reference plan of the same (fused) graph and weights: every node on the torch reference.
    reference = Model(model.config, model.graph, lower(model.graph, model.backend, model.weights,
                                                        kernels="reference"), model.weights, model.source)
    gen = torch.Generator().manual_seed(11)
    prompt = torch.randint(5, 20000, (2, 8), generator=gen)
    if model.config.mask_kind == "prefix":
        prompt[:, -2], prompt[:, -1] = model.config.gmask_token_id, model.config.sop_token_id
    got = model.generate(prompt, max_new_tokens=6)
    want = reference.generate(prompt, max_new_tokens=6)
    assert torch.equal(got, want)
