"""CPU kernels: wrappers that call glmrt._native_cpu with raw pointers, and their predicates."""

from __future__ import annotations

import os

import torch

from ... import _native, ops

_NATIVE_NAME = "_native_cpu"


def native():
    return _native.load(_NATIVE_NAME)


def torch_ops() -> dict:
    """torch's own CPU ops (ATen / oneDNN) for every IR op: the core reference functions are
    written in plain torch, so on the CPU they are exactly the library path."""
    return dict(ops.REFERENCE)


def native_rms_norm_supports(node) -> str | None:
    if node.attrs.get("kind") != "rmsnorm":
        return f"{node.attrs.get('kind')} is not RMSNorm"
    dtype = node.input_specs[0].dtype
    if dtype not in _native.DTYPE_CODES:
        return f"dtype {dtype} not supported"
    return None


def native_rms_norm(ctx, node, inputs, params):
    module, _ = native()
    x = inputs[0].contiguous()
    w = params["weight"].contiguous()
    out = torch.empty_like(x)
    cols = x.shape[-1]
    module.rms_norm(x.data_ptr(), _native.DTYPE_CODES[x.dtype], w.data_ptr(), _native.DTYPE_CODES[w.dtype],
                    out.data_ptr(), x.numel() // cols, cols, float(node.attrs["eps"]),
                    bool(node.attrs["round_before_weight"]))
    return out


# ----------------------------------------------------------------------------- quantized linear
# Weight-only INT8 / INT4 (glmrt.quant's format: symmetric, per output channel or group-wise along
# K, INT4 packed with the even index in the high nibble). The kernels quantize each activation row
# to int8 per block of 32 along K and take exact integer dot products (see native/cpu/gemv_quant.h
# for the error bound this implies against the dequantized reference).
QUANT_LINEAR_FUNCTIONS = {8: "linear_int8", 4: "linear_int4"}
QUANT_BLOCK = 32


def native_quant_linear_supports(node) -> str | None:
    quant = node.attrs.get("quant")
    if quant is None:
        return "float weights: the native kernels take INT8 / INT4 weight-only quantized linears"
    if quant["bits"] not in QUANT_LINEAR_FUNCTIONS:
        return f"{quant['bits']}-bit weights: the native kernels take int8 and int4"
    group = quant["group_size"]
    if group < 0 or group % QUANT_BLOCK:
        return (f"quantization group of {group}: the native kernels need 0 (one scale per output channel) or a "
                f"multiple of {QUANT_BLOCK}")
    dtype = node.input_specs[0].dtype
    if dtype not in _native.DTYPE_CODES:
        return f"activations in {dtype}: the native kernels take float32, bfloat16 or float16"
    return None


def native_quant_linear(ctx, node, inputs, params):
    module, _ = native()
    quant = node.attrs["quant"]
    bits, group, k = quant["bits"], quant["group_size"], quant["in_features"]
    x, w, scale, bias = inputs[0], params["weight"], params["scale"], params.get("bias")
    n = w.shape[0]
    row_bytes = k if bits == 8 else (k + 1) // 2
    if x.shape[-1] != k or w.dtype != torch.int8 or tuple(w.shape) != (n, row_bytes):
        raise ValueError(f"{node.name}: expected x (..., {k}) and int8 weight ({n}, {row_bytes}) for {bits}-bit "
                         f"weights, got x {tuple(x.shape)} and weight {w.dtype} {tuple(w.shape)}; the weights do not "
                         "match the node's quant attributes: quantize them with glmrt.quant.quantize_weights")
    groups = 1 if group == 0 else -(-k // group)
    if scale.numel() != n * groups or scale.dtype not in _native.DTYPE_CODES:
        raise ValueError(f"{node.name}: expected {n * groups} scales in float32/bfloat16/float16, got "
                         f"{scale.dtype} {tuple(scale.shape)}; quantize the weights with glmrt.quant.quantize_weights")
    x = x.contiguous()
    w = w.contiguous()
    scale = scale.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    m = x.numel() // k if k else int(torch.Size(x.shape[:-1]).numel())
    # Prefill: a panel GEMM where PREFILL says so (below); never under ctx.row_invariant (the serving
    # engine's batched decode), where every row must be computed alike whatever the row count, as
    # the GEMV does.
    panel = _panel_dtype(quant_prefill_path(bits, group, m), x.dtype)
    if (m > PREFILL_GEMM_MIN_M and k and n and panel is not None and hasattr(module, "dequantize_rows")
            and not getattr(ctx, "row_invariant", False)):
        sdt, odt = _native.DTYPE_CODES[scale.dtype], _native.DTYPE_CODES[panel]

        def fill(n0: int, n1: int, buf: torch.Tensor) -> None:
            module.dequantize_rows(bits, w.data_ptr(), scale.data_ptr(), sdt, n, k, group, n0, n1, buf.data_ptr(),
                                   odt, k)

        y = _panel_gemm(x.reshape(m, k), n, k, fill, bias, panel)
        return y.reshape(*x.shape[:-1], n)
    out = torch.empty((*x.shape[:-1], n), dtype=x.dtype)
    if m == 0 or n == 0:
        return out
    getattr(module, QUANT_LINEAR_FUNCTIONS[bits])(
        x.data_ptr(), _native.DTYPE_CODES[x.dtype], w.data_ptr(), scale.data_ptr(), _native.DTYPE_CODES[scale.dtype],
        bias.data_ptr() if bias is not None else 0, _native.DTYPE_CODES[bias.dtype] if bias is not None else 0,
        out.data_ptr(), m, n, k, group)
    return out


# ----------------------------------------------------------------------------- prefill GEMM
# Beyond PREFILL_GEMM_MIN_M rows of activations (prefill) a linear is compute-bound. Which GEMM is
# fastest depends on the CPU's matrix units, so PREFILL names a path per kind of weight, chosen at
# import from the CPU's flags (override: GLMRT_CPU_PREFILL="quant=integer,float=fp32-panel"):
#  - "integer" (quantized weights): the native kernels above, int8 dot products per block of 32;
#  - "fp32-panel": the weight widened to fp32 PREFILL_PANEL_ROWS output rows at a time (INT8 / INT4:
#    native dequantize_rows, exactly glmrt.quant.dequantize's values; bf16 / fp16: an exact widening
#    copy) into a reused buffer and multiplied with torch's fp32 GEMM (the host BLAS), the
#    activations widened once: fp32 accumulation, one rounding to the activation dtype at the end;
#  - "bf16-panel": the same with bf16 panels and torch's bf16 GEMM (oneDNN, AMX-BF16 where the CPU
#    has it); the panel holds dequantize(..., bfloat16), what the reference (glmrt.ops.linear)
#    multiplies;
#  - "torch" (float weights): F.linear as it is;
#  - "by-size" (quantized weights, CPUs with AVX2 but no VNNI / AMX): "integer" or "fp32-panel"
#    per weight format and row count, from QUANT_PANEL_FROM_M (below), what was measured there.
# float16 weights take neither panel: where PREFILL["float"] is a panel path they take native
# linear_float_gemm, whose outputs equal the decode GEMV's bit for bit (batch invariance, see
# _float_panel_gemm). With 2 threads on the AMD EPYC of "by-size" below: 4608 x 4096, M = 128 (load 7), F.linear
# 7.1 GFLOP/s, linear_float_gemm 30.0; benchmarks/cpu_prefill_paths.py (quiet, the command there):
# linear_float_gemm 77-91 GFLOP/s at every shape and M, one layer's linears 0.88x / 0.76x / 0.65x
# the bf16 fp32 panel's time at M = 128 / 256 / 512 (the BLAS reaches 107-137 at large M; this GEMM
# keeps the GEMV's 16 lane chains, one register tile per lane).
# Measured (2 threads, AMD EPYC, AVX2 without AVX-512 / AMX, 128 x 4096 x 4608, 2026-12-03): torch's
# bf16 F.linear 2.1 GFLOP/s and fp16 about 2x that, its fp32 GEMM 3.5x bf16's, the native INT4
# kernel 1.8x the fp32 GEMM; so there floats take fp32-panel and quantized weights integer (refined
# per format and row count by "by-size"; with VNNI, integer at every size, not measured here). With
# AMX-BF16 oneDNN's bf16 GEMM is the fastest of all (issue 16: an AMX VM's bf16 prefill ran 1.7x
# its INT4 prefill), so quantized weights take bf16-panel and floats torch.
PREFILL_GEMM_MIN_M = 8
PREFILL_PANEL_ROWS = 4096
PREFILL_PATHS = {"quant": ("by-size", "integer", "fp32-panel", "bf16-panel"),
                 "float": ("torch", "fp32-panel", "bf16-panel")}
# "by-size": per (bits, group-wise?) the row count M from which the fp32 panel is taken; below it
# the integer kernel (None: the integer kernel at every M). From measurements on an AMD EPYC (Zen
# 2, 2 cores, AVX2/FMA/F16C, no AVX-512 / VNNI), 2 threads, bf16 activations, 2026-12-03:
#  - a quiet machine, 8 chatglm3-6b layers (benchmarks/results/2026-12-03-cpu-vs-llama-cpp-chatglm3-
#    6b-L8-quiet, all quantized linears on the integer kernel): INT8-g32 prefill 1.17x bf16's at 128
#    tokens, 0.84x at 512; INT4-g32 1.41x and 1.04x;
#  - `OMP_NUM_THREADS=2 python benchmarks/cpu_prefill_paths.py --m 128,256,512 --rounds 2
#    --no-f16-torch` (the four linears of a layer, best of 2, load 0.8-1.7), one layer's time
#    against bf16's (fp32 panel: 526 / 905 / 1576 ms at M = 128 / 256 / 512):
#      M = 128: integer INT8-g32 1.24x, INT8 1.28x, INT4-g32 1.64x, INT4 1.89x; fp32-panel 1.00-1.01x
#      M = 256: integer 1.02x, 1.07x, 1.35x, 1.56x; fp32-panel 1.02x, 1.03x, 1.03x, 1.03x
#      M = 512: integer 0.89x, 0.92x, 1.17x, 1.34x; fp32-panel 1.02x, 1.01x, 1.01x, 1.01x
# So INT8-g32 takes the panel from 256 rows (a tie there), INT8 per channel from 384 (between its
# win at 256 and its loss at 512), INT4 the integer kernel throughout.
# The INT8 panel is the bf16 path's own GEMM (a dequantization in place of a widening copy), so at
# large M INT8 prefill ties bf16's rather than beating it: on AVX2 an int8 dot product (vpmaddubsw +
# vpmaddwd, then a conversion and an FMA per block of 32 for the activation scales) retires no more
# multiply-adds per cycle than fp32 FMAs on Zen 2. INT4's integer kernel stays ahead (above).
# Batch invariance: the integer kernel and the panel round differently (the integer kernel
# quantizes the activations to int8), and the choice follows the row count of the call, so a
# quantized request's prefill logits can differ, by that rounding, between alone and in a batch
# whose rows cross the threshold. The serving engine is not affected: it prefills each request
# alone in chunks fixed per request, and its batched decode steps run row_invariant (the integer
# kernel for every row).
QUANT_PANEL_FROM_M: dict[tuple[int, bool], int | None] = {(8, True): 256, (8, False): 384, (4, True): None,
                                                          (4, False): None}


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def default_prefill(flags: set[str], override: str = "") -> dict[str, str]:
    """PREFILL for a CPU with these /proc/cpuinfo flags, then "kind=path,..." overrides applied."""
    amx = "amx_bf16" in flags
    fast_bf16 = amx or "avx512_bf16" in flags
    vnni = "avx512_vnni" in flags or "avx_vnni" in flags
    quant = "bf16-panel" if amx else ("integer" if vnni or "avx2" not in flags else "by-size")
    out = {"quant": quant, "float": "torch" if fast_bf16 else "fp32-panel"}
    for item in (t.strip() for t in override.split(",") if t.strip()):
        kind, _, path = item.partition("=")
        if kind not in PREFILL_PATHS or path not in PREFILL_PATHS[kind]:
            raise ValueError(f"GLMRT_CPU_PREFILL: {item!r}; give kind=path with kind quant (paths "
                             f"{', '.join(PREFILL_PATHS['quant'])}) or float ({', '.join(PREFILL_PATHS['float'])})")
        out[kind] = path
    return out


PREFILL = default_prefill(_cpu_flags(), os.environ.get("GLMRT_CPU_PREFILL", ""))


def quant_prefill_path(bits: int, group: int, m: int) -> str:
    """The PREFILL path a quantized linear of this format takes for m rows of activations."""
    path = PREFILL["quant"]
    if path != "by-size":
        return path
    start = QUANT_PANEL_FROM_M.get((bits, group != 0))
    return "fp32-panel" if start is not None and m >= start else "integer"


def _panel_dtype(path: str, x_dtype: torch.dtype) -> torch.dtype | None:
    """The panels' dtype for a path and the activations' dtype; None: no panel GEMM."""
    if path == "fp32-panel":
        return torch.float32
    if path == "bf16-panel":
        return torch.bfloat16 if x_dtype == torch.bfloat16 else torch.float32
    return None


def _panel_gemm(x2d: torch.Tensor, n: int, k: int, fill, bias, panel_dtype: torch.dtype) -> torch.Tensor:
    """y (M, N) = x2d (M, K) @ W^T (+ bias), W produced PREFILL_PANEL_ROWS rows at a time by
    fill(n0, n1, buf) into buf (rows, K) of panel_dtype; the GEMM in panel_dtype (fp32 or bf16,
    accumulating in fp32), returned in x2d's dtype."""
    m = x2d.shape[0]
    xt = x2d.contiguous().to(panel_dtype).t()  # (K, M) view: the BLAS reads it transposed
    yt = torch.empty((n, m), dtype=panel_dtype)  # (N, M): each panel's product is a contiguous row block
    rows = min(PREFILL_PANEL_ROWS, n)
    buf = torch.empty((rows, k), dtype=panel_dtype)
    b = None if bias is None else bias.to(panel_dtype)[:, None]  # (N, 1)
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        panel = buf[: n1 - n0]
        fill(n0, n1, panel)
        if b is None:
            torch.mm(panel, xt, out=yt[n0:n1])
        else:
            torch.addmm(b[n0:n1], panel, xt, out=yt[n0:n1])
    return yt.t().to(x2d.dtype)  # (M, N)


def _row_gemm_ready(module) -> bool:
    """Whether native linear_float_gemm (fp16, every output the decode GEMV's bit for bit) runs here:
    built, on AVX2, and the GEMV on the AVX2 path whose sums it reproduces (an AVX-512 GEMV sums
    in another order)."""
    return (hasattr(module, "linear_float_gemm") and module.linear_float_gemm_isa() == "avx2"
            and module.linear_float_isa() == "avx2")


def _row_gemm(module, x2d: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """x2d (M, K) @ weight^T + bias in fp16 with native linear_float_gemm (see _row_gemm_ready)."""
    x2d, weight = x2d.contiguous(), weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    (m, k), n = x2d.shape, weight.shape[0]
    out = torch.empty((m, n), dtype=torch.float16)
    if m and n:
        module.linear_float_gemm(x2d.data_ptr(), weight.data_ptr(), 0 if bias is None else bias.data_ptr(),
                                 out.data_ptr(), _native.DTYPE_CODES[torch.float16], m, n, k)
    return out


def _float_panel_gemm(x2d: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor | None:
    """The prefill GEMM of float weights where PREFILL["float"] is a panel path; None elsewhere
    (then F.linear runs)."""
    m, k = x2d.shape
    panel = _panel_dtype(PREFILL["float"], x2d.dtype)
    if (panel is None or m <= PREFILL_GEMM_MIN_M or x2d.dtype not in _native.DTYPE_CODES or weight.dtype != x2d.dtype
            or weight.dim() != 2 or weight.shape[1] != k or (bias is not None and bias.dtype != x2d.dtype)):
        return None
    if x2d.dtype == torch.float16:
        # float16 takes native linear_float_gemm, not the fp32 panel: every output of it equals the
        # decode GEMV's bit for bit (see native/cpu/gemm_float.h), so which of the two computes a row
        # -- a prompt of <= 8 tokens alone, or the same prompt among > 8 rows of a padded batch --
        # cannot change it: a request's logits do not depend on what else is in its batch. (The fp32
        # panel's BLAS sums in another order, a difference fp16's rounding does not hide:
        # tests/models/test_original_code_half_precision.py's padded batch against its prompts alone.)
        # Where it does not run (no AVX2 / an AVX-512 GEMV), F.linear, as before.
        module, _ = native()
        if module is None or not _row_gemm_ready(module):
            return None
        return _row_gemm(module, x2d, weight, bias)
    if x2d.dtype != torch.bfloat16:
        return None  # float32 is already the fp32 GEMM
    weight = weight.contiguous()

    def fill(n0: int, n1: int, buf: torch.Tensor) -> None:
        buf.copy_(weight[n0:n1])

    return _panel_gemm(x2d, weight.shape[0], k, fill, bias, panel)


# ----------------------------------------------------------------------------- float decode GEMV
# Unquantized linears and the LM head at decode: native/cpu/gemv_float.cpp streams the weight once
# with fp32 FMAs (bf16 / fp16 widened exactly) and rounds once, what F.linear computes up to the fp32
# summation order. Used for at most FLOAT_GEMV_MAX_M rows of activations with x, weight and bias of
# one dtype; prefill and mixed dtypes take torch's F.linear (oneDNN), which is the faster GEMM. The
# reason (2 threads, bf16, M = 1, weights from DRAM, 2026-12-02): torch's GEMV read 9.5 GB/s on the
# 4096 x 13696 down projection and 20-21 GB/s on the 27392- and 65024-row ones; this one 21-22.5.
def native_float_linear_supports(node) -> str | None:
    if node.attrs.get("quant") is not None:
        return "weight-only quantized: native.quant_linear's"
    spec = node.input_specs[0] if node.input_specs else None
    if spec is None:
        return "no input shape"
    if spec.dtype not in _native.DTYPE_CODES:
        return f"activations in {spec.dtype}: the native GEMV takes float32, bfloat16 or float16"
    return None


def _float_gemv(module, x2d: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor | None:
    """x2d (M, K) @ weight^T + bias with the native GEMV, or None when it does not apply."""
    m, k = x2d.shape
    if (m > module.FLOAT_GEMV_MAX_M or x2d.dtype not in _native.DTYPE_CODES or weight.dtype != x2d.dtype
            or weight.dim() != 2 or weight.shape[1] != k or (bias is not None and bias.dtype != x2d.dtype)):
        return None
    x2d, weight = x2d.contiguous(), weight.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    n = weight.shape[0]
    out = torch.empty((m, n), dtype=x2d.dtype)
    if m and n:
        module.linear_float(x2d.data_ptr(), weight.data_ptr(), 0 if bias is None else bias.data_ptr(),
                            out.data_ptr(), _native.DTYPE_CODES[x2d.dtype], m, n, k)
    return out


def _float_gemv_rows(ctx, module, x2d: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor | None:
    """_float_gemv, and under ctx.row_invariant (the serving engine's batched decode) also beyond
    FLOAT_GEMV_MAX_M rows, in chunks of at most that many: the GEMV computes every row alike
    whatever the row count, so a request's logits do not depend on how many others share the step
    (a GEMM from F.linear would sum in another order). float16 there takes linear_float_gemm, whose
    outputs are the GEMV's bit for bit, in one pass over the weights."""
    limit = module.FLOAT_GEMV_MAX_M
    if not getattr(ctx, "row_invariant", False) or x2d.shape[0] <= limit:
        return _float_gemv(module, x2d, weight, bias)
    if (x2d.dtype == weight.dtype == torch.float16 and weight.dim() == 2 and weight.shape[1] == x2d.shape[1]
            and (bias is None or bias.dtype == torch.float16) and _row_gemm_ready(module)):
        return _row_gemm(module, x2d, weight, bias)  # the GEMV's outputs bit for bit, one pass over W
    parts = [_float_gemv(module, x2d[i:i + limit], weight, bias) for i in range(0, x2d.shape[0], limit)]
    return None if any(p is None for p in parts) else torch.cat(parts)


def native_float_linear(ctx, node, inputs, params):
    module, _ = native()
    x = inputs[0]  # (..., K)
    x2d = x.reshape(-1, x.shape[-1])
    out = _float_gemv_rows(ctx, module, x2d, params["weight"], params.get("bias"))
    if out is None and not getattr(ctx, "row_invariant", False):
        out = _float_panel_gemm(x2d, params["weight"], params.get("bias"))
    if out is None:
        return ops.linear(ctx, node, inputs, params)
    return out.reshape(*x.shape[:-1], out.shape[-1])  # (..., N)


def native_lm_head(ctx, node, inputs, params):
    module, _ = native()
    x = inputs[0]  # (B, T, H)
    last = x[:, -1] if ctx.last_only else x.reshape(-1, x.shape[-1])  # (B, H) or (B*T, H)
    out = _float_gemv_rows(ctx, module, last, params["weight"], None)
    if out is None and not getattr(ctx, "row_invariant", False):
        out = _float_panel_gemm(last, params["weight"], None)
    if out is None:
        return ops.lm_head(ctx, node, inputs, params)
    return out[:, None] if ctx.last_only else out.reshape(*x.shape[:-1], out.shape[-1])  # (B, 1, V) / (B, T, V)
