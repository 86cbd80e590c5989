"""glmrt's native GPU kernels (native/gpu) wrapped as plan kernels, with shape-aware predicates.

One kernel source tree is compiled twice: as CUDA into ``glmrt._native_cuda`` and as HIP into
``glmrt._native_hip``. :class:`NativeGpuKernels` wraps either module; the cuda backend uses it with
``_native_cuda`` and the rocm backend (backends/rocm/kernels.py) with ``_native_hip``.

Kernels:
  * ``native.rms_norm`` (op ``norm``): RMSNorm, fp32 math, both rounding conventions
    (``round_before_weight``), fp32 / bf16 / fp16, any width. The output has glmrt.ops.norm's dtype:
    the activations', except that with ``round_before_weight`` it is torch's product weight *
    normed.to(x dtype), so an fp32 weight under bf16 / fp16 activations gives an fp32 output (the
    kernel stores the fp32 product, as the reference returns it).
  * ``native.layer_norm`` (op ``norm``, kind ``layernorm``): LayerNorm with optional bias
    (ChatGLM-6B, GLM-130B), fp32 math rounded once, fp32 / bf16 / fp16, any width; the output keeps
    the activations' dtype whatever the weight's (what torch's CPU layer_norm gives for an fp32
    weight and bias under half activations; CUDA torch releases have refused that mix).
  * ``native.residual_rms_norm`` / ``native.residual_layer_norm`` (op ``residual_norm``, the node
    glmrt.fusion makes): h = branch + residual * alpha rounded as torch rounds it in the model dtype
    (DeepNorm's alpha of ChatGLM-6B / GLM-130B included), then RMSNorm(h) (either rounding
    convention, output dtype as native.rms_norm) or LayerNorm(h) with optional bias, in one launch;
    writes h only when the node emits it. Nodes whose residual and branch differ in dtype or shape
    are refused. Since both kinds have a kernel, glmrt.fusion fuses RMSNorm and LayerNorm models
    alike on these backends.
  * ``native.rope`` (op ``rope``): the split of the fused qkv and the rotary of q and k in one
    launch, for the three kinds of glmrt.ops.rope: ``interleaved`` (GPT-J pairing, partial:
    ChatGLM2/3, GLM-4), ``half`` (NeoX pairing: GLM-130B's 1-D) and ``2d`` (ChatGLM-6B: NeoX pairing
    over each half of the head, by the position and the block-position tables). Each
    product and sum is rounded to the model dtype as torch rounds them, so q and k equal
    glmrt.ops.rope bit for bit; the cos / sin tables are glmrt.ops.rope_tables' (fp32 or
    ChatGLM-6B's fp16 angles), built once per step under ops.rope's ctx.memo key. Refused: other
    kinds or table dtypes, odd head_dim / rotary_dim, 2-D with rotary_dim != head_dim or head_dim
    not a multiple of 4, a qkv width that is not (nh + 2 nkv) * hd.
  * ``native.quant_gemv`` (op ``linear``, weight-only INT8 / INT4 nodes only), per-channel or
    group-wise scales (g a multiple of 32), optional bias, any M. Decode (the activations have at
    most :data:`GEMV_MAX_M` rows, batch * new tokens; graph shapes carry the symbols B and T, so
    that is decided per call): the W8A16 / W4A16 GEMV. Prefill (more rows) is NOT a fused
    quantized GEMM: one native launch dequantizes the weight into an (N, K) buffer in the
    activations' dtype, then torch's F.linear multiplies it (cuBLAS / hipBLAS). The buffer is a
    view of one workspace per forward pass, device and dtype, reused by every quantized linear of
    the pass and grown as needed (_dequantize_buffer says why that is safe, under graph capture
    too, and what a fused quantized GEMM would gain). The dequantized weight equals
    glmrt.quant.dequantize bit for bit (the fp32 product q * scale, rounded once to the model
    dtype), and the GEMM is the call glmrt.ops.linear makes, so prefill gives the reference's
    numbers.
  * ``native.attention`` (op ``attention``): decode attention over the KV cache (eager slice or
    the static cache of graph capture), GQA / MQA, both GLM scalings (standard and GLM-130B /
    ChatGLM-6B's layer-scaled), any boolean mask (causal, GLM's bidirectional prefix, padding),
    fp32 / bf16 / fp16, head_dim <= 256, any KV length (split into chunks with a combined fp32
    softmax, bounded shared memory). The valid keys come from ``ctx.allowed``, the mask the
    reference reads, on the device (so a captured graph follows the position it is replayed at);
    the cache write is the reference's (``index_copy_`` at ``ctx.cache_pos_t``, or the slice at
    ``ctx.cache_pos``). Same roundings as glmrt.ops.attention (layer-scaled: scores and
    probabilities rounded to the model dtype; standard, as SDPA's flash kernels: fp32 scores, exp(score - max) rounded, divided by
    the fp32 sum; fp32
    accumulation): only the fp32 summation order differs. Two or three launches per call and a scratch workspace allocated with torch (scores of
    the allowed keys, per-split softmax statistics and partial rows); the split count depends on
    the shapes only, never on the mask. Used for at most :data:`ATTENTION_MAX_Q` new tokens per
    sequence; a longer query
    (prefill) takes the reference op on the same device (torch matmuls, cuBLAS), and
    supports() refuses nodes whose concrete T exceeds it.
  Unquantized linears stay on cuBLAS (torch); supports() says so.

The wrappers share their steps (a dtype check that falls back to the reference op, operands made
contiguous, outputs allocated with torch, then NativeGpuKernels._launch): they pass raw device
pointers, the device index and the current torch stream (``torch.cuda.current_stream().cuda_stream``,
also a HIP stream on ROCm torch), never synchronize, so they run inside CUDA / HIP graph capture.
"""

from __future__ import annotations

import math

import torch

from ... import _native, ops
from ..base import NATIVE, Kernel

# Decode-sized activations: the GEMV re-reads the weight once per GEMV_ROWS_PER_LAUNCH (4) rows,
# so beyond 8 rows the native dequantize + cuBLAS is the better path.
GEMV_MAX_M = 8
QUANT_BITS = (8, 4)
INT32_MAX = 2**31 - 1
# Decode attention: new query tokens per sequence the native kernel takes (a longer query is a
# prefill: the reference op's matmuls are the better path and the kernel's score workspace grows
# with T * S), the largest head_dim, and the scalings of glmrt.ops.attention.
ATTENTION_MAX_Q = 8
ATTENTION_MAX_HEAD_DIM = 256
ATTENTION_SCALINGS = ("standard", "layer_scaled")
# glmrt.ops.rope's kinds, numbered as native/gpu/rope.h (and the CPU kernel) number them.
ROPE_KIND_CODES = {"interleaved": 0, "half": 1, "2d": 2}
# The table rules glmrt.ops.rope_tables knows ("float16": ChatGLM-6B / GLM-130B, fp16-rounded frequencies).
ROPE_TABLE_DTYPES = ("float32", "float16")


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


# ---------------------------------------------------------------------- the wrappers' common steps
def _native_dtypes(*tensors) -> bool:
    """Whether every operand (None: an absent optional one) is in a dtype the kernels take."""
    return all(t is None or t.dtype in _native.DTYPE_CODES for t in tensors)


def _dense(*tensors) -> tuple:
    """The operands made contiguous (a no-op for those that are; None stays None): the kernels
    take row-major tensors."""
    return tuple(None if t is None else t.contiguous() for t in tensors)


def _code(t) -> int:
    """The module's dtype code of an operand; 0 for an absent one (its pointer is 0 too)."""
    return 0 if t is None else _native.DTYPE_CODES[t.dtype]


def _rows_cols(x: torch.Tensor) -> tuple[int, int]:
    """(rows, width) of a row-wise kernel's input: every leading dim is a row."""
    cols = x.shape[-1]
    return (x.numel() // cols if cols else 0), cols


def _pointer_or_value(arg):
    if isinstance(arg, torch.Tensor):
        return arg.data_ptr()
    return 0 if arg is None else arg


def _dequantize_buffer(ctx, n: int, k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The (N, K) buffer that the prefill of a quantized linear dequantizes its weight into.

    One workspace per forward pass, device and dtype (``ctx.memo``, where ops.rope keeps its
    tables), grown when a larger linear comes: every quantized linear of a prefill reuses it (a
    ChatGLM3-6B prefill makes two allocations, at its first qkv and first MLP up-projection,
    instead of one per linear, 112). Reuse is safe: the dequantize
    and the GEMM that reads it are queued on the pass's stream, so the next dequantize runs after
    the GEMM; a workspace that is replaced goes back to torch's stream-ordered caching allocator.
    Under CUDA / HIP graph capture it is allocated inside the capture (from the graph's private
    pool, as every intermediate of the captured pass), so a replay never writes into memory that
    an eager pass owns; and since each pass has its own ctx, two generations in flight on two
    threads never share one. Without a ctx (kernels called directly): a fresh buffer.

    What a fused quantized GEMM would gain (none is written here): this path writes the
    dequantized weight (2 N K bytes in fp16 / bf16) and the GEMM reads it back (2 N K more), on top
    of the 0.5 N K (int4) or N K (int8) bytes of the weight itself, so int4 prefill moves about 9x
    the weight bytes a kernel that dequantizes tiles in registers / shared memory before the
    tensor cores (Marlin, the int4 kernels of gpt-fast / TensorRT-LLM) would move, plus one launch
    per linear. With an H200's measured ceilings (a 4.3 TB/s copy, ~800 TFLOP/s fp16 products) the
    round trip of 4 N K bytes takes about 0.8x as long as the GEMM's 2 M N K flops at M = 512
    prompt tokens and a fifth of it at 2048: a fused kernel would make int4 prefill up to ~1.8x
    faster at 512 tokens and ~1.2x at 2048 (an estimate; benchmarks/cuda_decode.py measures fp16
    against int4 prefill at both lengths), and would need no (N, K) buffer."""
    numel = n * k
    memo = getattr(ctx, "memo", None)
    if memo is None:
        return torch.empty((n, k), dtype=dtype, device=device)
    key = ("quant_prefill_workspace", device, dtype)
    buffer = memo.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = torch.empty(numel, dtype=dtype, device=device)
        memo[key] = buffer
    return buffer[:numel].view(n, k)


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


def _residual_refusal(node, name: str) -> str | None:
    """The fused residual + norm kernels' conditions on the node, past its norm kind: residual and
    branch of one dtype and shape (no broadcasting), a finite alpha, then _row_spec_refusal."""
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
    return _row_spec_refusal(node, name)


def _rms_out_dtype(x_dtype: torch.dtype, w_dtype: torch.dtype, round_before_weight: bool) -> torch.dtype:
    """The dtype glmrt.ops.rms_norm returns: x's, except that with round_before_weight the result is
    torch's product weight * normed.to(x dtype), in the promoted dtype of the two (an fp32 weight
    under bf16 / fp16 activations gives fp32)."""
    return torch.promote_types(w_dtype, x_dtype) if round_before_weight else x_dtype


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

    def _launch(self, kernel: str, device: torch.device, *args) -> None:
        """module.<kernel>(*args, device index, current stream): the last step of every wrapper.
        Tensors go as their data pointers and None (an absent optional operand) as 0, the kernels'
        null; the launch is queued on the device's current torch stream, with no host sync."""
        module, _ = self.module()
        getattr(module, kernel)(*(_pointer_or_value(a) for a in args), device.index or 0, _stream(device))

    def kernels(self) -> list[Kernel]:
        if self.module()[0] is None:
            return []
        return [Kernel("norm", "native.rms_norm", NATIVE, self.rms_norm, self.rms_norm_supports),
                Kernel("norm", "native.layer_norm", NATIVE, self.layer_norm, self.layer_norm_supports),
                Kernel("residual_norm", "native.residual_rms_norm", NATIVE, self.residual_rms_norm,
                       self.residual_rms_norm_supports),
                Kernel("residual_norm", "native.residual_layer_norm", NATIVE, self.residual_layer_norm,
                       self.residual_layer_norm_supports),
                Kernel("rope", "native.rope", NATIVE, self.rope, self.rope_supports),
                Kernel("linear", "native.quant_gemv", NATIVE, self.quant_linear, self.quant_linear_supports),
                Kernel("attention", "native.attention", NATIVE, self.attention, self.attention_supports)]

    # ------------------------------------------------------------------ RMSNorm
    @staticmethod
    def rms_norm_supports(node) -> str | None:
        kind = node.attrs.get("kind")
        if kind != "rmsnorm":
            return f"norm kind {kind!r}: native.rms_norm does RMSNorm only"
        return _row_spec_refusal(node, "native.rms_norm")

    def rms_norm(self, ctx, node, inputs, params):
        x, weight = inputs[0], params["weight"]  # (..., H), (H,)
        if not _native_dtypes(x, weight):
            return ops.norm(ctx, node, inputs, params)
        x, weight = _dense(x, weight)
        rbw = bool(node.attrs["round_before_weight"])
        out = torch.empty(x.shape, dtype=_rms_out_dtype(x.dtype, weight.dtype, rbw), device=x.device)  # (..., H)
        rows, cols = _rows_cols(x)
        if rows:
            self._launch("rms_norm", x.device, x, _code(x), weight, _code(weight), out, _code(out), rows, cols,
                         float(node.attrs["eps"]), rbw)
        return out

    # ------------------------------------------------------------------ LayerNorm
    @staticmethod
    def layer_norm_supports(node) -> str | None:
        kind = node.attrs.get("kind")
        if kind != "layernorm":
            return f"norm kind {kind!r}: native.layer_norm does LayerNorm only"
        return _row_spec_refusal(node, "native.layer_norm")

    def layer_norm(self, ctx, node, inputs, params):
        x, weight, bias = inputs[0], params["weight"], params.get("bias")  # (..., H), (H,), (H,) or None
        if not _native_dtypes(x, weight, bias):
            return ops.norm(ctx, node, inputs, params)
        x, weight, bias = _dense(x, weight, bias)
        out = torch.empty_like(x)  # (..., H)
        rows, cols = _rows_cols(x)
        if rows:
            self._launch("layer_norm", x.device, x, _code(x), weight, _code(weight), bias, _code(bias), out, rows,
                         cols, float(node.attrs["eps"]))
        return out

    # ------------------------------------------------------------------ residual + RMSNorm
    @staticmethod
    def residual_rms_norm_supports(node) -> str | None:
        kind = node.attrs.get("kind")
        if kind != "rmsnorm":
            return f"norm kind {kind!r}: native.residual_rms_norm fuses RMSNorm only"
        return _residual_refusal(node, "native.residual_rms_norm")

    def residual_rms_norm(self, ctx, node, inputs, params):
        res, branch = inputs  # (..., H) each
        weight = params["weight"]
        if res.dtype != branch.dtype or res.shape != branch.shape or not _native_dtypes(res, weight):
            return ops.residual_norm(ctx, node, inputs, params)
        res, branch, weight = _dense(res, branch, weight)
        emit = bool(node.attrs.get("emit_residual", True))
        rbw = bool(node.attrs["round_before_weight"])
        out = torch.empty(res.shape, dtype=_rms_out_dtype(res.dtype, weight.dtype, rbw), device=res.device)  # (..., H)
        h = torch.empty_like(res) if emit else None  # (..., H)
        rows, cols = _rows_cols(res)
        if rows:
            self._launch("residual_rms_norm", res.device, res, branch, _code(res), float(node.attrs["alpha"]), weight,
                         _code(weight), h, out, _code(out), rows, cols, float(node.attrs["eps"]), rbw)
        return (h, out) if emit else out

    # ------------------------------------------------------------------ residual + LayerNorm
    @staticmethod
    def residual_layer_norm_supports(node) -> str | None:
        kind = node.attrs.get("kind")
        if kind != "layernorm":
            return f"norm kind {kind!r}: native.residual_layer_norm fuses LayerNorm only"
        return _residual_refusal(node, "native.residual_layer_norm")

    def residual_layer_norm(self, ctx, node, inputs, params):
        res, branch = inputs  # (..., H) each
        weight, bias = params["weight"], params.get("bias")
        if res.dtype != branch.dtype or res.shape != branch.shape or not _native_dtypes(res, weight, bias):
            return ops.residual_norm(ctx, node, inputs, params)
        res, branch, weight, bias = _dense(res, branch, weight, bias)
        emit = bool(node.attrs.get("emit_residual", True))
        out = torch.empty_like(res)  # (..., H): F.layer_norm keeps the activations' dtype
        h = torch.empty_like(res) if emit else None  # (..., H)
        rows, cols = _rows_cols(res)
        if rows:
            self._launch("residual_layer_norm", res.device, res, branch, _code(res), float(node.attrs["alpha"]),
                         weight, _code(weight), bias, _code(bias), h, out, rows, cols, float(node.attrs["eps"]))
        return (h, out) if emit else out

    # ------------------------------------------------------------------ RoPE
    @staticmethod
    def rope_supports(node) -> str | None:
        a = node.attrs
        kind = a.get("kind")
        if kind not in ROPE_KIND_CODES:
            return f"rope kind {kind!r}: native.rope takes {', '.join(ROPE_KIND_CODES)}"
        if a.get("table_dtype") not in ROPE_TABLE_DTYPES:
            return f"rope table dtype {a.get('table_dtype')!r}: native.rope takes {', '.join(ROPE_TABLE_DTYPES)}"
        hd, nh, nkv, rd = a.get("head_dim"), a.get("num_heads"), a.get("num_kv_heads"), a.get("rotary_dim")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (hd, nh, nkv, rd)):
            return f"head_dim {hd!r}, heads {nh!r} / {nkv!r}, rotary_dim {rd!r}: not all integers"
        if hd < 2 or hd % 2 or rd < 0 or rd % 2 or rd > hd:
            return f"head_dim {hd}, rotary_dim {rd}: the kernel takes an even head_dim and an even rotary_dim <= it"
        if kind == "2d" and (rd != hd or hd % 4):
            return f"2-D RoPE with rotary_dim {rd}, head_dim {hd}: needs rotary_dim == head_dim, a multiple of 4"
        if nh < 0 or nkv < 0:
            return f"negative head counts {nh} / {nkv}"
        spec = node.input_specs[0] if node.input_specs else None
        if spec is None:
            return "no input shape"
        if spec.dtype not in _native.DTYPE_CODES:
            return f"activations in {spec.dtype}: native.rope takes float32, bfloat16 or float16"
        width = spec.shape[-1]
        if width != (nh + 2 * nkv) * hd:
            return f"qkv width {width!r} is not (num_heads + 2 * num_kv_heads) * head_dim = {(nh + 2 * nkv) * hd}"
        return None

    def rope(self, ctx, node, inputs, params):
        a = node.attrs
        qkv = inputs[0]  # (B, T, (nh + 2 nkv) * hd)
        kind = a["kind"]
        hd, nh, nkv, rd = a["head_dim"], a["num_heads"], a["num_kv_heads"], a["rotary_dim"]
        if qkv.dim() != 3:
            return ops.rope(ctx, node, inputs, params)
        b, t = qkv.shape[:2]
        # positions: (B, T), or (B, 2, T) (position, block position) for 2-D RoPE.
        want_positions = (b, 2, t) if kind == "2d" else (b, t)
        if qkv.dtype not in _native.DTYPE_CODES or tuple(ctx.positions.shape) != want_positions:
            return ops.rope(ctx, node, inputs, params)
        # The same tables (and memo key) as glmrt.ops.rope: built once per step, shared by all layers
        # (native and reference ones alike).
        key = ("rope", kind, rd, a["base"], a["table_dtype"], qkv.dtype)
        tables = ctx.memo.get(key)
        if tables is None:
            if kind == "2d":
                half = hd // 2
                tables = (ops.rope_tables(ctx.positions[:, 0], half, a["base"], qkv.dtype, a["table_dtype"]),
                          ops.rope_tables(ctx.positions[:, 1], half, a["base"], qkv.dtype, a["table_dtype"]))
            else:
                tables = ops.rope_tables(ctx.positions, rd, a["base"], qkv.dtype, a["table_dtype"])
            ctx.memo[key] = tables
        flat = tables[0] + tables[1] if kind == "2d" else tables
        cos, sin, *second = _dense(*flat)  # (B, T, rd / 2), or 4 x (B, T, hd / 4) for 2-D
        cos2, sin2 = second or (None, None)  # the block-position tables of 2-D RoPE
        (qkv,) = _dense(qkv)
        q = torch.empty((b, t, nh, hd), dtype=qkv.dtype, device=qkv.device)
        k = torch.empty((b, t, nkv, hd), dtype=qkv.dtype, device=qkv.device)
        v = qkv[..., (nh + nkv) * hd:].unflatten(-1, (nkv, hd))  # (B, T, nkv, hd), a view as in ops.rope
        if b * t > 0:
            self._launch("rope", qkv.device, qkv, _code(qkv), ROPE_KIND_CODES[kind], cos, sin, cos2, sin2, q, k, b * t,
                         nh, nkv, hd, rd)
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
        # Any M: up to GEMV_MAX_M rows the GEMV, beyond (prefill) the native dequantize + cuBLAS.
        return None

    def quant_linear(self, ctx, node, inputs, params):
        """M <= GEMV_MAX_M rows: the W8A16 / W4A16 GEMV. More rows (prefill): the native kernel
        dequantizes the weight into a torch buffer in the activations' dtype (bit for bit
        glmrt.quant.dequantize), then torch's F.linear (cuBLAS / hipBLAS) multiplies, exactly the
        call glmrt.ops.linear makes; not a fused quantized GEMM."""
        x = inputs[0]  # (..., K)
        quant = node.attrs["quant"]
        k, bits, group = quant["in_features"], quant["bits"], quant["group_size"]
        weight, scale, bias = params["weight"], params["scale"], params.get("bias")
        rows = x.numel() // k if k else 0
        codes = _native.DTYPE_CODES
        n = weight.shape[0] if weight.dim() == 2 else -1
        layout_ok = (weight.dim() == 2 and weight.shape[1] == (k if bits == 8 else -(-k // 2)) and group >= 0
                     and scale.numel() == n * (1 if group == 0 else -(-k // group)))
        if (rows == 0 or x.dtype not in codes or scale.dtype not in codes or weight.element_size() != 1
                or not layout_ok or (rows <= GEMV_MAX_M and bias is not None and bias.dtype not in codes)):
            # An unusual dtype or layout: the reference op on this device.
            return ops.linear(ctx, node, inputs, params)
        # weight: (N, K) int8 or (N, ceil(K/2)) packed int4; scale: (N,) or (N, ceil(K/g))
        weight, scale = _dense(weight, scale)
        if rows > GEMV_MAX_M:
            # Prefill: dequantize once (one native launch into the pass's reused workspace), then cuBLAS.
            w = _dequantize_buffer(ctx, n, k, x.dtype, x.device)  # (N, K)
            self._launch(f"dequantize_int{bits}", x.device, weight, scale, _code(scale), w, _code(w), n, k, group)
            return torch.nn.functional.linear(x, w, bias)
        x, bias = _dense(x, bias)
        out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)  # (..., N)
        self._launch(f"linear_int{bits}", x.device, x, _code(x), weight, scale, _code(scale), bias, _code(bias), out,
                     rows, n, k, group)
        return out

    # ------------------------------------------------------------------ attention
    @staticmethod
    def attention_supports(node) -> str | None:
        a = node.attrs
        if a.get("scaling") not in ATTENTION_SCALINGS:
            return f"attention scaling {a.get('scaling')!r}: native.attention takes {', '.join(ATTENTION_SCALINGS)}"
        nh, nkv, hd = a.get("num_heads"), a.get("num_kv_heads"), a.get("head_dim")
        if not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in (nh, nkv, hd)):
            return f"heads {nh!r} / {nkv!r}, head_dim {hd!r}: not all positive integers"
        if nh % nkv:
            return f"num_heads {nh} is not a multiple of num_kv_heads {nkv}"
        if hd > ATTENTION_MAX_HEAD_DIM:
            return f"head_dim {hd} > {ATTENTION_MAX_HEAD_DIM}: the kernel's q rows and key tile are sized for that"
        scale = a.get("scale")
        if a["scaling"] == "standard" and (not isinstance(scale, (int, float)) or not math.isfinite(scale)):
            return f"scale {scale!r} is not a finite number"
        if len(node.input_specs) != 3:
            return "needs the q, k and v shapes"
        dtypes = {spec.dtype for spec in node.input_specs}
        if len(dtypes) != 1:
            return f"q, k and v in different dtypes ({', '.join(sorted(map(str, dtypes)))})"
        dtype = node.input_specs[0].dtype
        if dtype not in _native.DTYPE_CODES:
            return f"activations in {dtype}: native.attention takes float32, bfloat16 or float16"
        q_len = node.input_specs[0].shape[1] if len(node.input_specs[0].shape) == 4 else None
        if isinstance(q_len, int) and q_len > ATTENTION_MAX_Q:
            return (f"T={q_len} new tokens > {ATTENTION_MAX_Q}: prefill-sized, the reference op's matmuls (cuBLAS) "
                    "are the better path")
        return None

    def attention(self, ctx, node, inputs, params):
        """q: (B, T, nh, hd); k, v: (B, T, nkv, hd) -> (B, T, nh * hd). Writes k, v into the cache
        exactly where glmrt.ops.attention writes them, then runs the kernel over the keys the mask
        ``ctx.allowed`` lets each query see (the whole static cache under graph capture: the mask,
        computed on the device from the position tensor, is the only source of the valid length).
        More than ATTENTION_MAX_Q new tokens (prefill) or dtypes the kernel lacks: the reference op."""
        a = node.attrs
        q, k, v = inputs
        B, T, nh, hd = q.shape
        nkv = a["num_kv_heads"]
        codes = _native.DTYPE_CODES
        cache = ctx.cache
        layer = a["layer_index"]
        cache_dtype = cache.k[layer].dtype if cache is not None else q.dtype
        if (T > ATTENTION_MAX_Q or q.dtype not in codes or k.dtype != q.dtype or v.dtype != q.dtype
                or cache_dtype != q.dtype or hd > ATTENTION_MAX_HEAD_DIM):
            return ops.attention(ctx, node, inputs, params)
        if tuple(k.shape) != (B, T, nkv, hd) or tuple(v.shape) != (B, T, nkv, hd):
            raise ValueError(f"{node.name}: q {tuple(q.shape)} with k {tuple(k.shape)}, v {tuple(v.shape)}; expected "
                             f"k and v of ({B}, {T}, {nkv}, {hd})")
        if cache is not None:
            keys, values = ops.update_kv_cache(ctx, layer, k, v)  # (B, nkv, S, hd) views of the cache
            S = keys.shape[2]
            # (batch, kv head, key position) element strides of the cache layout
            k_strides, v_strides = keys.stride()[:3], values.stride()[:3]
        else:
            keys, values, S = k, v, T
            k_strides = (keys.stride(0), keys.stride(2), keys.stride(1))  # fresh (B, T, nkv, hd)
            v_strides = (values.stride(0), values.stride(2), values.stride(1))
        if keys.stride(-1) != 1 or values.stride(-1) != 1:
            raise ValueError(f"{node.name}: keys / values with a strided head_dim")
        if q.stride(-1) != 1:
            q = q.contiguous()
        allowed = ctx.allowed  # (B, 1, T, S)
        if allowed.dim() != 4 or allowed.shape[-1] != S or allowed.shape[-2] != T:
            raise ValueError(f"{node.name}: mask of shape {tuple(allowed.shape)} for {T} queries over {S} keys; "
                             f"expected (B, 1, {T}, {S})")
        if allowed.dtype != torch.bool:
            raise ValueError(f"{node.name}: mask must be bool (True = may attend), got {allowed.dtype}")
        if allowed.device != q.device:
            raise ValueError(f"{node.name}: mask on {allowed.device}, queries on {q.device}")
        allowed = allowed.expand(B, 1, T, S)  # broadcast dims get stride 0
        out = torch.empty((B, T, nh * hd), dtype=q.dtype, device=q.device)  # (B, T, nh * hd)
        if B * T == 0:
            return out
        module, _ = self.module()
        nbytes = module.attention_workspace_bytes(B, T, S, nh, nkv, hd, 0)
        workspace = torch.empty(nbytes, dtype=torch.uint8, device=q.device)
        c = float(a["layer_index"] + 1)
        self._launch("attention", q.device, _code(q), B, T, S, nh, nkv, hd,
                     q, q.stride(0), q.stride(1), q.stride(2), keys, *k_strides, values, *v_strides,
                     allowed, allowed.stride(0), allowed.stride(2), allowed.stride(3),
                     out, a["scaling"] == "layer_scaled", float(a.get("scale", 1.0)), hd ** 0.5 * c, c,
                     workspace, nbytes, 0)
        return out


NATIVE_CUDA = NativeGpuKernels("_native_cuda")
