"""Huawei Ascend through torch_npu.

torch_npu is probed in a subprocess (glmrt/_bootstrap.py), so a broken CANN install never breaks
`import torch` or `import glmrt`, and is imported here only when a kernel runs or the device is
asked for. The kernels (kernels.py) call torch_npu's fused inference ops where a node's shapes,
dtypes and the device's product allow it, and say why not where they do not.
"""

from __future__ import annotations

import torch

from ..._bootstrap import probe_torch_npu
from ..base import Backend, Capabilities, ProbeResult, Verification
from . import kernels


class NPUBackend(Backend):
    name = "npu"
    aliases = ("ascend",)
    device_type = "npu"

    def __init__(self, device: str | torch.device | None = None, soc: str | None = None):
        """device: run on this torch device instead of "npu" (the contract tests run the kernels on
        the CPU against a torch_npu test double). soc: the product name as
        torch.npu.get_device_name() gives it (e.g. "Ascend910B3", "Ascend910A"); by default asked
        from the device, or the Atlas A2 (910B) behaviour is assumed where there is none."""
        self._device_override = torch.device(device) if device is not None else None
        self._soc = soc
        self._product: kernels.Product | None = None
        self._kernel_set = kernels.NPUKernels(self.product)

    # ------------------------------------------------------------------ contract
    def probe(self) -> ProbeResult:
        usable, reason = probe_torch_npu()
        return ProbeResult(usable, reason)

    def verification(self) -> Verification:
        return Verification(
            "contract-verified",
            "no Ascend hardware was used: tests/lowering/test_npu_contract.py runs every torch_npu kernel on the CPU "
            "against a test double (tests/npu_double) that implements the documented semantics and argument "
            "constraints of npu_rms_norm, npu_rotary_mul, npu_apply_rotary_pos_emb, npu_swiglu, "
            "npu_fused_infer_attention_score, npu_weight_quant_batchmatmul and npu_convert_weight_to_int4pack "
            "(torch_npu 2.13.0's op schemas and op documentation) and raises where the real op refuses; it checks "
            "which ops each GLM generation lowers to on each Ascend product and why others fall back, each kernel "
            "against the reference op, and whole tiny models (prefill and KV-cache decode, causal and prefix masks, "
            "fp32/bf16/fp16, INT8/INT4 per-channel and group-wise) against the CPU plan. tests/unit/test_npu_probe.py "
            "checks that a torch_npu without CANN breaks neither `import glmrt` nor `glmrt info` (also tried with the "
            "real torch-npu 2.13.0 wheel on x86-64 without CANN). Static and graph decode run against the double's "
            "NPUGraph (replay of the captured ops). Numerics of the real kernels, the int4 pack's bit order, "
            "performance and real NPUGraph capture are unverified. UNVERIFIED: the attention mask polarity of "
            "npu_fused_infer_attention_score (glmrt passes True = masked, as documented for npu_incre_flash_attention "
            "and npu_fusion_attention; this op's own documentation does not state it and its example contradicts "
            f"it); check on the device with: {kernels.FIA_MASK_POLARITY_CHECK}")

    def capabilities(self) -> Capabilities:
        # bfloat16 on the Atlas A2/A3 only (kernels.BF16_PRODUCTS: torch_npu's IsBF16Supported()).
        return Capabilities(dtypes=kernels.product_dtypes(self.product().family), quant_formats=("int8", "int4"),
                            graph_capture=True,  # torch.npu.NPUGraph / torch.npu.graph
                            collective_backend="hccl", memory_query=True)

    def native_info(self) -> dict:
        p = self.product()
        module = kernels.loaded_vendor()
        if module is None:
            vendor_module = "not imported (plans assume op-plugin's documented signatures)"
        else:  # says so when a test double stands in (its version ends in +double)
            version = getattr(module, "__version__", "unknown version")
            vendor_module = f"{version} from {getattr(module, '__file__', '?')}"
        return {"built": False, "archs": [], "module": None,
                "reason": "no glmrt native kernels for Ascend; the kernels are torch_npu's own ops",
                "product": p.describe(), "torch_npu": vendor_module}

    def kernels(self):
        return self._kernel_set.kernel_list()

    def device(self) -> torch.device:
        if self._device_override is not None:
            return self._device_override
        kernels.vendor()  # importing torch_npu registers the "npu" device with torch
        return torch.device("npu")

    def synchronize(self) -> None:
        if self._device_override is None:
            kernels.vendor()
            torch.npu.synchronize()

    def memory_stats(self) -> dict:
        if self._device_override is not None:
            return {}
        kernels.vendor()
        return {"peak_bytes": torch.npu.max_memory_allocated(), "current_bytes": torch.npu.memory_allocated()}

    def prepare_weights(self, graph, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Convert the INT4 weights of ``graph`` to the int32 pack npu_weight_quant_batchmatmul takes,
        ahead of the first forward (weights already on this backend's device). Not called by the
        runtime yet (the contract has no such slot); without it the first forward converts them.
        Returns ``weights`` unchanged: the conversions live in the kernels' cache."""
        for node in graph.nodes:
            q = node.attrs.get("quant")
            if q is not None and q["bits"] == 4 and self._kernel_set.supports_weight_quant_matmul(node) is None:
                self._kernel_set.int4_cache.get(weights[node.params["weight"]], q["in_features"])
        return weights

    # ------------------------------------------------------------------ helpers
    def product(self) -> kernels.Product:
        if self._product is None:
            self._product = kernels.detect_product(self._soc)
        return self._product
