"""The machine a bench run is made on: the hardware and software stamp every result carries
(CPU, GPUs, load average, torch and glmrt versions, the commit), and the device bandwidth that a
setting's achieved bandwidth is compared with (a STREAM-like read on a CPU; on a GPU the
published figure and a measured device-to-device copy).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

# The STREAM-like read buffer: CPU_STREAM_CACHE_FACTOR x the last-level caches (STREAM's rule: an
# array at least 4 times the caches, so no pass is served from them), within [MIN, MAX] bytes and at
# most a quarter of the memory available; 1 GiB where the caches are unknown.
CPU_STREAM_CACHE_FACTOR = 4
CPU_STREAM_MIN_BYTES = 256 << 20
CPU_STREAM_MAX_BYTES = 2 << 30
CPU_STREAM_DEFAULT_BYTES = 1 << 30
CPU_STREAM_REPEATS = 7
DEVICE_COPY_BYTES = 1 << 30
DEVICE_COPY_REPEATS = 20


# Published memory bandwidth of GPUs, matched against torch's device name: first row whose every
# `needles` word is in the name and none of its `excluded` words is. (PERF.md's figures.)
PUBLISHED_BANDWIDTH = (
    {"needles": ("H200",), "excluded": (), "bytes_per_s": 4.8e12, "source": "NVIDIA H200: 4.8 TB/s (published)"},
    {"needles": ("H100",), "excluded": ("PCIE", "NVL"), "bytes_per_s": 3.35e12,
     "source": "NVIDIA H100 SXM: 3.35 TB/s (published)"},
    {"needles": ("A100", "80GB"), "excluded": ("PCIE",), "bytes_per_s": 2.04e12,
     "source": "NVIDIA A100-80G SXM: 2.04 TB/s (published)"},
)


def _transformers_version() -> str | None:
    from importlib import metadata
    try:
        return metadata.version("transformers")
    except metadata.PackageNotFoundError:
        return None


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def cpu_info() -> dict:
    text = _read("/proc/cpuinfo")
    model, cores = None, set()
    physical, core = None, None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "model name" and model is None:
            model = value
        elif key == "physical id":
            physical = value
        elif key == "core id":
            core = value
        elif not line.strip() and core is not None:
            cores.add((physical, core))
            physical, core = None, None
    if core is not None:
        cores.add((physical, core))
    meminfo = _read("/proc/meminfo")
    mem_total = None
    for line in meminfo.splitlines():
        if line.startswith("MemTotal:"):
            mem_total = int(line.split()[1]) * 1024
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    return {"model": model or platform.processor() or "unknown", "logical_cpus": os.cpu_count(),
            "physical_cores": len(cores) or None, "usable_cpus": usable, "memory_bytes": mem_total,
            "last_level_cache_bytes": last_level_cache_bytes()}


def last_level_cache_bytes(cpu_root: Path | str = "/sys/devices/system/cpu") -> int | None:
    """Total size of the last-level caches, every instance counted once (one L3 per socket, or per
    chiplet), from sysfs; `lscpu` where sysfs has no cache entries; None if unknown."""
    instances: dict[tuple[int, str], int] = {}  # (level, CPUs sharing it) -> bytes
    for entry in sorted(Path(cpu_root).glob("cpu[0-9]*/cache/index[0-9]*")):
        level, size = _read(str(entry / "level")).strip(), _parse_size(_read(str(entry / "size")))
        kind = _read(str(entry / "type")).strip()
        if not level.isdigit() or size is None or kind == "Instruction":
            continue
        shared = _read(str(entry / "shared_cpu_list")).strip() or str(entry.parent.parent.name)
        instances[(int(level), shared)] = size
    if instances:
        top = max(level for level, _ in instances)
        return sum(size for (level, _), size in instances.items() if level == top)
    return _lscpu_last_level_cache_bytes()


def _parse_size(text: str) -> int | None:
    """sysfs cache sizes: "48K", "2048K", "32M"."""
    text = text.strip().upper().removesuffix("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    try:
        return int(text.rstrip("KMG")) * mult
    except ValueError:
        return None


def _lscpu_last_level_cache_bytes() -> int | None:
    try:  # ALL-SIZE: the size of every instance of that cache together, in bytes with -B
        proc = subprocess.run(["lscpu", "-B", "--caches=LEVEL,TYPE,ALL-SIZE"], capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    best = None
    for line in proc.stdout.splitlines() if proc.returncode == 0 else []:
        parts = line.split()
        if len(parts) == 3 and parts[0].isdigit() and parts[2].isdigit() and parts[1] != "Instruction":
            if best is None or int(parts[0]) > best[0]:
                best = (int(parts[0]), int(parts[2]))
    return best[1] if best else None


def cpu_stream_buffer_bytes(cache_bytes: int | None, available_bytes: int | None = None) -> int:
    """The read probe's buffer size for last-level caches of `cache_bytes` (see CPU_STREAM_*)."""
    if not cache_bytes:
        size = CPU_STREAM_DEFAULT_BYTES
    else:
        size = min(max(CPU_STREAM_CACHE_FACTOR * cache_bytes, CPU_STREAM_MIN_BYTES), CPU_STREAM_MAX_BYTES)
    if available_bytes:
        size = min(size, max(available_bytes // 4, CPU_STREAM_MIN_BYTES))
    return size - size % 64


def available_memory_bytes() -> int | None:
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def gpu_info() -> list[dict]:
    """GPUs from nvidia-smi (name, driver, memory), or [] when there is none."""
    try:
        proc = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                               "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if proc.returncode != 0:
        return []
    out = []
    for line in proc.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) >= 3:
            try:
                memory = int(float(parts[2])) * (1 << 20)
            except ValueError:
                memory = None
            out.append({"name": parts[0], "driver": parts[1], "memory_bytes": memory})
    return out


def git_commit(package_dir: Path | None = None) -> dict:
    """The commit of the checkout glmrt was imported from, else the one an installed copy was built
    from, else "unknown"."""
    package_dir = package_dir or Path(__file__).resolve().parent.parent  # the glmrt package

    def git(*cmd: str) -> str | None:
        try:
            proc = subprocess.run(["git", "-C", str(package_dir), *cmd], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    # An installed copy may sit inside some other repository (a .venv in a checkout): only a
    # checkout whose root holds this very package counts. An installed copy carries the commit
    # it was built from (glmrt/_build_info.json, written by CMake).
    if not top or Path(top).resolve() != package_dir.parent:
        try:
            info = json.loads((package_dir / "_build_info.json").read_text(encoding="utf-8"))
            commit = str(info.get("commit", "unknown"))
            if len(commit) == 40 and all(c in "0123456789abcdef" for c in commit):
                dirty = info.get("dirty")
                return {"commit": commit, "dirty": dirty if isinstance(dirty, bool) else None}
        except (OSError, ValueError, AttributeError):
            pass
        return {"commit": "unknown", "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": git("rev-parse", "HEAD") or "unknown", "dirty": bool(status) if status is not None else None}


def load_average() -> list[float] | None:
    """The system's 1, 5 and 15 minute load averages: other work competing for the CPUs skews timings."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def stamp(threads: int) -> dict:
    import torch
    from .. import __version__
    software = {"python": platform.python_version(), "torch": torch.__version__,
                "torch_cuda": torch.version.cuda, "torch_hip": getattr(torch.version, "hip", None),
                "glmrt": __version__, "transformers": _transformers_version(), **git_commit()}
    hardware = {"cpu": cpu_info(), "threads": threads, "gpus": gpu_info(), "os": platform.platform(),
                "machine": platform.machine(), "load_average": {"start": load_average(), "end": None}}
    return {"hardware": hardware, "software": software}


# =============================================================================================
# device bandwidth


def published_bandwidth(device_name: str) -> dict | None:
    """{"bytes_per_s", "source"} for a GPU name PERF.md gives a figure for, else None."""
    upper = device_name.upper()
    for row in PUBLISHED_BANDWIDTH:
        if all(n in upper for n in row["needles"]) and not any(x in upper for x in row["excluded"]):
            return {"bytes_per_s": row["bytes_per_s"], "source": row["source"]}
    return None


def cpu_read_bandwidth(threads: int, buffer_bytes: int | None = None, repeats: int = CPU_STREAM_REPEATS) -> dict:
    """STREAM-like read of a buffer much larger than the caches, on `threads` threads; the best and
    the median of `repeats` passes after a warm-up. glmrt._native_cpu's read_stream (wide vector
    loads, OpenMP, no writes: what a weight-streaming decode GEMV does) when it is built; else
    torch.sum over float32, which reads 10-25% slower than the memory allows on the machines tried,
    so fractions of it overstate a kernel's efficiency. Both are reported when both run."""
    import torch
    from .. import _native
    cache = last_level_cache_bytes() or 0
    size = buffer_bytes or cpu_stream_buffer_bytes(cache, available_memory_bytes())
    size -= size % 64
    module = _native.load("_native_cpu")[0]
    if module is not None and not hasattr(module, "read_stream"):
        module = None  # a module built before the probe
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        buf = torch.ones(size // 4, dtype=torch.float32)
        probes = {"torch.sum": buf.sum}
        if module is not None:
            probes = {"native read_stream": lambda: module.read_stream(buf.data_ptr(), size, threads), **probes}
        results = {}
        for name, fn in probes.items():
            fn()  # warm-up: pages touched, threads started
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            results[name] = times
        nbytes = size
        del buf
    finally:
        torch.set_num_threads(previous)
    name, times = next(iter(results.items()))
    method = (f"{name} ({module.read_stream_isa()} loads)" if module is not None else name)
    others = "; ".join(f"{n}: {nbytes / min(t) / 1e9:.1f} GB/s" for n, t in list(results.items())[1:])
    return {"kind": "measured-read", "method": f"{method} over a {nbytes / 2**30:.2f} GiB buffer, {threads} threads, "
                                               f"best of {repeats}" + (f" (also {others})" if others else ""),
            "bytes_per_s": nbytes / min(times), "median_bytes_per_s": nbytes / statistics.median(times),
            "buffer_bytes": nbytes, "threads": threads, "last_level_cache_bytes": cache or None}


def device_copy_bandwidth(device, sync: Callable[[], None], nbytes: int = DEVICE_COPY_BYTES,
                          repeats: int = DEVICE_COPY_REPEATS) -> dict:
    """Device-to-device copy, bytes read + written per second (best and median of `repeats`)."""
    import torch
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        sync()
        times.append(time.perf_counter() - t0)
    moved = 2 * src.numel() * 4
    return {"method": f"tensor.copy_ of {nbytes / 2**30:.2f} GiB on the device, bytes read + written, "
                      f"best of {repeats}",
            "bytes_per_s": moved / min(times), "median_bytes_per_s": moved / statistics.median(times)}
