import importlib.util
import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


def _glmrt_outside_the_checkout() -> bool:
    """Whether the glmrt these tests import lies outside this checkout: a regular, non-editable
    install (`pip install .`) rather than the README's editable one."""
    spec = importlib.util.find_spec("glmrt")
    if spec is None or not spec.origin:
        return False
    root = Path(__file__).resolve().parents[1]
    return root not in Path(spec.origin).resolve().parents


# The README's editable install imports the same glmrt, compiled modules included, from any
# directory, so the subprocesses the tests start (`python -m glmrt ...` in the repository root) run
# as a user's shell would. Under a non-editable install the root's source tree (no compiled modules)
# would shadow the installed package there: keep the root off their sys.path (tests/unit/test_install.py
# still fails, and says how to reinstall).
if _glmrt_outside_the_checkout():
    os.environ.setdefault("PYTHONSAFEPATH", "1")


# Tests that need a native module, or a kernel inside one, carry
#     @pytest.mark.glmrt_native(available=<bool>, reason="...")   (or as a module's pytestmark)
# They are skipped when it is missing -- except under GLMRT_REQUIRE_NATIVE=1 (CI, .ci/run), where a
# missing module or kernel fails them: a build that silently lost a kernel must not pass as skips.
REQUIRE_NATIVE_ENV = "GLMRT_REQUIRE_NATIVE"


def pytest_configure(config):
    config.addinivalue_line("markers", "glmrt_native(available, reason): needs a native module or kernel; "
                                       f"skipped without it, failed without it under {REQUIRE_NATIVE_ENV}=1")


def native_requirement(markers, environ=os.environ):
    """(action, message) for a test's glmrt_native markers: ("run", ""), ("skip", why) or ("fail", why)."""
    for mark in markers:
        if not mark.kwargs.get("available", mark.args[0] if mark.args else False):
            why = mark.kwargs.get("reason", "a native module or kernel is missing")
            if environ.get(REQUIRE_NATIVE_ENV) == "1":
                return "fail", f"{REQUIRE_NATIVE_ENV}=1 but {why}"
            return "skip", why
    return "run", ""


def pytest_runtest_setup(item):
    action, why = native_requirement(item.iter_markers("glmrt_native"))
    if action == "fail":
        pytest.fail(why, pytrace=False)
    if action == "skip":
        pytest.skip(why)


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(0)


# The whole suite runs on the CPU backend unless GLMRT_TEST_BACKEND names another (e.g. "cuda" on
# a GPU machine: the parity tests then check that backend against the same references). Results
# come back to the CPU so the references can stay CPU tensors.
TEST_BACKEND = os.environ.get("GLMRT_TEST_BACKEND", "cpu")


@pytest.fixture(autouse=True)
def _test_backend(monkeypatch):
    import glmrt
    import glmrt.api
    from glmrt.model import Model

    real_load = glmrt.api.load

    def load(*args, **kwargs):
        kwargs.setdefault("backend", TEST_BACKEND)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(glmrt, "load", load)
    monkeypatch.setattr(glmrt.api, "load", load)
    if TEST_BACKEND != "cpu":
        for name in ("logits", "generate"):
            method = getattr(Model, name)
            monkeypatch.setattr(Model, name, lambda self, *a, _m=method, **k: _m(self, *a, **k).cpu())
        real_stream = Model.stream
        monkeypatch.setattr(Model, "stream",
                            lambda self, *a, **k: (t.cpu() for t in real_stream(self, *a, **k)))
