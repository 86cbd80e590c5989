"""The CPU backend's prefill GEMM paths (backends/cpu/kernels.py PREFILL): native dequantize_rows
against glmrt.quant.dequantize bit for bit, and the panel GEMMs of quantized and float linears
against the reference linear (glmrt.ops.linear) within what their arithmetic implies."""

from __future__ import annotations

import pytest
import torch

from glmrt import _native, ops, quant
from glmrt.backends.cpu import kernels

native = _native.load("_native_cpu")[0]
pytestmark = pytest.mark.glmrt_native(available=native is not None and hasattr(native, "dequantize_rows"),
                                      reason="glmrt._native_cpu with dequantize_rows is not built")
CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _quantized(bits, n, k, group, scale_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    lo, hi = (-128, 128) if bits == 8 else (-8, 8)
    q = torch.randint(lo, hi, (n, k), generator=g, dtype=torch.int16)
    w = q.to(torch.int8) if bits == 8 else quant.pack_int4(q.to(torch.int8))
    groups = 1 if group == 0 else -(-k // group)
    scale = (0.01 + 0.02 * torch.rand(n, groups, generator=g)).to(scale_dtype)
    return w.contiguous(), (scale[:, 0] if group == 0 else scale).contiguous()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group", [0, 32, 128])
@pytest.mark.parametrize("k", [1, 15, 16, 33, 257, 4096])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_rows_equals_the_reference(bits, group, k, out_dtype):
    n = 37
    scale_dtype = [torch.float16, torch.bfloat16, torch.float32][(k + group) % 3]
    w, scale = _quantized(bits, n, k, group, scale_dtype, seed=k * 7 + bits + group)
    want = quant.dequantize(w, scale, bits, group, k, out_dtype)  # (N, K)
    n0, n1, ld = 3, 29, k + 5  # a row range and a padded leading dimension
    out = torch.full((n1 - n0, ld), 7.0, dtype=out_dtype)
    native.dequantize_rows(bits, w.data_ptr(), scale.data_ptr(), CODES[scale_dtype], n, k, group, n0, n1,
                           out.data_ptr(), CODES[out_dtype], ld)
    assert torch.equal(out[:, :k], want[n0:n1]), native.dequantize_rows_isa()
    assert (out[:, k:] == 7).all()  # nothing written past K


def test_dequantize_rows_refuses_bad_ranges():
    w, scale = _quantized(8, 4, 32, 0, torch.float32, 0)
    out = torch.empty(4, 32)
    for n0, n1, ld, group in ((0, 5, 32, 0), (3, 2, 32, 0), (0, 4, 31, 0), (0, 4, 32, 48)):
        with pytest.raises(ValueError):
            native.dequantize_rows(8, w.data_ptr(), scale.data_ptr(), 0, 4, 32, group, n0, n1, out.data_ptr(), 0, ld)


def test_default_prefill_follows_the_cpu():
    assert kernels.default_prefill({"avx2"}) == {"quant": "by-size", "float": "fp32-panel"}
    assert kernels.default_prefill({"avx2", "avx512_vnni"}) == {"quant": "integer", "float": "fp32-panel"}
    assert kernels.default_prefill(set()) == {"quant": "integer", "float": "fp32-panel"}
    assert kernels.default_prefill({"avx512f", "avx512_bf16"}) == {"quant": "integer", "float": "torch"}
    assert kernels.default_prefill({"amx_bf16", "amx_tile"}) == {"quant": "bf16-panel", "float": "torch"}
    assert kernels.default_prefill({"avx2"}, "quant=fp32-panel, float=torch") == {"quant": "fp32-panel",
                                                                                  "float": "torch"}
    with pytest.raises(ValueError, match="GLMRT_CPU_PREFILL"):
        kernels.default_prefill(set(), "quant=fast")


class _Ctx:
    row_invariant = False


def test_by_size_picks_the_measured_path_per_format_and_rows(monkeypatch):
    """"by-size" reads QUANT_PANEL_FROM_M per (bits, group-wise): the fp32 panel from that row count
    on, the integer kernel below it and for formats without an entry; other paths ignore M."""
    # The table covers every format the native kernels take.
    assert set(kernels.QUANT_PANEL_FROM_M) == {(8, True), (8, False), (4, True), (4, False)}
    monkeypatch.setitem(kernels.PREFILL, "quant", "by-size")
    monkeypatch.setattr(kernels, "QUANT_PANEL_FROM_M", {(8, True): 256, (8, False): None, (4, True): 64})
    assert [kernels.quant_prefill_path(8, 32, m) for m in (9, 255, 256, 512)] == \
        ["integer", "integer", "fp32-panel", "fp32-panel"]
    assert kernels.quant_prefill_path(8, 0, 4096) == "integer"
    assert kernels.quant_prefill_path(4, 128, 64) == "fp32-panel"
    assert kernels.quant_prefill_path(4, 0, 4096) == "integer"
    monkeypatch.setitem(kernels.PREFILL, "quant", "bf16-panel")
    assert kernels.quant_prefill_path(8, 0, 9) == "bf16-panel"


def test_by_size_runs_the_chosen_path(monkeypatch):
    monkeypatch.setitem(kernels.PREFILL, "quant", "by-size")
    monkeypatch.setattr(kernels, "QUANT_PANEL_FROM_M", {(4, True): 16})
    k, n = 64, 40
    w, scale = _quantized(4, n, k, 32, torch.float16, 3)
    params, node = {"weight": w, "scale": scale}, _node(True, k, n, torch.float32)
    x = torch.randn(1, 20, k)

    def run(path, rows):
        with monkeypatch.context() as m:
            m.setitem(kernels.PREFILL, "quant", path)
            return kernels.native_quant_linear(_Ctx(), node, [x[:, :rows]], params)

    assert torch.equal(kernels.native_quant_linear(_Ctx(), node, [x], params), run("fp32-panel", 20))
    assert torch.equal(kernels.native_quant_linear(_Ctx(), node, [x[:, :15]], params), run("integer", 15))
    assert not torch.equal(run("fp32-panel", 20), run("integer", 20))


def _node(quantized, k, n, dtype, bits=4, group=32):
    from glmrt.graph import Node, ValueSpec
    attrs = {"quant": {"bits": bits, "group_size": group, "in_features": k}} if quantized else {}
    return Node("l", "linear", ["x"], ["y"], attrs=attrs, input_specs=[ValueSpec(("B", "T", k), dtype)],
                output_specs=[ValueSpec(("B", "T", n), dtype)])


@pytest.fixture
def prefill(monkeypatch):
    def use(kind, path, rows=None):
        monkeypatch.setitem(kernels.PREFILL, kind, path)
        if rows:
            monkeypatch.setattr(kernels, "PREFILL_PANEL_ROWS", rows)
    return use


@pytest.mark.parametrize("path", ["fp32-panel", "bf16-panel"])
@pytest.mark.parametrize("bits,group", [(4, 32), (8, 0), (8, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_quantized_panel_gemm_matches_the_reference(prefill, path, bits, group, dtype):
    m, n, k = 19, 300, 256  # m > PREFILL_GEMM_MIN_M; panels of 128 rows: 3 panels, the last partial
    prefill("quant", path, rows=128)
    w, scale = _quantized(bits, n, k, group, torch.float16, seed=bits + group)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    node = _node(True, k, n, dtype, bits, group)
    params = {"weight": w, "scale": scale, "bias": bias}
    got = kernels.native_quant_linear(_Ctx(), node, [x], params)
    assert got.shape == (1, m, n) and got.dtype == dtype
    # Reference: the dequantized weight in fp64, as exactly as the values allow.
    wd = quant.dequantize(w, scale, bits, group, k, torch.float64)
    exact = x.double()[0] @ wd.T + bias.double()
    magnitude = x.double()[0].abs() @ wd.abs().T + bias.double().abs()
    if path == "bf16-panel" and dtype == torch.bfloat16:
        tol = 2 * 2.0**-8 * magnitude + 2.0**-8 * exact.abs()  # bf16 weights (the reference's), bf16 outputs
    else:
        tol = 1e-5 * magnitude + (2.0**-8 if dtype == torch.bfloat16 else 0) * exact.abs() + 1e-6
    assert ((got[0].double() - exact).abs() <= tol).all()
    ref = ops.linear(_Ctx(), node, [x], params)  # glmrt's reference: dequantize to x.dtype, F.linear
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2 * ref.float().abs().max().item())


def test_quantized_prefill_keeps_the_integer_kernel_for_decode_and_row_invariant(prefill):
    prefill("quant", "fp32-panel")
    k, n = 64, 40
    w, scale = _quantized(4, n, k, 32, torch.float16, 3)
    params = {"weight": w, "scale": scale}
    node = _node(True, k, n, torch.float32)
    x = torch.randn(1, 12, k)
    panel = kernels.native_quant_linear(_Ctx(), node, [x], params)
    ctx = _Ctx()
    ctx.row_invariant = True
    rows = kernels.native_quant_linear(ctx, node, [x], params)  # the integer kernel, row by row alike
    prefill("quant", "integer")
    integer = kernels.native_quant_linear(_Ctx(), node, [x], params)
    assert torch.equal(rows, integer) and not torch.equal(panel, integer)
    torch.testing.assert_close(panel, integer, rtol=0.05, atol=0.05 * integer.abs().max().item())


def _row_gemm(x, w, b):
    m, k = x.shape
    out = torch.empty((m, w.shape[0]), dtype=torch.float16)
    native.linear_float_gemm(x.data_ptr(), w.data_ptr(), 0 if b is None else b.data_ptr(), out.data_ptr(), 2, m,
                             w.shape[0], k)
    return out


def _gemv(x, w, b):
    m, k = x.shape
    out = torch.empty((m, w.shape[0]), dtype=torch.float16)
    native.linear_float(x.data_ptr(), w.data_ptr(), 0 if b is None else b.data_ptr(), out.data_ptr(), 2, m,
                        w.shape[0], k)
    return out


# A build without linear_float_gemm fails under GLMRT_REQUIRE_NATIVE=1 (the marker); a CPU whose GEMV
# takes another ISA (AVX-512) skips: the GEMM reproduces the AVX2 GEMV's sums only.
ROW_GEMM_BUILT = native is not None and hasattr(native, "linear_float_gemm")
ROW_GEMM_ON_AVX2 = ROW_GEMM_BUILT and kernels._row_gemm_ready(native)


def needs_row_gemm(test):
    test = pytest.mark.skipif(not ROW_GEMM_ON_AVX2, reason="linear_float_gemm needs AVX2 and the GEMV on its AVX2 "
                              "path (this CPU's GEMV sums in another order)")(test)
    return pytest.mark.glmrt_native(available=ROW_GEMM_BUILT,
                                    reason="glmrt._native_cpu with linear_float_gemm is not built")(test)


# K: below one step of 16, remainders of 8-15 and 1-7, one K chunk exactly, several chunks and a tail;
# M: one block of 6 rows, partial blocks, more than one group of 16 blocks (with several K chunks).
@needs_row_gemm
@pytest.mark.parametrize("m,n,k", [(1, 5, 3), (9, 33, 16), (13, 17, 40), (20, 50, 101), (12, 16, 4096),
                                   (31, 21, 4096 * 2 + 24 + 5), (100, 19, 4096 + 24)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_float16_row_gemm_is_the_decode_gemv_bit_for_bit(m, n, k, with_bias):
    """native linear_float_gemm (fp16 prefill) against the decode GEMV (linear_float) on the same rows
    taken <= 8 at a time: equal bit for bit (the guarantee batch invariance rests on), and both
    within one fp16 rounding plus fp32 summation error of the exact fp64 product."""
    g = torch.Generator().manual_seed(m * 131 + k)
    x, w = torch.randn(m, k, generator=g).half(), torch.randn(n, k, generator=g).half()
    b = torch.randn(n, generator=g).half() if with_bias else None
    got = _row_gemm(x, w, b)
    limit = native.FLOAT_GEMV_MAX_M
    want = torch.cat([_gemv(x[i:i + limit].contiguous(), w, b) for i in range(0, m, limit)])
    assert torch.equal(got, want)
    assert torch.equal(got[-1:], _gemv(x[-1:].contiguous(), w, b))  # the decode case, M = 1
    exact = x.double() @ w.double().T + (0 if b is None else b.double())
    magnitude = x.double().abs() @ w.double().abs().T + (0 if b is None else b.double().abs())
    # fp16 rounding once (2^-11 relative, 2^-25 absolute at the subnormal end); fp32 sums of at
    # most k / 16 + 12 additions per chain and tree (2^-24 each, relative to the magnitude).
    tol = 2.0**-11 * exact.abs() + 2.0**-24 * (k / 16 + 12) * magnitude + 2.0**-25
    assert ((got.double() - exact).abs() <= tol).all()


def test_float16_row_gemm_refuses_other_dtypes():
    x = torch.zeros(4, 16)
    with pytest.raises(ValueError, match="float16 only"):
        native.linear_float_gemm(x.data_ptr(), x.data_ptr(), 0, x.data_ptr(), 0, 4, 4, 16)


@needs_row_gemm
def test_float16_prefill_rows_do_not_depend_on_the_batch(prefill):
    """Batch invariance at the op: a (3, 7) fp16 batch (21 rows: the prefill GEMM) gives each
    sequence exactly what it gives alone (7 rows: the decode GEMV), linears and the LM head."""
    prefill("float", "fp32-panel")
    k, n = 40, 24
    g = torch.Generator().manual_seed(5)
    x, w, b = torch.randn(3, 7, k, generator=g).half(), torch.randn(n, k, generator=g).half(), \
        torch.randn(n, generator=g).half()
    node = _node(False, k, n, torch.float16)
    batch = kernels.native_float_linear(_Ctx(), node, [x], {"weight": w, "bias": b})
    assert kernels._float_panel_gemm(x.reshape(-1, k), w, b) is not None  # the batch took the GEMM
    for i in range(3):
        assert torch.equal(batch[i:i + 1], kernels.native_float_linear(_Ctx(), node, [x[i:i + 1]], {"weight": w,
                                                                                                   "bias": b}))
    ctx = type("Ctx", (), {"row_invariant": False, "last_only": False})()
    head = kernels.native_lm_head(ctx, node, [x], {"weight": w})
    for i in range(3):
        assert torch.equal(head[i:i + 1], kernels.native_lm_head(ctx, node, [x[i:i + 1]], {"weight": w}))


@needs_row_gemm
def test_float16_row_invariant_takes_the_row_gemm_beyond_the_gemv():
    """Under row_invariant (the serving engine's batched decode) 13 fp16 rows take the GEMM in one
    pass, each row what it is alone."""
    g = torch.Generator().manual_seed(6)
    x, w, b = torch.randn(13, 1, 48, generator=g).half(), torch.randn(30, 48, generator=g).half(), \
        torch.randn(30, generator=g).half()
    ctx = _Ctx()
    ctx.row_invariant = True
    node = _node(False, 48, 30, torch.float16)
    batched = kernels.native_float_linear(ctx, node, [x], {"weight": w, "bias": b})
    assert torch.equal(batched[:, 0], _row_gemm(x[:, 0].contiguous(), w, b))
    for i in range(13):
        assert torch.equal(batched[i], kernels.native_float_linear(ctx, node, [x[i:i + 1]], {"weight": w,
                                                                                            "bias": b})[0])


def test_float16_prefill_without_the_row_gemm_keeps_f_linear(prefill, monkeypatch):
    """Where linear_float_gemm cannot run (no AVX2, or a GEMV summing in another order), fp16 never
    takes the fp32 panel: F.linear runs (None here), bf16 still takes the panel."""
    x, w = torch.randn(12, 32).half(), torch.randn(20, 32).half()
    prefill("float", "torch")
    assert kernels._float_panel_gemm(x, w, None) is None  # PREFILL float=torch: F.linear for every dtype
    prefill("float", "fp32-panel")
    monkeypatch.setattr(kernels, "_row_gemm_ready", lambda module: False)
    assert kernels._float_panel_gemm(x, w, None) is None
    assert kernels._float_panel_gemm(x.bfloat16(), w.bfloat16(), None) is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_float_panel_gemm_is_f_linear_up_to_summation_order(prefill, dtype):
    prefill("float", "fp32-panel", rows=64)
    m, n, k = 17, 150, 96
    g = torch.Generator().manual_seed(2)
    x, w, b = (torch.randn(*s, generator=g).to(dtype) for s in ((1, m, k), (n, k), (n,)))
    node = _node(False, k, n, dtype)
    got = kernels.native_float_linear(_Ctx(), node, [x], {"weight": w, "bias": b})
    exact = x.double()[0] @ w.double().T + b.double()
    eps = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    # One rounding of the fp32 result to the output dtype (plus fp32 summation error).
    assert ((got[0].double() - exact).abs() <= eps * exact.abs() + 1e-5 * (x.double()[0].abs() @ w.double().abs().T)
            + 1e-6).all()
    want = torch.nn.functional.linear(x, w, b)
    torch.testing.assert_close(got, want, rtol=2 * eps, atol=2 * eps * want.abs().max().item())
    # At decode sizes (M <= 8) the native GEMV runs, not the panel GEMM.
    small = kernels.native_float_linear(_Ctx(), node, [x[:, :4]], {"weight": w, "bias": b})
    torch.testing.assert_close(small, want[:, :4], rtol=2 * eps, atol=2 * eps * want.abs().max().item())
