"""benchmarks/configs/gpu-check.sh, the prepared GPU run-verification of issue 17, on a machine
without a GPU: it must fail clearly (exit 2, a message naming the problem) and fast, never hang;
and its CPU rehearsal (GLMRT_GPU_CHECK_REHEARSE=1) must get every later step's command line past
its arguments: `glmrt check` refuses the absent cuda backend only after parsing them, and the
plans, test collections and the benchmark's --dry-run pass. The whole rehearsal takes minutes on
a loaded 2-core machine, so it runs with GLMRT_SLOW=1; a quick one covers one check and one
benchmark step. Every run here is bounded by a subprocess timeout."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "configs" / "gpu-check.sh"
SLOW = os.environ.get("GLMRT_SLOW") == "1"
BASE_PATH = "/usr/bin:/bin"


def _run(out: Path, *steps: str, env: dict, timeout: float):
    """The script in its own process group, all of which is killed if it outlives `timeout`."""
    t0 = time.monotonic()
    proc = subprocess.Popen(["bash", str(SCRIPT), str(out), *steps], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"gpu-check.sh did not finish in {timeout} s")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), time.monotonic() - t0


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_VISIBLE_DEVICES", "GLMRT_GPU_CHECK_REHEARSE")}
    env.update({"PATH": BASE_PATH, "PYTHON": sys.executable, **extra})
    return env


def _fake_tool(bin_dir: Path, name: str, body: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def _assert_preflight_failure(proc, seconds, bound, message, out: Path):
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert seconds < bound, f"the preflight took {seconds:.1f} s (bound {bound} s)"
    assert "PREFLIGHT FAILED" in proc.stderr and message in proc.stderr, proc.stderr[-2000:]
    summary = (out / "summary.md").read_text()
    assert "| preflight | FAIL |" in summary and message in summary, summary
    assert message in (out / "setup.log").read_text()


def test_without_nvidia_smi_it_fails_at_once(tmp_path):
    if shutil.which("nvidia-smi", path=BASE_PATH):
        pytest.skip("this machine has nvidia-smi in /usr/bin")
    proc, seconds = _run(tmp_path / "out", env=_env(), timeout=60)
    _assert_preflight_failure(proc, seconds, 20, "no nvidia-smi on PATH", tmp_path / "out")


def test_an_empty_cuda_visible_devices_is_named(tmp_path):
    _fake_tool(tmp_path / "bin", "nvidia-smi", 'echo "NVIDIA H200, 580.159.04, 143771"')
    env = _env(PATH=f"{tmp_path / 'bin'}:{BASE_PATH}", CUDA_VISIBLE_DEVICES="")
    proc, seconds = _run(tmp_path / "out", env=env, timeout=60)
    _assert_preflight_failure(proc, seconds, 20, "CUDA_VISIBLE_DEVICES='' hides every GPU", tmp_path / "out")


def test_a_hung_nvidia_smi_is_cut_off(tmp_path):
    _fake_tool(tmp_path / "bin", "nvidia-smi", "exec sleep 600")
    env = _env(PATH=f"{tmp_path / 'bin'}:{BASE_PATH}", GLMRT_GPU_CHECK_PROBE_TIMEOUT_S="2")
    proc, seconds = _run(tmp_path / "out", env=env, timeout=60)
    _assert_preflight_failure(proc, seconds, 20, "nvidia-smi did not answer within 2 s", tmp_path / "out")


def test_a_failing_nvidia_smi_is_reported(tmp_path):
    _fake_tool(tmp_path / "bin", "nvidia-smi", 'echo "NVIDIA-SMI has failed because it could not communicate with '
                                               'the NVIDIA driver." >&2; exit 9')
    env = _env(PATH=f"{tmp_path / 'bin'}:{BASE_PATH}")
    proc, seconds = _run(tmp_path / "out", env=env, timeout=60)
    _assert_preflight_failure(proc, seconds, 20, "nvidia-smi failed (exit 9): NVIDIA-SMI has failed", tmp_path / "out")


def test_a_torch_that_sees_no_gpu_is_named(tmp_path):
    """nvidia-smi answers (a fake one), but this torch has no CUDA or no GPU: named after torch's
    import, well within a minute."""
    import torch
    if torch.cuda.is_available():
        pytest.skip("this torch sees a GPU")
    _fake_tool(tmp_path / "bin", "nvidia-smi", 'echo "NVIDIA H200, 580.159.04, 143771"')
    env = _env(PATH=f"{tmp_path / 'bin'}:{BASE_PATH}")
    proc, seconds = _run(tmp_path / "out", env=env, timeout=180)
    want = "is a CPU build (no CUDA)" if torch.version.cuda is None else "sees no GPU"
    _assert_preflight_failure(proc, seconds, 150, want, tmp_path / "out")


def test_usage_errors(tmp_path):
    proc, _ = _run(tmp_path / "out", "bench-everything", env=_env(), timeout=30)
    assert proc.returncode == 3 and "unknown step 'bench-everything'" in proc.stderr
    proc = subprocess.run(["bash", str(SCRIPT)], env=_env(), capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 3 and "usage:" in proc.stderr


def _rows(summary: str) -> dict[str, str]:
    rows = {}
    for line in summary.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 5 and cells[0] not in ("step", "---"):
            rows[cells[0]] = cells[1]
    return rows


def test_rehearsal_of_one_check_and_one_benchmark(tmp_path):
    """The rehearsal's mechanics on two steps: glmrt check's exact command line must end in the
    cuda backend's refusal (exit 2), not in an argument error; the benchmark's in its dry run."""
    out = tmp_path / "out"
    proc, _ = _run(out, "check", "bench-chatglm3", env=_env(GLMRT_GPU_CHECK_REHEARSE="1",
                                                           PATH=os.environ.get("PATH", BASE_PATH)), timeout=600)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    rows = _rows((out / "summary.md").read_text())
    assert rows == {"check": "pass", "bench-chatglm3 (dry run)": "pass"}, rows
    check_log = (out / "check.log").read_text()
    assert "backend 'cuda' is not available" in check_log and "unrecognized arguments" not in check_log
    assert "dry run: OK" in (out / "bench.log").read_text()
    assert "CPU rehearsal" in proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(not SLOW, reason="the whole rehearsal takes minutes on this machine: set GLMRT_SLOW=1")
def test_whole_rehearsal_passes(tmp_path):
    out = tmp_path / "out"
    proc, _ = _run(out, env=_env(GLMRT_GPU_CHECK_REHEARSE="1", PATH=os.environ.get("PATH", BASE_PATH),
                                 GLMRT_GPU_CHECK_BUDGET_S="3000"), timeout=3300)
    rows = _rows((out / "summary.md").read_text())
    assert proc.returncode == 0 and rows and set(rows.values()) == {"pass"}, (rows, proc.stdout[-3000:])
    names = " ".join(rows)
    for step in ("check", "check-models glm-130b L1", "tests-kernels (collect)", "tests-models (collect)",
                 "bench-chatglm3 (dry run)", "bench-glm4 (dry run)"):
        assert step in names, (step, rows)


# ----------------------------------------------------------------------------- cuda_decode.py
def _cuda_decode():
    import importlib.util
    spec = importlib.util.spec_from_file_location("cuda_decode", REPO / "benchmarks" / "cuda_decode.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("argv,message", [
    (["--preset", "chatglm9-6b"], "unknown synthetic preset 'chatglm9-6b'"),
    (["--quantize", "none,int3"], "int3"),
    (["--prefill", "512,0"], "--prefill: '0' is not a positive integer"),
    (["--quantize", "int4"], "keep 'none' in --quantize"),
    (["--modes", "graph,fast"], "each must be graph, static or eager"),
    (["--layers", "29"], "chatglm3-6b has 28 layers"),
    (["--prefill", "9000"], "exceed chatglm3-6b's 8192"),
    (["--append"], "--append needs --out"),
])
def test_cuda_decode_refuses_bad_arguments_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        _cuda_decode().parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_cuda_decode_without_a_gpu_says_so(capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this torch sees a GPU")
    assert _cuda_decode().main(["--preset", "chatglm3-6b", "--layers", "1"]) == 2
    assert "the cuda backend is not available here" in capsys.readouterr().err


def test_cuda_decode_end_to_end_on_the_cpu_backend(tmp_path, monkeypatch):
    """The benchmark's whole path (weights drawn on the device, float and INT4 from the same
    weights, decode timing in two modes, the transformers baseline on the same weights, prefill,
    the profile, targets, the JSON rewritten as it goes and appended to) on a tiny config and the
    cpu backend: what a GPU run would do, minus the GPU."""
    import json

    from glmrt.models import PRESETS
    tiny = dict(PRESETS["chatglm3-6b"], num_layers=2, hidden_size=64, ffn_hidden_size=96, kv_channels=16,
                num_attention_heads=4, multi_query_group_num=2, padded_vocab_size=256, seq_length=256)
    monkeypatch.setitem(PRESETS, "tiny-chatglm3", tiny)
    bench = _cuda_decode()
    out = tmp_path / "bench.json"
    argv = ["--backend", "cpu", "--preset", "tiny-chatglm3", "--dtype", "float32", "--quantize", "none,int4",
            "--modes", "eager,static", "--prompt", "5", "--gen", "4", "--repeat", "2", "--warmup", "0",
            "--prefill", "20,40", "--transformers-repeat", "1", "--profile-steps", "2", "--out", str(out), "--append"]
    assert bench.main(argv) == 0
    assert bench.main(argv + ["--no-transformers", "--quantize", "none", "--modes", "eager", "--prefill", "",
                              "--profile-steps", "0"]) == 0  # later flags win
    runs = json.loads(out.read_text())["runs"]
    assert len(runs) == 2 and all(r["complete"] and not r["errors"] for r in runs)
    first = runs[0]
    decode = {(r["impl"], r["setting"]) for r in first["decode"]}
    assert decode == {("glmrt-eager", "none"), ("glmrt-static", "none"), ("glmrt-eager", "int4"),
                      ("glmrt-static", "int4"), ("transformers-eager", "none")}
    for r in first["decode"]:
        assert r["decode_tokens_per_s"] > 0 and r["tpot_min_s"] <= r["tpot_s"] <= r["tpot_max_s"]
    int4 = next(r for r in first["decode"] if r["setting"] == "int4")
    fp = next(r for r in first["decode"] if r["setting"] == "none" and r["impl"].startswith("glmrt"))
    assert int4["bytes_per_step"] < fp["bytes_per_step"]  # the INT4 weights read per step
    assert {(r["impl"], r["setting"], r["prompt_tokens"]) for r in first["prefill"]} == {
        (impl, s, n) for impl, s in [("glmrt", "none"), ("glmrt", "int4"), ("transformers-eager", "none")]
        for n in (20, 40)}
    assert set(first["profiles"]) == {"none", "int4"} and all("error" not in p for p in first["profiles"].values())
    targets = {t["target"]: t for t in first["targets"]}
    assert targets["int4_vs_fp16_decode"]["value"] > 0 and targets["fp16_vs_transformers_eager"]["value"] > 0
    assert targets["fp16_fraction_of_published_bandwidth"]["value"] is None  # no GPU, no bandwidth
    assert runs[1]["decode"] and not runs[1]["prefill"]
