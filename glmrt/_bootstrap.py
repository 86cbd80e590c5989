"""Keep `import glmrt` (and the `import torch` it does) working when a vendor torch plug-in is
installed but broken.

torch >= 2.5 auto-loads installed device back-ends (torch_npu registers itself that way). With
torch_npu installed but no CANN toolkit, a plain `import torch` then fails on a missing
libhccl.so. Before glmrt imports torch for the first time, if torch_npu is installed, probe it
in a subprocess with autoload off; if the probe fails, turn autoload off in this process too. The
npu backend reports the probe's reason.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

NPU_PROBE_CODE = (
    "import torch, torch_npu\n"
    "ok = torch.npu.is_available() and torch.npu.device_count() > 0\n"
    "print('ok' if ok else 'no-device')\n"
)

_npu_probe: tuple[bool, str] | None = None


def probe_torch_npu(timeout: float = 120.0) -> tuple[bool, str]:
    """(usable, reason) for torch_npu, probed once per process in a subprocess."""
    global _npu_probe
    if _npu_probe is not None:
        return _npu_probe
    if importlib.util.find_spec("torch_npu") is None:
        _npu_probe = (False, "torch_npu is not installed (pip install torch-npu matching your torch and CANN)")
        return _npu_probe
    env = dict(os.environ, TORCH_DEVICE_BACKEND_AUTOLOAD="0")
    try:
        proc = subprocess.run([sys.executable, "-c", NPU_PROBE_CODE], env=env, capture_output=True, text=True,
                              timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        _npu_probe = (False, f"probing torch_npu failed: {exc}")
        return _npu_probe
    if proc.returncode == 0 and proc.stdout.strip().endswith("ok"):
        _npu_probe = (True, "torch_npu imports and sees an Ascend device")
    elif proc.returncode == 0:
        _npu_probe = (False, "torch_npu imports but sees no Ascend device (check ASCEND_RT_VISIBLE_DEVICES and the driver)")
    else:
        lines = [ln for ln in (proc.stderr or "").strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else f"exit code {proc.returncode}"
        _npu_probe = (False, f"torch_npu is installed but does not import: {last} "
                             "(install the CANN toolkit and NNAL matching torch_npu, then source set_env.sh)")
    return _npu_probe


def prepare_torch_import() -> None:
    if "torch" in sys.modules or os.environ.get("TORCH_DEVICE_BACKEND_AUTOLOAD") is not None:
        return
    if importlib.util.find_spec("torch_npu") is None:
        return
    usable, _ = probe_torch_npu()
    if not usable:
        os.environ["TORCH_DEVICE_BACKEND_AUTOLOAD"] = "0"
