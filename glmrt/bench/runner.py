"""One bench run from start to end: the settings, the stamp, the device bandwidth, the reference
logits, then every setting in its own worker; the results document, written as results.json,
results.md and results.png when an output directory is given.
"""

from __future__ import annotations

import datetime
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from ..errors import ConfigError, GLMRTError, InputError
from .machine import cpu_read_bandwidth, load_average, stamp
from .metrics import METRIC_NOTES, _log
from .render import write_outputs
from .settings import BenchConfig, Setting, describe_model, plan_settings, prompt_ids, resolved_model
from .workers import run_in_process, run_worker

SCHEMA_VERSION = 1


def run_bench(cfg: BenchConfig, argv: list[str] | None = None) -> dict | None:
    """Run every setting of `cfg`; returns the results document (and writes it if cfg.out).

    With cfg.tensor_parallel (under torchrun), every rank runs this: the settings run in this
    process, the same on every rank, their collectives inside; rank 0 alone measures the
    bandwidth, computes the reference and writes the document; the other ranks return None."""
    import torch
    from . import metrics
    if cfg.tensor_parallel is not None:
        metrics.LOG_PROGRESS = os.environ.get("RANK", "0") == "0"
    model_info, model_cfg = describe_model(cfg.model, cfg.layers)
    if cfg.prompt_len + cfg.gen_len > model_cfg.max_positions:
        raise InputError(f"prompt ({cfg.prompt_len}) + generated tokens ({cfg.gen_len}) exceed the model's "
                         f"{model_cfg.max_positions} positions")
    settings, skipped = plan_settings(cfg, model_cfg)
    for row in skipped:
        _log(f"glmrt bench: skipping {row['setting']}: {row['reason']}")
    if not settings:
        raise ConfigError("nothing to run: every requested backend or setting was skipped (see the lines above)")
    comm = _join_group(cfg, settings) if cfg.tensor_parallel is not None else None
    rank = comm.rank if comm is not None else 0
    torch.set_num_threads(cfg.threads)
    prompts = prompt_ids(model_cfg.vocab_size, cfg.batch, cfg.prompt_len, cfg.seed)
    doc = {"schema_version": SCHEMA_VERSION, "kind": "glmrt-bench",
           "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": cfg.launch_command(), "argv": list(sys.argv if argv is None else argv),
           "config": asdict(cfg), "model": model_info, **stamp(cfg.threads),
           "prompt_ids": prompts, "skipped": skipped, "metric_notes": METRIC_NOTES}
    if comm is not None:
        doc["tensor_parallel"] = {"size": comm.size, "transport": comm.transport, "launcher": "torchrun",
                                  "threads_per_rank": cfg.threads}
    _log(f"glmrt bench: {len(settings)} setting(s) of {cfg.model}"
         f"{f' (layers {cfg.layers})' if cfg.layers else ''}, {cfg.threads} thread(s): "
         f"{', '.join(s.id for s in settings)}")

    with tempfile.TemporaryDirectory(prefix="glmrt-bench-") as tmp:
        workdir = Path(tmp)
        if rank == 0:
            doc["device_bandwidth"] = measure_device_bandwidth(cfg, settings, workdir)
        base_task = {"model": resolved_model(cfg.model), "layers": cfg.layers, "threads": cfg.threads, "batch": cfg.batch,
                     "prompt_len": cfg.prompt_len, "gen_len": cfg.gen_len, "repeat": cfg.repeat,
                     "warmup": cfg.warmup, "prompt_ids": prompts, "full_num_layers": model_info["full_num_layers"],
                     "reference_logits": str(workdir / "reference_logits.pt")}
        if rank == 0:  # one process: the other ranks wait at the barrier below
            _log("glmrt bench: [reference] float32 CPU logits through the plain-torch reference ops")
            reference = run_worker(dict(base_task, kind="reference", logits_path=base_task["reference_logits"]),
                                   workdir, "reference")
            if reference.get("status") != "ok":
                raise GLMRTError(f"the float32 CPU reference failed: {reference.get('error')}")
            doc["reference"] = {"description": reference["description"]}
        if comm is not None:
            comm.barrier("the bench's start (rank 0 measured the bandwidth and the reference)")
            base_task.update(tensor_parallel=comm.size,
                             reference_logits=base_task["reference_logits"] if rank == 0 else None)
        results = []
        for i, setting in enumerate(settings, 1):
            _log(f"glmrt bench: [{i}/{len(settings)}] {setting.id}")
            kind = "glmrt" if setting.runner == "glmrt" else "baseline"
            task = dict(base_task, kind=kind, setting=asdict(setting))
            # Tensor-parallel: in this process, in lockstep with the other ranks (a worker process
            # could not join the process group).
            raw = run_in_process(task) if comm is not None else run_worker(task, workdir, f"setting{i}")
            if rank == 0:
                results.append(finish_result(setting, raw, doc["device_bandwidth"]))
                if results[-1]["status"] != "ok":
                    _log(f"glmrt bench: {setting.id} failed: {results[-1]['error']}")
    if rank != 0:
        return None
    doc["results"] = results
    doc["hardware"]["load_average"]["end"] = load_average()
    if cfg.out:
        write_outputs(doc, Path(cfg.out))
    return doc


def _join_group(cfg: BenchConfig, settings: list[Setting]):
    """The tensor-parallel communicator every setting of a torchrun-launched run shares (the
    settings were planned to share its transport: see plan_settings)."""
    from ..api import _join_group as join
    from ..backends import get_backend
    from ..distributed import DEFAULT_TIMEOUT_S
    return join(get_backend(settings[0].backend), cfg.tensor_parallel, DEFAULT_TIMEOUT_S)


def measure_device_bandwidth(cfg: BenchConfig, settings: list[Setting], workdir: Path) -> dict:
    """{device: bandwidth figure} for every device a setting runs on."""
    out: dict[str, dict] = {}
    for setting in settings:
        device = setting.device
        if device in out:
            continue
        if device.split(":")[0] == "cpu":
            _log(f"glmrt bench: measuring CPU read bandwidth ({cfg.threads} threads)")
            out[device] = cpu_read_bandwidth(cfg.threads)
            continue
        backend = setting.backend or next(s.backend for s in settings if s.device == device and s.backend)
        _log(f"glmrt bench: measuring {device} bandwidth (device-to-device copy)")
        result = run_worker({"kind": "device_bandwidth", "backend": backend, "threads": cfg.threads},
                            workdir, f"bandwidth-{len(out)}")
        if result.get("status") == "ok":
            result.pop("status")
            out[device] = result
        else:
            out[device] = {"kind": "unknown", "bytes_per_s": None, "source": f"measurement failed: {result['error']}"}
    return out


def finish_result(setting: Setting, raw: dict, device_bandwidth: dict) -> dict:
    """A worker's result with the setting's identity and its fraction of the device's bandwidth."""
    result = {"id": setting.id, **asdict(setting), "status": "ok" if raw.get("status") == "ok" else "error"}
    if result["status"] != "ok":
        result["error"] = raw.get("error", "unknown error")
        return result
    result.update((k, v) for k, v in raw.items() if k != "status")
    reference = device_bandwidth.get(setting.device) or {}
    bw = result["bandwidth"]
    bw["device_bytes_per_s"] = reference.get("bytes_per_s")
    bw["device_bandwidth_kind"] = reference.get("kind")
    bw["fraction_of_device"] = (bw["achieved_bytes_per_s"] / reference["bytes_per_s"]
                                if reference.get("bytes_per_s") else None)
    copy = (reference.get("measured_copy") or {}).get("bytes_per_s")
    bw["fraction_of_measured_copy"] = bw["achieved_bytes_per_s"] / copy if copy else None
    return result
