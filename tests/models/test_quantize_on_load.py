"""Quantizing on load (issue 11 item 10): every source is read (or generated), quantized and placed
tensor by tensor, so the float model is never whole in memory.

- The result is bit-identical to the old path, quantizing the whole float model after loading it
  (glmrt.quant.quantize_weights over the float weights), for every source: synthetic presets,
  safetensors (THUDM and transformers names), THUDM .bin (ChatGLM-6B), GLM-130B SAT rank files
  and float GGUF files.
- The peak resident memory of a load in a fresh process stays under a stated bound: the quantized
  model plus a few float linears, well below the float model (which the old path held whole).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ckpt_writers as cw  # noqa: E402

from glmrt.api import prepare  # noqa: E402
from glmrt.gguf_writer import write_gguf  # noqa: E402
from glmrt.graph import build_graph  # noqa: E402
from glmrt.models import PRESETS, config_from_dict  # noqa: E402
from glmrt.quant import parse_format, quantize_graph, quantize_weights  # noqa: E402

FORMATS = ["int8", "int4", "int4-g32"]

TINY_CHATGLM6B = {"model_type": "chatglm", "vocab_size": 300, "hidden_size": 64, "num_layers": 2,
                  "num_attention_heads": 4, "inner_hidden_size": 128, "layernorm_epsilon": 1e-5,
                  "max_sequence_length": 256, "position_encoding_2d": True, "bos_token_id": 290,
                  "eos_token_id": 291, "mask_token_id": 292, "gmask_token_id": 293, "pad_token_id": 3,
                  "torch_dtype": "float16"}


def _write_release_names(directory: Path, raw: dict, save) -> Path:
    """config.json plus random weights under the release's own tensor names (its name map)."""
    from glmrt.api import synthetic_weights
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(raw))
    generation, cfg = config_from_dict(dict(raw))
    weights = synthetic_weights(build_graph(cfg, torch.float32), seed=3)
    tensors = {}
    for canonical, src in generation.weight_map(cfg).sources.items():
        parts = weights[canonical].split(list(src.part_rows)) if src.part_rows else [weights[canonical]]
        tensors.update({name: part.contiguous() for name, part in zip(src.names, parts)})
    save(directory, tensors)
    return directory


def _sources(tmp_path: Path, monkeypatch) -> dict[str, str]:
    from test_glm130b_parity import make_full_state_dict, split_like_sat, write_sat
    monkeypatch.setitem(PRESETS, "tiny-quantize-on-load", dict(PRESETS["chatglm3-6b"], num_layers=2, hidden_size=64,
                                                               ffn_hidden_size=96, kv_channels=16,
                                                               num_attention_heads=4, padded_vocab_size=256))
    hf = cw.hf_glm_config(model_type="glm", vocab_size=256, hidden_size=64, intermediate_size=96,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                          max_position_embeddings=128, rope_theta=10000.0)
    sd = cw.random_hf_glm_state_dict(hf, seed=1)
    hf_dir = tmp_path / "hf"
    cw.write_config(hf_dir, hf)
    cw.write_safetensors(hf_dir, sd, num_shards=2)
    thudm = cw.thudm_config_from_hf(hf, rope_ratio=1.0)
    thudm_dir = tmp_path / "thudm"
    cw.write_config(thudm_dir, thudm)
    cw.write_safetensors(thudm_dir, cw.hf_to_thudm(sd, hf, rope_ratio=1.0))
    bin_dir = _write_release_names(tmp_path / "chatglm6b-bin", TINY_CHATGLM6B,
                                   lambda d, t: cw.write_torch_bin(d, t, num_shards=2))
    sat_dir = write_sat(tmp_path / "sat", split_like_sat(make_full_state_dict(), 2))
    gguf_file = write_gguf(tmp_path / "m.gguf", hf, sd, qtype="F16", tokenizer=False)
    return {"synthetic": "synthetic:tiny-quantize-on-load", "safetensors (transformers names, 2 shards)": str(hf_dir),
            "safetensors (THUDM names)": str(thudm_dir), "ChatGLM-6B .bin (2 shards)": str(bin_dir),
            "GLM-130B SAT (2 ranks)": str(sat_dir), "GGUF F16": str(gguf_file)}


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_quantized_on_load_equals_quantizing_the_float_model(tmp_path, monkeypatch, dtype):
    for label, source in _sources(tmp_path, monkeypatch).items():
        floats = prepare(source, dtype=dtype, progress=False)
        for fmt in FORMATS:
            quantized = quantize_graph(floats.graph, *parse_format(fmt))
            want = quantize_weights(floats.graph, quantized, floats.weights)
            got = prepare(source, dtype=dtype, quantize=fmt, progress=False)
            assert list(got.graph.params) == list(quantized.params), (label, fmt)
            assert list(got.weights) == list(want), f"{label} {fmt}: not the same tensors in the same order"
            for name, t in want.items():
                g = got.weights[name]
                assert g.dtype == t.dtype and g.shape == t.shape, (label, fmt, name)
                assert torch.equal(g, t), f"{label} {fmt} {dtype}: {name} differs from quantizing the float model"


# ----------------------------------------------------------------------------- peak memory
# A mid-size ChatGLM3-like model: 12 layers at width 1024 with a 4096-wide GLU MLP and a small
# vocabulary, loaded in float32 and quantized to INT4 (the float model is ~8x the quantized one).
MID = dict(PRESETS["chatglm3-6b"], num_layers=12, hidden_size=1024, ffn_hidden_size=4096, kv_channels=64,
           num_attention_heads=16, padded_vocab_size=4096)

_CHILD = textwrap.dedent("""
    import json, sys
    source, dtype, quantize, mid = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    from glmrt.models import PRESETS
    PRESETS["mid-rss"] = mid
    import glmrt, torch

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    torch.set_num_threads(1)
    with open("/proc/self/clear_refs", "w") as f:  # 5: reset the peak (VmHWM) to the current RSS
        f.write("5")
    base = status("VmRSS")
    model = glmrt.load(source, backend="cpu", dtype=dtype, quantize=None if quantize == "none" else quantize,
                       progress=False)
    print(json.dumps({"base": base, "peak": status("VmHWM"), "weight_bytes": model.weight_bytes()}))
""")


def _peak(source: str, dtype: str, quantize: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", _CHILD, source, dtype, quantize, json.dumps(MID)],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _mid_float_bytes(dtype) -> tuple[int, int]:
    """(the float model's bytes, its largest linear's bytes) in ``dtype``."""
    _, cfg = config_from_dict(dict(MID))
    graph = build_graph(cfg, dtype)
    sizes = [torch.Size(p.shape).numel() * p.dtype.itemsize for p in graph.params.values()]
    linears = [torch.Size(p.shape).numel() * p.dtype.itemsize for p in graph.params.values() if p.role == "linear"]
    return sum(sizes), max(linears)


def _check_bound(result: dict, largest: int, float_bytes: int, what: str) -> None:
    # The bound: the quantized model, plus what quantizing its largest float linear needs at once
    # (the float32 linear and up to three float32 temporaries of its shape), plus 64 MiB for the
    # allocator and the plan. ``largest``: that linear's bytes in float32.
    bound = result["weight_bytes"] + 4 * largest + 64 * 2 ** 20
    grew = result["peak"] - result["base"]
    assert bound < float_bytes / 2, "the test model is too small to tell the two paths apart"
    assert grew <= bound, (f"{what}: loading grew the resident set by {grew / 2**20:.0f} MiB, over the bound "
                           f"{bound / 2**20:.0f} MiB (quantized weights {result['weight_bytes'] / 2**20:.0f} MiB; the "
                           f"float model is {float_bytes / 2**20:.0f} MiB)")


def test_peak_memory_of_quantizing_a_synthetic_model_on_load():
    float_bytes, largest = _mid_float_bytes(torch.float32)
    result = _peak("synthetic:mid-rss", "float32", "int4")
    _check_bound(result, largest, float_bytes, "synthetic float32 -> INT4")


@pytest.mark.parametrize("fmt", ["safetensors", ".bin"])
def test_peak_memory_of_quantizing_a_checkpoint_on_load(tmp_path, fmt):
    # Both are read through a memory map (safetensors' header scan; torch.load(mmap=True) of the
    # zip .bin): mapped pages that were read count in the resident set until they are dropped.
    from safetensors.torch import save_file
    float_bytes, largest = _mid_float_bytes(torch.float32)
    save = ((lambda d, t: save_file(t, str(d / "model.safetensors"))) if fmt == "safetensors" else
            (lambda d, t: cw.write_torch_bin(d, t, num_shards=2)))
    directory = _write_release_names(tmp_path / "mid", MID, save)
    result = _peak(str(directory), "float32", "int4")
    _check_bound(result, largest, float_bytes, f"{fmt} float32 -> INT4")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_synthetic_weights_drawn_in_row_blocks_equal_one_draw(monkeypatch, dtype):
    """A large half-precision synthetic tensor is drawn in row blocks (its float32 draw is never
    whole): the values must be the ones a single draw gives, or presets would change their weights."""
    import glmrt.api as api
    _, cfg = config_from_dict(dict(PRESETS["chatglm3-6b"], num_layers=1, hidden_size=64, ffn_hidden_size=96,
                                   kv_channels=16, num_attention_heads=4, padded_vocab_size=1000))
    graph = build_graph(cfg, dtype)
    monkeypatch.setattr(api, "SYNTHETIC_BLOCK", 10 ** 12)
    whole = api.synthetic_weights(graph)
    monkeypatch.setattr(api, "SYNTHETIC_BLOCK", 64 * 7)  # 7-row blocks of the 64-wide tensors
    blocks = api.synthetic_weights(graph)
    assert list(whole) == list(blocks)
    for name in whole:
        assert torch.equal(whole[name], blocks[name]), name


@pytest.mark.parametrize("fmt", ["int8", "int4", "int4-g32", "int8-g128"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantizing_in_row_blocks_equals_one_block(monkeypatch, fmt, dtype):
    """quantize_weight works through large weights in row blocks (small float32 temporaries):
    the result must be the one-block result exactly, odd widths and group tails included."""
    import glmrt.quant as quant
    bits, group = parse_format(fmt)
    w = (torch.randn(301, 203, generator=torch.Generator().manual_seed(5)) * 0.05).to(dtype)
    w[7, :50] = 0  # a zero group
    monkeypatch.setattr(quant, "QUANT_BLOCK", 10 ** 12)
    whole = quant.quantize_weight(w, bits, group)
    monkeypatch.setattr(quant, "QUANT_BLOCK", 203 * 13)  # 13-row blocks, the last one short
    blocks = quant.quantize_weight(w, bits, group)
    for a, b in zip(whole, blocks):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
