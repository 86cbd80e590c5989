"""The out-of-tree backend template (backends/template/) installs as its own package, glmrt finds it
through the "glmrt.backends" entry point, and `glmrt check` passes on it.

The template is pip-installed from a copy (the build writes into its source tree) into a
temporary --target directory, never into the test environment; that directory goes on sys.path /
PYTHONPATH for the checks, and is deleted with the test's tmp path. Where setuptools (the
template's build backend) is missing, an equivalent .dist-info with entry_points.txt is written
instead, which is all importlib.metadata reads.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import glmrt
from glmrt import backends as registry

TEMPLATE = Path(__file__).resolve().parents[2] / "backends" / "template"
NAME = "template"

pytestmark = pytest.mark.skipif(not TEMPLATE.is_dir(), reason="backends/template is not in this checkout")


def _install(site: Path, work: Path) -> str:
    """Install the template into `site`; returns how."""
    source = work / "template"
    shutil.copytree(TEMPLATE, source, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    if importlib.util.find_spec("setuptools") is not None:
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                               "--no-index", "--disable-pip-version-check", "--target", str(site), str(source)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return "pip"
    shutil.copytree(source / "glmrt_backend_template", site / "glmrt_backend_template")
    info = site / "glmrt_backend_template-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: glmrt-backend-template\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(
        f"[glmrt.backends]\n{NAME} = glmrt_backend_template:TemplateBackend\n")
    return "dist-info"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("oot")
    site = work / "site"
    site.mkdir()
    _install(site, work)
    return site


@pytest.fixture
def on_path(site, monkeypatch):
    monkeypatch.syspath_prepend(str(site))
    registry._cache.pop(NAME, None)
    yield site
    registry._cache.pop(NAME, None)
    for module in [m for m in sys.modules if m.startswith("glmrt_backend_template")]:
        del sys.modules[module]


def _env(site: Path) -> dict:
    paths = [str(site)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths))


def test_the_installed_package_declares_its_entry_point(site):
    infos = list(site.glob("glmrt_backend_template-*.dist-info"))
    assert len(infos) == 1
    assert f"{NAME} = glmrt_backend_template:TemplateBackend" in (infos[0] / "entry_points.txt").read_text()


def test_glmrt_lists_and_loads_the_template(on_path):
    rows = {r["name"]: r for r in glmrt.list_backends()}
    assert NAME in rows and rows[NAME]["available"] and rows[NAME]["verification"] == "unverified"
    backend = registry.get_backend(NAME)
    assert type(backend).__module__ == "glmrt_backend_template"
    assert [(k.op, k.kind) for k in backend.kernels()] == [("residual", "native")]


def test_not_listed_once_uninstalled():
    registry._cache.pop(NAME, None)
    assert NAME not in {r["name"] for r in glmrt.list_backends()}


def test_glmrt_check_passes_on_the_template(site, tmp_path):
    from test_check import check_command, write_tiny_glm_checkpoint  # noqa: PLC0415 - same test folder
    ckpt = write_tiny_glm_checkpoint(tmp_path / "tiny_glm")
    proc = subprocess.run(check_command() + ["--backend", NAME, "--model", str(ckpt), "--json"], env=_env(site),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["passed"] and result["backend"] == NAME and result["dtypes"] == ["float32"]
    toy = next(r for r in result["kernels"] if r["kernel"] == "template.residual_add")
    assert toy["status"] == "pass" and toy["cases"] > 0
    fallbacks = {r["op"] for r in result["kernels"] if r["status"] == "fallback"}
    assert "linear" in fallbacks and "residual" in fallbacks  # DeepNorm's scaled residual is refused
    assert {r["kernel"]: r["status"] for r in result["model"]} == {"plan": "fallback", "logits": "pass",
                                                                    "greedy 8 tokens": "pass"}
    strict = subprocess.run(check_command() + ["--backend", NAME, "--no-model", "--strict"], env=_env(site),
                            capture_output=True, text=True, timeout=600)
    assert strict.returncode == 1 and "FAIL" in strict.stdout


def test_the_template_is_excluded_from_glmrts_wheel():
    """wheel.exclude in pyproject.toml drops backends/template (installed as glmrt/backends/...),
    matched as scikit-build-core matches it: gitignore patterns on paths inside the wheel."""
    pathspec = pytest.importorskip("pathspec")
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    root = TEMPLATE.parents[1]
    wheel = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["scikit-build"]["wheel"]
    packages, exclude = wheel["packages"], wheel["exclude"]
    spec = pathspec.GitIgnoreSpec.from_lines(exclude)
    target = next(k for k, v in packages.items() if v == "backends")  # where backends/ lands in the wheel
    template_files = [p for p in TEMPLATE.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert template_files
    for path in template_files:
        assert spec.match_file(f"{target}/{path.relative_to(root / 'backends').as_posix()}"), path
    for kept in ("backends/sunway/__init__.py", "backends/base.py", "backends/sunway/swdeepspeed/comm.py"):
        assert not spec.match_file(f"{target}/{Path(kept).relative_to('backends').as_posix()}"), kept


def test_glmrt_info_shows_the_templates_plan_with_fallbacks(site):
    from test_check import write_tiny_glm_checkpoint  # noqa: PLC0415 - same test folder
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_tiny_glm_checkpoint(Path(tmp) / "tiny_glm")
        proc = subprocess.run([sys.executable, "-m", "glmrt", "info", "--backend", NAME, str(ckpt)], env=_env(site),
                              capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert any(line.split()[:1] == [NAME] and "available" in line and "[unverified]" in line for line in lines)
    plan = [line.split() for line in lines if line.startswith("  residual") or line.startswith("  linear")]
    assert ["residual", "x4", "native", "template.residual_add"] in [p[:4] for p in plan]  # 2 per layer, 2 layers
    assert any(p[0] == "linear" and p[2] == "fallback" and "no kernel for op 'linear'" in " ".join(p) for p in plan)
    assert "fall back to the torch reference" in lines[-1]
