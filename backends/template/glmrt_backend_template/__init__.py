"""Template of an out-of-tree glmrt backend. It runs on the host CPU so it can be tried anywhere.

A backend is a Backend subclass (glmrt.backends.base documents the contract): a name, the torch
device type, probe(), verification(), and optionally capabilities() and kernels(). Every IR op
without a kernel here runs glmrt's plain-torch reference on this backend's device, and the plan
reports it as a fallback; `glmrt check --backend template --strict` turns fallbacks into errors.

To port to a chip: keep the structure, replace the toy kernel by calls into your vendor library or
a compiled module (pass raw data pointers, shapes and dtype codes, as glmrt's own native modules
do), and import vendor modules only inside methods, never at import time of this module.
"""

from __future__ import annotations

import torch

from glmrt.backends.base import NATIVE, Backend, Capabilities, Kernel, ProbeResult, Verification


def residual_add_supports(node) -> str | None:
    """supports(node) sees the whole node (shapes, dtypes, attributes): None when the kernel runs
    it, else the reason it cannot, which the plan reports."""
    if node.attrs.get("alpha", 1.0) != 1.0:
        return f"residual scaled by alpha={node.attrs['alpha']} (DeepNorm): only a plain add is implemented"
    dtype = node.input_specs[0].dtype
    if dtype != torch.float32:
        return f"dtype {dtype}: this kernel runs float32 only"
    return None


def residual_add(ctx, node, inputs, params):
    """The toy "native" kernel: h = branch + residual, written into a fresh tensor.

    The signature is every kernel's: fn(ctx, node, inputs, params). A real port calls its own op
    here, e.g. my_ext.add(out.data_ptr(), a.data_ptr(), b.data_ptr(), a.numel())."""
    residual, branch = inputs  # (B, T, H) each
    out = torch.empty_like(branch)
    torch.add(branch, residual, out=out)
    return out


class TemplateBackend(Backend):
    name = "template"
    aliases = ()
    device_type = "cpu"  # a chip's backend names its torch device type ("npu", "cuda", ...)

    def probe(self) -> ProbeResult:
        # Must never raise and never break `import torch`: probe a vendor stack in a subprocess.
        return ProbeResult(True, "host CPU (glmrt backend template)")

    def verification(self) -> Verification:
        # State the highest level reached, and where; never more. "run-verified" needs
        # `glmrt check --backend <name>` passing on the real device.
        return Verification("unverified", "a template: replace with what your port verified, where and how")

    def capabilities(self) -> Capabilities:
        return Capabilities(dtypes=(torch.float32,), quant_formats=(), graph_capture=False,
                            collective_backend=None, memory_query=False)

    def kernels(self):
        return [Kernel("residual", "template.residual_add", NATIVE, residual_add, residual_add_supports)]
