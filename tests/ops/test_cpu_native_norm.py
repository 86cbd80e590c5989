"""glmrt._native_cpu.rms_norm against the torch reference, over odd shapes and every dtype."""

import os
import zlib

import pytest
import torch

from glmrt import _native, ops
from glmrt.backends import get_backend
from glmrt.graph import Node, ValueSpec

native, why = _native.load("_native_cpu")


def test_native_module_is_built_when_required():
    if os.environ.get("GLMRT_REQUIRE_NATIVE") == "1":
        assert native is not None, why


needs_native = pytest.mark.glmrt_native(available=native is not None, reason=f"native CPU module not built: {why}")


def norm_node(cols, dtype, round_before_weight):
    return Node("n", "norm", ["x"], ["y"], {"weight": "w"},
                attrs=dict(kind="rmsnorm", eps=1e-5, round_before_weight=round_before_weight),
                input_specs=[ValueSpec(("B", "T", cols), dtype)], output_specs=[ValueSpec(("B", "T", cols), dtype)])


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 3, 7), (2, 5, 64), (1, 2, 4096), (3, 1, 13696)])
@pytest.mark.parametrize("round_before_weight", [False, True])
def test_native_rms_norm_matches_reference(dtype, shape, round_before_weight):
    g = torch.Generator().manual_seed(zlib.crc32(repr((shape, str(dtype))).encode()))  # the same in every process
    x = (3 * torch.randn(shape, generator=g)).to(dtype)
    w = (1 + 0.2 * torch.randn(shape[-1], generator=g)).to(dtype)
    node = norm_node(shape[-1], dtype, round_before_weight)
    kernel = next(k for k in get_backend("cpu").kernels() if k.name == "native.rms_norm")
    assert kernel.supports(node) is None
    got = kernel.fn(None, node, [x], {"weight": w})
    want = ops.norm(None, node, [x], {"weight": w})
    assert got.dtype == dtype and got.shape == x.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    else:
        # Same fp32 arithmetic up to summation order; allow one ulp of the storage dtype.
        ulp = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10
        torch.testing.assert_close(got.float(), want.float(), atol=ulp, rtol=2 * ulp)


@needs_native
def test_native_rms_norm_refuses_layernorm():
    node = norm_node(8, torch.float32, False)
    node.attrs["kind"] = "layernorm"
    kernel = next(k for k in get_backend("cpu").kernels() if k.name == "native.rms_norm")
    assert "RMSNorm" in kernel.supports(node)
