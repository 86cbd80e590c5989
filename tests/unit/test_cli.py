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
    assert {"embedding", "norm", "linear", "rope", "attention", "activation", "residual", "lm_head"} <= ops
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
