"""`torchrun --nproc-per-node 2 -m glmrt run MODEL --tensor-parallel 2`: rank 0 alone prints, and
the tokens are the single-process command's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import glmrt
from glmrt.cli import main

from launch import free_port


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    import ckpt_writers as cw
    hf = cw.hf_glm_config(model_type="glm4", vocab_size=256, num_attention_heads=8, head_dim=8,
                          intermediate_size=128, num_key_value_heads=2)
    return cw.write_hf_checkpoint(tmp_path_factory.mktemp("cli"), hf, cw.random_hf_glm_state_dict(hf, seed=5))


def test_torchrun_run_prints_once_with_the_single_process_tokens(tiny_dir, capsys):
    args = ["run", str(tiny_dir), "--backend", "cpu", "--prompt-ids", "5,6,7,8", "--max-new-tokens", "6", "--json"]
    assert main(args) == 0
    want = json.loads(capsys.readouterr().out)["new_ids"]
    root = str(Path(glmrt.__file__).resolve().parent.parent)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [root] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "glmrt", *args, "--tensor-parallel", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count('"new_ids"') == 1  # rank 0 only
    got = json.loads(done.stdout[done.stdout.index("{"):])
    assert got["new_ids"] == want


def test_several_processes_without_tensor_parallel_is_an_error(tiny_dir, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["run", str(tiny_dir), "--backend", "cpu", "--max-new-tokens", "1"]) == 2
    assert "pass --tensor-parallel 2" in capsys.readouterr().err
    assert main(["chat", str(tiny_dir), "--backend", "cpu", "--tensor-parallel", "2"]) == 2
    assert "glmrt chat --tensor-parallel is not available" in capsys.readouterr().err
