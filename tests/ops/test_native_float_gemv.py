"""_native_cpu.linear_float (the float-weight decode GEMV) and its plan kernels, against float64.

The kernel widens bf16 / fp16 exactly to fp32, multiplies and sums in fp32, adds the bias in fp32
and rounds once to the dtype. So against the float64 result it may differ by half an ulp of the
output dtype plus fp32 summation error (checked as 1e-5 of sum |x * w|, generous for K <= 5000).
Every instruction-set path the CPU has runs the same checks; the M == 1 AVX-512 path takes four
weight rows at once, so N not a multiple of 4 exercises its tail.
"""

from __future__ import annotations

import pytest
import torch

from glmrt import _native, ops
from glmrt.graph import Node, ValueSpec

native, why = _native.load("_native_cpu")
pytestmark = pytest.mark.glmrt_native(available=native is not None and hasattr(native, "linear_float"),
                                      reason=f"native CPU module with linear_float not built: {why}")

HALF_ULP = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}  # unit roundoff


def isas():
    if native is None or not hasattr(native, "linear_float"):
        return []
    order = ["scalar", "avx2", "avx512"]
    return order[:order.index(native.linear_float_isa()) + 1]


@pytest.fixture(params=isas())
def isa(request):
    best = native.linear_float_isa()
    assert native.set_linear_float_isa(request.param)
    yield request.param
    native.set_linear_float_isa(best)


def check(out, x, w, b):
    ref = x.double() @ w.double().T + (b.double() if b is not None else 0)  # (M, N)
    terms = x.double().abs() @ w.double().abs().T + (b.double().abs() if b is not None else 0)
    bound = ref.abs() * HALF_ULP[out.dtype] * 1.0001 + 1e-5 * terms + 1e-30
    err = (out.double() - ref).abs()
    assert bool((err <= bound).all()), f"max error {err.max().item()} vs bound {bound[err > bound].min().item()}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (1, 7, 15), (1, 9, 17), (1, 64, 4096), (1, 130, 1000), (2, 5, 77),
                                   (8, 33, 300), (3, 4, 64)])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_float_matches_float64(isa, dtype, m, n, k, bias):
    g = torch.Generator().manual_seed(m * 1000 + n * 10 + k)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    out = torch.empty(m, n, dtype=dtype)
    native.linear_float(x.data_ptr(), w.data_ptr(), b.data_ptr() if bias else 0, out.data_ptr(),
                        _native.DTYPE_CODES[dtype], m, n, k)
    check(out, x, w, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", [(19, 4104), (8, 1000), (3, 77), (17, 2056)])
def test_linear_float_rows_equal_each_row_alone_for_every_m(isa, dtype, n, k):
    """M = 1..8 (odd M too): each output row is bit for bit what the same x row gives alone (the
    serving engine's batch invariance), and within the float64 bound. The shapes cover K blocks
    (k = 4104: the K-blocked multi-row path splits it), an 8-wide remainder (k % 16 == 8), a scalar
    tail (k % 8 != 0), and a last tile of output rows shorter than the others (n % 8 != 0)."""
    g = torch.Generator().manual_seed(n * 7 + k)
    x = torch.randn(native.FLOAT_GEMV_MAX_M, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype)
    code = _native.DTYPE_CODES[dtype]
    alone = torch.empty(native.FLOAT_GEMV_MAX_M, n, dtype=dtype)
    for i in range(native.FLOAT_GEMV_MAX_M):
        native.linear_float(x[i].data_ptr(), w.data_ptr(), b.data_ptr(), alone[i].data_ptr(), code, 1, n, k)
    check(alone, x, w, b)
    for m in range(2, native.FLOAT_GEMV_MAX_M + 1):
        out = torch.empty(m, n, dtype=dtype)
        native.linear_float(x.data_ptr(), w.data_ptr(), b.data_ptr(), out.data_ptr(), code, m, n, k)
        assert torch.equal(out, alone[:m]), f"M={m}: rows differ from the rows alone"


def test_linear_float_refuses_too_many_rows():
    m = native.FLOAT_GEMV_MAX_M + 1
    x, w, out = torch.zeros(m, 4), torch.zeros(2, 4), torch.zeros(m, 2)
    with pytest.raises(ValueError, match="FLOAT_GEMV_MAX_M"):
        native.linear_float(x.data_ptr(), w.data_ptr(), 0, out.data_ptr(), 0, m, 2, 4)
    with pytest.raises(ValueError, match="dtype code"):
        native.linear_float(x.data_ptr(), w.data_ptr(), 0, out.data_ptr(), 7, 1, 2, 4)


# ----------------------------------------------------------------------------- plan kernels
def _kernel(op):
    from glmrt.backends.cpu import CPUBackend

    return next(k for k in CPUBackend().kernels() if k.op == op and k.name == "native.float_gemv")


def linear_node(k, n, dtype, quant=None):
    attrs = {} if quant is None else {"quant": quant}
    return Node("layers.0.attn.dense", "linear", ["x"], ["y"], {"weight": "w"}, attrs=attrs,
                input_specs=[ValueSpec(("B", "T", k), dtype)], output_specs=[ValueSpec(("B", "T", n), dtype)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [1, 3, 9])  # 9 rows: prefill, torch's F.linear
def test_linear_kernel_equals_reference_within_rounding(dtype, t):
    g = torch.Generator().manual_seed(t)
    x = torch.randn(1, t, 96, generator=g).to(dtype)
    params = {"weight": torch.randn(50, 96, generator=g).to(dtype), "bias": torch.randn(50, generator=g).to(dtype)}
    node = linear_node(96, 50, dtype)
    got = _kernel("linear").fn(None, node, [x], params)
    want = ops.linear(None, node, [x], params)
    assert got.shape == want.shape == (1, t, 50) and got.dtype == dtype
    if t > native.FLOAT_GEMV_MAX_M:
        assert torch.equal(got, want)  # the reference path itself
    check(got.reshape(t, 50), x.reshape(t, 96), params["weight"], params["bias"])


def test_linear_kernel_mixed_dtypes_take_the_reference():
    x = torch.randn(1, 1, 32).to(torch.bfloat16)
    params = {"weight": torch.randn(8, 32)}  # float32 weight under bf16 activations
    node = linear_node(32, 8, torch.bfloat16)
    # The reference path ran: the kernel raises torch's own error for the mix, word for word (not
    # some other RuntimeError, e.g. from a native kernel handed the wrong dtype).
    with pytest.raises(RuntimeError) as torch_error:
        ops.linear(None, node, [x], params)
    with pytest.raises(RuntimeError) as kernel_error:
        _kernel("linear").fn(None, node, [x], params)
    assert str(kernel_error.value) == str(torch_error.value)


def test_supports_refuses_quantized_and_float64():
    k = _kernel("linear")
    assert k.supports(linear_node(32, 8, torch.bfloat16)) is None
    assert "quantized" in k.supports(linear_node(32, 8, torch.bfloat16, quant={"bits": 4, "group_size": 0,
                                                                               "in_features": 32}))
    assert "float64" in k.supports(linear_node(32, 8, torch.float64))


@pytest.mark.parametrize("last_only", [True, False])
def test_lm_head_kernel(last_only):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 64, generator=g).to(torch.bfloat16)
    params = {"weight": torch.randn(301, 64, generator=g).to(torch.bfloat16)}
    node = Node("lm_head", "lm_head", ["h"], ["logits"], {"weight": "w"}, attrs={},
                input_specs=[ValueSpec(("B", "T", 64), torch.bfloat16)],
                output_specs=[ValueSpec(("B", "T", 301), torch.bfloat16)])
    ctx = ops.ForwardContext.__new__(ops.ForwardContext)
    ctx.last_only = last_only
    got = _kernel("lm_head").fn(ctx, node, [x], params)
    want = ops.lm_head(ctx, node, [x], params)
    assert got.shape == want.shape == ((2, 1, 301) if last_only else (2, 3, 301))
    rows = x[:, -1] if last_only else x.reshape(-1, 64)
    check(got.reshape(rows.shape[0], 301), rows, params["weight"], None)
