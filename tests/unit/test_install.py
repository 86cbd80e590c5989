"""The README set-up (`bash .ci/setup-venv.sh`: an editable install) gives the same glmrt, with its
compiled modules, whatever the current directory: `python -m glmrt` in the clone's root once
imported the bare source tree instead (the cwd comes first on sys.path) and silently lost every
native kernel.

The subprocesses run without PYTHONSAFEPATH (which tests/conftest.py may set for the others), as a
user's shell would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

REINSTALL = ("glmrt is not installed the README's way: run `bash .ci/setup-venv.sh` (or "
             "`.venv/bin/pip install --no-build-isolation -e .`) in the checkout")

PROBE = ("import json, glmrt\n"
         "from glmrt import _native\n"
         "module, why = _native.load('_native_cpu')\n"
         "print(json.dumps({'file': glmrt.__file__, 'native_cpu': module is not None, 'why': why}))\n")


def _user_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONSAFEPATH", "PYTHONPATH")}
    return env


def _probe(cwd: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=str(cwd), env=_user_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _here() -> dict:
    import glmrt
    from glmrt import _native
    module, why = _native.load("_native_cpu")
    return {"file": glmrt.__file__, "native_cpu": module is not None, "why": why}


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_the_same_glmrt_with_its_native_modules_from_any_directory(where, tmp_path):
    here = _here()
    got = _probe(ROOT if where == "root" else tmp_path)
    assert Path(got["file"]).resolve() == Path(here["file"]).resolve(), f"{REINSTALL}: {got['file']} vs {here['file']}"
    assert got["native_cpu"] == here["native_cpu"], f"{REINSTALL}: {got['why']}"


def test_python_m_glmrt_from_the_root_keeps_the_native_kernels():
    here = _here()
    if not here["native_cpu"]:
        pytest.skip(f"no native CPU module here to lose: {here['why']}")
    proc = subprocess.run([sys.executable, "-m", "glmrt", "info", "--json"], cwd=str(ROOT), env=_user_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    cpu = next(b for b in json.loads(proc.stdout)["backends"] if b["name"] == "cpu")
    assert cpu["native"]["built"], f"{REINSTALL}: {cpu['native']}"


def test_a_module_an_editable_install_did_not_build_is_reported_as_not_built(monkeypatch):
    """An editable install imports glmrt from the checkout by design: a compiled module its build
    skipped is 'not built', not 'the source tree shadows the installed package'."""
    from glmrt import _native
    monkeypatch.setattr(_native, "_any_compiled", lambda: False, raising=False)  # nothing compiled at all
    monkeypatch.setattr(_native, "_installed_copy", lambda: None, raising=False)  # editable: no installed copy
    why = _native._why_missing("_native_cpu", ImportError("No module named 'glmrt._native_cpu'"))
    assert "not built" in why and "shadow" not in why and "current directory" not in why


def test_a_regular_install_shadowed_by_the_checkout_says_how_to_install(monkeypatch, tmp_path):
    from glmrt import _native
    installed = tmp_path / "site-packages" / "glmrt"
    monkeypatch.setattr(_native, "_installed_copy", lambda: installed, raising=False)
    why = _native._why_missing("_native_cpu", ImportError("No module named 'glmrt._native_cpu'"))
    assert str(installed) in why and "current directory" in why and "-e ." in why
