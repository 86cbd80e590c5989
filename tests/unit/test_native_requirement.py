"""The glmrt_native marker (tests/conftest.py): a test whose native module or kernel is missing is
skipped, except under GLMRT_REQUIRE_NATIVE=1 (CI), where it fails; and every test file that needs a
native kernel uses the marker, not a plain skipif."""

import importlib.util
import re
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]


def _conftest():
    spec = importlib.util.spec_from_file_location("glmrt_tests_root_conftest", TESTS / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_missing_native_skips_locally_and_fails_under_require_native():
    requirement = _conftest().native_requirement
    missing = [pytest.mark.glmrt_native(available=False, reason="no add_norm").mark]
    present = [pytest.mark.glmrt_native(available=True, reason="no add_norm").mark]
    assert requirement(missing, {}) == ("skip", "no add_norm")
    assert requirement(missing, {"GLMRT_REQUIRE_NATIVE": "0"}) == ("skip", "no add_norm")
    action, why = requirement(missing, {"GLMRT_REQUIRE_NATIVE": "1"})
    assert action == "fail" and "GLMRT_REQUIRE_NATIVE=1" in why and "no add_norm" in why
    assert requirement(present, {"GLMRT_REQUIRE_NATIVE": "1"}) == ("run", "")
    assert requirement(present + missing, {}) == ("skip", "no add_norm")


def test_native_tests_use_the_marker_not_a_plain_skip():
    """A skipif on a native module or attribute would skip under GLMRT_REQUIRE_NATIVE=1 too."""
    offenders = []
    for path in sorted(TESTS.rglob("test_*.py")):
        text = path.read_text()
        for match in re.finditer(r"skipif\(([^)]*)", text):
            if re.search(r"native|hasattr", match.group(1)):
                offenders.append(f"{path.relative_to(TESTS)}: skipif({match.group(1)[:60]}")
    assert not offenders, offenders
