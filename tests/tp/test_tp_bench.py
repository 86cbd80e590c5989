"""`torchrun --nproc-per-node 2 -m glmrt bench MODEL --tensor-parallel 2`: both ranks run the setting
in lockstep over gloo, rank 0 alone prints and writes the results (tensor-parallel size, transport,
the collectives' share of decode), and the tokens are the single-process model's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import glmrt
from glmrt.bench.render import schema_problems

from launch import free_port

LAYERS = 2


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    import ckpt_writers as cw
    hf = cw.hf_glm_config(model_type="glm4", vocab_size=256, num_attention_heads=8, head_dim=8,
                          intermediate_size=128, num_key_value_heads=2, num_hidden_layers=LAYERS)
    return cw.write_hf_checkpoint(tmp_path_factory.mktemp("bench"), hf, cw.random_hf_glm_state_dict(hf, seed=5))


def test_torchrun_bench_runs_every_rank_and_reports_once(tiny_dir, tmp_path):
    out, logs = tmp_path / "out", tmp_path / "logs"
    root = str(Path(glmrt.__file__).resolve().parent.parent)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [root] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    # --redirects 1 --log-dir: each rank's stdout in a file of its own, so rank 1's can be read.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "--redirects", "1", "--log-dir", str(logs),
           "-m", "glmrt", "bench", str(tiny_dir), "--backends", "cpu", "--baseline", "none", "--prompt-len", "6",
           "--gen-len", "5", "--repeat", "2", "--warmup", "0", "--threads", "1", "--json", "--out", str(out),
           "--tensor-parallel", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    stdouts = {int(p.parent.name): p.read_text() for p in logs.rglob("stdout.log")}
    assert done.returncode == 0, done.stderr[-3000:] + "\n".join(stdouts.values())[-3000:]
    assert sorted(stdouts) == [0, 1]
    assert stdouts[1] == ""  # rank 1 prints nothing of the report
    doc = json.loads(stdouts[0])
    assert doc == json.loads((out / "results.json").read_text())
    assert schema_problems(doc) == []
    assert doc["tensor_parallel"] == {"size": 2, "transport": "gloo", "launcher": "torchrun", "threads_per_rank": 1}
    assert doc["command"].startswith("torchrun --nproc-per-node 2 -m glmrt bench ")
    assert "--tensor-parallel 2" in doc["command"]
    (result,) = doc["results"]
    assert result["status"] == "ok", result.get("error")
    tp = result["tensor_parallel"]
    assert tp["size"] == 2 and tp["transport"] == "gloo"
    # Two all-reduces per layer, one for the embedding, one all-gather of the logits per step.
    assert tp["collectives_per_decode_step"] == {"all_reduce": 2 * LAYERS + 1, "all_gather": 1}
    assert 0 < tp["decode_comm_share"] < 1 and 0 < tp["decode_comm_share_slowest_rank"] < 1
    assert tp["decode_comm_s_per_step"] > 0
    assert result["drift"]["top1_agreement"] == 1.0 and result["drift"]["max_abs_logit_diff"] < 1e-4
    md = (out / "results.md").read_text()
    assert "tensor parallel: 2 ranks over gloo" in md and "% of decode on rank 0" in md
    # The tokens are the single-process model's.
    single = glmrt.load(str(tiny_dir), backend="cpu", dtype="float32", progress=False)
    want = single.generate(doc["prompt_ids"], max_new_tokens=5, eos_token_id=[])[0, 6:].tolist()
    assert [step[0] for step in result["generated_ids"]] == want


def test_bench_tensor_parallel_skips_baselines_with_the_reason():
    from glmrt.bench.settings import BenchConfig, describe_model, plan_settings
    cfg = BenchConfig(model="synthetic:chatglm3-6b", layers=1, backends=["cpu"], dtypes=["float32"],
                      quantize=["none"], baselines=["torch-eager"], tensor_parallel=2)
    settings, skipped = plan_settings(cfg, describe_model(cfg.model, 1)[1])
    assert [s.id for s in settings] == ["cpu/float32/none"]
    assert any("baselines run in one process" in s["reason"] for s in skipped)
    assert cfg.launch_command().startswith("torchrun --nproc-per-node 2 -m glmrt bench synthetic:chatglm3-6b ")
