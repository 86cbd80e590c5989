"""glmrt's native GPU kernels (native/gpu) wrapped as plan kernels, with shape-aware predicates.

One kernel source tree is compiled twice: as CUDA into ``glmrt._native_cuda`` and as HIP into
``glmrt._native_hip``. :class:`NativeGpuKernels` wraps either module; the cuda backend uses it with
``_native_cuda`` and the rocm backend (backends/rocm/kernels.py) with ``_native_hip``.

Kernels:
  * ``native.rms_norm`` (op ``norm``): RMSNorm, fp32 math, both rounding conventions
    (``round_before_weight``), fp32 / bf16 / fp16, any width.
  * ``native.layer_norm`` (op ``norm``, kind ``layernorm``): LayerNorm with optional bias
    (ChatGLM-6B, GLM-130B), fp32 math rounded once, fp32 / bf16 / fp16, any width.
  * ``native.residual_rms_norm`` (op ``residual_norm``, the node glmrt.fusion makes): h = branch +
    residual * alpha rounded as torch rounds it in the model dtype, then RMSNorm(h) with either
    rounding convention, in one pass over the row; writes h only when the node emits it. Only
    RMSNorm nodes whose residual and branch share one dtype and shape (supports() refuses the
    rest, so LayerNorm models keep their two separate nodes).
  * ``native.rope_interleaved`` (op ``rope``, kind ``interleaved``: ChatGLM2/3, GLM-4): the split of
    the fused qkv and the GPT-J-pairing partial rotary of q and k in one launch, each product and
    sum rounded to the model dtype as torch rounds them (so q and k equal glmrt.ops.rope bit for
    bit); the cos / sin tables are glmrt.ops.rope_tables', shared per step through ctx.memo. The
    NeoX-pairing and 2-D (ChatGLM-6B) kinds are refused and run the reference op.
  * ``native.quant_gemv`` (op ``linear``, weight-only INT8 / INT4 nodes only): the W8A16 / W4A16
    GEMV for decode, per-channel or group-wise scales (g a multiple of 32), optional bias. Used
    when the activations have at most :data:`GEMV_MAX_M` rows (batch * new tokens); graph shapes
    carry the symbols B and T, so that is decided per call: a larger M (prefill) takes the core's
    reference path on the same device (dequantize, then cuBLAS through torch), whose numbers the
    GEMV kernel is tested against. When the node's leading dims are concrete and exceed the bound,
    supports() refuses it so the plan shows the torch path directly.
  Unquantized linears stay on cuBLAS (torch); supports() says so.

The wrappers pass raw device pointers, the device index and the current torch stream
(``torch.cuda.current_stream().cuda_stream``, also a HIP stream on ROCm torch), never synchronize
and allocate outputs with torch, so they run inside CUDA / HIP graph capture.
"""

from __future__ import annotations

import math

import torch

from ... import _native, ops
from ..base import NATIVE, Kernel

# Decode-sized activations: the GEMV re-reads the weight once per GEMV_ROWS_PER_LAUNCH (4) rows,
# so beyond 8 rows dequantize + cuBLAS is the better path.
GEMV_MAX_M = 8
QUANT_BITS = (8, 4)
INT32_MAX = 2**31 - 1


def _concrete_rows(shape) -> int | None:
    """Product of the leading dims when all are integers, else None (symbolic B / T)."""
    lead = shape[:-1]
    if all(isinstance(d, int) for d in lead):
        return math.prod(lead)
    return None


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _row_spec_refusal(node, name: str) -> str | None:
    """The row-wise kernels' common conditions on the input: a float dtype the kernel takes and a
    concrete positive width."""
    spec = node.input_specs[0] if node.input_specs else None
    if spec is None:
        return "no input shape"
    if spec.dtype not in _native.DTYPE_CODES:
        return f"activations in {spec.dtype}: {name} takes float32, bfloat16 or float16"
    cols = spec.shape[-1]
    if not isinstance(cols, int) or cols < 1:
        return f"normalized width {cols!r} is not a positive integer"
    return None


class NativeGpuKernels:
    """The kernels of one compiled GPU module (``_native_cuda`` or ``_native_hip``)."""

    def __init__(self, module_name: str):
        self.module_name = module_name

    # ------------------------------------------------------------------ module
    def module(self):
        """(module or None, reason)."""
        return _native.load(self.module_name)

    def info(self) -> dict:
        """native_info(): {"built", "archs", "module", ...}. Never needs a GPU."""
        module, why = self.module()
        if module is None:
            return {"built": False, "archs": [], "module": None, "reason": why}
        return {"built": True, "archs": list(module.archs()), "module": f"glmrt.{self.module_name}",
                "platform": module.PLATFORM, "runtime_version": module.runtime_version(),
                "kernels": [k.name for k in self.kernels()], "gemv_max_m": GEMV_MAX_M}

    def kernels(self) -> list[Kernel]:
        if self.module()[0] is None:
            return []
        return [Kernel("norm", "native.rms_norm", NATIVE, self.rms_norm, self.rms_norm_supports),
                Kernel("norm", "native.layer_norm", NATIVE, self.layer_norm, self.layer_norm_supports),
                Kernel("residual_norm", "native.residual_rms_norm", NATIVE, self.residual_rms_norm,
                       self.residual_rms_norm_supports),
                Kernel("rope", "native.rope_interleaved", NATIVE, self.rope_interleaved,
                       self.rope_interleaved_supports),
                Kernel("linear", "native.quant_gemv", NATIVE, self.quant_linear, self.quant_linear_supports)]

    # ------------------------------------------------------------------ RMSNorm
    @staticmethod
    def rms_norm_supports(node) -> str | None:
        kind = node.attrs.get("kind")
        if kind != "rmsnorm":
            return f"norm kind {kind!r}: the native kernel does RMSNorm only"
        spec = node.input_specs[0] if node.input_specs else None
        if spec is None:
            return "no input shape"
        if spec.dtype not in _native.DTYPE_CODES:
            return f"activations in {spec.dtype}: the native kernel takes float32, bfloat16 or float16"
        cols = spec.shape[-1]
        if not isinstance(cols, int) or cols < 1:
            return f"normalized width {cols!r} is not a positive integer"
        return None

    def rms_norm(self, ctx, node, inputs, params):
        x = inputs[0]  # (..., H)
        weight = params["weight"]
        if weight.dtype not in _native.DTYPE_CODES or x.dtype not in _native.DTYPE_CODES:
            return ops.norm(ctx, node, inputs, params)
        module, _ = self.module()
        x = x.contiguous()
        weight = weight.contiguous()
        out = torch.empty_like(x)  # (..., H)
        cols = x.shape[-1]
        rows = x.numel() // cols if cols else 0
        if rows == 0:
            return out
        module.rms_norm(x.data_ptr(), _native.DTYPE_CODES[x.dtype], weight.data_ptr(),
                        _native.DTYPE_CODES[weight.dtype], out.data_ptr(), rows, cols, float(node.attrs["eps"]),
                        bool(node.attrs["round_before_weight"]), x.device.index, _stream(x.device))
        return out

    # ------------------------------------------------------------------ LayerNorm
    @staticmethod
    def layer_norm_supports(node) -> str | None:
        kind = node.attrs.get("kind")
        if kind != "layernorm":
            return f"norm kind {kind!r}: native.layer_norm does LayerNorm only"
        return _row_spec_refusal(node, "native.layer_norm")

    def layer_norm(self, ctx, node, inputs, params):
        x = inputs[0]  # (..., H)
        weight, bias = params["weight"], params.get("bias")
        codes = _native.DTYPE_CODES
        if x.dtype not in codes or weight.dtype not in codes or (bias is not None and bias.dtype not in codes):
            return ops.norm(ctx, node, inputs, params)
        module, _ = self.module()
        x = x.contiguous()
        weight = weight.contiguous()
        if bias is not None:
            bias = bias.contiguous()
        out = torch.empty_like(x)  # (..., H)
        cols = x.shape[-1]
        rows = x.numel() // cols if cols else 0
        if rows == 0:
            return out
        module.layer_norm(x.data_ptr(), codes[x.dtype], weight.data_ptr(), codes[weight.dtype],
                          bias.data_ptr() if bias is not None else 0, codes[bias.dtype] if bias is not None else 0,
                          out.data_ptr(), rows, cols, float(node.attrs["eps"]), x.device.index, _stream(x.device))
        return out

    # ------------------------------------------------------------------ residual + RMSNorm
    @staticmethod
    def residual_rms_norm_supports(node) -> str | None:
        kind = node.attrs.get("kind")
        if kind != "rmsnorm":
            return f"norm kind {kind!r}: native.residual_rms_norm fuses RMSNorm only"
        if len(node.input_specs) != 2:
            return "needs the residual and branch shapes"
        res, branch = node.input_specs
        if res.dtype != branch.dtype:
            return f"residual in {res.dtype}, branch in {branch.dtype}: the kernel adds two tensors of one dtype"
        if tuple(res.shape) != tuple(branch.shape):
            return f"residual {tuple(res.shape)} and branch {tuple(branch.shape)} differ in shape (no broadcasting)"
        alpha = node.attrs.get("alpha")
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
            return f"alpha {alpha!r} is not a finite number"
        return _row_spec_refusal(node, "native.residual_rms_norm")

    def residual_rms_norm(self, ctx, node, inputs, params):
        res, branch = inputs  # (..., H) each
        weight = params["weight"]
        codes = _native.DTYPE_CODES
        if (res.dtype != branch.dtype or res.shape != branch.shape or res.dtype not in codes
                or weight.dtype not in codes):
            return ops.residual_norm(ctx, node, inputs, params)
        module, _ = self.module()
        res, branch, weight = res.contiguous(), branch.contiguous(), weight.contiguous()
        emit = bool(node.attrs.get("emit_residual", True))
        out = torch.empty_like(res)  # (..., H)
        h = torch.empty_like(res) if emit else None  # (..., H)
        cols = res.shape[-1]
        rows = res.numel() // cols if cols else 0
        if rows > 0:
            module.residual_rms_norm(res.data_ptr(), branch.data_ptr(), codes[res.dtype], float(node.attrs["alpha"]),
                                     weight.data_ptr(), codes[weight.dtype], h.data_ptr() if emit else 0,
                                     out.data_ptr(), rows, cols, float(node.attrs["eps"]),
                                     bool(node.attrs["round_before_weight"]), res.device.index, _stream(res.device))
        return (h, out) if emit else out

    # ------------------------------------------------------------------ RoPE
    @staticmethod
    def rope_interleaved_supports(node) -> str | None:
        a = node.attrs
        if a.get("kind") != "interleaved":
            return f"rope kind {a.get('kind')!r}: native.rope_interleaved does the interleaved (GPT-J) pairing only"
        hd, nh, nkv, rd = a.get("head_dim"), a.get("num_heads"), a.get("num_kv_heads"), a.get("rotary_dim")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (hd, nh, nkv, rd)):
            return f"head_dim {hd!r}, heads {nh!r} / {nkv!r}, rotary_dim {rd!r}: not all integers"
        if hd < 2 or hd % 2 or rd < 0 or rd % 2 or rd > hd:
            return f"head_dim {hd}, rotary_dim {rd}: the kernel takes an even head_dim and an even rotary_dim <= it"
        if nh < 0 or nkv < 0:
            return f"negative head counts {nh} / {nkv}"
        spec = node.input_specs[0] if node.input_specs else None
        if spec is None:
            return "no input shape"
        if spec.dtype not in _native.DTYPE_CODES:
            return f"activations in {spec.dtype}: native.rope_interleaved takes float32, bfloat16 or float16"
        width = spec.shape[-1]
        if width != (nh + 2 * nkv) * hd:
            return f"qkv width {width!r} is not (num_heads + 2 * num_kv_heads) * head_dim = {(nh + 2 * nkv) * hd}"
        return None

    def rope_interleaved(self, ctx, node, inputs, params):
        a = node.attrs
        qkv = inputs[0]  # (B, T, (nh + 2 nkv) * hd)
        hd, nh, nkv, rd = a["head_dim"], a["num_heads"], a["num_kv_heads"], a["rotary_dim"]
        if qkv.dtype not in _native.DTYPE_CODES or qkv.dim() != 3 or tuple(ctx.positions.shape) != tuple(qkv.shape[:2]):
            return ops.rope(ctx, node, inputs, params)
        # The same tables (and memo key) as glmrt.ops.rope: built once per step, shared by all layers.
        key = ("rope", a["kind"], rd, a["base"], a["table_dtype"], qkv.dtype)
        tables = ctx.memo.get(key)
        if tables is None:
            tables = ops.rope_tables(ctx.positions, rd, a["base"], qkv.dtype, a["table_dtype"])
            ctx.memo[key] = tables
        cos, sin = (t.contiguous() for t in tables)  # (B, T, rd / 2)
        qkv = qkv.contiguous()
        b, t = qkv.shape[:2]
        q = torch.empty((b, t, nh, hd), dtype=qkv.dtype, device=qkv.device)
        k = torch.empty((b, t, nkv, hd), dtype=qkv.dtype, device=qkv.device)
        v = qkv[..., (nh + nkv) * hd:].unflatten(-1, (nkv, hd))  # (B, T, nkv, hd), a view as in ops.rope
        if b * t > 0:
            module, _ = self.module()
            module.rope_interleaved(qkv.data_ptr(), _native.DTYPE_CODES[qkv.dtype], cos.data_ptr(), sin.data_ptr(),
                                    q.data_ptr(), k.data_ptr(), b * t, nh, nkv, hd, rd, qkv.device.index,
                                    _stream(qkv.device))
        return q, k, v

    # ------------------------------------------------------------------ quantized linear
    @staticmethod
    def quant_linear_supports(node) -> str | None:
        quant = node.attrs.get("quant")
        if quant is None:
            return "not weight-only quantized: float linears run cuBLAS through torch"
        if quant["bits"] not in QUANT_BITS:
            return f"{quant['bits']}-bit weights: the GEMV takes int8 and int4"
        group = quant["group_size"]
        if group < 0 or group % 32:
            return f"group size {group}: the GEMV takes per-channel scales or groups that are multiples of 32"
        spec = node.input_specs[0] if node.input_specs else None
        if spec is None or not node.output_specs:
            return "no input / output shape"
        if spec.dtype not in _native.DTYPE_CODES:
            return f"activations in {spec.dtype}: the GEMV takes float32, bfloat16 or float16"
        k, n = quant["in_features"], node.output_specs[0].shape[-1]
        if not isinstance(n, int) or not isinstance(k, int) or not 0 < k <= INT32_MAX or not 0 < n <= INT32_MAX:
            return f"K={k}, N={n}: the GEMV takes 1 <= K, N < 2^31"
        rows = _concrete_rows(spec.shape)
        if rows is not None and rows > GEMV_MAX_M:
            return (f"M={rows} activation rows > {GEMV_MAX_M}: prefill-sized, dequantize + cuBLAS (torch) is "
                    "the faster path")
        return None

    def quant_linear(self, ctx, node, inputs, params):
        x = inputs[0]  # (..., K)
        quant = node.attrs["quant"]
        k = quant["in_features"]
        weight, scale, bias = params["weight"], params["scale"], params.get("bias")
        rows = x.numel() // k if k else 0
        codes = _native.DTYPE_CODES
        if (rows == 0 or rows > GEMV_MAX_M or x.dtype not in codes or scale.dtype not in codes
                or (bias is not None and bias.dtype not in codes) or weight.element_size() != 1):
            # Prefill (or an unusual dtype): the reference op on this device, dequantize + cuBLAS.
            return ops.linear(ctx, node, inputs, params)
        module, _ = self.module()
        x = x.contiguous()
        weight = weight.contiguous()  # (N, K) int8 or (N, ceil(K/2)) packed int4
        scale = scale.contiguous()  # (N,) or (N, ceil(K/g))
        n = weight.shape[0]
        out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)  # (..., N)
        if bias is not None:
            bias = bias.contiguous()
        launch = module.linear_int8 if quant["bits"] == 8 else module.linear_int4
        launch(x.data_ptr(), codes[x.dtype], weight.data_ptr(), scale.data_ptr(), codes[scale.dtype],
               bias.data_ptr() if bias is not None else 0, codes[bias.dtype] if bias is not None else 0,
               out.data_ptr(), rows, n, k, quant["group_size"], x.device.index, _stream(x.device))
        return out


NATIVE_CUDA = NativeGpuKernels("_native_cuda")
