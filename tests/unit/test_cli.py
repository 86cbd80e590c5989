import json
import subprocess
import sys

import pytest


def run(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "glmrt", *args], capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"glmrt {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    return proc


def test_info_json_lists_every_backend():
    out = json.loads(run("info", "--json").stdout)
    names = {b["name"] for b in out["backends"]}
    assert {"cpu", "cuda", "rocm", "npu", "sunway"} <= names
    for b in out["backends"]:
        assert set(b) >= {"name", "available", "reason"}


def test_info_with_model_shows_the_plan():
    out = json.loads(run("info", "synthetic:glm-4-9b-0414", "--layers", "1", "--dtype", "bfloat16", "--json").stdout)
    ops = {row["op"] for row in out["plan"]}
    assert {"embedding", "norm", "linear", "rope", "attention", "activation", "lm_head"} <= ops
    # Residuals feeding a norm are fused into residual_norm where the backend has a kernel for it.
    assert {"residual", "residual_norm"} & ops
    assert all(row["impl"] and row["reason"] for row in out["plan"])
    assert out["backend"]["native"]["built"] in (True, False)


def test_run_synthetic_generates():
    proc = run("run", "synthetic:chatglm3-6b", "--layers", "1", "--dtype", "bfloat16", "--max-new-tokens", "4",
               "--prompt-ids", "5,6,7", "--json")
    result = json.loads(proc.stdout)
    assert result["prompt_ids"] == [5, 6, 7]
    assert len(result["new_ids"]) == 4 and all(0 <= t < 65024 for t in result["new_ids"])


def test_errors_are_one_line_for_people():
    proc = run("run", "/nonexistent/ckpt", check=False)
    assert proc.returncode == 2
    assert "glmrt: error:" in proc.stderr and "Traceback" not in proc.stderr
    proc = run("info", "--backend", "tpu9", check=False)
    assert proc.returncode == 2 and "unknown backend 'tpu9'" in proc.stderr


@pytest.mark.parametrize("flag", ["--max-new-tokens", "--temperature", "--top-k", "--top-p"])
def test_cli_defaults_come_from_the_api(flag):
    import inspect

    from glmrt.model import Model
    help_text = run("run", "--help").stdout
    name = flag[2:].replace("-", "_")
    default = inspect.signature(Model.generate).parameters[name].default
    assert f"(default: {default})" in " ".join(help_text.split())


def test_info_json_reports_each_backends_native_module():
    from glmrt import _native
    from glmrt.backends.base import VERIFICATION_LEVELS
    out = json.loads(run("info", "--json").stdout)
    rows = {b["name"]: b for b in out["backends"]}
    for row in rows.values():
        native = row["native"]
        assert set(native) >= {"built", "archs", "module", "reason"} and native["reason"]
        assert isinstance(native["built"], bool) and isinstance(native["archs"], list)
        assert native["built"] == bool(native["archs"]), row["name"]  # a built module names what it was built for
        assert row["verification"] in VERIFICATION_LEVELS and row["verification_detail"]
    for name, module_name in (("cpu", "_native_cpu"), ("cuda", "_native_cuda"), ("rocm", "_native_hip"),
                              ("sunway", "_native_sunway")):
        module, _ = _native.load(module_name)
        assert rows[name]["native"]["built"] == (module is not None), name
        if module is not None:
            assert rows[name]["native"]["module"] == f"glmrt.{module_name}"
            if hasattr(module, "archs"):  # the GPU modules report the archs they were compiled for
                assert rows[name]["native"]["archs"] == list(module.archs())
    assert rows["npu"]["native"]["built"] is False and "torch_npu" in rows["npu"]["native"]["reason"]


def test_info_backend_shows_capabilities_and_per_op_coverage():
    text = run("info", "--backend", "sunway").stdout
    assert "backend sunway (aliases: sw, swdeepspeed)" in text and "verification: contract-verified" in text
    assert "dtypes: float32, bfloat16, float16" in text and "collectives: gloo" in text
    out = json.loads(run("info", "--backend", "sunway", "--json").stdout)
    ops = {row["op"]: row for row in out["backend"]["ops"]}
    assert set(ops) == {"embedding", "norm", "linear", "rope", "attention", "activation", "residual", "lm_head",
                        "residual_norm"}
    if out["backend"]["native"]["built"]:
        assert ops["linear"]["plan"] == "native" and ops["linear"]["kernels"][0]["name"] == "sunway.tiled_linear"
    assert ops["rope"]["plan"] == "vendor"


def test_info_plan_names_native_vendor_and_why():
    proc = run("info", "--backend", "sunway", "synthetic:chatglm3-6b", "--layers", "1", "--quantize", "int4-g32")
    lines = proc.stdout.splitlines()
    plan = lines[lines.index(next(l for l in lines if l.startswith("plan (per op"))) + 1:]
    linear = [l for l in plan if l.split()[0] == "linear"]
    assert linear and all(("native" in l and "sunway.tiled_linear" in l) or "vendor" in l for l in linear)
    assert any("supports" in l for l in plan) and plan[-1] == "no fallbacks"
    bad = run("info", "--quantize", "int4", check=False)
    assert bad.returncode != 0 and "--quantize needs a MODEL" in bad.stderr


def test_native_summary_fills_in_and_never_raises():
    from glmrt.backends.base import Backend, native_summary

    class Broken(Backend):
        name = "broken"

        def native_info(self):
            raise OSError("driver gone")

    class Terse(Backend):
        name = "terse"

        def native_info(self):
            return {"built": True, "archs": ["gfx906"], "module": "glmrt._native_x"}

    assert native_summary(Broken()) == {"built": False, "archs": [], "module": None,
                                        "reason": "native_info() raised OSError: driver gone"}
    terse = native_summary(Terse())
    assert terse["reason"] == "glmrt._native_x is built (gfx906)"
    assert Backend.native_info(Terse())["reason"] == "backend 'terse' has no glmrt native module"


def test_info_plans_a_model_for_a_backend_that_is_absent():
    """A porting engineer sees the npu plan on a machine without Ascend: planned, not loaded."""
    import glmrt
    if any(b["name"] == "npu" and b["available"] for b in glmrt.list_backends()):
        pytest.skip("an Ascend device is present: the plan is made for an available backend instead")
    out = json.loads(run("info", "--backend", "npu", "synthetic:chatglm3-6b", "--layers", "1",
                         "--quantize", "int4", "--json").stdout)
    assert out["model"]["planned_only"] is True and "not available" in out["model"]["why"]
    impl = {row["op"]: row["impl"] for row in out["plan"]}
    assert impl["linear"] == "torch_npu.npu_weight_quant_batchmatmul"  # int4 linears go to the vendor op
    assert impl["activation"] == "torch_npu.npu_swiglu"
    assert out["model"]["weight_bytes"] > 0 and out["model"]["config"]["num_layers"] == 1
    text = run("info", "--backend", "npu", "synthetic:chatglm3-6b", "--layers", "1").stdout
    assert "planned only" in text and "no fallbacks" in text


@pytest.mark.parametrize("backend", ["auto", "cpu", "sunway"])
def test_info_plans_a_model_without_reading_a_weight(backend, monkeypatch, capsys, tmp_path):
    """`glmrt info MODEL` once loaded every weight to print the plan (5.5 GB for glm-4-9b at one
    layer). It plans on meta tensors now, and that plan is the one glmrt.load builds."""
    from pathlib import Path

    import glmrt
    import glmrt.api
    from glmrt import checkpoint, cli
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
    import ckpt_writers as cw
    if not any(b["name"] == backend and b["available"] for b in glmrt.list_backends()) and backend != "auto":
        pytest.skip(f"{backend} is not available here: its plan is never loaded")
    cfg = cw.hf_glm_config(num_hidden_layers=2)
    ckpt = cw.write_hf_checkpoint(tmp_path / "ckpt", cfg, cw.random_hf_glm_state_dict(cfg, seed=0))
    loaded = glmrt.api.load(str(ckpt), backend=backend, progress=False)

    def refuse(*args, **kwargs):
        raise AssertionError("glmrt info read or generated the weights")

    for owner, name in ((glmrt.api, "load"), (glmrt, "load"), (checkpoint, "load_weights"),
                        (glmrt.api, "synthetic_weights")):
        monkeypatch.setattr(owner, name, refuse)
    assert cli.main(["info", str(ckpt), "--backend", backend, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["plan"] == loaded.plan.report()
    assert out["model"]["weight_bytes"] == loaded.weight_bytes()
    assert out["model"]["device"] == str(loaded.device) and out["model"]["backend"] == loaded.backend.name
    # A real-width model at one layer: nothing is allocated, whatever its size.
    assert cli.main(["info", "synthetic:glm-4-9b", "--layers", "1", "--backend", backend]) == 0
    assert "planned" in capsys.readouterr().out
