"""GGUF files (llama.cpp's format) loaded by glmrt against the same weights from safetensors.

The GGUF files are written with the gguf package (glmrt.gguf_writer: llama.cpp's TensorNameMap and
quantizers) from tiny random models in the three layouts llama.cpp converts for this family: THUDM
ChatGLM3 / GLM-4-9B (arch chatglm, fused query_key_value), transformers glm (arch chatglm, split
q/k/v) and transformers glm4 = GLM-4-0414 (arch glm4, sandwich norms). The references:

- float files: glmrt loading the checkpoint directory (safetensors) holding the same values (2-D
  tensors rounded the way the file stores them), and transformers itself for F32 files;
- Q8_0 / Q4_0: every quantized linear's glmrt dequantization equals the gguf package's
  ``gguf.quants.dequantize`` bit for bit, and the logits equal those of a glmrt INT8/INT4-g32
  checkpoint (glmrt's own quantized format) built here from the gguf package's dequantized values;
- k-quants: re-quantized on request only, equal to glmrt quantizing the gguf-dequantized values.
"""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

import ckpt_writers as cw  # noqa: E402
from ckpt_writers import BATCH_PROMPTS, hf_logits  # noqa: E402

import glmrt  # noqa: E402  (a broken glmrt must fail these tests, not skip them)
from glmrt.errors import CheckpointError, ConfigError, UnsupportedModelError  # noqa: E402
from glmrt.gguf_checkpoint import LossyConversionWarning  # noqa: E402
from glmrt.gguf_writer import RawTensor, write_gguf  # noqa: E402
from glmrt.quant import FORMAT_KEY, FORMAT_NAME, FORMAT_VERSION, dequantize, pack_int4  # noqa: E402

ATOL = 1e-4
ROPE_RATIO = 2.5
LAYOUTS = ("thudm", "glm", "glm4")  # -> GGUF arch chatglm (fused qkv), chatglm (split q/k/v), glm4
IDS = torch.tensor([BATCH_PROMPTS[1], BATCH_PROMPTS[0] + BATCH_PROMPTS[2] + BATCH_PROMPTS[1][:1]])  # [2, 12]


def _hf_config(kind: str, **overrides) -> dict:
    kw = dict(model_type=kind, vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0 * ROPE_RATIO,
              rms_norm_eps=1e-5, max_position_embeddings=128)
    kw.update(overrides)
    return cw.hf_glm_config(**kw)


def _case(layout: str, seed: int = 0, **overrides) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json dict, fp32 state dict in that layout's own names)."""
    hf = _hf_config("glm4" if layout == "glm4" else "glm", **overrides)
    sd = cw.random_hf_glm_state_dict(hf, seed=seed)
    if layout == "thudm":
        return cw.thudm_config_from_hf(hf, rope_ratio=ROPE_RATIO), cw.hf_to_thudm(sd, hf, rope_ratio=ROPE_RATIO)
    return hf, sd


def _rounded(sd: dict[str, torch.Tensor], qtype: str) -> dict[str, torch.Tensor]:
    """The values a float GGUF holds: 2-D tensors in qtype, 1-D ones (norms, biases) in F32."""
    to = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[qtype]
    return {k: (v.to(to).float() if v.dim() == 2 else v.clone()) for k, v in sd.items()}


def _checkpoint(directory, config, sd):
    cw.write_config(directory, config)
    cw.write_safetensors(directory, sd)
    return directory


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


# ------------------------------------------------------------------------------------------------
# float files


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_float_gguf_matches_safetensors(tmp_path, layout, qtype):
    config, sd = _case(layout)
    path = write_gguf(tmp_path / "m.gguf", config, sd, qtype=qtype, tokenizer=False)
    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.architecture"].contents() == ("glm4" if layout == "glm4" else "chatglm")
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["token_embd.weight"] == qtype and kinds["blk.0.attn_norm.weight"] == "F32"
    ref = glmrt.load(str(_checkpoint(tmp_path / "ref", config, _rounded(sd, qtype))), dtype="float32",
                     progress=False)
    model = glmrt.load(str(path), dtype="float32", progress=False)
    assert model.config.num_layers == 2 and model.config.rope_base == 10000.0 * ROPE_RATIO
    assert model.config.norm_placement == ("sandwich" if layout == "glm4" else "pre")
    err = _max_diff(model.logits(IDS), ref.logits(IDS))
    assert err <= ATOL, f"{layout} {qtype}: max |gguf - safetensors| = {err:.3e}"


@pytest.mark.parametrize("kind", ["glm", "glm4"])
def test_f32_gguf_matches_transformers(tmp_path, kind):
    """An F32 GGUF of a transformers model against transformers' own forward pass."""
    pytest.importorskip("transformers")
    model = cw.build_hf_model(kind, seed=3)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    path = write_gguf(tmp_path / "m.gguf", model.config.to_dict(), sd, qtype="F32", tokenizer=False)
    got = glmrt.load(str(path), progress=False).logits(IDS)  # an F32 file runs in float32
    err = _max_diff(got, hf_logits(model, IDS))
    assert got.dtype == torch.float32 and err <= ATOL, f"{kind}: max |gguf - transformers| = {err:.3e}"


def test_gguf_dtype_default_and_depth_cut(tmp_path):
    config, sd = _case("glm4")
    path = write_gguf(tmp_path / "m.gguf", config, sd, qtype="BF16", tokenizer=False)
    assert glmrt.load(str(path), progress=False).config.torch_dtype == "bfloat16"
    one = glmrt.load(str(path), dtype="float32", layers=1, progress=False)
    ref = glmrt.load(str(_checkpoint(tmp_path / "ref", config, _rounded(sd, "BF16"))), dtype="float32", layers=1,
                     progress=False)
    assert one.config.num_layers == 1
    assert _max_diff(one.logits(IDS), ref.logits(IDS)) <= ATOL


def test_directory_holding_one_gguf_loads(tmp_path):
    config, sd = _case("thudm")
    write_gguf(tmp_path, config, sd, qtype="F32", tokenizer=False)  # -> tmp_path / model.gguf
    assert (tmp_path / "model.gguf").is_file()
    model = glmrt.load(str(tmp_path), progress=False)
    assert model.config.generation == "chatglm"
    shutil.copy(tmp_path / "model.gguf", tmp_path / "other.gguf")
    with pytest.raises(ConfigError, match="2 GGUF files"):
        glmrt.load(str(tmp_path), progress=False)


# ------------------------------------------------------------------------------------------------
# Q8_0 / Q4_0: exact


def _tensor_values(path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, str]]:
    """From the file, with the gguf package only: each tensor's dequantized float32 values, the fp16
    block scales d of the Q8_0 / Q4_0 ones, and each tensor's type."""
    values, scales, kinds = {}, {}, {}
    for t in gguf.GGUFReader(str(path)).tensors:
        kinds[t.name] = t.tensor_type.name
        values[t.name] = np.asarray(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type), dtype=np.float32)
        if t.tensor_type.name in ("Q8_0", "Q4_0"):
            rows = values[t.name].shape[0]
            blocks = np.asarray(t.data).reshape(rows, values[t.name].shape[1] // 32, -1)
            scales[t.name] = np.ascontiguousarray(blocks[..., :2]).view(np.float16).reshape(rows, -1)
    return values, scales, kinds


def _linear_sources(layout: str, i: int) -> dict[str, list[str]]:
    """glmrt node -> the GGUF tensors it is made of (llama.cpp's names, spelled out here)."""
    qkv = [f"blk.{i}.attn_qkv"] if layout == "thudm" else [f"blk.{i}.attn_{p}" for p in "qkv"]
    return {f"layers.{i}.attn.qkv": qkv, f"layers.{i}.attn.dense": [f"blk.{i}.attn_output"],
            f"layers.{i}.mlp.up": [f"blk.{i}.ffn_up"], f"layers.{i}.mlp.down": [f"blk.{i}.ffn_down"]}


def _glmrt_quantized_reference(directory, config, layout, values, scales, bits, layers=2):
    """A checkpoint in glmrt's own quantized format (`glmrt quantize` output) holding, for every
    linear, q = dequantized / d with d the file's block scales, and every other tensor's dequantized
    value: the INT8/INT4-g32 model of exactly the file's numbers."""
    t = {}
    t["embed.weight"] = values["token_embd.weight"]
    modules = {}
    for i in range(layers):
        t[f"layers.{i}.attn_norm.weight"] = values[f"blk.{i}.attn_norm.weight"]
        t[f"layers.{i}.mlp_norm.weight"] = values[f"blk.{i}.ffn_norm.weight"]
        if layout == "glm4":
            t[f"layers.{i}.attn_out_norm.weight"] = values[f"blk.{i}.post_attention_norm.weight"]
            t[f"layers.{i}.mlp_out_norm.weight"] = values[f"blk.{i}.post_ffw_norm.weight"]
        bias = [f"{n}.bias" for n in _linear_sources(layout, i)[f"layers.{i}.attn.qkv"]]
        t[f"layers.{i}.attn.qkv.bias"] = np.concatenate([values[b] for b in bias])
        for node, parts in _linear_sources(layout, i).items():
            w = np.concatenate([values[f"{p}.weight"] for p in parts])
            d = np.concatenate([scales[f"{p}.weight"] for p in parts])
            q = w / np.repeat(d.astype(np.float32), 32, axis=1)
            assert np.array_equal(q, np.round(q)) and np.abs(q).max() <= 2 ** (bits - 1)
            q = torch.from_numpy(q.astype(np.int8))
            t[f"{node}.weight"] = pack_int4(q) if bits == 4 else q
            t[f"{node}.weight_scale"] = torch.from_numpy(d)
            modules[node] = {"bits": bits, "group_size": 32, "scale_dtype": "float16"}
    t["final_norm.weight"] = values["output_norm.weight"]
    t["lm_head.weight"] = values["output.weight"]
    t = {k: (v if isinstance(v, torch.Tensor) else torch.from_numpy(np.array(v))) for k, v in t.items()}
    config = dict(config, **{FORMAT_KEY: {"format": FORMAT_NAME, "version": FORMAT_VERSION, "bits": bits,
                                          "group_size": 32, "dtype": "float32", "scheme": "from GGUF blocks",
                                          "modules": modules}})
    cw.write_config(directory, config)
    from safetensors.torch import save_file
    save_file(t, str(directory / "model.safetensors"),
              metadata={"format": "pt", "glmrt_format": FORMAT_NAME, "glmrt_format_version": str(FORMAT_VERSION)})
    return directory


@pytest.mark.parametrize("qtype,bits", [("Q8_0", 8), ("Q4_0", 4)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_q8_0_q4_0_load_exactly(tmp_path, layout, qtype, bits):
    config, sd = _case(layout, seed=1)
    path = write_gguf(tmp_path / "m.gguf", config, sd, qtype=qtype, tokenizer=False)
    values, scales, kinds = _tensor_values(path)
    assert kinds["blk.0.ffn_down.weight"] == qtype and kinds["token_embd.weight"] == qtype
    model = glmrt.load(str(path), dtype="float32", progress=False)

    # Bit for bit: glmrt's dequantization of each linear is the gguf package's.
    for i in range(2):
        for node, parts in _linear_sources(layout, i).items():
            n = next(x for x in model.graph.nodes if x.name == node)
            assert n.attrs["quant"] == {"bits": bits, "group_size": 32, "in_features": n.attrs["in_features"]}
            w, s = model.weights[n.params["weight"]].cpu(), model.weights[n.params["scale"]].cpu()
            assert s.dtype == torch.float16 and w.dtype == torch.int8
            got = dequantize(w, s, bits, 32, n.attrs["in_features"], torch.float32).numpy()
            want = np.concatenate([values[f"{p}.weight"] for p in parts])
            assert got.tobytes() == want.tobytes(), f"{node} differs from gguf.quants.dequantize"
    if qtype == "Q4_0":  # the full Q4_0 range, -8 included, reached glmrt's INT4
        q = torch.from_numpy(values["blk.0.ffn_up.weight"] / np.repeat(scales["blk.0.ffn_up.weight"], 32, 1)
                             .astype(np.float32))
        assert q.min() == -8

    # The same numbers in glmrt's own INT8/INT4-g32 format give the same logits, bit for bit.
    ref = glmrt.load(str(_glmrt_quantized_reference(tmp_path / "ref", config, layout, values, scales, bits)),
                     dtype="float32", progress=False)
    assert torch.equal(model.logits(IDS), ref.logits(IDS))

    # And through the reference kernels, the quantized model is the float model of the dequantized values.
    fl = {"thudm": _thudm_float_from_values, "glm": _hf_float_from_values, "glm4": _hf_float_from_values}[layout]
    flt = glmrt.load(str(_checkpoint(tmp_path / "flt", config, fl(values, config, layout))), dtype="float32",
                     kernels="reference", progress=False)
    qref = glmrt.load(str(path), dtype="float32", kernels="reference", progress=False)
    assert _max_diff(qref.logits(IDS), flt.logits(IDS)) <= ATOL


def _hf_float_from_values(values, config, layout):
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    for i in range(config["num_hidden_layers"]):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        names.update({p + "input_layernorm.weight": b + "attn_norm.weight",
                      p + "post_attention_layernorm.weight": b + "ffn_norm.weight",
                      p + "self_attn.o_proj.weight": b + "attn_output.weight",
                      p + "mlp.gate_up_proj.weight": b + "ffn_up.weight",
                      p + "mlp.down_proj.weight": b + "ffn_down.weight"})
        for x in "qkv":
            names[p + f"self_attn.{x}_proj.weight"] = b + f"attn_{x}.weight"
            names[p + f"self_attn.{x}_proj.bias"] = b + f"attn_{x}.bias"
        if layout == "glm4":
            names[p + "post_self_attn_layernorm.weight"] = b + "post_attention_norm.weight"
            names[p + "post_mlp_layernorm.weight"] = b + "post_ffw_norm.weight"
    return {k: torch.from_numpy(values[v].copy()) for k, v in names.items()}


def _thudm_float_from_values(values, config, layout):
    out = {"transformer.embedding.word_embeddings.weight": "token_embd.weight",
           "transformer.encoder.final_layernorm.weight": "output_norm.weight",
           "transformer.output_layer.weight": "output.weight"}
    for i in range(config["num_layers"]):
        p, b = f"transformer.encoder.layers.{i}.", f"blk.{i}."
        out.update({p + "input_layernorm.weight": b + "attn_norm.weight",
                    p + "self_attention.query_key_value.weight": b + "attn_qkv.weight",
                    p + "self_attention.query_key_value.bias": b + "attn_qkv.bias",
                    p + "self_attention.dense.weight": b + "attn_output.weight",
                    p + "post_attention_layernorm.weight": b + "ffn_norm.weight",
                    p + "mlp.dense_h_to_4h.weight": b + "ffn_up.weight",
                    p + "mlp.dense_4h_to_h.weight": b + "ffn_down.weight"})
    return {k: torch.from_numpy(values[v].copy()) for k, v in out.items()}


def test_mixed_q8_0_and_f16_linears(tmp_path):
    """llama.cpp files mix types (e.g. an F16 LM head in a Q4_0 file, one layer kept Q8_0): each
    linear keeps its own exact format."""
    config, sd = _case("glm4", seed=2)
    path = write_gguf(tmp_path / "m.gguf", config, sd, qtype="Q4_0",
                      tensor_qtypes={"token_embd.weight": "F16", "output.weight": "F16", "blk.1.*": "Q8_0",
                                     "blk.0.ffn_down.weight": "F16"})
    model = glmrt.load(str(path), dtype="float32", progress=False)
    quant = {n.name: n.attrs.get("quant", {}).get("bits") for n in model.graph.nodes if n.op == "linear"}
    assert quant["layers.0.attn.qkv"] == 4 and quant["layers.1.mlp.down"] == 8 and quant["layers.0.mlp.down"] is None
    values, scales, kinds = _tensor_values(path)
    assert kinds["output.weight"] == "F16"
    assert torch.equal(model.weights["lm_head.weight"].cpu(), torch.from_numpy(values["output.weight"]))
    assert torch.isfinite(model.logits(IDS)).all()


def test_quantize_requests_on_exact_files(tmp_path):
    config, sd = _case("glm", seed=4)
    path = write_gguf(tmp_path / "m.gguf", config, sd, qtype="Q8_0", tokenizer=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the file's own format: nothing to warn about
        same = glmrt.load(str(path), dtype="float32", quantize="int8-g32", progress=False)
    assert torch.equal(same.logits(IDS), glmrt.load(str(path), dtype="float32", progress=False).logits(IDS))
    with pytest.warns(LossyConversionWarning, match="Q8_0 to INT4 groups of 32"):
        four = glmrt.load(str(path), dtype="float32", quantize="int4-g32", progress=False)
    assert all(n.attrs["quant"]["bits"] == 4 for n in four.graph.nodes if "quant" in n.attrs)
    # An F16 file quantizes on load as any checkpoint does.
    f16 = write_gguf(tmp_path / "f16.gguf", config, sd, qtype="F16", tokenizer=False)
    ref = glmrt.load(str(_checkpoint(tmp_path / "ref", config, _rounded(sd, "F16"))), dtype="float32",
                     quantize="int4-g64", progress=False)
    got = glmrt.load(str(f16), dtype="float32", quantize="int4-g64", progress=False)
    assert torch.equal(got.logits(IDS), ref.logits(IDS))


# ------------------------------------------------------------------------------------------------
# k-quants: re-quantized on request, refused otherwise


def _random_blocks(qtype: str, rows: int, cols: int, seed: int) -> RawTensor:
    """Valid random blocks: random bytes, with the fp16 super-block scales set to small numbers."""
    q = gguf.GGMLQuantizationType[qtype]
    block, size = gguf.GGML_QUANT_SIZES[q]
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    if qtype == "Q4_K":  # d, dmin first
        data[..., 0:4] = np.array([0.002, 0.001], dtype=np.float16).view(np.uint8)
    elif qtype == "Q6_K":  # d last
        data[..., size - 2:] = np.array([0.0005], dtype=np.float16).view(np.uint8)
    return RawTensor(data.reshape(rows, -1), qtype, (rows, cols))


def test_k_quants_need_a_named_format(tmp_path):
    config, sd = _case("glm4", seed=5, hidden_size=256, intermediate_size=256, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=64)
    weights = dict(sd)
    for i, name in enumerate(n for n in sd if n.endswith("proj.weight")):
        weights[name] = _random_blocks("Q4_K", *sd[name].shape, seed=i)
    weights["lm_head.weight"] = _random_blocks("Q6_K", *sd["lm_head.weight"].shape, seed=99)
    path = write_gguf(tmp_path / "m.gguf", config, weights, qtype="F32", tokenizer=False)
    values, _, kinds = _tensor_values(path)
    assert kinds["blk.0.attn_k.weight"] == "Q4_K" and kinds["output.weight"] == "Q6_K"
    with pytest.raises(ConfigError, match=r"as Q4_K.*quantize='int4-g32'"):
        glmrt.load(str(path), dtype="float32", progress=False)
    with pytest.warns(LossyConversionWarning, match=r"re-quantizing 8 linear\(s\) stored as Q4_K to INT4 groups"):
        model = glmrt.load(str(path), dtype="float32", quantize="int4-g32", progress=False)
    # The reference: glmrt quantizing, on load, a checkpoint of the gguf package's dequantized values.
    ref = glmrt.load(str(_checkpoint(tmp_path / "ref", config, _hf_float_from_values(values, config, "glm4"))),
                     dtype="float32", quantize="int4-g32", progress=False)
    assert torch.equal(model.weights["lm_head.weight"].cpu(), torch.from_numpy(values["output.weight"]))
    assert torch.equal(model.logits(IDS), ref.logits(IDS))


# ------------------------------------------------------------------------------------------------
# planning without weights


def test_plan_of_a_gguf_needs_no_weights(tmp_path):
    config, sd = _case("thudm")
    path = write_gguf(tmp_path / "m.gguf", config, sd, qtype="Q4_0", tokenizer=False)
    plan = glmrt.api.plan(str(path), backend="cuda")  # no GPU needed: kernel choices depend on the graph only
    quantized = [n for n in plan.graph.nodes if "quant" in n.attrs]
    assert len(quantized) == 8 and all(n.attrs["quant"]["group_size"] == 32 for n in quantized)


# ------------------------------------------------------------------------------------------------
# errors


def _small_gguf(tmp_path, name="m.gguf", layout="glm4", **kw):
    config, sd = _case(layout)
    return write_gguf(tmp_path / name, config, sd, tokenizer=False, **kw)


def test_unsupported_architectures_are_refused_by_name(tmp_path):
    moe = _small_gguf(tmp_path, "moe.gguf", metadata={"general.architecture": "glm4moe"})
    with pytest.raises(UnsupportedModelError, match=r"'glm4moe'.*GLM-4\.5"):
        glmrt.load(str(moe), progress=False)
    llama = _small_gguf(tmp_path, "llama.gguf", metadata={"general.architecture": "llama"})
    with pytest.raises(UnsupportedModelError, match=r"'llama' GGUF: glmrt runs GLM-family models only"):
        glmrt.load(str(llama), progress=False)
    vision = _small_gguf(tmp_path, "v.gguf", metadata={"glm4.rope.dimension_sections": [8, 8, 8, 0]})
    with pytest.raises(UnsupportedModelError, match="M-RoPE"):
        glmrt.load(str(vision), progress=False)


def test_unsupported_tensor_type(tmp_path):
    path = _small_gguf(tmp_path, tensor_qtypes={"blk.1.ffn_down.weight": "I8"})
    with pytest.raises(CheckpointError, match=r"blk\.1\.ffn_down\.weight \(I8\).*cannot read as weights"):
        glmrt.load(str(path), progress=False)


def test_truncated_file(tmp_path):
    path = _small_gguf(tmp_path, qtype="F16")
    data = path.read_bytes()
    for keep in (len(data) - 4096, 300, 10):
        cut = tmp_path / f"cut{keep}.gguf"
        cut.write_bytes(data[:keep])
        with pytest.raises(CheckpointError, match=r"truncated|damaged"):
            glmrt.load(str(cut), progress=False)
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"PK\x03\x04" + data[4:100])
    with pytest.raises(CheckpointError, match="GGUF magic"):
        glmrt.load(str(not_gguf), progress=False)


@pytest.mark.parametrize("key,value,problem", [
    ("glm4.block_count", 3, r"missing tensor blk\.2\.attn_norm\.weight"),
    ("glm4.embedding_length", 128, r"tensor token_embd\.weight is \[256, 64\] but the metadata needs \[256, 128\]"),
    ("glm4.feed_forward_length", 80, r"blk\.0\.ffn_up\.weight is \[192, 64\] but the metadata needs \[160, 64\]"),
    ("glm4.attention.head_count_kv", 4, r"blk\.0\.attn_k\.weight is \[32, 64\] but the metadata needs \[64, 64\]"),
    ("glm4.block_count", 1, r"unexpected tensor\(s\) blk\.1\."),
])
def test_metadata_contradicting_tensors(tmp_path, key, value, problem):
    path = _small_gguf(tmp_path, metadata={key: value})
    with pytest.raises(CheckpointError, match="metadata contradicts its tensors") as info:
        glmrt.load(str(path), progress=False)
    assert __import__("re").search(problem, str(info.value)), str(info.value)


def test_vocabulary_contradicting_the_embedding(tmp_path):
    config, sd = _case("glm4", vocab_size=320)
    path = write_gguf(tmp_path / "m.gguf", config, sd, tokenizer=None,
                      metadata={"tokenizer.ggml.tokens": [f"t{i}" for i in range(300)],
                                "tokenizer.ggml.token_type": [1] * 300})
    with pytest.raises(CheckpointError, match=r"token_embd\.weight is \[320, 64\] but the metadata needs \[300, 64\]"):
        glmrt.load(str(path), progress=False)


def test_missing_metadata_key(tmp_path):
    path = _small_gguf(tmp_path, metadata={"glm4.attention.layer_norm_rms_epsilon": None})
    with pytest.raises(CheckpointError, match="lacks the metadata key glm4.attention.layer_norm_rms_epsilon"):
        glmrt.load(str(path), progress=False)


def test_glmrt_quantize_refuses_gguf(tmp_path):
    from glmrt.quantize_cmd import quantize_checkpoint
    path = _small_gguf(tmp_path)
    with pytest.raises(ConfigError, match="loads it directly"):
        quantize_checkpoint(str(path), tmp_path / "dst", 4, 32, progress=False)


def test_written_file_has_the_converters_metadata(tmp_path):
    config, sd = _case("thudm")
    path = write_gguf(tmp_path / "m.gguf", config, sd, qtype="Q8_0", tokenizer=False)
    f = gguf.GGUFReader(str(path)).fields
    get = {k: v.contents() for k, v in f.items()}
    assert get["chatglm.block_count"] == 2 and get["chatglm.embedding_length"] == 64
    assert get["chatglm.attention.head_count"] == 4 and get["chatglm.attention.head_count_kv"] == 2
    assert get["chatglm.rope.dimension_count"] == 8 and get["chatglm.rope.freq_base"] == 10000.0 * ROPE_RATIO
    assert get["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    names = {t.name for t in gguf.GGUFReader(str(path)).tensors}
    assert "blk.0.attn_qkv.weight" in names and "blk.0.attn_qkv.bias" in names
    assert not any("rotary" in n or "inv_freq" in n or "rope_freqs" in n for n in names)
    assert json.dumps(sorted(names))  # plain names only


def test_first_generation_blocks_and_splits_are_refused(tmp_path):
    # A ChatGLM-6B-style block (LayerNorm with a bias) under arch chatglm: no llama.cpp converter writes it.
    path = tmp_path / "glm6b.gguf"
    w = gguf.GGUFWriter(str(path), "chatglm")
    for name, shape in (("token_embd.weight", (256, 64)), ("blk.0.attn_norm.weight", (64,)),
                        ("blk.0.attn_norm.bias", (64,))):
        w.add_tensor(name, np.zeros(shape, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match="ChatGLM-6B or GLM-130B"):
        glmrt.load(str(path), progress=False)
    split = _small_gguf(tmp_path, "split.gguf", metadata={"split.count": 3, "split.no": 0})
    with pytest.raises(UnsupportedModelError, match=r"part 1 of a GGUF split in 3 files.*llama-gguf-split --merge"):
        glmrt.load(str(split), progress=False)


# ------------------------------------------------------------------------------------------------
# tensor parallelism: a rank reads its slices


@pytest.mark.parametrize("qtype", ["F16", "Q8_0", "Q4_0", "Q4_K"])
def test_a_tensor_parallel_rank_reads_only_its_slices(tmp_path, monkeypatch, qtype):
    """prepare(..., tensor_parallel=(2, r)) gives exactly the rank's part of the whole load
    (glmrt.shard.shard_weights of it; Q4_K re-quantized to INT4-g32 after slicing, on 32-aligned
    cuts, so the same groups), and reads every split tensor through get_slice: only the
    replicated norms are copied out of the file whole."""
    from glmrt import gguf_checkpoint
    from glmrt.api import prepare
    from glmrt.shard import shard_graph, shard_weights
    width = 256 if qtype == "Q4_K" else 128  # k-quant rows come in blocks of 256
    config, sd = _case("glm4", seed=2, hidden_size=width, intermediate_size=width, head_dim=width // 4)
    weights = dict(sd)
    if qtype == "Q4_K":
        for i, name in enumerate(n for n in sd if n.endswith("proj.weight")):
            weights[name] = _random_blocks("Q4_K", *sd[name].shape, seed=i)
    path = write_gguf(tmp_path / "m.gguf", config, weights, qtype="F32" if qtype == "Q4_K" else qtype,
                      tokenizer=False)
    quantize = "int4-g32" if qtype == "Q4_K" else None
    whole_reads: list[str] = []
    real_get = gguf_checkpoint._GGUFTensors.get
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LossyConversionWarning)
        full = prepare(str(path), dtype="float32", quantize=quantize, progress=False)
        monkeypatch.setattr(gguf_checkpoint._GGUFTensors, "get",
                            lambda self, name: whole_reads.append(name) or real_get(self, name))
        for rank in range(2):
            whole_reads.clear()
            part = prepare(str(path), dtype="float32", quantize=quantize, progress=False, tensor_parallel=(2, rank))
            assert part.graph.nodes == shard_graph(full.graph, 2, rank).nodes
            want = shard_weights(full.graph, full.weights, 2, rank)
            assert set(want) == set(part.weights) == set(part.graph.params)
            for name, value in want.items():
                assert torch.equal(part.weights[name], value), (qtype, rank, name)
            assert whole_reads and all("norm" in name for name in whole_reads), (qtype, rank, whole_reads)
