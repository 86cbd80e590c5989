"""`glmrt quantize` as a process: SIGTERM cleans up like Ctrl-C, the partial directories of runs that
died are removed by the next run, a DST that cannot be created fails before anything is loaded,
and the quantizing and writing show progress."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
import ckpt_writers as cw  # noqa: E402

import glmrt.api  # noqa: E402
from glmrt import quantize_cmd  # noqa: E402
from glmrt.errors import GLMRTError  # noqa: E402
from glmrt.quantize_cmd import quantize_checkpoint  # noqa: E402

# The file a run leaves in its partial directory to say whose it is.
PARTIAL_MARKER = getattr(quantize_cmd, "PARTIAL_MARKER", "glmrt-partial.json")


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    cfg = cw.hf_glm_config(num_hidden_layers=2)
    return cw.write_hf_checkpoint(tmp_path_factory.mktemp("src"), cfg, cw.random_hf_glm_state_dict(cfg, seed=0))


# The child quantizes SRC into DST; its writer stops half way (a file written, then a long sleep)
# and says so on stdout, so that the SIGTERM lands while the partial directory holds data.
CHILD = r"""
import sys, time
import glmrt.checkpoint
real = glmrt.checkpoint.write_safetensors_shards
def slow_write(directory, tensors, metadata, max_shard_bytes, *args, **kwargs):
    real(directory, dict(list(tensors.items())[:1]), metadata, max_shard_bytes)
    print("WRITING", flush=True)
    time.sleep(120)
    raise AssertionError("not terminated")
glmrt.checkpoint.write_safetensors_shards = slow_write
from glmrt.cli import main
sys.exit(main(["quantize", sys.argv[1], sys.argv[2], "--bits", "4"]))
"""


def test_sigterm_while_writing_leaves_no_partial_directory(src, tmp_path):
    dst = tmp_path / "q"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(src), str(dst)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # blocks until the child writes (or dies)
        assert line.strip() == "WRITING", proc.stderr.read() if proc.poll() is not None else line
        partial = list(tmp_path.glob(".q.partial-*"))
        assert partial and any(partial[0].iterdir())  # the half-written directory exists
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 128 + signal.SIGTERM, proc.stderr.read()
    assert not dst.exists() and not list(tmp_path.glob(".q.partial-*"))


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _partial(parent: Path, name: str, pid: int, marker: bool) -> Path:
    d = parent / f".{name}.partial-{pid}"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"\0" * 1024)
    if marker:
        (d / PARTIAL_MARKER).write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    return d


def test_partial_directories_of_dead_runs_are_removed_by_the_next_run(src, tmp_path):
    dead = _dead_pid()
    same_dst_old_run = _partial(tmp_path, "q", dead, marker=False)  # an older glmrt: no marker, same DST
    other_dst_dead = _partial(tmp_path, "other", dead, marker=True)
    other_dst_live = _partial(tmp_path, "busy", os.getppid(), marker=True)  # a live process: kept
    unknown = _partial(tmp_path, "unknown", dead, marker=False)  # not provably glmrt's: kept
    quantize_checkpoint(str(src), tmp_path / "q", 8, 0, progress=False)
    assert (tmp_path / "q" / "config.json").is_file()
    assert not same_dst_old_run.exists() and not other_dst_dead.exists()
    assert other_dst_live.exists() and unknown.exists()


@pytest.mark.parametrize("where", ["under-a-file", "is-a-file"])
def test_a_dst_that_cannot_be_created_fails_before_loading(src, tmp_path, monkeypatch, where):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    dst = blocker / "q" if where == "under-a-file" else blocker

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before DST was checked")

    monkeypatch.setattr(glmrt.api, "prepare", refuse)
    with pytest.raises(GLMRTError) as e:
        quantize_checkpoint(str(src), dst, 4, 0, progress=False)
    assert str(blocker) in str(e.value)


def test_quantizing_and_writing_show_progress(src, tmp_path, monkeypatch):
    from glmrt.progress import Progress
    seen: dict[str, tuple[int, int]] = {}
    real_call = Progress.__call__

    def record(self, done, total=None):
        real_call(self, done, total)
        if self.enabled:
            seen[self.label] = (done, self.total)

    monkeypatch.setattr(Progress, "__call__", record)
    quantize_checkpoint(str(src), tmp_path / "q", 4, 0, progress=True)
    quantizing = [v for k, v in seen.items() if k.startswith("quantizing")]
    writing = [v for k, v in seen.items() if k.startswith("writing")]
    assert quantizing and quantizing[0][0] == quantizing[0][1] > 0, seen
    assert writing and writing[0][0] == writing[0][1] > 0, seen
