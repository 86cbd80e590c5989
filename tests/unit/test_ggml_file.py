"""benchmarks/chatglm_cpp/ggml_file.py: the GGML writer the chatglm.cpp comparison depends on.

The block formats are checked against ggml's definitions worked by hand (not against the writer's
own dequantizer alone), and the file layout is parsed back field by field as chatglm.cpp's loader
reads it. The end-to-end evidence (chatglm.cpp's greedy tokens equal glmrt's on a GGML F32 file) is
in benchmarks/vs_chatglm_cpp.py's cross-check, which needs the chatglm.cpp build.
"""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "chatglm_cpp" / "ggml_file.py"


@pytest.fixture(scope="module")
def gf():
    spec = importlib.util.spec_from_file_location("ggml_file", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_q8_0_block_by_hand(gf):
    # amax 127 * 0.5: d = 0.5 exactly, values are multiples of 0.5 -> exact integers.
    row = torch.tensor([0.5 * k for k in range(-16, 16)], dtype=torch.float32)
    row[5] = 63.5  # the largest magnitude: q = 127
    out = gf.quantize_q8_0(row.reshape(1, 32))
    assert out.shape == (1, 34)
    assert out[0, :2].view(np.float16)[0] == np.float16(0.5)
    q = out[0, 2:].view(np.int8)
    assert q[5] == 127
    assert q[0] == -16 and q[31] == 15
    assert torch.equal(gf.dequantize(out, gf.Q8_0, (1, 32)), row.reshape(1, 32))


def test_q4_0_block_by_hand(gf):
    # The element of largest magnitude is -8 (negative): d = -8 / -8 = 1, q = trunc(x / 1 + 8.5).
    row = torch.zeros(32)
    row[0], row[1], row[16], row[17], row[31] = -8.0, 7.0, 3.0, -2.4, 0.49
    out = gf.quantize_q4_0(row.reshape(1, 32))
    assert out.shape == (1, 18)
    assert out[0, :2].view(np.float16)[0] == np.float16(1.0)
    qs = out[0, 2:]
    # byte j: q[j] in the low nibble, q[j + 16] in the high nibble.
    assert qs[0] == (0 | (11 << 4))  # q[0] = 0 (-8), q[16] = trunc(11.5) = 11 (3)
    assert qs[1] == (15 | (6 << 4))  # q[1] = trunc(15.5) = 15 (7), q[17] = trunc(6.1) = 6 (-2)
    assert qs[15] == (8 | (8 << 4))  # q[15] = 8 (0), q[31] = trunc(8.99) = 8 (0.49 -> 0)
    back = gf.dequantize(out, gf.Q4_0, (1, 32))[0]
    assert back[0] == -8 and back[1] == 7 and back[16] == 3 and back[17] == -2 and back[31] == 0

    # Largest magnitude positive: d = m / -8 < 0, so the code for m is 0 and -m would clip to 15.
    pos = torch.linspace(-1.0, 2.0, 32)
    out = gf.quantize_q4_0(pos.reshape(1, 32))
    d = float(out[0, :2].view(np.float16)[0])
    assert d == pytest.approx(-0.25, abs=1e-3)
    assert out[0, 2 + 15] >> 4 == 0  # pos[31] = 2.0 = m -> q = 0


@pytest.mark.parametrize("kind", ["q4_0", "q8_0"])
def test_block_error_bound(gf, kind):
    w = torch.randn(7, 96, generator=torch.Generator().manual_seed(0))
    blocks = gf.quantize_q4_0(w) if kind == "q4_0" else gf.quantize_q8_0(w)
    back = gf.dequantize(blocks, gf.TYPES[kind], tuple(w.shape))
    amax = w.reshape(-1, 32).abs().amax(dim=1, keepdim=True)
    step = amax / (8 if kind == "q4_0" else 127)
    err = (back - w).reshape(-1, 32).abs()
    # Half a step, plus the fp16 rounding of d; Q4_0's codes stop at 15 = +7 steps, so a value near
    # the opposite of the block's extreme (-m = +8 steps) is off by up to a whole step.
    bound = step * (1.0 if kind == "q4_0" else 0.5) + 1e-3 * amax
    assert bool((err <= bound).all())


def test_file_layout_parses_as_chatglm_cpp_reads_it(gf, tmp_path):
    cfg = {"padded_vocab_size": 300, "hidden_size": 64, "num_attention_heads": 4, "multi_query_attention": True,
           "multi_query_group_num": 2, "kv_channels": 16, "num_layers": 2, "ffn_hidden_size": 96,
           "layernorm_epsilon": 1e-5, "seq_length": 128, "eos_token_id": 2, "pad_token_id": 0}
    path = tmp_path / "m.bin"
    tensors = gf.synthetic_tensors(cfg)
    matrix_bytes = gf.write(path, cfg, "q4_0", tensors)
    data = path.read_bytes()
    assert data[:4] == b"ggml"
    off = 4
    model_type, version = struct.unpack_from("<ii", data, off)
    assert (model_type, version) == (3, 2)
    off += 8
    vals = struct.unpack_from("<iiiiiiififiii", data, off)
    off += 13 * 4
    assert vals[:7] == (gf.Q4_0, 300, 64, 4, 2, 2, 96)
    assert vals[7] == pytest.approx(1e-5) and vals[8] == 0 and vals[9] == 10000.0 and vals[10:] == (128, 2, 0)
    (n,) = struct.unpack_from("<i", data, off)
    off += 4
    from sentencepiece import SentencePieceProcessor
    assert SentencePieceProcessor(model_proto=data[off:off + n]).get_piece_size() == 300
    off += n
    seen, total_matrix = [], 0
    while off < len(data):
        (name_len,) = struct.unpack_from("<i", data, off)
        name = data[off + 4:off + 4 + name_len].decode()
        off += 4 + name_len
        (ndim,) = struct.unpack_from("<i", data, off)
        dims = struct.unpack_from(f"<{ndim}i", data, off + 4)
        (gtype,) = struct.unpack_from("<i", data, off + 4 + 4 * ndim)
        off += 8 + 4 * ndim
        off += -off % 16  # data at a 16-byte file offset
        count = int(np.prod(dims))
        size = count // 32 * 18 if gtype == gf.Q4_0 else 4 * count
        if gtype == gf.Q4_0:
            total_matrix += size
        seen.append((name, dims, gtype))
        off += size
    assert off == len(data)
    assert total_matrix == matrix_bytes
    names = [s[0] for s in seen]
    assert names == [n for n, _ in gf.tensor_names(2)]
    shapes = dict((s[0], s[1]) for s in seen)
    assert shapes["transformer.encoder.layers.1.self_attention.query_key_value.weight"] == ((4 + 2 * 2) * 16, 64)
    assert shapes["transformer.encoder.layers.0.mlp.dense_h_to_4h.weight"] == (192, 64)
    assert {s[2] for s in seen if s[0].endswith(("layernorm.weight", ".bias"))} == {gf.F32}


def test_glmrt_names_cover_the_graph(gf):
    import glmrt.api as api

    prep = api.prepare("synthetic:chatglm3-6b", layers=2, materialize=False, progress=False)
    mapped = {gf.glmrt_name(n) for n, _ in gf.tensor_names(2)}
    assert mapped == set(prep.graph.params)
