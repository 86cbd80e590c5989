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
