import subprocess
import sys

import pytest

import glmrt
from glmrt.backends import get_backend, list_backends
from glmrt.backends.base import Backend, safe_probe
from glmrt.errors import BackendError

DESIGN_BACKENDS = {"cpu", "cuda", "rocm", "npu", "sunway"}


def test_list_backends_names_every_design_backend_with_a_reason():
    rows = {r["name"]: r for r in glmrt.list_backends()}
    assert DESIGN_BACKENDS <= set(rows)
    for row in rows.values():
        assert isinstance(row["available"], bool) and row["reason"]
        assert row["verification"] in ("run-verified", "compile-verified", "contract-verified", "unverified")
    assert rows["cpu"]["available"] and rows["cpu"]["verification"] == "run-verified"


def test_aliases_and_auto():
    assert get_backend("dcu").name == "rocm"
    assert get_backend("DCU").name == "rocm"
    assert get_backend("auto").name in DESIGN_BACKENDS


def test_unknown_backend_is_named():
    with pytest.raises(BackendError, match="'tpu9'"):
        get_backend("tpu9")


def test_unavailable_backend_refused_with_reason():
    with pytest.raises(BackendError, match="npu.*not available"):
        glmrt.load("synthetic:chatglm3-6b", backend="npu", layers=1)


def test_probe_never_raises():
    class Broken(Backend):
        name = "broken"

        def probe(self):
            raise OSError("libfoo.so: cannot open shared object file")

    result = safe_probe(Broken())
    assert not result.available and "libfoo.so" in result.reason


def test_incompatible_api_version_is_reported_not_raised():
    from glmrt import backends as reg

    class Old(Backend):
        api_version = 0
        name = "old"

    with pytest.raises(TypeError, match="API version"):
        reg._instantiate("old", Old)


def test_import_glmrt_does_not_import_vendor_modules():
    code = "import sys, glmrt; glmrt.list_backends(); print([m for m in ('torch_npu', 'swDeepSpeed', 'deepspeed') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_rocm_tells_hygon_dcus_from_amd_gpus():
    from glmrt.backends.rocm import is_hygon
    assert is_hygon("DCU Z100L", "gfx906:sramecc-:xnack-")
    assert is_hygon("Hygon K100_AI", "gfx928")
    assert is_hygon("", "gfx936:sramecc+")  # an ISA only Hygon reports
    assert not is_hygon("AMD Instinct MI50", "gfx906:sramecc+:xnack-")  # the same ISA as the Z100
    assert not is_hygon("AMD Instinct MI250X", "gfx90a")
