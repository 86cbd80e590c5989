"""Sunway (SW26010-Pro) through a swDeepSpeed-compatible shim. Not implemented yet."""

from __future__ import annotations

from ..base import Backend, ProbeResult, Verification


class SunwayBackend(Backend):
    name = "sunway"
    aliases = ("sw", "swdeepspeed")
    device_type = "cpu"

    def probe(self) -> ProbeResult:
        return ProbeResult(False, "the sunway backend (swDeepSpeed-compatible shim with LDM-tiled CPU kernels) "
                                  "is not implemented yet")

    def verification(self) -> Verification:
        return Verification("unverified", "not implemented yet")
