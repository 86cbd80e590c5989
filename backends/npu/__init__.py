"""Huawei Ascend through torch_npu. Probed in a subprocess so a broken CANN install never breaks
`import torch` or `import glmrt` (see glmrt/_bootstrap.py)."""

from __future__ import annotations

from ..base import Backend, ProbeResult, Verification
from ..._bootstrap import probe_torch_npu


class NPUBackend(Backend):
    name = "npu"
    aliases = ("ascend",)
    device_type = "npu"

    def probe(self) -> ProbeResult:
        usable, reason = probe_torch_npu()
        return ProbeResult(False, "the npu backend's lowering to torch_npu ops is not implemented yet; "
                                  f"torch_npu: {reason}")

    def verification(self) -> Verification:
        return Verification("unverified", "not implemented yet: no contract tests against torch_npu's documented ops")
