"""One bench run from start to end: the settings, the stamp, the device bandwidth, the reference
logits, then every setting in its own worker; the results document, written as results.json,
results.md and results.png when an output directory is given.
"""

from __future__ import annotations

import datetime
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from ..errors import ConfigError, GLMRTError, InputError
from .machine import cpu_read_bandwidth, load_average, stamp
from .metrics import METRIC_NOTES, _log
from .render import write_outputs
from .settings import BenchConfig, Setting, describe_model, plan_settings, prompt_ids, resolved_model
from .workers import run_worker

SCHEMA_VERSION = 1


def run_bench(cfg: BenchConfig, argv: list[str] | None = None) -> dict:
    """Run every setting of `cfg`; returns the results document (and writes it if cfg.out)."""
    import torch
    model_info, model_cfg = describe_model(cfg.model, cfg.layers)
    if cfg.prompt_len + cfg.gen_len > model_cfg.max_positions:
        raise InputError(f"prompt ({cfg.prompt_len}) + generated tokens ({cfg.gen_len}) exceed the model's "
                         f"{model_cfg.max_positions} positions")
    settings, skipped = plan_settings(cfg, model_cfg)
    for row in skipped:
        _log(f"glmrt bench: skipping {row['setting']}: {row['reason']}")
    if not settings:
        raise ConfigError("nothing to run: every requested backend or setting was skipped (see the lines above)")
    torch.set_num_threads(cfg.threads)
    prompts = prompt_ids(model_cfg.vocab_size, cfg.batch, cfg.prompt_len, cfg.seed)
    doc = {"schema_version": SCHEMA_VERSION, "kind": "glmrt-bench",
           "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": cfg.command(), "argv": list(sys.argv if argv is None else argv),
           "config": asdict(cfg), "model": model_info, **stamp(cfg.threads),
           "prompt_ids": prompts, "skipped": skipped, "metric_notes": METRIC_NOTES}
    _log(f"glmrt bench: {len(settings)} setting(s) of {cfg.model}"
         f"{f' (layers {cfg.layers})' if cfg.layers else ''}, {cfg.threads} thread(s): "
         f"{', '.join(s.id for s in settings)}")

    with tempfile.TemporaryDirectory(prefix="glmrt-bench-") as tmp:
        workdir = Path(tmp)
        doc["device_bandwidth"] = measure_device_bandwidth(cfg, settings, workdir)
        base_task = {"model": resolved_model(cfg.model), "layers": cfg.layers, "threads": cfg.threads, "batch": cfg.batch,
                     "prompt_len": cfg.prompt_len, "gen_len": cfg.gen_len, "repeat": cfg.repeat,
                     "warmup": cfg.warmup, "prompt_ids": prompts, "full_num_layers": model_info["full_num_layers"],
                     "reference_logits": str(workdir / "reference_logits.pt")}
        _log("glmrt bench: [reference] float32 CPU logits through the plain-torch reference ops")
        reference = run_worker(dict(base_task, kind="reference", logits_path=base_task["reference_logits"]),
                               workdir, "reference")
        if reference.get("status") != "ok":
            raise GLMRTError(f"the float32 CPU reference failed: {reference.get('error')}")
        doc["reference"] = {"description": reference["description"]}
        results = []
        for i, setting in enumerate(settings, 1):
            _log(f"glmrt bench: [{i}/{len(settings)}] {setting.id}")
            kind = "glmrt" if setting.runner == "glmrt" else "baseline"
            raw = run_worker(dict(base_task, kind=kind, setting=asdict(setting)), workdir, f"setting{i}")
            results.append(finish_result(setting, raw, doc["device_bandwidth"]))
            if results[-1]["status"] != "ok":
                _log(f"glmrt bench: {setting.id} failed: {results[-1]['error']}")
    doc["results"] = results
    doc["hardware"]["load_average"]["end"] = load_average()
    if cfg.out:
        write_outputs(doc, Path(cfg.out))
    return doc


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
