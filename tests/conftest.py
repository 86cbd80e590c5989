import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))

# Subprocesses the tests start (`python -m glmrt ...`, `python -c ...`) run in the repository root;
# without this, Python 3.11+ would put that directory first on sys.path and import the source tree
# (no compiled modules) instead of the installed package the tests check.
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
