"""`glmrt serve MODEL --tensor-parallel 2` as two gloo ranks started the way torchrun starts them
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT): rank 0 serves HTTP and schedules, rank 1 replays
each engine step (glmrt.engine.follow). Concurrent greedy requests through the official openai
client must give exactly the single-process model's tokens (fp32); an idle server outlives the
distributed timeout (keep-alives); SIGTERM on rank 0 ends rank 1 cleanly, and a killed rank 0
ends rank 1 with an error that says so. Every wait is bounded."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "unit"))

import glmrt  # noqa: E402
from launch import free_port  # noqa: E402
from serve_fixtures import random_checkpoint, thudm_config  # noqa: E402

TIMEOUT_S = 12  # --distributed-timeout: rank 0 sends a keep-alive every 3 s when idle


class TPServer:
    """Both ranks of `glmrt serve --tensor-parallel 2` on a free 127.0.0.1 port."""

    def __init__(self, model: Path, logs: Path, *args: str):
        self.port, master = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        root = str(Path(glmrt.__file__).resolve().parent.parent)
        self.logs = [logs / f"rank{r}.log" for r in range(2)]
        self.procs = []
        for rank in range(2):
            env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(master), OMP_NUM_THREADS="1", PYTHONPATH=root)
            with open(self.logs[rank], "w") as log:
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "glmrt", "serve", str(model), "--port", str(self.port), "--dtype",
                     "float32", "--backend", "cpu", "--served-model-name", "tiny", "--tensor-parallel", "2",
                     "--distributed-timeout", str(TIMEOUT_S), *args],
                    env=env, stdout=log, stderr=subprocess.STDOUT, cwd="/"))

    def log(self, rank: int) -> str:
        return self.logs[rank].read_text()

    def start(self, timeout: float = 150) -> "TPServer":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for rank, p in enumerate(self.procs):
                if p.poll() is not None:
                    self.stop()
                    raise AssertionError(f"rank {rank} exited with {p.returncode}:\n{self.log(rank)[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise AssertionError(f"not healthy within {timeout} s:\n" + "\n".join(self.log(r)[-2000:] for r in range(2)))

    def client(self):
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", timeout=60, max_retries=0)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """ChatGLM3 layout: 4 heads in 2 KV groups (one per rank at tp 2), no tokenizer (token ids in, ids out)."""
    d = tmp_path_factory.mktemp("tp_serve")
    random_checkpoint(d, thudm_config(96, eos=2))
    return d


def _complete(server, prompt, max_tokens, delay, out, key):
    time.sleep(delay)
    r = server.client().completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           extra_body={"ignore_eos": True})
    out[key] = (r.choices[0].model_extra["token_ids"], r.choices[0].finish_reason)


def test_tensor_parallel_server_equals_the_single_process_model(tiny_dir, tmp_path):
    prompts = [[5 + i, 40 + 3 * i, 7, 60 + i] + [11] * (i % 4) for i in range(6)]
    lengths = [3 + (5 * i) % 9 for i in range(6)]
    single = glmrt.load(str(tiny_dir), backend="cpu", dtype="float32", progress=False)
    want = {i: single.generate(p, max_new_tokens=n, eos_token_id=[])[0, len(p):].tolist()
            for i, (p, n) in enumerate(zip(prompts, lengths))}
    # 4 slots for 6 requests: some wait for a slot, rows join and leave mid-decode (slot copies).
    server = TPServer(tiny_dir, tmp_path, "--max-batch", "4", "--max-len", "64").start()
    try:
        got: dict = {}
        threads = [threading.Thread(target=_complete, args=(server, prompts[i], lengths[i], 0.05 * i, got, i))
                   for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert {i: ids for i, (ids, _) in got.items()} == want
        assert all(reason == "length" for _, reason in got.values())
        # Idle for longer than the distributed timeout: the keep-alives hold rank 1.
        time.sleep(TIMEOUT_S + 2)
        assert server.procs[1].poll() is None, server.log(1)[-2000:]
        again: dict = {}
        _complete(server, prompts[0], lengths[0], 0, again, 0)
        assert again[0][0] == want[0]
        server.procs[0].send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully (the engine sends "stop"), then re-raises the signal.
        assert server.procs[0].wait(30) in (0, -signal.SIGTERM), server.log(0)[-2000:]
        assert server.procs[1].wait(30) == 0, server.log(1)[-2000:]
        assert "rank 0 stopped serving" in server.log(1)
    finally:
        server.stop()


def test_a_killed_rank_zero_ends_the_follower_with_an_error(tiny_dir, tmp_path):
    server = TPServer(tiny_dir, tmp_path, "--max-batch", "2", "--max-len", "32").start()
    try:
        server.procs[0].kill()
        t0 = time.monotonic()
        code = server.procs[1].wait(TIMEOUT_S + 30)
        assert code != 0 and time.monotonic() - t0 < TIMEOUT_S + 30
        assert "lost rank 0 of `glmrt serve`" in server.log(1), server.log(1)[-2000:]
    finally:
        server.stop()
