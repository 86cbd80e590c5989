"""ONNX exports of every generation, run by onnxruntime on the CPU through the documented
signature only (tests/onnx/ort_driver.py: numpy + onnxruntime, no glmrt code in the loop), against
glmrt's float32 reference plan (kernels="reference": the plain-torch oracle, itself checked
against transformers and the original code in tests/models).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cases import CASES, GLM130B_QUANT_TOKEN_IDS, left_pad, make_case, quantized_glm130b  # noqa: E402
from ort_driver import Export  # noqa: E402

import glmrt  # noqa: E402
from glmrt.errors import ConfigError  # noqa: E402
from glmrt.onnx_export import ExportError, export_onnx  # noqa: E402

ATOL = 1e-4
FLAVORS = ("ort", "standard")
DECODE_STEPS = 8
GREEDY = 32


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx_cases")
    return {name: make_case(name, root / name) for name in CASES}


@pytest.fixture(scope="module")
def references(cases):
    return {name: glmrt.load(str(c.directory), dtype="float32", kernels="reference", progress=False, **c.load_kwargs)
            for name, c in cases.items()}


_exports: dict = {}


@pytest.fixture(scope="module")
def export(cases, tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx_exports")

    def get(name: str, flavor: str, quantize: str | None = None, accuracy_level: int = 4, **kw) -> Export:
        key = (name, flavor, quantize, accuracy_level, tuple(sorted(kw.items())))
        if key not in _exports:
            c = cases[name]
            out = root / f"{name}-{flavor}-{quantize}-{accuracy_level}-{len(_exports)}"
            export_onnx(str(c.directory), out, flavor=flavor, quantize=quantize, accuracy_level=accuracy_level,
                        progress=False, dtype="float32", token_ids=c.load_kwargs.get("token_ids"), **kw)
            _exports[key] = Export(out)
        return _exports[key]

    yield get
    _exports.clear()


def _diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def _tokens(case, n: int, rows: int = 1, seed: int = 0) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(*case.text_range, (rows, n), generator=g).numpy()


# ----------------------------------------------------------------------------- float32 parity
@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("name", CASES)
def test_prefill_and_decode_steps_match_reference(cases, references, export, name, flavor):
    case, ref, ex = cases[name], references[name], export(name, flavor)
    prompt = np.array([case.prompts[0]])
    tokens = _tokens(case, DECODE_STEPS)
    prefill, steps = ex.decode(prompt, np.ones_like(prompt), tokens)
    full = np.concatenate((prompt, tokens), axis=1)
    want = ref.logits(torch.from_numpy(full)).numpy()  # (1, T + 8, V): one full forward
    T = prompt.shape[1]
    assert _diff(prefill, want[:, :T]) <= ATOL, f"{name}/{flavor} prefill: {_diff(prefill, want[:, :T]):.2e}"
    for j, step in enumerate(steps):
        err = _diff(step, want[:, T + j])
        assert err <= ATOL, f"{name}/{flavor} decode step {j}: {err:.2e}"


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("name", CASES)
def test_left_padded_batch_of_two(cases, references, export, name, flavor):
    case, ref, ex = cases[name], references[name], export(name, flavor)
    ids, mask = left_pad(case.prompts)
    tokens = _tokens(case, 2, rows=2, seed=1)
    prefill, steps = ex.decode(ids.numpy(), mask.numpy(), tokens)
    for r, prompt in enumerate(case.prompts):  # each row against its own unpadded prompt
        full = torch.tensor([prompt + tokens[r].tolist()])
        want = ref.logits(full).numpy()[0]
        pad = ids.shape[1] - len(prompt)
        assert _diff(prefill[r, pad:], want[:len(prompt)]) <= ATOL, f"{name}/{flavor} row {r} prefill"
        for j, step in enumerate(steps):
            assert _diff(step[r], want[len(prompt) + j]) <= ATOL, f"{name}/{flavor} row {r} step {j}"


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("name", CASES)
def test_prefill_equals_shorter_prefill_then_decode(cases, export, name, flavor):
    """prefill(L) == prefill(L - k) then k decode steps (the k tokens come after <sop>)."""
    case, ex, k = cases[name], export(name, flavor), 4
    prompt = np.array([case.prompts[0]])
    tokens = _tokens(case, k, seed=2)
    whole = np.concatenate((prompt, tokens), axis=1)
    long_logits, _ = ex.prefill(whole, np.ones_like(whole))
    _, steps = ex.decode(prompt, np.ones_like(prompt), tokens[:, :k])
    # decode step j feeds token j and predicts position T + j
    for j in range(k - 1):
        assert _diff(steps[j], long_logits[:, prompt.shape[1] + j]) <= ATOL, f"{name}/{flavor} step {j}"


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("name", CASES)
def test_greedy_tokens_identical(cases, references, export, name, flavor):
    case, ref, ex = cases[name], references[name], export(name, flavor)
    prompt = np.array([case.prompts[0]])
    got = ex.greedy(prompt, np.ones_like(prompt), GREEDY)
    want = ref.generate(torch.from_numpy(prompt), max_new_tokens=GREEDY, eos_token_id=[])[:, prompt.shape[1]:]
    assert want.shape[1] == GREEDY
    assert got.tolist() == want.tolist(), f"{name}/{flavor}"


# ----------------------------------------------------------------------------- files and manifest
@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("name", ["glm4", "chatglm-6b"])
def test_export_directory_layout_and_checker(export, name, flavor):
    ex = export(name, flavor)
    files = sorted(p.name for p in ex.dir.iterdir())
    assert files[:3] == ["glmrt_onnx.json", "model.onnx", "model.onnx.data"], files
    onnx.checker.check_model(str(ex.dir / "model.onnx"), full_check=True)  # by path: external data too
    model = onnx.load(str(ex.dir / "model.onnx"), load_external_data=False)
    locations = {e.value for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                 for e in t.external_data if e.key == "location"}
    assert locations == {"model.onnx.data"}
    assert (ex.dir / "model.onnx").stat().st_size < (ex.dir / "model.onnx.data").stat().st_size
    m = ex.manifest
    assert m["format"] == "glmrt-onnx" and m["format_version"] == 1 and m["flavor"] == flavor
    imports = {o.domain: o.version for o in model.opset_import}
    assert imports == ({"": 21, "com.microsoft": 1} if flavor == "ort" else {"": 23})
    domains = {n.domain for n in model.graph.node}
    assert domains == ({"", "com.microsoft"} if flavor == "ort" else {""})
    names = [i.name for i in model.graph.input]
    L = m["config"]["num_layers"]
    assert names == ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{k}" for i in range(L) for k in ("key", "value")]
    outs = {o.name for o in model.graph.output}
    assert outs == {"logits"} | {f"present.{i}.{k}" for i in range(L) for k in ("key", "value")}
    pos = next(i for i in model.graph.input if i.name == "position_ids")
    rank = len(pos.type.tensor_type.shape.dim)
    assert rank == (3 if name == "chatglm-6b" else 2)
    logits = next(o for o in model.graph.output if o.name == "logits")
    assert logits.type.tensor_type.elem_type == onnx.TensorProto.FLOAT


def test_ort_flavor_uses_the_contrib_ops_standard_flavor_the_opset23_ops(export):
    ort_ops, std_ops = export("glm", "ort").manifest["ops"], export("glm", "standard").manifest["ops"]
    for op in ("com.microsoft.GroupQueryAttention", "com.microsoft.RotaryEmbedding",
               "com.microsoft.SkipSimplifiedLayerNormalization"):
        assert op in ort_ops, (op, ort_ops)
    for op in ("Attention", "RotaryEmbedding", "RMSNormalization"):
        assert op in std_ops, (op, std_ops)
    assert "com.microsoft.SkipLayerNormalization" in export("glm-130b", "ort").manifest["ops"]


def test_decomposed_attention_matches_gqa(cases, references, export):
    ex = export("chatglm3", "ort", gqa=False)
    assert "com.microsoft.GroupQueryAttention" not in ex.manifest["ops"]
    prompt = np.array([cases["chatglm3"].prompts[0]])
    got, _ = ex.prefill(prompt, np.ones_like(prompt))
    assert _diff(got, references["chatglm3"].logits(torch.from_numpy(prompt)).numpy()) <= ATOL


def test_graph_optimizations_do_not_change_results(cases, export):
    """onnxruntime's fusions (ORT_ENABLE_ALL) against the graph as written (ORT_DISABLE_ALL)."""
    for name in ("glm4", "chatglm-6b"):
        ex = export(name, "ort")
        plain = Export(ex.dir, optimization="none")
        ids, mask = left_pad(cases[name].prompts)
        a, _ = ex.prefill(ids.numpy(), mask.numpy())
        b, _ = plain.prefill(ids.numpy(), mask.numpy())
        real = mask.numpy().astype(bool)
        assert _diff(a[real], b[real]) <= ATOL


# ----------------------------------------------------------------------------- quantized
# accuracy_level 1 (fp32 activations): the float tolerance, 1e-4 absolute. accuracy_level 4 (onnxruntime
# quantizes the activations to int8 per block): 2.5% of the largest |logit| (measured: 1.5-2.2%),
# and the same top-1 wherever the reference's top-2 margin exceeds twice the observed error.
QUANT_REL_TOL_LEVEL4 = 0.025


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("quantize", ["int4", "int4-g32", "int8"])
@pytest.mark.parametrize("name", ["glm", "chatglm-6b"])
@pytest.mark.parametrize("level", [1, 4])
def test_quantized_export_matches_dequantize_then_matmul(cases, export, name, quantize, flavor, level):
    case = cases[name]
    ref = glmrt.load(str(case.directory), dtype="float32", quantize=quantize, kernels="reference", progress=False,
                     **case.load_kwargs)
    ex = export(name, flavor, quantize, accuracy_level=level)
    assert ex.manifest["quantization"]["accuracy_level"] == level
    ids, mask = left_pad(case.prompts)
    got, _ = ex.prefill(ids.numpy(), mask.numpy())
    want = ref.logits(ids, mask).numpy()
    real = mask.numpy().astype(bool)
    err = _diff(got[real], want[real])
    tol = ATOL if level == 1 else QUANT_REL_TOL_LEVEL4 * float(np.abs(want[real]).max())
    assert err <= tol, f"{name} {quantize} {flavor} level {level}: {err:.2e} > {tol:.2e}"
    top_got, top_want = got[real].argmax(-1), want[real].argmax(-1)
    srt = np.sort(want[real], axis=-1)
    decisive = (srt[:, -1] - srt[:, -2]) > 2 * err if level == 4 else np.ones(len(srt), bool)
    assert (top_got[decisive] == top_want[decisive]).all(), f"{name} {quantize} {flavor} level {level}: top-1"


def test_quantized_ops_per_flavor(export):
    ort_m = export("glm", "ort", "int4", accuracy_level=1).manifest
    std_m = export("glm", "standard", "int4", accuracy_level=1).manifest
    assert ort_m["ops"]["com.microsoft.MatMulNBits"] == 4 * 2  # qkv, dense, up, down per layer
    assert "DequantizeLinear" in std_m["ops"] and "com.microsoft.MatMulNBits" not in std_m["ops"]
    assert std_m["session_config"] == {"session.qdq_matmulnbits_accuracy_level": "1"}
    model = onnx.load(str(Path(export("glm", "standard", "int4", accuracy_level=1).dir) / "model.onnx"),
                      load_external_data=False)
    int4 = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT4]
    assert len(int4) == 8 and all(len(t.dims) == 2 for t in int4)


# ----------------------------------------------------------------------------- what a flavor cannot express
def test_glm130b_per_rank_scales_fail_the_ort_flavor_naming_the_node(tmp_path):
    """GLM-130B's INT4 rank files carry one scale per (row, rank): with 8 ranks and 64 columns a
    group of 8, which no MatMulNBits block size (a power of two >= 16) divides."""
    src = quantized_glm130b(tmp_path / "sat", 4, 8)
    out = tmp_path / "export"
    with pytest.raises(ExportError, match=r"layers\.0\.attn\.dense .*'linear'.*MatMulNBits"):
        export_onnx(str(src), out, flavor="ort", token_ids=GLM130B_QUANT_TOKEN_IDS, dtype="float32", progress=False)
    assert not out.exists() and not list(tmp_path.glob(".export*")), "a failed export must leave no files"
    # The standard flavor's blocked DequantizeLinear takes any block size.
    export_onnx(str(src), out, flavor="standard", token_ids=GLM130B_QUANT_TOKEN_IDS, dtype="float32",
                accuracy_level=1, progress=False)
    ex = Export(out)
    ref = glmrt.load(str(src), dtype="float32", token_ids=GLM130B_QUANT_TOKEN_IDS, kernels="reference", progress=False)
    prompt = np.array([[11, 12, 13, 14, 15, 191, 194]])
    got, _ = ex.prefill(prompt, np.ones_like(prompt))
    assert _diff(got, ref.logits(torch.from_numpy(prompt)).numpy()) <= ATOL


def test_ir_op_without_translation_fails_naming_it(cases, tmp_path, monkeypatch):
    import importlib
    translate = importlib.import_module("glmrt.onnx_export.translate")
    monkeypatch.delitem(translate.TRANSLATIONS, "activation")
    with pytest.raises(ExportError, match=r"layers\.0\.mlp\.act \(op 'activation'"):
        export_onnx(str(cases["glm"].directory), tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()


def test_bad_options_are_refused(cases, tmp_path):
    with pytest.raises(ConfigError, match="flavor"):
        export_onnx(str(cases["glm"].directory), tmp_path / "a", flavor="tensorrt", progress=False)
    with pytest.raises(ConfigError, match="accuracy_level"):
        export_onnx(str(cases["glm"].directory), tmp_path / "a", accuracy_level=7, progress=False)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a glmrt ONNX export"):
        export_onnx(str(cases["glm"].directory), busy, progress=False)
    assert (busy / "notes.txt").read_text() == "mine"


def test_manifest_states_signature_and_position_rule(export):
    m = export("chatglm-6b", "standard").manifest
    assert m["position_ids"]["rule"] == "prefix-2d" and "block position" in m["position_ids"]["text"]
    assert export("glm-130b", "ort").manifest["position_ids"]["rule"] == "prefix-1d"
    assert export("glm", "ort").manifest["position_ids"]["rule"] == "causal"
    sig = {i["name"]: i for i in m["signature"]["inputs"]}
    assert sig["position_ids"]["shape"] == ["batch", 2, "sequence"]
    assert sig["past_key_values.0.key"]["shape"] == ["batch", 4, "past_sequence", 16]
    assert json.loads(json.dumps(m)) == m


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("name", ["glm4", "chatglm-6b"])
def test_float16_export_runs_on_the_cpu_provider(cases, tmp_path, name, flavor):
    """float16 weights, KV cache and activations (logits still float32): against glmrt's float16
    reference, within 0.3% of the largest logit (a couple of fp16 rounding steps; measured <= 0.13%)."""
    case = cases[name]
    out = export_onnx(str(case.directory), tmp_path / "f16", flavor=flavor, dtype="float16", progress=False,
                      token_ids=case.load_kwargs.get("token_ids"))
    ex = Export(out)
    assert ex.manifest["dtype"] == "float16"
    ref = glmrt.load(str(case.directory), dtype="float16", kernels="reference", progress=False, **case.load_kwargs)
    prompt = np.array([case.prompts[0]])
    tokens = _tokens(case, 3)
    prefill, steps = ex.decode(prompt, np.ones_like(prompt), tokens)
    want = ref.logits(torch.from_numpy(np.concatenate((prompt, tokens), axis=1))).numpy()
    got = np.concatenate((prefill, np.stack(steps, axis=1)), axis=1)
    assert prefill.dtype == np.float32
    assert _diff(got, want) <= 3e-3 * float(np.abs(want).max())
