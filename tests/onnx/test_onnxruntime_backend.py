"""The onnxruntime backend: glmrt.load(DIR) / glmrt run / glmrt info on an ONNX export, through
the same Model API as a checkpoint, against glmrt's reference plan on the original checkpoint."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cases import left_pad, make_case  # noqa: E402

import glmrt  # noqa: E402
from glmrt.cli import main as cli_main  # noqa: E402
from glmrt.errors import BackendError, ConfigError  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ortb")
    out = {}
    for name, flavor in (("chatglm3", "ort"), ("chatglm-6b", "standard"), ("glm-130b", "ort")):
        case = make_case(name, root / name)
        d = glmrt.export_onnx(str(case.directory), root / f"{name}.onnx", flavor=flavor, dtype="float32",
                              token_ids=case.load_kwargs.get("token_ids"), progress=False)
        ref = glmrt.load(str(case.directory), dtype="float32", kernels="reference", progress=False,
                         **case.load_kwargs)
        out[name] = (case, d, ref)
    return out


@pytest.mark.parametrize("name", ["chatglm3", "chatglm-6b", "glm-130b"])
def test_load_export_generates_like_the_reference(setup, name):
    case, d, ref = setup[name]
    model = glmrt.load(str(d), backend="onnxruntime")
    assert model.backend.name == "onnxruntime" and model.config == ref.config
    ids, mask = left_pad(case.prompts)
    want = ref.generate(ids, max_new_tokens=12, attention_mask=mask, eos_token_id=[])
    got = model.generate(ids, max_new_tokens=12, attention_mask=mask, eos_token_id=[])
    assert got.tolist() == want.tolist()
    streamed = torch.stack(list(model.stream(ids, max_new_tokens=12, attention_mask=mask, eos_token_id=[])), 1)
    assert streamed.tolist() == want[:, ids.shape[1]:].tolist()
    real = mask.bool()
    assert (model.logits(ids, mask)[real] - ref.logits(ids, mask)[real]).abs().max() <= 1e-4


def test_plan_reports_placement_and_info_lists_the_backend(setup, capsys):
    _, d, _ = setup["chatglm3"]
    model = glmrt.load(str(d), backend="onnxruntime")
    assert model.onnx_session.placement.get("CPUExecutionProvider", 0) > 0
    rows = model.plan.summary()
    assert rows and all(r["impl"] == "onnxruntime.CPUExecutionProvider" and "CPUExecutionProvider" in r["reason"]
                        for r in rows)
    row = next(b for b in glmrt.list_backends() if b["name"] == "onnxruntime")
    assert row["available"] and row["verification"] == "run-verified"
    assert "never run here" in row["verification_detail"]
    assert cli_main(["info", str(d), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model"]["backend"] == "onnxruntime"
    assert {r["op"] for r in info["model"]["plan"]} >= {"attention", "linear", "rope"}


def test_cli_export_then_run(setup, tmp_path, capsys):
    case, _, ref = setup["chatglm3"]
    out = tmp_path / "cli.onnx"
    assert cli_main(["export", str(case.directory), "--format", "onnx", "--out", str(out), "--flavor", "standard",
                     "--dtype", "float32", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["flavor"] == "standard" and summary["position_ids"] == "causal"
    prompt = case.prompts[0]
    assert cli_main(["run", str(out), "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", "6",
                     "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    want = ref.generate([prompt], max_new_tokens=6)[0, len(prompt):].tolist()
    assert result["new_ids"] == want


def test_wrong_backend_or_provider_or_option_is_refused(setup):
    _, d, _ = setup["chatglm3"]
    with pytest.raises(BackendError, match="onnxruntime backend"):
        glmrt.load(str(d), backend="cpu")
    with pytest.raises(BackendError, match="CANNExecutionProvider"):
        glmrt.load(str(d), backend="onnxruntime:cann")
    with pytest.raises(BackendError, match="unknown onnxruntime provider"):
        glmrt.load(str(d), backend="onnxruntime:abacus")
    with pytest.raises(ConfigError, match="chosen when exporting"):
        glmrt.load(str(d), backend="onnxruntime", layers=1)
    with pytest.raises(ConfigError, match="exported in float32"):
        glmrt.load(str(d), backend="onnxruntime", dtype="float16")


def test_incomplete_export_is_refused(setup, tmp_path):
    import shutil
    _, d, _ = setup["chatglm3"]
    broken = tmp_path / "broken"
    shutil.copytree(d, broken)
    (broken / "model.onnx.data").unlink()
    with pytest.raises(ConfigError, match="missing model.onnx.data"):
        glmrt.load(str(broken), backend="onnxruntime")
    manifest = json.loads((broken / "glmrt_onnx.json").read_text())
    manifest["format_version"] = 99
    (broken / "glmrt_onnx.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="newer glmrt"):
        glmrt.load(str(broken), backend="onnxruntime")


def test_probe_never_raises_without_onnxruntime(monkeypatch):
    from glmrt.backends.onnxruntime import OnnxRuntimeBackend
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime -> ImportError
    probe = OnnxRuntimeBackend().probe()
    assert not probe.available and "pip install" in probe.reason


def test_placement_parser():
    from glmrt.backends.onnxruntime.session import parse_placement
    log = ("... VerifyEachNodeIsAssignedToAnEp] Node placements\n"
           "... VerifyEachNodeIsAssignedToAnEp]  Node(s) placed on [CUDAExecutionProvider]. Number of nodes: 120\n"
           "... VerifyEachNodeIsAssignedToAnEp]  Node(s) placed on [CPUExecutionProvider]. Number of nodes: 7\n")
    assert parse_placement(log) == {"CUDAExecutionProvider": 120, "CPUExecutionProvider": 7}


def test_onnxruntime_backend_refuses_a_checkpoint_and_bench_skips_it(setup):
    case, _, ref = setup["chatglm3"]
    with pytest.raises(BackendError, match="glmrt export"):
        glmrt.load(str(case.directory), backend="onnxruntime")
    from types import SimpleNamespace
    from glmrt.bench.settings import plan_settings
    cfg = SimpleNamespace(model=str(case.directory), backends=["all"], dtypes=["float32"], quantize=["none"],
                          baselines=["none"])
    settings, skipped = plan_settings(cfg, ref.config)
    assert all(s.backend != "onnxruntime" for s in settings)
    assert any(r["setting"] == "backend onnxruntime" and "exports only" in r["reason"] for r in skipped)


def test_weight_bytes_and_cli_surfaces(setup, capsys):
    _, d, _ = setup["chatglm3"]
    model = glmrt.load(str(d), backend="onnxruntime")
    assert model.weight_bytes() == (d / "model.onnx.data").stat().st_size
    assert cli_main(["info", "--backend", "onnxruntime"]) == 0
    assert "runs inside the glmrt-onnx export's session" in capsys.readouterr().out
    assert cli_main(["check", "--backend", "onnxruntime"]) == 2
    assert "no per-op kernels" in capsys.readouterr().err


def test_glmrt_bench_runs_an_export_on_onnxruntime(setup, tmp_path, monkeypatch):
    """`glmrt bench DIR --backends onnxruntime`: the export against the reference and the transformers
    baseline built from its source checkpoint; other backends and settings are skipped with reasons."""
    from glmrt import bench
    from glmrt.bench import machine
    from glmrt.bench.render import SCHEMA_PATH
    # The bandwidth probe's buffer is not what this test checks: keep it small.
    monkeypatch.setattr(machine, "CPU_STREAM_MIN_BYTES", 1 << 24)
    monkeypatch.setattr(machine, "CPU_STREAM_MAX_BYTES", 1 << 24)
    _, d, _ = setup["chatglm3"]
    out = tmp_path / "bench"
    argv = [str(d), "--backends", "onnxruntime,cpu", "--dtype", "float32", "--quantize", "none,int8",
            "--baseline", "transformers", "--repeat", "1", "--warmup", "0", "--prompt-len", "4", "--gen-len", "3",
            "--threads", "1", "--out", str(out)]
    assert bench.main(argv) == 0
    doc = json.loads((out / "results.json").read_text())
    rows = {r["id"]: r for r in doc["results"]}
    ort_row = next(r for r in doc["results"] if r.get("setting", {}).get("backend") == "onnxruntime"
                   or "onnxruntime" in r["id"])
    assert ort_row["status"] == "ok", ort_row
    assert ort_row["drift"]["max_abs_logit_diff"] <= 1e-4
    assert any("transformers" in i and r["status"] == "ok" for i, r in rows.items())
    reasons = " ".join(r["reason"] for r in doc["skipped"])
    assert "is an ONNX export" in reasons and "exported in float32" in reasons
    import jsonschema
    jsonschema.validate(doc, json.loads(SCHEMA_PATH.read_text()), cls=jsonschema.Draft202012Validator)
