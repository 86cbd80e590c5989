"""torch_npu installed without CANN must break neither `import glmrt` nor `glmrt info`.

A stand-in for the real torch-npu wheel on a machine without CANN: a `torch_npu` distribution in
a temporary directory, registered (like the wheel) in torch's ``torch.backends`` entry-point
group, whose import fails the way torch-npu 2.13.0's does there:
``ImportError: libhccl.so: cannot open shared object file: No such file or directory``.
With it, a plain ``import torch`` fails (torch auto-loads the backend and raises
``RuntimeError: Failed to load the backend extension: torch_npu. ...``), which the first test
checks so that the others cannot pass for want of a working stand-in. Every check runs in a
fresh interpreter, since torch's auto-loading happens once, at its first import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HCCL_ERROR = "libhccl.so: cannot open shared object file: No such file or directory"


@pytest.fixture(scope="module")
def cann_less_torch_npu(tmp_path_factory) -> dict:
    """The environment of an interpreter that sees a torch_npu whose CANN libraries are missing."""
    root = tmp_path_factory.mktemp("torch_npu_without_cann")
    package = root / "torch_npu"
    package.mkdir()
    # torch_npu/__init__.py imports torch_npu._C, which links against CANN's libhccl.so.
    (package / "__init__.py").write_text(f"raise ImportError({HCCL_ERROR!r})\n")
    dist = root / "torch_npu-2.13.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: torch_npu\nVersion: 2.13.0\n")
    (dist / "entry_points.txt").write_text("[torch.backends]\ntorch_npu = torch_npu:_autoload\n")
    env = {k: v for k, v in os.environ.items() if k != "TORCH_DEVICE_BACKEND_AUTOLOAD"}
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return env


def _python(env: dict, code: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", textwrap.dedent(code)] if code else [sys.executable, *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent)


def test_the_stand_in_breaks_a_plain_import_torch_as_the_real_wheel_does(cann_less_torch_npu):
    proc = _python(cann_less_torch_npu, "import torch")
    assert proc.returncode != 0
    assert "Failed to load the backend extension: torch_npu" in proc.stderr
    assert HCCL_ERROR in proc.stderr


def test_import_glmrt_then_torch_work_and_npu_is_unavailable_with_the_reason(cann_less_torch_npu):
    proc = _python(cann_less_torch_npu, """
        import json, os, sys
        import glmrt
        import torch
        from glmrt.backends import get_backend, list_backends
        from glmrt.backends.npu import NPUBackend, kernels
        from glmrt.graph import build_graph
        from glmrt.lowering import lower
        from glmrt.models import config_from_dict, preset

        npu = get_backend("npu")
        probe = npu.probe()
        cfg = config_from_dict(preset("chatglm3-6b"))[1].replace(num_layers=1)
        graph = build_graph(cfg, torch.bfloat16)
        meta = {n: torch.empty(p.shape, dtype=p.dtype, device="meta") for n, p in graph.params.items()}
        plan = lower(graph, NPUBackend(), meta)  # a plan for absent hardware
        print(json.dumps({
            "autoload": os.environ.get("TORCH_DEVICE_BACKEND_AUTOLOAD"),
            "torch_npu_imported": "torch_npu" in sys.modules,
            "available": probe.available, "reason": probe.reason,
            "listed": [b["name"] for b in list_backends()],
            "loaded_vendor": kernels.loaded_vendor() is not None,
            "product": NPUBackend().native_info()["product"],
            "rope": next(s.impl for s in plan.steps if s.node.op == "rope"),
            "cpu": get_backend("cpu").probe().available,
        }))
    """)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["autoload"] == "0"  # turned off before glmrt's first `import torch`
    assert not out["torch_npu_imported"] and not out["loaded_vendor"]
    assert out["available"] is False
    assert "torch_npu is installed but does not import" in out["reason"] and HCCL_ERROR in out["reason"]
    assert "CANN" in out["reason"]
    assert "npu" in out["listed"] and out["cpu"]
    assert "assumed: no device to ask" in out["product"]
    assert out["rope"] == "torch_npu.npu_rotary_mul"


def test_glmrt_info_reports_npu_unavailable_and_does_not_crash(cann_less_torch_npu):
    proc = _python(cann_less_torch_npu, "", "-m", "glmrt", "info", "--backend", "npu", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    row = next(r for r in out["backends"] if r["name"] == "npu")
    assert row["available"] is False and HCCL_ERROR in row["reason"]
    assert out["backend"]["verification"]["level"] == "contract-verified"
    assert out["backend"]["native"]["torch_npu"].startswith("not imported")


def test_an_explicit_autoload_setting_is_left_alone(cann_less_torch_npu):
    """Someone who sets TORCH_DEVICE_BACKEND_AUTOLOAD=1 asked for torch's behaviour, and gets it."""
    env = dict(cann_less_torch_npu, TORCH_DEVICE_BACKEND_AUTOLOAD="1")
    proc = _python(env, "import glmrt")
    assert proc.returncode != 0 and "Failed to load the backend extension: torch_npu" in proc.stderr
