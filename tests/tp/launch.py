"""Start N ranks of tp_worker.py the way torchrun does (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT in each process's environment), wait for them within a time bound, and read back
what each wrote."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

WORKER = Path(__file__).with_name("tp_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(size: int, out_dir: Path, args: list[str], timeout: float, wait_for: list[int] | None = None):
    """Run the ranks; returns ({rank: result}, {rank: output text}). Ranks not in ``wait_for``
    (default: all) are killed once those are done."""
    import glmrt
    # The ranks import the glmrt this test process imported (the checkout or the installed package).
    root = str(Path(glmrt.__file__).resolve().parent.parent)
    path = os.pathsep.join([root] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    port = free_port()
    procs = []
    for rank in range(size):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(size),
                   LOCAL_WORLD_SIZE=str(size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   OMP_NUM_THREADS="1", PYTHONPATH=path)
        log = open(out_dir / f"rank{rank}.log", "w")
        procs.append((subprocess.Popen([sys.executable, str(WORKER), str(out_dir), *args], env=env, stdout=log,
                                       stderr=subprocess.STDOUT), log))
    wait_for = list(range(size)) if wait_for is None else wait_for
    try:
        for rank in wait_for:
            procs[rank][0].wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()
    logs = {r: (out_dir / f"rank{r}.log").read_text() for r in range(size)}
    results = {}
    for r in range(size):
        path = out_dir / f"rank{r}.pt"
        if path.exists():
            results[r] = torch.load(path, weights_only=False)
    missing = [r for r in wait_for if r not in results]
    if missing:
        raise AssertionError(f"ranks {missing} of {size} wrote no result within {timeout} s:\n" +
                             "\n".join(f"--- rank {r}\n{logs[r][-3000:]}" for r in missing))
    return results, logs
