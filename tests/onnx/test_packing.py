"""The exact INT4/INT8 weight layouts of the two flavors (glmrt.onnx_export.packing), checked both
ways: glmrt's GLM packing (even index in the HIGH nibble) -> each flavor's layout, read back by an
unpacker written here from the op specs (MatMulNBits: first element in the LOW nibble; ONNX int4:
first element in the 4 low bits) and by onnxruntime / onnx themselves."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from glmrt.onnx_export import packing
from glmrt.quant import pack_int4, quantize_weight


def _spec_unpack_matmulnbits(b: np.ndarray, bits: int, k: int) -> np.ndarray:
    """From the contrib-op doc: B (N, k_blocks, blob); 4 bits: byte = first | second << 4; code - 2^(bits-1)."""
    n = b.shape[0]
    out = np.zeros((n, b.shape[1] * b.shape[2] * (8 // bits)), np.int16)
    for r in range(n):
        col = 0
        for blk in range(b.shape[1]):
            for byte in b[r, blk]:
                if bits == 8:
                    out[r, col] = int(byte) - 128
                    col += 1
                else:
                    out[r, col] = (int(byte) & 0xF) - 8
                    out[r, col + 1] = (int(byte) >> 4) - 8
                    col += 2
    return out[:, :k]


def _matmulnbits(a: np.ndarray, b: np.ndarray, scales: np.ndarray, k: int, n: int, bits: int, block: int):
    node = helper.make_node("MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=1)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, list(a.shape))],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [a.shape[0], n])],
                              [numpy_helper.from_array(b, "B"), numpy_helper.from_array(scales, "S")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
                              ir_version=10)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"A": a})[0]


@pytest.mark.parametrize("k", [64, 80, 33])
def test_glm_int4_to_matmulnbits_and_back(k):
    g = torch.Generator().manual_seed(k)
    q = torch.randint(-7, 8, (5, k), generator=g, dtype=torch.int8)
    glm = pack_int4(q)  # the release's layout: even index in the HIGH nibble
    assert int(glm[0, 0]) & 0xFF == ((int(q[0, 0]) << 4) | (int(q[0, 1]) & 0xF)) & 0xFF
    values = packing.signed_values(glm, 4, k)
    assert (values == q.numpy()).all()
    b = packing.pack_matmulnbits(values, 4, 32)
    assert b.shape == (5, -(-k // 32), 16) and b.dtype == np.uint8
    assert int(b[0, 0, 0]) == (int(q[0, 0]) + 8) | ((int(q[0, 1]) + 8) << 4)  # first element LOW nibble
    assert (_spec_unpack_matmulnbits(b, 4, k) == q.numpy()).all()
    assert (packing.unpack_matmulnbits(b, 4, k) == q.numpy()).all()
    tail = _spec_unpack_matmulnbits(b, 4, b.shape[1] * 32)[:, k:]
    assert (tail == 0).all()  # the padding dequantizes to zero


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [0, 32, 64])
def test_onnxruntime_matmulnbits_reads_our_layout(bits, group):
    k, n = 96, 7
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(bits + group))
    qw, scale = quantize_weight(w, bits, group, torch.float32)
    values = packing.signed_values(qw, bits, k)
    block = packing.block_size_for(group, k)
    a = np.random.default_rng(0).standard_normal((3, k)).astype(np.float32)
    scales = packing.block_scales(scale, group, k, block).numpy()
    want = a @ (values.astype(np.float32) * (scale.numpy()[:, None] if group == 0 else
                                             np.repeat(scale.numpy(), group, axis=1)[:, :k])).T
    got = _matmulnbits(a, packing.pack_matmulnbits(values, bits, block), scales, k, n, bits, block)
    assert np.abs(got - want).max() < 1e-4
    if bits == 4:  # the planted defect: glmrt's own nibble order (even index high) is not MatMulNBits'
        b = packing.pack_matmulnbits(values, 4, block)
        swapped = ((b & 0xF) << 4) | (b >> 4)
        wrong = _matmulnbits(a, swapped.astype(np.uint8), scales, k, n, bits, block)
        assert np.abs(wrong - want).max() > 1e-2


def test_onnx_int4_layout_read_by_onnx_and_dequantized_by_onnxruntime():
    k, n = 37, 6  # odd element count: ONNX pads the last byte
    q = np.random.default_rng(1).integers(-7, 8, (k, n)).astype(np.int8)  # the transposed (K, N) weight
    raw = packing.pack_onnx_int4(q)
    assert raw[0] == ((int(q.flat[0]) & 0xF) | ((int(q.flat[1]) & 0xF) << 4))  # first element in the low bits
    assert (packing.unpack_onnx_int4(raw, q.shape) == q).all()
    t = TensorProto()
    t.name, t.data_type, t.raw_data = "W", TensorProto.INT4, raw.tobytes()
    t.dims.extend([k, n])
    assert (numpy_helper.to_array(t).astype(np.int8) == q).all()  # onnx's own reading
    block = 16
    scale = np.random.default_rng(2).random((-(-k // block), n)).astype(np.float32) + 0.5
    node = helper.make_node("DequantizeLinear", ["W", "S"], ["Y"], axis=0, block_size=block)
    graph = helper.make_graph([node], "g", [], [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [k, n])],
                              [t, numpy_helper.from_array(scale, "S")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})[0]
    assert np.abs(y - q * np.repeat(scale, block, axis=0)[:k]).max() == 0


def test_block_size_rule():
    assert packing.block_size_for(0, 4096) == 128 and packing.block_size_for(0, 64) == 64
    assert packing.block_size_for(32, 4096) == 32 and packing.block_size_for(128, 4096) == 128
    assert packing.block_size_for(1536, 12288) == 128  # GLM-130B per-rank groups at full width
    assert packing.block_size_for(48, 96) == 16
    assert packing.block_size_for(8, 64) is None and packing.block_size_for(12, 96) is None
    s = torch.arange(6, dtype=torch.float32).reshape(2, 3)  # groups of 48 over K = 144
    assert packing.block_scales(s, 48, 144, 16).tolist() == [[0, 0, 0, 1, 1, 1, 2, 2, 2], [3, 3, 3, 4, 4, 4, 5, 5, 5]]
