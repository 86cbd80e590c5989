"""One tensor-parallel rank of the tests in test_tp_ranks.py, started with torchrun's environment
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) by the test: glmrt.load initialises the gloo group
from it. Usage: tp_worker.py OUT_DIR JOB [args]; writes OUT_DIR/rank<r>.pt."""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
import tp_cases  # noqa: E402

import glmrt  # noqa: E402


def job_cases(size: int, names: list[str], quantize: list[str], dirs: list[str]) -> dict:
    out = {}
    for spec in dirs:  # dir:KEY:PROMPTS:PATH - a checkpoint directory, read as this rank's slices
        _, key, prompts, path = spec.split(":", 3)
        model = glmrt.load(path, backend="cpu", dtype="float32", tensor_parallel=size, progress=False,
                           distributed_timeout=60, **tp_cases.load_kwargs(prompts))
        out[key] = tp_cases.run(model, prompts)
    for name in names:
        model = glmrt.load(f"synthetic:tp-{name}", backend="cpu", dtype="float32", tensor_parallel=size,
                           progress=False, distributed_timeout=60)
        out[name] = tp_cases.run(model, name)
        out[name]["kv_heads"] = model.kv_heads
        out[name]["weights"] = {k: v.clone() for k, v in model.weights.items()}
    for spec in quantize:
        name, fmt = spec.split("=")
        model = glmrt.load(f"synthetic:tp-{name}", backend="cpu", dtype="float32", tensor_parallel=size,
                           progress=False, quantize=fmt, distributed_timeout=60, kernels="reference")
        out[f"{name}={fmt}"] = tp_cases.run(model, name)
    return out


def job_hang(size: int) -> dict:
    model = glmrt.load("synthetic:tp-chatglm2", backend="cpu", dtype="float32", tensor_parallel=size,
                       progress=False, distributed_timeout=3)
    ids, mask = tp_cases.prompts("chatglm2")
    if model.comm.rank == size - 1:  # this rank "hangs": it never joins the forward
        time.sleep(60)
        return {}
    t0 = time.monotonic()
    try:
        model.logits(ids, attention_mask=mask)
    except glmrt.GLMRTError as exc:
        return {"error": type(exc).__name__, "message": str(exc), "seconds": time.monotonic() - t0}
    return {"error": None, "seconds": time.monotonic() - t0}


THREAD_PROMPTS = ([5, 17, 42, 7, 99, 12, 250], [8, 3, 61])


def job_threads(size: int) -> dict:
    """Two threads share one tensor-parallel model. In order: thread A generates and, once its first
    token is out, thread B starts a generation of its own (B waits for A's, the same order on every
    rank): both must give their single-process tokens. Crossed: rank 0 starts A then B, the other
    ranks B then A: every call must fail with an error, never return another call's tokens."""
    import threading
    model = glmrt.load("synthetic:tp-chatglm2", backend="cpu", dtype="float32", tensor_parallel=size,
                       progress=False, distributed_timeout=30)
    out = {}

    def generate(key, prompt, started=None):
        try:
            tokens = []
            for step in model.stream([prompt], max_new_tokens=12, eos_token_id=[]):
                tokens.append(int(step[0]))
                if started is not None:
                    started.set()
            out[key] = tokens
        except glmrt.GLMRTError as exc:
            out[key] = f"{type(exc).__name__}: {exc}"
        finally:
            if started is not None:
                started.set()

    a_started = threading.Event()
    a = threading.Thread(target=generate, args=("ordered_a", THREAD_PROMPTS[0], a_started))
    a.start()
    a_started.wait(60)
    b = threading.Thread(target=generate, args=("ordered_b", THREAD_PROMPTS[1]))
    b.start()
    a.join(60)
    b.join(60)
    first, second = (0, 1) if model.comm.rank == 0 else (1, 0)
    t1 = threading.Thread(target=generate, args=(f"crossed_{first}", THREAD_PROMPTS[first]))
    t1.start()
    time.sleep(1.0)  # t1 holds the model (it takes the lock before any collective) when t2 starts
    t2 = threading.Thread(target=generate, args=(f"crossed_{second}", THREAD_PROMPTS[second]))
    t2.start()
    t1.join(90)
    t2.join(90)
    # After the failures the model still serves a call every rank makes.
    generate("after", THREAD_PROMPTS[1])
    return out


RSS_FIELD = os.environ.get("TP_RSS_FIELD", "VmRSS:")


def _rss_anon() -> int:
    """This process's resident anonymous memory in bytes (not the page cache of mmapped files)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(RSS_FIELD):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def job_memory(size: int, path: str) -> dict:
    """Peak anonymous memory while loading ``path`` as this rank, sampled every 2 ms, above what
    the process held before (torch and glmrt imported, the process group started)."""
    import threading
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    # What the first load imports (torch's meta-tensor registrations, ~70 MB of modules, used to
    # check the checkpoint's shapes) is a fixed cost, not weights: import it before the baseline.
    from glmrt.api import prepare
    prepare(path, dtype="float32", tensor_parallel=(size, dist.get_rank()), progress=False, materialize=False)
    torch.cat([torch.empty((2, 2), device="meta")] * 2).reshape(4, 2).transpose(0, 1).reshape(8)
    base = _rss_anon()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_anon())
            time.sleep(0.002)
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    model = glmrt.load(path, backend="cpu", dtype="float32", tensor_parallel=size, progress=False,
                       distributed_timeout=60)
    done.set()
    t.join()
    peak[0] = max(peak[0], _rss_anon())
    return {"peak_bytes": peak[0] - base, "weight_bytes": model.weight_bytes()}


def main() -> None:
    torch.set_num_threads(1)
    out_dir, job = sys.argv[1], sys.argv[2]
    tp_cases.register()
    size = int(os.environ["WORLD_SIZE"])
    if job == "cases":
        args = sys.argv[3:]
        dirs = [a for a in args if a.startswith("dir:")]
        names = [a for a in args if "=" not in a and a not in dirs]
        quant = [a for a in args if "=" in a and a not in dirs]
        result = job_cases(size, names, quant, dirs)
    elif job == "half":  # half PATH DTYPE IDS: the reference kernels' logits of one prompt
        path, dtype, ids = sys.argv[3], sys.argv[4], [int(i) for i in sys.argv[5].split(",")]
        model = glmrt.load(path, backend="cpu", dtype=dtype, tensor_parallel=size, progress=False,
                           kernels="reference", token_ids=tp_cases.SAT_SPECIAL, distributed_timeout=60)
        result = {"logits": model.logits(torch.tensor([ids]))}
    elif job == "memory":
        result = job_memory(size, sys.argv[3])
    elif job == "hang":
        result = job_hang(size)
    elif job == "threads":
        result = job_threads(size)
    else:
        raise SystemExit(f"unknown job {job}")
    torch.save(result, os.path.join(out_dir, f"rank{os.environ['RANK']}.pt"))
    sys.stdout.flush()
    os._exit(0)  # do not wait in the process group's destructor for a rank that hangs on purpose


if __name__ == "__main__":
    main()
