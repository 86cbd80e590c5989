"""glmrt's native GPU kernels (native/gpu -> glmrt._native_cuda / glmrt._native_hip) against torch.

The same kernel sources are built as CUDA (nvcc) and as HIP (hipcc). This file has two parts.

1. Build and wiring checks that need NO GPU (they run in CI):
   * GLMRT_REQUIRE_CUDA_BUILD=1 / GLMRT_REQUIRE_HIP_BUILD=1: the module must be installed inside the
     glmrt package and import in a fresh process with no visible GPU (both link their runtime so
     that no driver is needed to import), with the architectures it was built for;
   * the backends register the kernels, native_info() reports the module, argument errors are
     raised before anything touches a device (an RMSNorm out_dtype that is not the reference's
     included), and the supports() predicates accept and refuse the right nodes (a plan for a
     quantized graph picks the native kernels; plans for ChatGLM-6B and GLM-130B, LayerNorm with
     DeepNorm and 2-D / half-split RoPE, fuse every residual + LayerNorm onto
     native.residual_layer_norm and run native.layer_norm and native.rope).

   * the same kernel sources compiled as C++ against native/gpu/emulate.h (one OS thread per GPU
     thread; __syncthreads and shuffles are barriers) with 32-lane AND 64-lane warps, and checked
     bit for bit on exact data (below): the kernels' indexing and every warp reduction are
     exercised at both widths without a GPU (a few minutes of CPU; GLMRT_SKIP_GPU_EMULATION=1
     skips it). The prefill dequantization (dequantize_int8 / dequantize_int4; prefill of a
     quantized linear is this dequantize, then a cuBLAS / hipBLAS GEMM through torch, NOT a fused
     quantized GEMM) is checked there bit for bit against a dequantization written in the test
     from the formula (the fp32 product q * scale rounded once to the output dtype, itself checked
     against glmrt.quant.dequantize): int8 and int4, per-channel and groups of 32 / 64 / 12, K odd and
     not a multiple of the group, fp32 / bf16 / fp16 outputs, fp32 scales under bf16, scales
     with random mantissas (so the products round); and the plan wrapper's prefill path (M = 9,
     64) on the emulated kernel against glmrt.ops.linear on CPU tensors, bit for bit; and its
     reuse of one dequantization workspace per forward pass, device and dtype (ctx.memo), grown
     as needed, over a pass of linears of several shapes.
     The norms and RoPE are checked there against independent formulas written in the
     test: RMSNorm / LayerNorm / residual + RMSNorm / residual + LayerNorm (h bit for bit, norm(h)
     within one ulp; with an fp32 or other-half weight the RMSNorm output dtype is the reference's
     and, on rows whose rms is a power of two, the product is rounded exactly once), and the three
     RoPE kinds (interleaved, half, 2-D; fp32 and fp16 tables) bit for bit, the formulas
     themselves checked against glmrt.ops.rope.
     Decode attention (native.attention) is checked there against an attention written out from
     the formulas in float64 with the releases' roundings (scores, probabilities, output; both
     scalings, GQA / MQA / MHA, causal and GLM prefix masks, left padding and a query that sees no
     key, KV lengths 1 to 700 over one to six KV splits, the fresh / cache-slice / static-cache key
     layouts, every dtype): small-integer q and k make every score exact, so the scores the kernel
     leaves in its workspace must equal the formula's bit for bit (bf16 / fp16) and masked keys
     must never be scored; the output within an ulp of itself plus an ulp of the largest value
     (expf and the fp32 sums may move one rounding of a probability). And the plan wrapper (cache
     write, strides, mask broadcast, prefill fallback) on the emulated kernel against
     glmrt.ops.attention on CPU tensors. Its supports() predicate and argument errors need no GPU.
     The other plan wrappers (norms, fused residual norms, RoPE: their shared steps, dtype codes,
     contiguous operands, absent operands as null pointers) run there too, on CPU tensors, against
     glmrt.ops.

2. Kernel conformance, which needs a GPU (skipped otherwise, with the reason). On a CUDA machine
   it tests glmrt._native_cuda through the cuda backend; on a ROCm / DTK torch, glmrt._native_hip
   through the rocm backend:

       pip install --no-build-isolation -e .       # nvcc (or hipcc) on PATH
       pytest -v tests/ops/test_native_gpu.py

   * RMSNorm vs glmrt.ops.norm, every dtype, odd widths (1, 7, 100, 257, 4096, 13696), both
     rounding conventions; a float32 (or other-half) weight under half activations, where the
     output has the reference's dtype (fp32 with round_before_weight); within one ulp of the
     activations' dtype (the sum of squares is reduced in another order, which can move the
     rounding of the normalized value).
   * LayerNorm (with and without bias) vs glmrt.ops.norm, within one ulp of the output dtype; a
     float32 weight and bias under half activations against glmrt.ops.norm on the CPU (torch's
     CPU layer_norm defines that mix; CUDA torch releases refuse it).
   * Fused residual + RMSNorm and residual + LayerNorm vs glmrt.ops.residual_norm: h bit for bit
     (the same two roundings), norm(h) within one ulp, alpha 1 and the DeepNorm alphas of
     ChatGLM-6B / GLM-130B, emit_residual on and off, with and without bias, a weight unlike the
     activations.
   * RoPE (fused qkv split), the three kinds (interleaved, half, 2-D with (B, 2, T) positions),
     fp32 and fp16 (ChatGLM-6B) tables, through the plan wrapper vs glmrt.ops.rope: q, k bit for
     bit (the kernel rounds each product and sum as torch does), v the same view, the tables
     memoized under ops.rope's key; GQA head counts, partial and full rotary, every dtype,
     a non-contiguous qkv.
   * W8A16 / W4A16 GEMV on EXACT data: small-integer activations, the full int8 / int4 ranges,
     power-of-two scales and integer biases make every partial sum exact in fp32, so the kernel
     must equal the float64 reference rounded once to the output dtype, bit for bit, over
     K in {100, 257, 4096, 4104, 13696} (odd, unaligned rows, several K tiles), N in {1, 3, 129},
     M in {1, 2, 5} (one and two launches), every dtype, per-channel and group sizes 32/64/128,
     with and without bias. Any indexing, nibble-order, sign-extension, scale-group or reduction
     error (a 64-lane wavefront reduced as 32, say) shows up as a mismatch.
   * The same on realistic data (glmrt.quant.quantize_weight of random weights) against the fp32
     dequantized reference, within the output dtype's rounding plus fp32 summation slack; and
     against glmrt.ops.linear (what the plan would run otherwise).
   * Prefill (M > 8, here 9 and 64, every dtype, int8 / int4, per-channel and g32 / g128): the
     native dequantization equals glmrt.quant.dequantize bit for bit on the device, and the plan
     wrapper (dequantize, then torch's F.linear: cuBLAS / hipBLAS) equals glmrt.ops.linear bit for
     bit (the same GEMM call on the same weight); under graph capture, each replay within one bf16
     rounding of the reference (a captured GEMM may sum in another order).
   * The plan wrappers: a weight
     whose base pointer is not 16-byte aligned (scalar-load path); non-contiguous input; a side
     stream; CUDA / HIP graph capture and replay.
   * Decode attention through the plan wrapper vs glmrt.ops.attention: every dtype, GQA / MQA /
     MHA heads with head_dim 12 to 256, both mask kinds and scalings (layers 1 and 6), no cache,
     the eager cache slice and the static cache with the position as a device tensor (up to 3000
     keys), T up to 8; the cache written exactly as the reference writes it, the output within
     two ulps of the largest value (cuBLAS sums the dot products in another order, which can flip
     the rounding of a score); T = 12 (a prefill) is the reference op itself. Forced KV splits of
     32 and 96 keys agree with the automatic split. Under CUDA / HIP graph capture, the model's
     static decode step (the mask computed on the device from the position tensor inside the
     graph) replayed at positions 5 to 299: each replay equals an eager launch bit for bit and the
     reference within tolerance, and leaves the cache as the reference does.

Speed is measured by benchmarks, never here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import threading
import zlib
from pathlib import Path

import pytest
import torch

from glmrt import _native, ops
from glmrt.backends import get_backend
from glmrt.graph import Node, ValueSpec
from glmrt.quant import dequantize, pack_int4, quantize_weight

IS_HIP_TORCH = getattr(torch.version, "hip", None) is not None
MODULE_NAME = "_native_hip" if IS_HIP_TORCH else "_native_cuda"
BACKEND_NAME = "rocm" if IS_HIP_TORCH else "cuda"
PLATFORMS = {"cuda": ("_native_cuda", "cuda", "GLMRT_REQUIRE_CUDA_BUILD"),
             "hip": ("_native_hip", "rocm", "GLMRT_REQUIRE_HIP_BUILD")}

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CODES = _native.DTYPE_CODES
# Half an ulp of the output dtype, relative (round to nearest).
HALF_ULP = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _has_gpu() -> bool:
    try:
        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - a broken driver means "no GPU" here
        return False


gpu_module, gpu_module_why = _native.load(MODULE_NAME)
if not _has_gpu():
    _skip_reason = (f"no GPU visible to torch {torch.__version__} (CUDA {torch.version.cuda}, "
                    f"HIP {getattr(torch.version, 'hip', None)}): the kernel conformance tests run on a GPU "
                    "machine with `pytest tests/ops/test_native_gpu.py`")
elif gpu_module is None:
    _skip_reason = f"glmrt.{MODULE_NAME} is not built: {gpu_module_why}"
else:
    _skip_reason = ""
needs_gpu = pytest.mark.skipif(bool(_skip_reason), reason=_skip_reason)


def _module_for(platform: str):
    return _native.load(PLATFORMS[platform][0])


# =============================================================================== part 1: no GPU
@pytest.mark.parametrize("platform", sorted(PLATFORMS))
def test_gpu_module_is_built_when_required(platform):
    name, _, env = PLATFORMS[platform]
    if os.environ.get(env) != "1":
        pytest.skip(f"{env} is not 1: this build is not required to contain glmrt.{name}")
    spec = importlib.util.find_spec(f"glmrt.{name}")
    assert spec is not None and spec.origin and os.path.isfile(spec.origin), (
        f"glmrt.{name} is not installed inside the glmrt package: look for 'glmrt: skipping the "
        f"{platform.upper()} target' or 'glmrt: compiling ... failed' in the pip install -v output")
    # Import in a fresh process with no GPU visible: importing must not need a device or a driver.
    env_vars = dict(os.environ, CUDA_VISIBLE_DEVICES="", HIP_VISIBLE_DEVICES="", ROCR_VISIBLE_DEVICES="")
    code = (f"import json, glmrt.{name} as m; "
            "print(json.dumps({'archs': m.archs(), 'platform': m.PLATFORM, 'runtime': m.runtime_version()}))")
    proc = subprocess.run([sys.executable, "-c", code], env=env_vars, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (f"{spec.origin} exists but does not import without a GPU:\n"
                                  f"{proc.stderr[-2000:]}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["platform"] == platform
    assert info["archs"], "the module reports no compiled architecture"
    if platform == "cuda" and not os.environ.get("GLMRT_CUDA_ARCHS"):
        assert {"sm_80", "sm_90"} <= set(info["archs"]), info  # DESIGN: compile-verified for sm_80 / sm_90
    if platform == "hip" and not os.environ.get("GLMRT_HIP_ARCHS"):
        assert "gfx906" in info["archs"], info  # the Hygon Z100 ISA (DESIGN: compile-verified)


@pytest.mark.parametrize("platform", sorted(PLATFORMS))
def test_backend_registers_the_module_it_has(platform):
    name, backend_name, _ = PLATFORMS[platform]
    module, why = _module_for(platform)
    backend = get_backend(backend_name)
    info = backend.native_info()
    names = {k.name for k in backend.kernels()}
    if module is None:
        assert info["built"] is False and info["module"] is None and info["reason"]
        assert "native.rms_norm" not in names
        return
    assert info["built"] is True and info["module"] == f"glmrt.{name}"
    assert info["archs"] == list(module.archs()) and info["archs"]
    assert info["platform"] == platform
    assert {"native.rms_norm", "native.layer_norm", "native.residual_rms_norm", "native.residual_layer_norm",
            "native.rope",
            "native.quant_gemv", "native.attention"} <= names


@pytest.mark.parametrize("platform", sorted(PLATFORMS))
def test_argument_errors_are_raised_before_touching_a_device(platform):
    module, why = _module_for(platform)
    if module is None:
        pytest.skip(f"glmrt.{PLATFORMS[platform][0]} is not built: {why}")
    #             x  xd w  scale sd bias bd out M  N  K   group device stream
    with pytest.raises(RuntimeError, match="group_size"):
        module.linear_int8(1, 0, 1, 1, 0, 0, 0, 1, 1, 1, 64, 48, 0, 0)
    with pytest.raises(RuntimeError, match="dtype"):
        module.linear_int4(1, 7, 1, 1, 0, 0, 0, 1, 1, 1, 64, 0, 0, 0)
    with pytest.raises(RuntimeError, match="dtype"):
        module.rms_norm(1, 0, 1, 5, 1, 0, 1, 8, 1e-5, False, 0, 0)
    module.linear_int8(0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 64, 0, 0, 0)  # M = 0: nothing to do, no launch
    #                         w scale sd out od N  K   group device stream
    with pytest.raises(RuntimeError, match="dequantize_int8: dtype"):
        module.dequantize_int8(1, 1, 0, 1, 3, 4, 64, 0, 0, 0)
    with pytest.raises(RuntimeError, match="dequantize_int4: dtype"):
        module.dequantize_int4(1, 1, 5, 1, 1, 4, 64, 32, 0, 0)
    with pytest.raises(RuntimeError, match="dequantize_int4: group_size"):
        module.dequantize_int4(1, 1, 1, 1, 1, 4, 64, -32, 0, 0)
    with pytest.raises(RuntimeError, match="N and K"):
        module.dequantize_int8(1, 1, 1, 1, 1, -1, 64, 0, 0, 0)
    module.dequantize_int8(0, 0, 1, 0, 1, 0, 64, 0, 0, 0)  # N = 0: nothing to do, no launch
    module.dequantize_int4(0, 0, 1, 0, 1, 16, 0, 32, 0, 0)  # K = 0
    module.rms_norm(0, 1, 0, 1, 0, 1, 0, 4096, 1e-5, True, 0, 0)  # rows = 0
    # The output dtype must be the reference's: x's, or with round_before_weight the promotion of
    # x and weight (bf16 x, fp32 weight -> fp32; bf16 x, fp16 weight -> fp32). A wrong one would
    # write past a half-sized buffer, so it is an argument error even for rows = 0.
    #                 x xd w wd out od rows cols eps  rbw  device stream
    module.rms_norm(0, 1, 0, 0, 0, 0, 0, 8, 1e-5, True, 0, 0)
    module.rms_norm(0, 1, 0, 2, 0, 0, 0, 8, 1e-5, True, 0, 0)
    module.rms_norm(0, 1, 0, 0, 0, 1, 0, 8, 1e-5, False, 0, 0)
    with pytest.raises(RuntimeError, match="rms_norm: out_dtype must be the promoted"):
        module.rms_norm(0, 1, 0, 0, 0, 1, 0, 8, 1e-5, True, 0, 0)
    with pytest.raises(RuntimeError, match="rms_norm: out_dtype must be x's"):
        module.rms_norm(0, 1, 0, 0, 0, 0, 0, 8, 1e-5, False, 0, 0)
    with pytest.raises(RuntimeError, match="residual_rms_norm: out_dtype must be the promoted"):
        module.residual_rms_norm(0, 0, 2, 1.0, 0, 1, 0, 0, 2, 0, 8, 1e-5, True, 0, 0)
    with pytest.raises(RuntimeError, match="layer_norm: dtype"):
        module.layer_norm(1, 0, 1, 0, 1, 9, 1, 1, 8, 1e-5, 0, 0)  # a bias dtype code 9
    module.layer_norm(1, 0, 1, 0, 0, 9, 1, 0, 8, 1e-5, 0, 0)  # no bias: its code is not read; rows = 0
    with pytest.raises(RuntimeError, match="residual_rms_norm: dtype"):
        module.residual_rms_norm(1, 1, 3, 1.0, 1, 0, 0, 1, 3, 1, 8, 1e-5, False, 0, 0)
    with pytest.raises(RuntimeError, match="rows and cols"):
        module.residual_rms_norm(1, 1, 0, 1.0, 1, 0, 0, 1, 0, -1, 8, 1e-5, False, 0, 0)
    module.residual_rms_norm(0, 0, 1, 1.0, 0, 1, 0, 0, 1, 0, 4096, 1e-5, True, 0, 0)  # rows = 0
    #                                res br xd alpha w wd bias bd h out rows cols eps device stream
    with pytest.raises(RuntimeError, match="residual_layer_norm: dtype"):
        module.residual_layer_norm(1, 1, 2, 1.0, 1, 0, 1, 4, 0, 1, 1, 8, 1e-5, 0, 0)  # a bias dtype code 4
    with pytest.raises(RuntimeError, match="residual_layer_norm: rows and cols"):
        module.residual_layer_norm(1, 1, 2, 1.0, 1, 0, 0, 0, 0, 1, 1, -8, 1e-5, 0, 0)
    module.residual_layer_norm(0, 0, 2, 7.5, 0, 0, 0, 9, 0, 0, 0, 4096, 1e-5, 0, 0)  # no bias, rows = 0
    #          qkv d kind cos sin cos2 sin2 q  k  rows nh nkv hd rd device stream
    with pytest.raises(RuntimeError, match="rotary_dim"):
        module.rope(1, 1, 0, 1, 1, 0, 0, 1, 1, 1, 2, 1, 128, 130, 0, 0)
    with pytest.raises(RuntimeError, match="head_dim"):
        module.rope(1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 2, 1, 7, 4, 0, 0)
    with pytest.raises(RuntimeError, match="dtype"):
        module.rope(1, 3, 0, 1, 1, 0, 0, 1, 1, 1, 2, 1, 128, 64, 0, 0)
    with pytest.raises(RuntimeError, match="kind"):
        module.rope(1, 1, 3, 1, 1, 0, 0, 1, 1, 1, 2, 1, 128, 64, 0, 0)
    with pytest.raises(RuntimeError, match="2-D RoPE rotates whole heads"):
        module.rope(1, 1, 2, 1, 1, 1, 1, 1, 1, 1, 2, 1, 128, 64, 0, 0)  # 2-D needs rotary_dim == head_dim
    with pytest.raises(RuntimeError, match="2-D RoPE rotates whole heads"):
        module.rope(1, 1, 2, 1, 1, 1, 1, 1, 1, 1, 2, 1, 6, 6, 0, 0)  # ... a multiple of 4
    with pytest.raises(RuntimeError, match="block-position tables"):
        module.rope(1, 1, 2, 1, 1, 0, 0, 1, 1, 1, 2, 1, 128, 128, 0, 0)
    module.rope(0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 32, 2, 128, 64, 0, 0)  # rows = 0
    module.rope(0, 1, 2, 0, 0, 0, 0, 0, 0, 0, 32, 32, 128, 128, 0, 0)  # rows = 0: no tables needed
    assert module.GEMV_ROWS_PER_LAUNCH == 4
    assert module.runtime_version() > 0


def norm_node(cols, dtype, round_before_weight, kind="rmsnorm", lead=("B", "T")):
    return Node("n", "norm", ["x"], ["y"], {"weight": "w"},
                attrs=dict(kind=kind, eps=1e-5, round_before_weight=round_before_weight),
                input_specs=[ValueSpec((*lead, cols), dtype)], output_specs=[ValueSpec((*lead, cols), dtype)])


def residual_norm_node(cols, dtype, round_before_weight, alpha=1.0, emit_residual=True, kind="rmsnorm",
                       branch_dtype=None, lead=("B", "T")):
    spec = ValueSpec((*lead, cols), dtype)
    branch = ValueSpec((*lead, cols), branch_dtype or dtype)
    outputs = (["h"] if emit_residual else []) + ["y"]
    return Node("r+n", "residual_norm", ["res", "branch"], outputs, {"weight": "w"},
                attrs=dict(alpha=alpha, kind=kind, eps=1e-5, round_before_weight=round_before_weight,
                           emit_residual=emit_residual),
                input_specs=[spec, branch], output_specs=[spec] * len(outputs))


def rope_node(nh, nkv, hd, rd, dtype, kind="interleaved", lead=("B", "T"), table_dtype="float32"):
    return Node("layers.0.rope", "rope", ["qkv"], ["q", "k", "v"], {},
                attrs=dict(kind=kind, rotary_dim=rd, head_dim=hd, num_heads=nh, num_kv_heads=nkv, base=10000.0,
                           table_dtype=table_dtype),
                input_specs=[ValueSpec((*lead, (nh + 2 * nkv) * hd), dtype)],
                output_specs=[ValueSpec((*lead, n, hd), dtype) for n in (nh, nkv, nkv)])


def linear_node(k, n, dtype, bits, group, bias=True, lead=("B", "T")):
    params = {"weight": "w", "scale": "s"}
    if bias:
        params["bias"] = "b"
    attrs = {} if bits is None else {"quant": {"bits": bits, "group_size": group, "in_features": k}}
    return Node("layers.0.mlp.up", "linear", ["x"], ["y"], params, attrs=attrs,
                input_specs=[ValueSpec((*lead, k), dtype)], output_specs=[ValueSpec((*lead, n), dtype)])


def test_supports_predicates():
    from glmrt.backends.cuda.kernels import GEMV_MAX_M, NativeGpuKernels

    norm_ok, linear_ok = NativeGpuKernels.rms_norm_supports, NativeGpuKernels.quant_linear_supports
    for dtype in DTYPES:
        assert norm_ok(norm_node(4096, dtype, True)) is None
        assert norm_ok(norm_node(7, dtype, False)) is None
    assert "RMSNorm" in norm_ok(norm_node(64, torch.float32, False, kind="layernorm"))
    assert "float64" in norm_ok(norm_node(64, torch.float64, False))
    ln_ok, rn_ok = NativeGpuKernels.layer_norm_supports, NativeGpuKernels.residual_rms_norm_supports
    for dtype in DTYPES:
        assert ln_ok(norm_node(4096, dtype, False, kind="layernorm")) is None
        assert ln_ok(norm_node(7, dtype, False, kind="layernorm")) is None
        for rbw in (False, True):
            assert rn_ok(residual_norm_node(4096, dtype, rbw)) is None
            assert rn_ok(residual_norm_node(7, dtype, rbw, alpha=(2 * 40) ** 0.5, emit_residual=False)) is None
    assert "LayerNorm only" in ln_ok(norm_node(64, torch.float32, False))
    assert "float64" in ln_ok(norm_node(64, torch.float64, False, kind="layernorm"))
    assert "positive integer" in ln_ok(norm_node("H", torch.float16, False, kind="layernorm"))
    assert "RMSNorm only" in rn_ok(residual_norm_node(64, torch.bfloat16, False, kind="layernorm"))
    assert "one dtype" in rn_ok(residual_norm_node(64, torch.bfloat16, False, branch_dtype=torch.float32))
    assert "float64" in rn_ok(residual_norm_node(64, torch.float64, False))
    assert "finite" in rn_ok(residual_norm_node(64, torch.float16, False, alpha=float("inf")))
    rln_ok = NativeGpuKernels.residual_layer_norm_supports
    for dtype in DTYPES:
        for emit in (False, True):  # ChatGLM-6B / GLM-130B DeepNorm alphas, and plain pre-norm adds
            assert rln_ok(residual_norm_node(4096, dtype, False, alpha=(2 * 28) ** 0.5, kind="layernorm",
                                             emit_residual=emit)) is None
            assert rln_ok(residual_norm_node(7, dtype, False, kind="layernorm", emit_residual=emit)) is None
    assert "LayerNorm only" in rln_ok(residual_norm_node(64, torch.bfloat16, False))
    assert "one dtype" in rln_ok(residual_norm_node(64, torch.float16, False, kind="layernorm",
                                                    branch_dtype=torch.float32))
    assert "float64" in rln_ok(residual_norm_node(64, torch.float64, False, kind="layernorm"))
    assert "finite" in rln_ok(residual_norm_node(64, torch.float16, False, kind="layernorm", alpha=float("nan")))
    assert "positive integer" in rln_ok(residual_norm_node("H", torch.float16, False, kind="layernorm"))
    ln_mismatch = residual_norm_node(64, torch.float16, False, kind="layernorm")
    ln_mismatch.input_specs[1] = ValueSpec((1, 64), torch.float16)
    assert "shape" in rln_ok(ln_mismatch)
    rope_ok = NativeGpuKernels.rope_supports
    for dtype in DTYPES:
        for table_dtype in ("float32", "float16"):
            assert rope_ok(rope_node(32, 2, 128, 64, dtype, table_dtype=table_dtype)) is None  # ChatGLM2/3, GLM-4
            assert rope_ok(rope_node(3, 1, 8, 8, dtype, table_dtype=table_dtype)) is None  # full rotary
            # GLM-130B (1-D, half-split over the whole head) and ChatGLM-6B (2-D), and partial half-split.
            assert rope_ok(rope_node(96, 96, 128, 128, dtype, kind="half", table_dtype=table_dtype)) is None
            assert rope_ok(rope_node(4, 2, 96, 32, dtype, kind="half", table_dtype=table_dtype)) is None
            assert rope_ok(rope_node(32, 32, 128, 128, dtype, kind="2d", table_dtype=table_dtype)) is None
            assert rope_ok(rope_node(3, 1, 4, 4, dtype, kind="2d", table_dtype=table_dtype)) is None
    assert "rope kind 'yarn'" in rope_ok(rope_node(32, 2, 128, 64, torch.bfloat16, kind="yarn"))
    assert "table dtype 'bfloat16'" in rope_ok(rope_node(32, 2, 128, 64, torch.bfloat16, table_dtype="bfloat16"))
    assert "2-D" in rope_ok(rope_node(32, 32, 128, 64, torch.float16, kind="2d"))  # rotary_dim != head_dim
    assert "multiple of 4" in rope_ok(rope_node(4, 4, 6, 6, torch.float16, kind="2d"))
    assert "even" in rope_ok(rope_node(4, 1, 128, 130, torch.bfloat16))
    assert "even" in rope_ok(rope_node(4, 1, 7, 7, torch.bfloat16, kind="half"))
    assert "even" in rope_ok(rope_node(4, 1, 7, 4, torch.bfloat16))
    assert "float64" in rope_ok(rope_node(4, 1, 128, 64, torch.float64))
    bad_width = rope_node(4, 1, 128, 64, torch.bfloat16)
    bad_width.input_specs[0] = ValueSpec(("B", "T", 100), torch.bfloat16)
    assert "qkv width" in rope_ok(bad_width)
    shape_mismatch = residual_norm_node(64, torch.float16, False)
    shape_mismatch.input_specs[1] = ValueSpec((1, 64), torch.float16)
    assert "shape" in rn_ok(shape_mismatch)
    for bits in (8, 4):
        for group in (0, 32, 64, 128):
            assert linear_ok(linear_node(4096, 4608, torch.bfloat16, bits, group)) is None
    assert linear_ok(linear_node(257, 3, torch.float16, 4, 32, bias=False)) is None
    assert "float linears" in linear_ok(linear_node(4096, 4096, torch.bfloat16, None, 0))
    assert "group size 48" in linear_ok(linear_node(4096, 4096, torch.bfloat16, 4, 48))
    assert "2-bit" in linear_ok(linear_node(4096, 4096, torch.bfloat16, 2, 0))
    assert "float64" in linear_ok(linear_node(4096, 4096, torch.float64, 8, 0))
    # Any M: the GEMV up to GEMV_MAX_M rows (decided per call under symbolic B, T), beyond that the
    # native dequantize + cuBLAS, so concrete prefill-sized leading dims are accepted too.
    assert linear_ok(linear_node(4096, 4096, torch.bfloat16, 8, 0, lead=(1, GEMV_MAX_M))) is None
    assert linear_ok(linear_node(4096, 4096, torch.bfloat16, 8, 0, lead=(2, 512))) is None


@pytest.mark.parametrize("platform", sorted(PLATFORMS))
def test_plan_for_a_quantized_graph_picks_the_native_kernels(platform):
    from glmrt.graph import build_graph
    from glmrt.lowering import lower
    from glmrt.models import PRESETS, config_from_dict
    from glmrt.quant import quantize_graph

    module, why = _module_for(platform)
    if module is None:
        pytest.skip(f"glmrt.{PLATFORMS[platform][0]} is not built: {why}")
    _, cfg = config_from_dict(dict(PRESETS["glm-4-9b-0414"]))
    graph = quantize_graph(build_graph(cfg.replace(num_layers=1), torch.bfloat16), 4, 32)
    weights = {n: torch.empty(p.shape, dtype=p.dtype, device="meta") for n, p in graph.params.items()}
    plan = lower(graph, get_backend(PLATFORMS[platform][1]), weights)
    by_node = {s.node.name: s for s in plan.steps}
    for step in plan.steps:
        if step.node.op == "norm":
            assert step.impl == "native.rms_norm", step.reason
        assert step.node.op != "residual_norm"  # lower() alone does not fuse
        if step.node.op == "linear" and "quant" in step.node.attrs:
            assert step.impl == "native.quant_gemv", step.reason
    assert by_node and any(s.impl == "native.quant_gemv" for s in plan.steps)


@pytest.mark.parametrize("platform", sorted(PLATFORMS))
def test_fused_plans_use_the_native_norm_kernels(platform):
    """glmrt.api.plan fuses residual + norm where native.residual_rms_norm takes the node (RMSNorm
    models); the LayerNorm models are in test_plans_for_layer_norm_models_use_the_native_kernels."""
    from glmrt.api import plan as plan_for

    module, why = _module_for(platform)
    if module is None:
        pytest.skip(f"glmrt.{PLATFORMS[platform][0]} is not built: {why}")
    backend = PLATFORMS[platform][1]
    plan = plan_for("synthetic:glm-4-9b-0414", backend=backend, layers=1)
    ops_seen = {s.node.op for s in plan.steps}
    assert "residual_norm" in ops_seen and "residual" not in ops_seen
    for step in plan.steps:
        if step.node.op == "residual_norm":
            assert step.impl == "native.residual_rms_norm", step.reason
        if step.node.op == "norm":
            assert step.impl == "native.rms_norm", step.reason
        if step.node.op == "rope":
            assert step.node.attrs["kind"] == "interleaved" and step.impl == "native.rope", step.reason


@pytest.mark.parametrize("preset, rope_kind, alpha", [("chatglm-6b", "2d", (2 * 28) ** 0.5),
                                                      ("glm-130b", "half", (2 * 70) ** 0.5)])
@pytest.mark.parametrize("platform", sorted(PLATFORMS))
def test_plans_for_layer_norm_models_use_the_native_kernels(platform, preset, rope_kind, alpha):
    """ChatGLM-6B (LayerNorm, DeepNorm, 2-D RoPE with fp16 tables) and GLM-130B (LayerNorm, DeepNorm,
    half-split RoPE): glmrt.api.plan fuses every residual + LayerNorm into a residual_norm node on
    native.residual_layer_norm (glmrt.fusion fuses only where the backend has a kernel for the fused
    node, which LayerNorm lacked), the first norm runs native.layer_norm and every RoPE native.rope.
    Unfused, the same graphs keep their nodes on the native norm kernels."""
    from glmrt.api import plan as plan_for

    module, why = _module_for(platform)
    if module is None:
        pytest.skip(f"glmrt.{PLATFORMS[platform][0]} is not built: {why}")
    backend = PLATFORMS[platform][1]
    plan = plan_for(f"synthetic:{preset}", backend=backend, layers=2)
    by_op = {}
    for step in plan.steps:
        by_op.setdefault(step.node.op, []).append(step)
    assert "residual" not in by_op, [s.node.name for s in by_op["residual"]]
    # 2 layers: attn residual + mlp_norm and mlp residual + the next norm, per layer (the last one's
    # next norm is final_norm).
    fused = by_op["residual_norm"]
    assert len(fused) == 4
    for step in fused:
        assert step.impl == "native.residual_layer_norm", step.reason
        assert step.node.attrs["kind"] == "layernorm" and "bias" in step.node.params
        assert step.node.attrs["alpha"] == pytest.approx(alpha)
    norms = by_op["norm"]  # only layer 0's attn_norm reads no residual sum
    assert [s.node.name for s in norms] == ["layers.0.attn_norm"]
    assert norms[0].impl == "native.layer_norm", norms[0].reason
    ropes = by_op["rope"]
    assert len(ropes) == 2
    for step in ropes:
        assert step.node.attrs["kind"] == rope_kind and step.node.attrs["table_dtype"] == "float16"
        assert step.impl == "native.rope", step.reason
    unfused = plan_for(f"synthetic:{preset}", backend=backend, layers=2, fuse=False)
    assert "residual_norm" not in {s.node.op for s in unfused.steps}
    assert all(s.impl == "native.layer_norm" for s in unfused.steps if s.node.op == "norm")


# ============================================================================= part 2: on a GPU
def _kernels():
    return {k.name: k for k in get_backend(BACKEND_NAME).kernels()}


@needs_gpu
def test_device_matches_the_build():
    archs = gpu_module.archs()
    warp = gpu_module.warp_size(torch.cuda.current_device())
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    if IS_HIP_TORCH:
        assert warp in (32, 64)
        arch = props.gcnArchName.split(":")[0]
        assert arch in archs, f"this {arch} GPU has no code in glmrt.{MODULE_NAME} (built for {archs})"
    else:
        assert warp == 32
        major, minor = torch.cuda.get_device_capability()
        sass = f"sm_{major}{minor}"
        # SASS for this exact arch, or PTX of the newest built arch that the driver can JIT.
        assert sass in archs or max(int(a[3:].rstrip("af")) for a in archs) <= major * 10 + minor, (sass, archs)


# ------------------------------------------------------------------------------------- RMSNorm
NORM_SHAPES = [(1, 1, 1), (1, 3, 7), (2, 5, 64), (1, 2, 100), (1, 1, 257), (1, 2, 4096), (3, 1, 13696)]


def _assert_within_one_ulp(got, want, dtype, what):
    assert got.dtype == want.dtype and got.shape == want.shape, what
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what}: {m}")
    else:
        ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
        torch.testing.assert_close(got.float(), want.float(), atol=ulp, rtol=2 * ulp, msg=lambda m: f"{what}: {m}")


@needs_gpu
@pytest.mark.parametrize("round_before_weight", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_matches_reference(dtype, round_before_weight):
    kernel = _kernels()["native.rms_norm"]
    g = torch.Generator().manual_seed(1)
    for shape in NORM_SHAPES:
        node = norm_node(shape[-1], dtype, round_before_weight)
        assert kernel.supports(node) is None
        x = (3 * torch.randn(shape, generator=g)).to(dtype).cuda()
        w = (1 + 0.2 * torch.randn(shape[-1], generator=g)).to(dtype).cuda()
        got = kernel.fn(None, node, [x], {"weight": w})
        want = ops.norm(None, node, [x], {"weight": w})
        _assert_within_one_ulp(got, want, dtype, f"rms_norm {shape} {dtype} round_before_weight={round_before_weight}")


def _other_weight_dtypes(dtype):
    """Weight dtypes unlike the activations': fp32, and the other half type (bf16 with fp16
    promotes to fp32 in torch)."""
    return [torch.float32, torch.float16 if dtype == torch.bfloat16 else torch.bfloat16]


@needs_gpu
@pytest.mark.parametrize("round_before_weight", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_rms_norm_float32_weight_under_half_activations(dtype, round_before_weight):
    """The output has the reference's dtype: x's, or with round_before_weight torch's product
    weight * normed.to(x dtype), fp32 here (it used to be rounded back to x's dtype)."""
    kernel = _kernels()["native.rms_norm"]
    x = torch.randn(2, 3, 4096, device="cuda").to(dtype)
    for w_dtype in _other_weight_dtypes(dtype):
        w = (1 + 0.1 * torch.randn(4096, device="cuda")).to(w_dtype)
        node = norm_node(4096, dtype, round_before_weight)
        got = kernel.fn(None, node, [x], {"weight": w})
        want = ops.norm(None, node, [x], {"weight": w})
        assert want.dtype == (torch.float32 if round_before_weight else dtype)
        _assert_within_one_ulp(got, want, dtype, f"{w_dtype} weight, round_before_weight={round_before_weight}")


@needs_gpu
def test_rms_norm_large_values_do_not_overflow_the_fp32_sum():
    kernel = _kernels()["native.rms_norm"]
    x = torch.full((1, 1, 4096), 300.0, device="cuda", dtype=torch.float16)  # x^2 > fp16 max
    w = torch.ones(4096, device="cuda", dtype=torch.float16)
    got = kernel.fn(None, norm_node(4096, torch.float16, True), [x], {"weight": w})
    torch.testing.assert_close(got.float(), torch.ones_like(got, dtype=torch.float32), atol=1e-3, rtol=0)


# ------------------------------------------------------------------------------ LayerNorm
@needs_gpu
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_norm_matches_reference(dtype, bias):
    kernel = _kernels()["native.layer_norm"]
    g = torch.Generator().manual_seed(2)
    for shape in NORM_SHAPES:
        node = norm_node(shape[-1], dtype, False, kind="layernorm")
        assert kernel.supports(node) is None
        x = (3 * torch.randn(shape, generator=g) + 1.5).to(dtype).cuda()
        params = {"weight": (1 + 0.2 * torch.randn(shape[-1], generator=g)).to(dtype).cuda()}
        if bias:
            params["bias"] = (0.3 * torch.randn(shape[-1], generator=g)).to(dtype).cuda()
        got = kernel.fn(None, node, [x], params)
        want = ops.norm(None, node, [x], params)
        _assert_within_one_ulp(got, want, dtype, f"layer_norm {shape} {dtype} bias={bias}")


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_layer_norm_float32_weight_and_bias_under_half_activations(dtype):
    """The reference is glmrt.ops.norm on the CPU: torch's CPU layer_norm defines half activations
    with fp32 weight and bias (fp32 math, the activations' dtype out), while CUDA torch releases
    refuse the mix ("expected scalar type Half but found Float")."""
    kernel = _kernels()["native.layer_norm"]
    x = torch.randn(2, 3, 4096, device="cuda").to(dtype)
    params = {"weight": 1 + 0.1 * torch.randn(4096, device="cuda"), "bias": 0.1 * torch.randn(4096, device="cuda")}
    node = norm_node(4096, dtype, False, kind="layernorm")
    got = kernel.fn(None, node, [x], params)
    want = ops.norm(None, node, [x.cpu()], {k: v.cpu() for k, v in params.items()})
    assert want.dtype == dtype
    _assert_within_one_ulp(got.cpu(), want, dtype, "fp32 weight and bias")


# ------------------------------------------------------------------------ residual + RMSNorm
@needs_gpu
@pytest.mark.parametrize("alpha", [1.0, (2 * 28) ** 0.5], ids=["alpha1", "deepnorm"])
@pytest.mark.parametrize("round_before_weight", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_residual_rms_norm_matches_reference(dtype, round_before_weight, alpha):
    kernel = _kernels()["native.residual_rms_norm"]
    g = torch.Generator().manual_seed(3)
    for shape in NORM_SHAPES:
        for emit in (True, False):
            node = residual_norm_node(shape[-1], dtype, round_before_weight, alpha=alpha, emit_residual=emit)
            assert kernel.supports(node) is None
            res = (3 * torch.randn(shape, generator=g)).to(dtype).cuda()
            branch = torch.randn(shape, generator=g).to(dtype).cuda()
            w = {"weight": (1 + 0.2 * torch.randn(shape[-1], generator=g)).to(dtype).cuda()}
            got = kernel.fn(None, node, [res, branch], w)
            want = ops.residual_norm(None, node, [res, branch], w)
            what = f"residual_rms_norm {shape} {dtype} rbw={round_before_weight} alpha={alpha} emit={emit}"
            if emit:
                assert torch.equal(got[0], want[0]), f"{what}: h {_first_mismatch(got[0], want[0])}"
                got, want = got[1], want[1]
            _assert_within_one_ulp(got, want, dtype, what)


@needs_gpu
@pytest.mark.parametrize("round_before_weight", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_residual_rms_norm_float32_weight_under_half_activations(dtype, round_before_weight):
    """h keeps the activations' dtype; norm(h) has the reference's dtype (fp32 with
    round_before_weight and a weight unlike the activations)."""
    kernel = _kernels()["native.residual_rms_norm"]
    g = torch.Generator().manual_seed(13)
    res = (3 * torch.randn(2, 3, 4096, generator=g)).to(dtype).cuda()
    branch = torch.randn(2, 3, 4096, generator=g).to(dtype).cuda()
    for w_dtype in _other_weight_dtypes(dtype):
        w = {"weight": (1 + 0.1 * torch.randn(4096, generator=g)).to(w_dtype).cuda()}
        node = residual_norm_node(4096, dtype, round_before_weight, alpha=(2 * 28) ** 0.5)
        got = kernel.fn(None, node, [res, branch], w)
        want = ops.residual_norm(None, node, [res, branch], w)
        assert want[1].dtype == (torch.float32 if round_before_weight else dtype)
        assert torch.equal(got[0], want[0]), _first_mismatch(got[0], want[0])
        _assert_within_one_ulp(got[1], want[1], dtype, f"{w_dtype} weight, round_before_weight={round_before_weight}")


# ---------------------------------------------------------------------- residual + LayerNorm
@needs_gpu
@pytest.mark.parametrize("alpha", [1.0, (2 * 28) ** 0.5, (2 * 70) ** 0.5], ids=["alpha1", "chatglm6b", "glm130b"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_residual_layer_norm_matches_reference(dtype, alpha):
    """ChatGLM-6B / GLM-130B's DeepNorm residual h = x * alpha + branch, then LayerNorm(h) with bias:
    h bit for bit (the same two roundings), norm(h) within one ulp."""
    kernel = _kernels()["native.residual_layer_norm"]
    g = torch.Generator().manual_seed(12)
    for shape in NORM_SHAPES:
        for emit, bias in ((True, True), (False, True), (True, False)):
            node = residual_norm_node(shape[-1], dtype, False, alpha=alpha, emit_residual=emit, kind="layernorm")
            assert kernel.supports(node) is None
            res = (3 * torch.randn(shape, generator=g) + 1).to(dtype).cuda()
            branch = torch.randn(shape, generator=g).to(dtype).cuda()
            params = {"weight": (1 + 0.2 * torch.randn(shape[-1], generator=g)).to(dtype).cuda()}
            if bias:
                params["bias"] = (0.3 * torch.randn(shape[-1], generator=g)).to(dtype).cuda()
            got = kernel.fn(None, node, [res, branch], params)
            want = ops.residual_norm(None, node, [res, branch], params)
            what = f"residual_layer_norm {shape} {dtype} alpha={alpha} emit={emit} bias={bias}"
            if emit:
                assert torch.equal(got[0], want[0]), f"{what}: h {_first_mismatch(got[0], want[0])}"
                got, want = got[1], want[1]
            _assert_within_one_ulp(got, want, dtype, what)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_residual_layer_norm_float32_weight_and_bias_under_half_activations(dtype):
    """Against glmrt.ops.residual_norm on the CPU (see the LayerNorm test above): the output keeps
    the activations' dtype."""
    kernel = _kernels()["native.residual_layer_norm"]
    res = torch.randn(2, 3, 4096, device="cuda").to(dtype)
    branch = torch.randn(2, 3, 4096, device="cuda").to(dtype)
    params = {"weight": 1 + 0.1 * torch.randn(4096, device="cuda"), "bias": 0.1 * torch.randn(4096, device="cuda")}
    node = residual_norm_node(4096, dtype, False, alpha=(2 * 28) ** 0.5, kind="layernorm")
    h, y = kernel.fn(None, node, [res, branch], params)
    want_h, want_y = ops.residual_norm(None, node, [res.cpu(), branch.cpu()], {k: v.cpu() for k, v in params.items()})
    assert want_y.dtype == dtype
    assert torch.equal(h.cpu(), want_h), _first_mismatch(h.cpu(), want_h)
    _assert_within_one_ulp(y.cpu(), want_y, dtype, "fp32 weight and bias")


# ------------------------------------------------------------------------------------- RoPE
ROPE_CASES = [(1, 1, 1, 1, 2, 2), (2, 3, 4, 2, 8, 4), (1, 5, 32, 2, 128, 64), (2, 2, 6, 6, 64, 64),
              (1, 4, 3, 1, 96, 32)]  # (B, T, nh, nkv, hd, rotary_dim)
# 2-D RoPE rotates whole heads (rotary_dim == head_dim, a multiple of 4); ChatGLM-6B is 32 x 128 MHA.
ROPE_2D_CASES = [(1, 1, 1, 1, 4, 4), (2, 3, 4, 4, 8, 8), (1, 5, 32, 32, 128, 128), (2, 2, 6, 2, 64, 64),
                 (1, 4, 3, 1, 96, 96)]
ROPE_KINDS = ["interleaved", "half", "2d"]


def _rope_cases(kind):
    return ROPE_2D_CASES if kind == "2d" else ROPE_CASES


def _rope_inputs(b, t, nh, nkv, hd, rd, dtype, g, device="cpu", kind="interleaved"):
    """qkv (B, T, (nh + 2 nkv) * hd) and positions: (B, T), or (B, 2, T) (position, block
    position) for 2-D RoPE, large enough that fp16 tables lose precision."""
    qkv = (2 * torch.randn(b, t, (nh + 2 * nkv) * hd, generator=g)).to(dtype).to(device)
    positions = torch.arange(t)[None, :] + torch.randint(0, 3000, (b, 1), generator=g)  # (B, T)
    if kind == "2d":
        blocks = torch.randint(0, 300, (b, t), generator=g)  # (B, T)
        positions = torch.stack((positions, blocks), dim=1)  # (B, 2, T)
    return qkv, positions.to(device)


@needs_gpu
@pytest.mark.parametrize("table_dtype", ["float32", "float16"])
@pytest.mark.parametrize("kind", ROPE_KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rope_matches_reference(dtype, kind, table_dtype):
    """native.rope through the plan wrapper vs glmrt.ops.rope: q and k bit for bit, v the same
    view; the tables are built once, under ops.rope's memo key (a reference layer after a native
    one reuses them)."""
    kernel = _kernels()["native.rope"]
    g = torch.Generator().manual_seed(4)
    for b, t, nh, nkv, hd, rd in _rope_cases(kind):
        node = rope_node(nh, nkv, hd, rd, dtype, kind=kind, table_dtype=table_dtype)
        assert kernel.supports(node) is None
        qkv, positions = _rope_inputs(b, t, nh, nkv, hd, rd, dtype, g, device="cuda", kind=kind)
        ctx = ops.ForwardContext(positions=positions, allowed=None)
        got = kernel.fn(ctx, node, [qkv], {})
        want = ops.rope(ops.ForwardContext(positions=positions, allowed=None), node, [qkv], {})
        what = f"rope {kind} B{b} T{t} nh{nh} nkv{nkv} hd{hd} rd{rd} {dtype} tables {table_dtype}"
        for name, x, y in zip("qkv", got, want):
            assert x.shape == y.shape and x.dtype == y.dtype, f"{what}: {name}"
            assert torch.equal(x, y), f"{what}: {name} {_first_mismatch(x, y)}"
        assert got[2].data_ptr() == want[2].data_ptr()  # v: the same view of qkv
        assert len(ctx.memo) == 1  # the tables are memoized for the other layers, as ops.rope does
        again = ops.rope(ctx, node, [qkv], {})  # a reference layer in the same step: the same tables
        assert len(ctx.memo) == 1 and all(torch.equal(x, y) for x, y in zip(again, want))
        # A non-contiguous qkv (a column slice of a wider buffer) gives the same result.
        wide = torch.zeros(b, t, qkv.shape[-1] + 8, dtype=dtype, device="cuda")
        wide[..., :qkv.shape[-1]] = qkv
        sliced = wide[..., :qkv.shape[-1]]
        assert b * t == 1 or not sliced.is_contiguous()
        for x, y in zip(kernel.fn(ctx, node, [sliced], {}), want):
            assert torch.equal(x, y), f"{what}, non-contiguous qkv: {_first_mismatch(x, y)}"


# ------------------------------------------------------------------------------- W8A16 / W4A16
GEMV_K = [100, 257, 4096, 4104, 13696]
GEMV_N = [1, 3, 129]
GEMV_M = [1, 2, 5]
GROUPS = [0, 32, 64, 128]


def _expand_scale(scale: torch.Tensor, group: int, k: int) -> torch.Tensor:
    """(N,) or (N, G) -> (N, K)."""
    if group == 0:
        return scale[:, None].expand(-1, k)
    return scale.repeat_interleave(group, dim=1)[:, :k]


def _exact_case(m, n, k, bits, group, dtype, bias, g):
    """Inputs whose every partial sum is exact in fp32: x in [-2, 2], q over the whole int8 / int4
    range, scales 2^e with e in [e0 - 2, e0] and integer biases. Worst case |sum| <= 2 * 127 * K * 2^e0
    with a granularity of 2^(e0 - 2): under 2^24 granularities for K <= 16384. fp16 uses e0 = -6 so
    the results stay finite."""
    e0 = -6 if dtype == torch.float16 else 0
    x = torch.randint(-2, 3, (m, k), generator=g).to(dtype)
    if bits == 8:
        q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        stored = q
    else:
        q = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
        stored = pack_int4(q)
    groups = 1 if group == 0 else -(-k // group)
    exps = torch.randint(e0 - 2, e0 + 1, (n,) if group == 0 else (n, groups), generator=g)
    scale = torch.pow(2.0, exps.double()).to(dtype)
    b = torch.randint(-40, 41, (n,), generator=g).to(dtype) if bias else None
    return x, q, stored, scale, b


def _exact_reference(x, q, scale, b, group, dtype):
    w = q.double() * _expand_scale(scale.double(), group, q.shape[1])  # (N, K)
    y = x.double() @ w.T  # (M, N), exact
    if b is not None:
        y = y + b.double()
    return y.to(dtype)


def _first_mismatch(got, want):
    bad = (got != want) & ~(got.isnan() & want.isnan())
    idx = bad.nonzero()[0].tolist()
    return f"{int(bad.sum())} of {bad.numel()} differ; first at {idx}: got {got[tuple(idx)].item()} want {want[tuple(idx)].item()}"


@needs_gpu
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quant_gemv_exact(dtype, bits, group):
    launch = gpu_module.linear_int8 if bits == 8 else gpu_module.linear_int4
    g = torch.Generator().manual_seed(bits * 1000 + group)
    device = torch.cuda.current_device()
    stream = torch.cuda.current_stream().cuda_stream
    for k in GEMV_K:
        for n in GEMV_N:
            for m in GEMV_M:
                for bias in (False, True):
                    x, q, stored, scale, b = _exact_case(m, n, k, bits, group, dtype, bias, g)
                    want = _exact_reference(x, q, scale, b, group, dtype).cuda()
                    xd, wd, sd = x.cuda(), stored.cuda(), scale.cuda()
                    bd = b.cuda() if b is not None else None
                    out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
                    launch(xd.data_ptr(), CODES[dtype], wd.data_ptr(), sd.data_ptr(), CODES[dtype],
                           bd.data_ptr() if bd is not None else 0, CODES[dtype], out.data_ptr(), m, n, k, group,
                           device, stream)
                    assert torch.equal(out, want), (
                        f"int{bits} g{group} {dtype} M={m} N={n} K={k} bias={bias}: {_first_mismatch(out, want)}")


@needs_gpu
@pytest.mark.parametrize("bits", [8, 4])
def test_quant_gemv_exact_with_float32_scales_and_bias_under_bf16(bits):
    """Scale and bias dtypes are independent of the activations' (each has its own code)."""
    launch = gpu_module.linear_int8 if bits == 8 else gpu_module.linear_int4
    g = torch.Generator().manual_seed(7)
    for group in (0, 64):
        x, q, stored, scale, b = _exact_case(3, 129, 4096, bits, group, torch.bfloat16, True, g)
        scale, b = scale.float(), b.float()
        want = _exact_reference(x, q, scale, b, group, torch.bfloat16).cuda()
        xd, wd, sd, bd = x.cuda(), stored.cuda(), scale.cuda(), b.cuda()
        out = torch.empty(3, 129, dtype=torch.bfloat16, device="cuda")
        launch(xd.data_ptr(), CODES[torch.bfloat16], wd.data_ptr(), sd.data_ptr(), CODES[torch.float32], bd.data_ptr(),
               CODES[torch.float32], out.data_ptr(), 3, 129, 4096, group, torch.cuda.current_device(),
               torch.cuda.current_stream().cuda_stream)
        assert torch.equal(out, want), _first_mismatch(out, want)


def _realistic(m, n, k, bits, group, dtype, bias, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    stored, scale = quantize_weight(w.to(dtype), bits, group)
    x = torch.randn(m, k, generator=g).to(dtype)
    b = (0.1 * torch.randn(n, generator=g)).to(dtype) if bias else None
    return x, stored, scale, b


def _check_against_fp32_truth(out, x, stored, scale, b, bits, group, k, what):
    """|y - y32| <= half an ulp of the output at |y32| (rounding) + fp32 summation slack."""
    w32 = dequantize(stored, scale, bits, group, k, torch.float32)  # (N, K)
    y32 = x.float() @ w32.T  # (M, N)
    if b is not None:
        y32 = y32 + b.float()
    magnitude = x.float().abs() @ w32.abs().T + (b.float().abs() if b is not None else 0)
    tol = HALF_ULP[out.dtype] * y32.abs() * 1.01 + 2e-6 * magnitude + 1e-30
    err = (out.float() - y32).abs()
    worst = int((err - tol).argmax())
    assert bool((err <= tol).all()), (f"{what}: error {err.flatten()[worst].item():.3g} > tolerance "
                                      f"{tol.flatten()[worst].item():.3g} at flat index {worst}")
    return y32


@needs_gpu
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quant_gemv_realistic_weights_through_the_plan_kernel(dtype, bits, group):
    kernel = _kernels()["native.quant_gemv"]
    for m, n, k in [(1, 3, 100), (2, 129, 257), (5, 129, 4096), (1, 4608, 4096), (2, 1, 13696), (1, 4096, 13696)]:
        for bias in (False, True):
            x, stored, scale, b = _realistic(m, n, k, bits, group, dtype, bias, seed=m * n + k)
            node = linear_node(k, n, dtype, bits, group, bias=bias)
            assert kernel.supports(node) is None
            params = {"weight": stored.cuda(), "scale": scale.cuda()}
            if b is not None:
                params["bias"] = b.cuda()
            xd = x.cuda().view(1, m, k)  # (B, T, K)
            out = kernel.fn(None, node, [xd], params)
            assert out.shape == (1, m, n) and out.dtype == dtype
            what = f"int{bits} g{group} {dtype} M={m} N={n} K={k} bias={bias}"
            y32 = _check_against_fp32_truth(out.view(m, n).cpu(), x, stored, scale, b, bits, group, k, what)
            # The plan's reference path (dequantize to the model dtype, then cuBLAS): the same
            # numbers up to the reference's own rounding of the weights to the model dtype.
            ref = ops.linear(None, node, [xd], params).view(m, n).float().cpu()
            magnitude = x.float().abs() @ dequantize(stored, scale, bits, group, k, torch.float32).abs().T
            slack = 4 * HALF_ULP[dtype] * (magnitude + y32.abs()) + 4e-6 * magnitude + 1e-6
            diff = (out.view(m, n).float().cpu() - ref).abs()
            assert bool((diff <= slack).all()), f"{what}: differs from glmrt.ops.linear by {diff.max().item():.3g}"


class _CallLog:
    """A kernel module that records which functions the plan wrapper called."""

    def __init__(self, module):
        self._module, self.calls = module, []

    def __getattr__(self, name):
        fn = getattr(self._module, name)

        def call(*args):
            self.calls.append(name)
            return fn(*args)

        return call


def _check_prefill_wrapper(wrapper, log, device):
    """The plan wrapper with M = 9 and M = 64 (> GEMV_MAX_M): one native dequantize, then torch's
    F.linear; equal to glmrt.ops.linear (the same GEMM call on a bit-identical weight)."""
    for dtype in DTYPES:
        for bits, group, bias in [(8, 0, True), (4, 32, False), (4, 0, True), (8, 128, False)]:
            for lead in [(1, 9), (2, 32)]:
                m, n, k = lead[0] * lead[1], 40, 259
                x, stored, scale, b = _realistic(m, n, k, bits, group, dtype, bias, seed=m + bits + group)
                node = linear_node(k, n, dtype, bits, group, bias=bias)
                params = {"weight": stored.to(device), "scale": scale.to(device)}
                if b is not None:
                    params["bias"] = b.to(device)
                xd = x.to(device).view(*lead, k)
                log.calls.clear()
                got = wrapper.quant_linear(None, node, [xd], params)
                assert log.calls == [f"dequantize_int{bits}"], log.calls
                want = ops.linear(None, node, [xd], params)
                what = f"int{bits} g{group} {dtype} M={m} bias={bias}"
                assert got.shape == want.shape == (*lead, n) and got.dtype == want.dtype == dtype, what
                assert torch.equal(got, want), f"{what}: {_first_mismatch(got, want)}"


@needs_gpu
@pytest.mark.parametrize("bits", [8, 4])
def test_quant_dequantize_matches_the_reference_on_the_device(bits):
    """The prefill kernel's dequantized weight is glmrt.quant.dequantize's, bit for bit."""
    module = gpu_module
    dequant = module.dequantize_int8 if bits == 8 else module.dequantize_int4
    for dtype in DTYPES:
        for scale_dtype in {dtype, torch.float32}:
            for group in (0, 32, 128):
                for n, k in [(3, 77), (129, 4096), (1024, 4097)]:
                    g = torch.Generator().manual_seed(n + k + group)
                    w = torch.randn(n, k, generator=g) * 0.05
                    stored, scale = quantize_weight(w.to(dtype), bits, group, scale_dtype)
                    stored, scale = stored.cuda(), scale.cuda()
                    out = torch.full((n, k), float("nan"), dtype=dtype, device="cuda")
                    dequant(stored.data_ptr(), scale.data_ptr(), CODES[scale.dtype], out.data_ptr(), CODES[dtype],
                            n, k, group, torch.cuda.current_device(), torch.cuda.current_stream().cuda_stream)
                    want = dequantize(stored, scale, bits, group, k, dtype)
                    assert torch.equal(out, want), (f"int{bits} g{group} {dtype} scales {scale_dtype} N={n} K={k}: "
                                                    f"{_first_mismatch(out, want)}")


@needs_gpu
def test_quant_prefill_sized_m_is_dequantize_then_cublas():
    """M > GEMV_MAX_M through the plan kernel: the native dequantize + torch's F.linear, equal to
    glmrt.ops.linear; and the same under CUDA / HIP graph capture."""
    from glmrt.backends.cuda import kernels as gpu_kernels

    wrapper = gpu_kernels.NativeGpuKernels(MODULE_NAME)
    log = _CallLog(gpu_module)
    wrapper.module = lambda: (log, "")
    _check_prefill_wrapper(wrapper, log, "cuda")
    # The registered plan kernel takes the same path.
    x, stored, scale, b = _realistic(64, 64, 256, 4, 32, torch.bfloat16, True, seed=3)
    node = linear_node(256, 64, torch.bfloat16, 4, 32)
    params = {"weight": stored.cuda(), "scale": scale.cuda(), "bias": b.cuda()}
    kernel = _kernels()["native.quant_gemv"]
    static_x = x.cuda().view(2, 32, 256)
    assert torch.equal(kernel.fn(None, node, [static_x], params), ops.linear(None, node, [static_x], params))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch recommends before capture
        kernel.fn(None, node, [static_x], params)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = kernel.fn(None, node, [static_x], params)
    for seed in range(2):
        static_x.copy_(torch.randn(2, 32, 256, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16))
        graph.replay()
        torch.cuda.synchronize()
        # The dequantized weight is exact; the captured cuBLAS call may pick another reduction
        # order than an eager one, which can move one bf16 rounding of an output.
        ref = ops.linear(None, node, [static_x], params).float()
        err = (captured.float() - ref).abs().max().item()
        assert err <= 2.0**-7 * ref.abs().max().item(), f"replay {seed}: differs from glmrt.ops.linear by {err}"


@needs_gpu
@pytest.mark.parametrize("bits", [8, 4])
def test_quant_gemv_unaligned_weight_pointer_and_noncontiguous_input(bits):
    """A weight whose base is not 16-byte aligned takes the byte-load path; results stay exact."""
    launch = gpu_module.linear_int8 if bits == 8 else gpu_module.linear_int4
    g = torch.Generator().manual_seed(11)
    x, q, stored, scale, b = _exact_case(2, 129, 4096, bits, 32, torch.bfloat16, True, g)
    want = _exact_reference(x, q, scale, b, 32, torch.bfloat16).cuda()
    buffer = torch.zeros(stored.numel() + 1, dtype=torch.int8, device="cuda")
    buffer[1:] = stored.flatten().cuda()
    wd = buffer[1:].view(stored.shape)
    assert wd.data_ptr() % 16 != 0
    xd, sd, bd = x.cuda(), scale.cuda(), b.cuda()
    out = torch.empty(2, 129, dtype=torch.bfloat16, device="cuda")
    launch(xd.data_ptr(), CODES[torch.bfloat16], wd.data_ptr(), sd.data_ptr(), CODES[torch.bfloat16], bd.data_ptr(),
           CODES[torch.bfloat16], out.data_ptr(), 2, 129, 4096, 32, torch.cuda.current_device(),
           torch.cuda.current_stream().cuda_stream)
    assert torch.equal(out, want), _first_mismatch(out, want)
    # Non-contiguous activations through the plan kernel (it makes them contiguous).
    kernel = _kernels()["native.quant_gemv"]
    node = linear_node(4096, 129, torch.bfloat16, bits, 32)
    xt = xd.t().contiguous().t()  # (2, 4096), column-major
    assert not xt.is_contiguous()
    got = kernel.fn(None, node, [xt], {"weight": stored.cuda(), "scale": sd, "bias": bd})
    assert torch.equal(got, want), _first_mismatch(got, want)


@needs_gpu
def test_quant_prefill_workspace_of_a_pass_eager_and_under_graph_capture():
    """Three prefill-sized quantized linears in one forward pass (one ctx): the second reuses the
    first's dequantization workspace, the third grows it. Eager: each output equals glmrt.ops.linear
    bit for bit. Captured in a CUDA / HIP graph (the workspace then comes from the graph's pool):
    each replay with new inputs gives every stage within one bf16 rounding of glmrt.ops.linear on
    that stage's captured input (the captured GEMM may sum in another order)."""
    kernel = _kernels()["native.quant_gemv"]
    dtype = torch.bfloat16
    stages = [(256, 64, 4, 32), (64, 128, 8, 0), (128, 512, 4, 0)]  # (K, N, bits, group): 16384, 8192, 65536
    nodes, params = [], []
    for i, (k, n, bits, group) in enumerate(stages):
        _, stored, scale, b = _realistic(1, n, k, bits, group, dtype, True, seed=40 + i)
        nodes.append(linear_node(k, n, dtype, bits, group))
        params.append({"weight": stored.cuda(), "scale": scale.cuda(), "bias": b.cuda()})

    def chain(x):
        ctx = ops.ForwardContext(positions=None, allowed=None)
        outs = []
        for node, p in zip(nodes, params):
            x = kernel.fn(ctx, node, [x], p)
            outs.append(x)
        return outs, ctx

    static_x = torch.randn(2, 32, 256, generator=torch.Generator().manual_seed(1)).to(dtype).cuda()
    outs, ctx = chain(static_x)
    (workspace,) = ctx.memo.values()
    assert workspace.numel() == 65536 and workspace.dtype == dtype
    inp = static_x
    for i, (node, p, got) in enumerate(zip(nodes, params, outs)):
        want = ops.linear(None, node, [inp], p)
        assert torch.equal(got, want), f"eager stage {i}: {_first_mismatch(got, want)}"
        inp = got
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream before capture
        chain(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured, _ = chain(static_x)
    for seed in range(3):
        static_x.copy_(torch.randn(2, 32, 256, generator=torch.Generator().manual_seed(10 + seed)).to(dtype))
        chain(static_x)  # an eager pass in between: its own workspace, which must not disturb the graph's
        graph.replay()
        torch.cuda.synchronize()
        inp = static_x
        for i, (node, p, got) in enumerate(zip(nodes, params, captured)):
            ref = ops.linear(None, node, [inp], p).float()
            err = (got.float() - ref).abs().max().item()
            assert err <= 2.0**-7 * ref.abs().max().item(), f"replay {seed}, stage {i}: off by {err}"
            inp = got


@needs_gpu
def test_kernels_run_on_a_side_stream_and_under_graph_capture():
    kernels = _kernels()
    norm, gemv = kernels["native.rms_norm"], kernels["native.quant_gemv"]
    dtype = torch.bfloat16
    k, n = 4096, 4608
    x, stored, scale, b = _realistic(1, n, k, 4, 128, dtype, True, seed=5)
    lin_node = linear_node(k, n, dtype, 4, 128)
    n_node = norm_node(k, dtype, True)
    params = {"weight": stored.cuda(), "scale": scale.cuda(), "bias": b.cuda()}
    nw = {"weight": (1 + 0.1 * torch.randn(k)).to(dtype).cuda()}

    def step(inp):
        return gemv.fn(None, lin_node, [norm.fn(None, n_node, [inp], nw)], params)

    def reference(inp):
        return ops.linear(None, lin_node, [ops.norm(None, n_node, [inp], nw)], params)

    static_x = x.cuda().view(1, 1, k)
    eager = step(static_x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        on_side = step(static_x)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert torch.equal(on_side, eager)

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured_out = step(static_x)
    for seed in range(3):
        static_x.copy_(torch.randn(1, 1, k, generator=torch.Generator().manual_seed(seed)).to(dtype))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured_out, step(static_x)), f"replay {seed} differs from an eager run"
        # And close to the reference ops (bf16: the norm output may differ by an ulp, which moves y).
        ref = reference(static_x).float()
        assert (captured_out.float() - ref).abs().max().item() <= 0.05 * ref.abs().max().item()


# ======================================================== part 1b: the kernels, emulated on the CPU
GPU_SOURCES = Path(__file__).resolve().parents[2] / "native" / "gpu"
EMULATION_TIMEOUT_S = 300


def _build_emulated(out_dir: Path) -> dict:
    """Compile module.cpp + the .cu sources as C++ with GLMRT_PLATFORM_EMULATE, for 32- and 64-lane
    warps (two compiles in parallel). Returns {warp_size: module or skip reason}."""
    if os.environ.get("GLMRT_SKIP_GPU_EMULATION") == "1":
        return {w: "GLMRT_SKIP_GPU_EMULATION=1" for w in (32, 64)}
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    try:
        import pybind11
    except ImportError:
        pybind11 = None
    if cxx is None or pybind11 is None or not (GPU_SOURCES / "emulate.h").is_file():
        return {w: "needs a C++ compiler, pybind11 and the native/gpu sources" for w in (32, 64)}
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    procs = {}
    for warp in (32, 64):
        name = f"_gpu_emulated_w{warp}"
        cmd = [cxx, "-std=c++17", "-O2", "-pthread", "-shared", "-fPIC", "-fvisibility=hidden",
               f"-I{GPU_SOURCES}", f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
               "-DGLMRT_PLATFORM_EMULATE=1", f"-DGLMRT_EMULATE_WARP_SIZE={warp}", f"-DGLMRT_GPU_MODULE={name}",
               '-DGLMRT_GPU_PLATFORM="emulated"', f'-DGLMRT_GPU_ARCHS="emulated-w{warp}"',
               "-x", "c++", *(str(GPU_SOURCES / f) for f in ("norm.cu", "gemv_quant.cu", "rope.cu", "attention.cu", "runtime.cu")),
               "-x", "none", str(GPU_SOURCES / "module.cpp"), "-o", str(out_dir / f"{name}{suffix}")]
        procs[warp] = (name, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    out = {}
    for warp, (name, proc) in procs.items():
        log, _ = proc.communicate(timeout=900)
        if proc.returncode != 0:
            out[warp] = AssertionError(f"the emulation build failed (a compile error in native/gpu?):\n{log[-3000:]}")
            continue
        spec = importlib.util.spec_from_file_location(name, out_dir / f"{name}{suffix}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        out[warp] = module
    return out


@pytest.fixture(scope="module")
def emulated_modules(tmp_path_factory):
    return _build_emulated(tmp_path_factory.mktemp("gpu_emulation"))


@pytest.fixture(params=[32, 64], ids=["warp32", "warp64"])
def emulated(request, emulated_modules):
    module = emulated_modules[request.param]
    if isinstance(module, AssertionError):
        raise module
    if isinstance(module, str):  # under GLMRT_REQUIRE_NATIVE=1 only an explicit opt-out skips
        if os.environ.get("GLMRT_REQUIRE_NATIVE") == "1" and module != "GLMRT_SKIP_GPU_EMULATION=1":
            pytest.fail(f"GLMRT_REQUIRE_NATIVE=1 but the GPU kernels could not be built for emulation: {module}",
                        pytrace=False)
        pytest.skip(module)
    assert module.warp_size(0) == request.param
    return module


def _within_timeout(fn, *args):
    """Run an emulated launch; a barrier or shuffle that some threads skip would hang forever."""
    error = []

    def target():
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - reported below
            error.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(EMULATION_TIMEOUT_S)
    assert not thread.is_alive(), (f"the emulated kernel did not finish in {EMULATION_TIMEOUT_S} s: some threads "
                                   "wait at a __syncthreads or shuffle that others skip (a deadlock on a GPU too)")
    if error:
        raise error[0]


# Each case is (bits, group, dtype, M, N, K, bias): every format and group size, every dtype, odd K
# (unaligned rows: the byte-load path), K over several tiles (4104 with M > 2), M over two launches
# (5), N over several blocks (129), kept small because emulated barriers are slow.
EMULATED_GEMV_CASES = [
    (8, 0, torch.float32, 1, 3, 100, False), (8, 0, torch.bfloat16, 5, 9, 4104, True),
    (8, 32, torch.float16, 2, 9, 257, True), (8, 64, torch.bfloat16, 1, 129, 256, False),
    (8, 128, torch.float32, 3, 5, 4104, True), (8, 32, torch.bfloat16, 4, 17, 4096, False),
    (4, 0, torch.float16, 1, 3, 257, True), (4, 0, torch.bfloat16, 2, 129, 512, False),
    (4, 32, torch.float32, 5, 9, 4104, True), (4, 64, torch.float16, 3, 5, 100, False),
    (4, 128, torch.bfloat16, 1, 9, 4104, True), (4, 128, torch.float32, 4, 3, 1000, False),
]


@pytest.mark.parametrize("case", EMULATED_GEMV_CASES,
                         ids=lambda c: f"int{c[0]}-g{c[1]}-{str(c[2])[6:]}-M{c[3]}N{c[4]}K{c[5]}{'-bias' if c[6] else ''}")
def test_emulated_quant_gemv_exact(emulated, case):
    bits, group, dtype, m, n, k, bias = case
    g = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    x, q, stored, scale, b = _exact_case(m, n, k, bits, group, dtype, bias, g)
    want = _exact_reference(x, q, scale, b, group, dtype)
    out = torch.full((m, n), float("nan"), dtype=dtype)
    launch = emulated.linear_int8 if bits == 8 else emulated.linear_int4
    _within_timeout(launch, x.data_ptr(), CODES[dtype], stored.data_ptr(), scale.data_ptr(), CODES[dtype],
                    b.data_ptr() if b is not None else 0, CODES[dtype], out.data_ptr(), m, n, k, group, 0, 0)
    assert torch.equal(out, want), f"{case}: {_first_mismatch(out, want)}"


def _independent_dequantize(q, scale, group, dtype):
    """The formula: float32(q) * float32(scale) (one fp32 rounding), then rounded to dtype. q is the
    unpacked (N, K) int8 tensor, scale (N,) or (N, G)."""
    n, k = q.shape
    s = scale.float()
    s = s[:, None].expand(n, k) if group == 0 else s[:, torch.arange(k) // group]
    return (q.float() * s).to(dtype)


@pytest.mark.parametrize("bits", [8, 4])
def test_emulated_dequantize_exact(emulated, bits):
    """The prefill dequantization, bit for bit against the formula, on odd K not a multiple of the
    group, N over two blocks (23 * ceil(101 / 8) = 299 chunks of 8) or under one, random-mantissa
    scales (the fp32 product rounds, then the half rounding), tiny scales whose fp16 products are
    subnormal, and fp32 scales under bf16 activations (two roundings)."""
    dequant = emulated.dequantize_int8 if bits == 8 else emulated.dequantize_int4
    qmax = 2 ** (bits - 1) - 1
    cases = [(dtype, dtype) for dtype in DTYPES] + [(torch.bfloat16, torch.float32), (torch.float16, torch.float32)]
    for out_dtype, scale_dtype in cases:
        for group in (0, 32, 64, 12):  # 12: group boundaries inside a thread's 8 elements (the kernel API allows it)
            for n, k in [(23, 101), (3, 77)]:
                seed = zlib.crc32(repr((bits, out_dtype, scale_dtype, group, n, k)).encode())
                g = torch.Generator().manual_seed(seed)
                q = torch.randint(-qmax - 1, qmax + 1, (n, k), generator=g, dtype=torch.int8)
                q[0, :2 * (qmax + 1)] = torch.arange(-qmax - 1, qmax + 1)[:k]  # the whole range, both nibbles
                stored = pack_int4(q) if bits == 4 else q
                groups = 1 if group == 0 else -(-k // group)
                scale = (torch.rand((n,) if group == 0 else (n, groups), generator=g) * 0.02 + 1e-4)
                scale.view(-1)[-1] = 3e-8  # products below fp16's normal range
                scale = scale.to(scale_dtype)
                want = _independent_dequantize(q, scale, group, out_dtype)
                # The formula is the reference's (glmrt.quant.dequantize, what glmrt.ops.linear uses).
                assert torch.equal(want, dequantize(stored, scale, bits, group, k, out_dtype))
                out = torch.full((n, k), float("nan"), dtype=out_dtype)
                _within_timeout(dequant, stored.data_ptr(), scale.data_ptr(), CODES[scale_dtype], out.data_ptr(),
                                CODES[out_dtype], n, k, group, 0, 0)
                what = f"int{bits} g{group} out {out_dtype} scales {scale_dtype} N={n} K={k}"
                assert torch.equal(out, want), f"{what}: {_first_mismatch(out, want)}"


def test_emulated_quant_linear_prefill_wrapper(emulated, monkeypatch):
    """The plan wrapper's prefill path (M > GEMV_MAX_M: dequantize, then F.linear) on the emulated
    kernel, on CPU tensors, against glmrt.ops.linear, bit for bit."""
    from glmrt.backends.cuda import kernels as gpu_kernels

    wrapper = gpu_kernels.NativeGpuKernels("_native_cuda")
    log = _CallLog(emulated)
    monkeypatch.setattr(wrapper, "module", lambda: (log, ""))
    monkeypatch.setattr(gpu_kernels, "_stream", lambda device: 0)
    _check_prefill_wrapper(wrapper, log, "cpu")
    # M <= GEMV_MAX_M stays on the GEMV.
    x, stored, scale, _ = _realistic(2, 5, 64, 8, 0, torch.float32, False, seed=1)
    log.calls.clear()
    wrapper.quant_linear(None, linear_node(64, 5, torch.float32, 8, 0, bias=False), [x.view(1, 2, 64)],
                         {"weight": stored, "scale": scale})
    assert log.calls == ["linear_int8"]


def test_emulated_quant_prefill_reuses_one_workspace_per_pass(emulated, monkeypatch):
    """The prefill of a quantized linear dequantizes into one workspace per forward pass, device and
    dtype (kept in ctx.memo, grown when a larger weight comes, a view of it otherwise): a pass of
    linears of several shapes, int8 and int4, per-channel and grouped, each equal to
    glmrt.ops.linear bit for bit, with two allocations for the whole pass; a second dtype gets its
    own workspace; without a ctx each call gets a fresh buffer."""
    from glmrt.backends.cuda import kernels as gpu_kernels

    wrapper = gpu_kernels.NativeGpuKernels("_native_cuda")
    monkeypatch.setattr(wrapper, "module", lambda: (emulated, ""))
    monkeypatch.setattr(gpu_kernels, "_stream", lambda device: 0)
    # A layer's order of shapes: qkv, dense, MLP up (the largest), MLP down; then the next layer.
    layer = [(48, 40, 8, 0), (40, 40, 4, 32), (96, 40, 4, 0), (40, 72, 8, 64)]  # (N, K, bits, group)
    for dtype in (torch.bfloat16, torch.float32):
        ctx = ops.ForwardContext(positions=None, allowed=None)
        buffers = []
        for i, (n, k, bits, group) in enumerate(layer * 2):
            x, stored, scale, b = _realistic(9, n, k, bits, group, dtype, i % 2 == 0, seed=i)
            node = linear_node(k, n, dtype, bits, group, bias=b is not None)
            params = {"weight": stored, "scale": scale, **({"bias": b} if b is not None else {})}
            got = wrapper.quant_linear(ctx, node, [x.view(1, 9, k)], params)
            want = ops.linear(None, node, [x.view(1, 9, k)], params)
            assert torch.equal(got, want), f"linear {i} ({n}x{k} int{bits} g{group} {dtype}): {_first_mismatch(got, want)}"
            buffers.append(ctx.memo[("quant_prefill_workspace", x.device, dtype)])
        sizes = [n * k for n, k, _, _ in layer]
        assert [buf.numel() for buf in buffers] == [sizes[0], sizes[0], sizes[2], sizes[2]] + [sizes[2]] * 4
        assert len({buf.data_ptr() for buf in buffers}) == 2  # allocated at the first linear and at the largest
        assert all(buf.dtype == dtype for buf in buffers)
    two = ops.ForwardContext(positions=None, allowed=None)
    for dtype in (torch.bfloat16, torch.float16):
        x, stored, scale, _ = _realistic(12, 8, 64, 4, 32, dtype, False, seed=7)
        wrapper.quant_linear(two, linear_node(64, 8, dtype, 4, 32, bias=False), [x], {"weight": stored, "scale": scale})
    assert sorted(str(key[2]) for key in two.memo) == ["torch.bfloat16", "torch.float16"]
    # No ctx (a direct call): a fresh buffer, and still the reference's numbers.
    x, stored, scale, b = _realistic(10, 24, 40, 8, 0, torch.float16, True, seed=9)
    node = linear_node(40, 24, torch.float16, 8, 0)
    params = {"weight": stored, "scale": scale, "bias": b}
    assert torch.equal(wrapper.quant_linear(None, node, [x], params), ops.linear(None, node, [x], params))


def test_emulated_row_and_rope_plan_wrappers(emulated, monkeypatch):
    """The plan wrappers of the norms, the fused residual norms and RoPE (their shared steps: the
    dtype codes, contiguous operands, outputs, optional operands as null pointers, device and
    stream) on the emulated kernels, on CPU tensors, against glmrt.ops: h and q / k bit for bit,
    normed outputs within one ulp; non-contiguous inputs, absent and present biases, weights in
    another dtype than the activations, h emitted or not, and the three RoPE kinds."""
    from glmrt.backends.cuda import kernels as gpu_kernels

    wrapper = gpu_kernels.NativeGpuKernels("_native_cuda")
    monkeypatch.setattr(wrapper, "module", lambda: (emulated, ""))
    monkeypatch.setattr(gpu_kernels, "_stream", lambda device: 0)
    g = torch.Generator().manual_seed(21)
    for dtype in DTYPES:
        for w_dtype in {dtype, torch.float32}:
            wide = (3 * torch.randn(2, 3, 70, generator=g) + 0.5).to(dtype)
            x = wide[..., :65]  # (2, 3, 65), not contiguous
            branch = torch.randn(2, 3, 65, generator=g).to(dtype)
            w = (1 + 0.2 * torch.randn(65, generator=g)).to(w_dtype)
            b = (0.3 * torch.randn(65, generator=g)).to(w_dtype)
            for rbw in (False, True):
                node = norm_node(65, dtype, rbw)
                got, want = wrapper.rms_norm(None, node, [x], {"weight": w}), ops.norm(None, node, [x], {"weight": w})
                _assert_within_one_ulp(got, want, dtype, f"rms_norm wrapper {dtype} w {w_dtype} rbw={rbw}")
                for emit in (True, False):
                    node = residual_norm_node(65, dtype, rbw, alpha=(2 * 28) ** 0.5, emit_residual=emit)
                    got = wrapper.residual_rms_norm(None, node, [x, branch], {"weight": w})
                    want = ops.residual_norm(None, node, [x, branch], {"weight": w})
                    what = f"residual_rms_norm wrapper {dtype} w {w_dtype} rbw={rbw} emit={emit}"
                    if emit:
                        assert torch.equal(got[0], want[0]), f"{what}: h {_first_mismatch(got[0], want[0])}"
                        got, want = got[1], want[1]
                    _assert_within_one_ulp(got, want, dtype, what)
            if w_dtype != dtype:  # torch's CPU layer_norm takes a weight unlike the activations; keep to its own
                continue
            for params in ({"weight": w}, {"weight": w, "bias": b}):
                node = norm_node(65, dtype, False, kind="layernorm")
                got, want = wrapper.layer_norm(None, node, [x], params), ops.norm(None, node, [x], params)
                _assert_within_one_ulp(got, want, dtype, f"layer_norm wrapper {dtype} bias={'bias' in params}")
                for emit in (True, False):
                    node = residual_norm_node(65, dtype, False, alpha=(2 * 70) ** 0.5, emit_residual=emit,
                                              kind="layernorm")
                    got = wrapper.residual_layer_norm(None, node, [x, branch], params)
                    want = ops.residual_norm(None, node, [x, branch], params)
                    what = f"residual_layer_norm wrapper {dtype} bias={'bias' in params} emit={emit}"
                    if emit:
                        assert torch.equal(got[0], want[0]), f"{what}: h {_first_mismatch(got[0], want[0])}"
                        got, want = got[1], want[1]
                    _assert_within_one_ulp(got, want, dtype, what)
        for kind in ROPE_KINDS:
            b_, t, nh, nkv, hd, rd = (2, 3, 4, 2, 8, 8) if kind == "2d" else (2, 3, 4, 2, 8, 4)
            node = rope_node(nh, nkv, hd, rd, dtype, kind=kind)
            qkv, positions = _rope_inputs(b_, t, nh, nkv, hd, rd, dtype, g, kind=kind)
            wide = torch.zeros(b_, t, qkv.shape[-1] + 6, dtype=dtype)
            wide[..., :qkv.shape[-1]] = qkv
            sliced = wide[..., :qkv.shape[-1]]  # not contiguous
            got = wrapper.rope(ops.ForwardContext(positions=positions, allowed=None), node, [sliced], {})
            want = ops.rope(ops.ForwardContext(positions=positions, allowed=None), node, [qkv], {})
            for name, a, c in zip("qkv", got, want):
                assert a.shape == c.shape and torch.equal(a, c), f"rope wrapper {kind} {dtype}: {name} {_first_mismatch(a, c)}"


@pytest.mark.parametrize("round_before_weight", [False, True])
def test_emulated_rms_norm(emulated, round_before_weight):
    g = torch.Generator().manual_seed(5)
    for dtype in DTYPES:
        for shape in [(1, 1, 1), (1, 3, 7), (2, 1, 257), (1, 1, 4096)]:
            x = (3 * torch.randn(shape, generator=g)).to(dtype)
            w = (1 + 0.2 * torch.randn(shape[-1], generator=g)).to(dtype)
            want = _independent_rms_norm(x, w, 1e-5, round_before_weight)  # the formula, not glmrt.ops
            out = torch.empty_like(x)
            _within_timeout(emulated.rms_norm, x.data_ptr(), CODES[dtype], w.data_ptr(), CODES[dtype], out.data_ptr(),
                            CODES[dtype], x.numel() // shape[-1], shape[-1], 1e-5, round_before_weight, 0, 0)
            _assert_within_one_ulp(out, want, dtype, f"emulated rms_norm {shape} {dtype}")


def _independent_rms_norm(x, w, eps, round_before_weight):
    """RMSNorm with float64 statistics; round_before_weight: the normalized value rounded to x's
    dtype, times the weight in the promoted dtype of the two, returned in that dtype (torch's
    product, as glmrt.ops.norm returns it); else the fp32 product rounded once to x's dtype."""
    xf = x.double()
    normed = (xf / torch.sqrt((xf * xf).mean(-1, keepdim=True) + eps)).float()
    if round_before_weight:
        product = torch.promote_types(w.dtype, x.dtype)  # torch: the product in fp32, rounded to it
        return (w.float() * normed.to(x.dtype).float()).to(product)
    return (w.float() * normed).to(x.dtype)


@pytest.mark.parametrize("round_before_weight", [False, True])
def test_emulated_norms_with_a_weight_unlike_the_activations(emulated, round_before_weight):
    """An fp32 (or the other half type's) weight under bf16 / fp16 activations: with
    round_before_weight the output is the product's dtype, fp32, as glmrt.ops.norm returns it (the
    kernels used to round it back to the activations' dtype); without, the activations' dtype.
    rms_norm and the fused residual_rms_norm alike; h keeps the activations' dtype."""
    g = torch.Generator().manual_seed(15)
    alpha = (2 * 28) ** 0.5
    for dtype in (torch.bfloat16, torch.float16):
        for w_dtype in (torch.float32, torch.float16 if dtype == torch.bfloat16 else torch.bfloat16):
            out_dtype = torch.float32 if round_before_weight else dtype
            for shape in [(1, 3, 7), (2, 1, 257)]:
                x = (3 * torch.randn(shape, generator=g)).to(dtype)
                branch = torch.randn(shape, generator=g).to(dtype)
                w = (1 + 0.2 * torch.randn(shape[-1], generator=g)).to(w_dtype)
                rows, cols = x.numel() // shape[-1], shape[-1]
                what = f"{shape} {dtype} weight {w_dtype} round_before_weight={round_before_weight}"
                node = norm_node(cols, dtype, round_before_weight)
                assert ops.norm(None, node, [x], {"weight": w}).dtype == out_dtype  # what the kernel must match
                want = _independent_rms_norm(x, w, 1e-5, round_before_weight)
                out = torch.full(shape, float("nan"), dtype=out_dtype)
                _within_timeout(emulated.rms_norm, x.data_ptr(), CODES[dtype], w.data_ptr(), CODES[w_dtype],
                                out.data_ptr(), CODES[out_dtype], rows, cols, 1e-5, round_before_weight, 0, 0)
                _assert_within_one_ulp(out, want, dtype, f"emulated rms_norm {what}")
                want_h, want_y = _independent_residual_rms_norm(x, branch, w, alpha, 1e-5, round_before_weight)
                h = torch.full_like(x, float("nan"))
                y = torch.full(shape, float("nan"), dtype=out_dtype)
                _within_timeout(emulated.residual_rms_norm, x.data_ptr(), branch.data_ptr(), CODES[dtype], alpha,
                                w.data_ptr(), CODES[w_dtype], h.data_ptr(), y.data_ptr(), CODES[out_dtype], rows, cols,
                                1e-5, round_before_weight, 0, 0)
                assert torch.equal(h, want_h), f"emulated residual_rms_norm {what}: h {_first_mismatch(h, want_h)}"
                _assert_within_one_ulp(y, want_y, dtype, f"emulated residual_rms_norm {what}")
            # Exact data: rows that are permutations of (5, -1, 1, -1, 0, 0, 0) * 2^e with eps 0 have
            # rms 2^(e+1) exactly, so normed = x / rms is exact and the output must be the product
            # w * normed rounded ONCE to out_dtype: a kernel that rounds it to the activations'
            # dtype first (the old behaviour) differs here.
            rows = 6
            base = torch.tensor([5.0, -1.0, 1.0, -1.0, 0.0, 0.0, 0.0])
            x = torch.stack([base[torch.randperm(7, generator=g)] * 2.0 ** (r - 2) for r in range(rows)]).to(dtype)
            w = (1 + 0.3 * torch.randn(7, generator=g)).to(w_dtype)
            normed = x.float() / (2.0 * 2.0 ** (torch.arange(rows, dtype=torch.float32) - 2))[:, None]
            want = (w.float() * normed).to(out_dtype)  # normed is exact in every dtype
            out = torch.full((rows, 7), float("nan"), dtype=out_dtype)
            _within_timeout(emulated.rms_norm, x.data_ptr(), CODES[dtype], w.data_ptr(), CODES[w_dtype],
                            out.data_ptr(), CODES[out_dtype], rows, 7, 0.0, round_before_weight, 0, 0)
            assert torch.equal(out, want), f"exact rms_norm {dtype} weight {w_dtype}: {_first_mismatch(out, want)}"
            y = torch.full((rows, 7), float("nan"), dtype=out_dtype)
            zeros = torch.zeros_like(x)
            _within_timeout(emulated.residual_rms_norm, zeros.data_ptr(), x.data_ptr(), CODES[dtype], 1.0,
                            w.data_ptr(), CODES[w_dtype], 0, y.data_ptr(), CODES[out_dtype], rows, 7, 0.0,
                            round_before_weight, 0, 0)
            assert torch.equal(y, want), f"exact residual_rms_norm {dtype} weight {w_dtype}: {_first_mismatch(y, want)}"


def _independent_layer_norm(x, w, b, eps):
    """LayerNorm written out in float64 statistics, fp32 output math, one rounding."""
    xf = x.double()
    mean = xf.mean(-1, keepdim=True)
    var = ((xf - mean) ** 2).mean(-1, keepdim=True)
    y = ((xf - mean) / torch.sqrt(var + eps)).float() * w.float()
    if b is not None:
        y = y + b.float()
    return y.to(x.dtype)


@pytest.mark.parametrize("bias", [False, True])
def test_emulated_layer_norm(emulated, bias):
    g = torch.Generator().manual_seed(6)
    for dtype in DTYPES:
        for w_dtype in {dtype, torch.float32}:
            for shape in [(1, 1, 1), (1, 3, 7), (2, 1, 257), (1, 1, 4096)]:
                x = (3 * torch.randn(shape, generator=g) + 2).to(dtype)
                w = (1 + 0.2 * torch.randn(shape[-1], generator=g)).to(w_dtype)
                b = (0.3 * torch.randn(shape[-1], generator=g)).to(w_dtype) if bias else None
                want = _independent_layer_norm(x, w, b, 1e-5)
                out = torch.empty_like(x)
                _within_timeout(emulated.layer_norm, x.data_ptr(), CODES[dtype], w.data_ptr(), CODES[w_dtype],
                                b.data_ptr() if b is not None else 0, CODES[w_dtype] if b is not None else 0,
                                out.data_ptr(), x.numel() // shape[-1], shape[-1], 1e-5, 0, 0)
                _assert_within_one_ulp(out, want, dtype, f"emulated layer_norm {shape} {dtype} w {w_dtype}")


def _independent_residual_rms_norm(res, branch, w, alpha, eps, round_before_weight):
    """h: residual * alpha rounded to the dtype (fp32 math), plus branch, rounded again; then RMSNorm
    with float64 statistics and the two weight conventions."""
    return _independent_residual(res, branch, alpha), _independent_rms_norm(
        _independent_residual(res, branch, alpha), w, eps, round_before_weight)


def _independent_residual(res, branch, alpha):
    """residual * alpha in fp32 rounded to the dtype (unless alpha is 1), plus branch in fp32,
    rounded again."""
    dtype = res.dtype
    scaled = res if alpha == 1.0 else (res.float() * torch.tensor(alpha, dtype=torch.float32)).to(dtype)
    return (branch.float() + scaled.float()).to(dtype)


@pytest.mark.parametrize("alpha", [1.0, (2 * 28) ** 0.5], ids=["alpha1", "deepnorm"])
@pytest.mark.parametrize("round_before_weight", [False, True])
def test_emulated_residual_rms_norm(emulated, round_before_weight, alpha):
    g = torch.Generator().manual_seed(7)
    for dtype in DTYPES:
        for shape in [(1, 1, 1), (1, 3, 7), (2, 1, 257), (1, 1, 4096)]:
            res = (3 * torch.randn(shape, generator=g)).to(dtype)
            branch = torch.randn(shape, generator=g).to(dtype)
            w = (1 + 0.2 * torch.randn(shape[-1], generator=g)).to(dtype)
            want_h, want_y = _independent_residual_rms_norm(res, branch, w, alpha, 1e-5, round_before_weight)
            # The independent h is torch's own sum, bit for bit (what the kernel must reproduce).
            assert torch.equal(want_h, branch + (res * alpha if alpha != 1.0 else res))
            rows = res.numel() // shape[-1]
            for emit in (True, False):
                h = torch.full_like(res, float("nan"))
                y = torch.empty_like(res)
                _within_timeout(emulated.residual_rms_norm, res.data_ptr(), branch.data_ptr(), CODES[dtype], alpha,
                                w.data_ptr(), CODES[dtype], h.data_ptr() if emit else 0, y.data_ptr(), CODES[dtype],
                                rows, shape[-1], 1e-5, round_before_weight, 0, 0)
                what = f"emulated residual_rms_norm {shape} {dtype} alpha={alpha} emit={emit}"
                if emit:
                    assert torch.equal(h, want_h), f"{what}: h {_first_mismatch(h, want_h)}"
                else:
                    assert bool(h.isnan().all()), f"{what}: h was written though h_out is 0"
                _assert_within_one_ulp(y, want_y, dtype, what)


@pytest.mark.parametrize("alpha", [1.0, (2 * 28) ** 0.5], ids=["alpha1", "deepnorm"])
def test_emulated_residual_layer_norm(emulated, alpha):
    """The fused residual + LayerNorm (ChatGLM-6B / GLM-130B DeepNorm): h bit for bit, LayerNorm(h)
    within one ulp of the independent formula; weight and bias in the activations' dtype or fp32,
    with and without bias, h emitted or not."""
    g = torch.Generator().manual_seed(9)
    i = 0
    for dtype in DTYPES:
        for shape in [(1, 1, 1), (1, 3, 7), (2, 1, 257), (1, 1, 4096)]:
            i += 1
            w_dtype = torch.float32 if i % 2 else dtype
            res = (3 * torch.randn(shape, generator=g) + 1).to(dtype)
            branch = torch.randn(shape, generator=g).to(dtype)
            w = (1 + 0.2 * torch.randn(shape[-1], generator=g)).to(w_dtype)
            bias = (0.3 * torch.randn(shape[-1], generator=g)).to(w_dtype) if i % 3 else None
            want_h = _independent_residual(res, branch, alpha)
            assert torch.equal(want_h, branch + (res * alpha if alpha != 1.0 else res))  # torch's own sum
            want_y = _independent_layer_norm(want_h, w, bias, 1e-5)
            rows = res.numel() // shape[-1]
            for emit in (True, False):
                h = torch.full_like(res, float("nan"))
                y = torch.full_like(res, float("nan"))
                _within_timeout(emulated.residual_layer_norm, res.data_ptr(), branch.data_ptr(), CODES[dtype], alpha,
                                w.data_ptr(), CODES[w_dtype], bias.data_ptr() if bias is not None else 0,
                                CODES[w_dtype] if bias is not None else 0, h.data_ptr() if emit else 0, y.data_ptr(),
                                rows, shape[-1], 1e-5, 0, 0)
                what = (f"emulated residual_layer_norm {shape} {dtype} w {w_dtype} bias={bias is not None} "
                        f"alpha={alpha} emit={emit}")
                if emit:
                    assert torch.equal(h, want_h), f"{what}: h {_first_mismatch(h, want_h)}"
                else:
                    assert bool(h.isnan().all()), f"{what}: h was written though h_out is 0"
                _assert_within_one_ulp(y, want_y, dtype, what)


def _independent_rope(qkv, tables, nh, nkv, hd, kind):
    """glmrt.ops.rope written out per pair: the pairs (a, b) of every q and k head for the kind, each
    rotated by its table entry i as (x[a] c - x[b] s, x[b] c + x[a] s), each product and sum in fp32
    rounded to the dtype; the dims no pair rotates unchanged. tables: [(cos, sin)], two for 2-D
    (position, then block position), each (B, T, entries)."""
    dtype = qkv.dtype
    rows = qkv.shape[0] * qkv.shape[1]
    src = qkv.reshape(rows, nh + 2 * nkv, hd)[:, :nh + nkv]  # (rows, nh + nkv, hd)
    heads = src.clone()
    n = tables[0][0].shape[-1]
    idx = torch.arange(n)
    if kind == "interleaved":  # GPT-J
        pairs = [(2 * idx, 2 * idx + 1, tables[0])]
    elif kind == "half":  # NeoX: x[i] with x[i + rotary_dim / 2]
        pairs = [(idx, idx + n, tables[0])]
    else:  # 2-D: NeoX over each half of the head, the second half by the block positions
        pairs = [(idx, idx + n, tables[0]), (hd // 2 + idx, hd // 2 + idx + n, tables[1])]

    def r(v):
        return v.to(dtype).float()

    for a, b, (cos, sin) in pairs:
        c, s = cos.reshape(rows, 1, n).float(), sin.reshape(rows, 1, n).float()
        x0, x1 = src[..., a].float(), src[..., b].float()
        heads[..., a] = (r(x0 * c) - r(x1 * s)).to(dtype)
        heads[..., b] = (r(x1 * c) + r(x0 * s)).to(dtype)
    return heads[:, :nh], heads[:, nh:]


def _independent_rope_tables(positions, rotary_dim, base, dtype, table_dtype):
    """cos/sin (B, T, rotary_dim / 2) as the original code builds them (not glmrt.ops.rope_tables):
    inv_freq = 1 / base^(arange(0, d, 2) / d) in fp32; "float16" (ChatGLM-6B / SAT in fp16):
    inv_freq.half(), positions in fp16, their product and cos/sin in fp16; "float32" (THUDM): the
    product and cos/sin in fp32; then rounded to the model dtype."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    if table_dtype == "float16":
        angles = torch.einsum("bt,j->btj", positions.half(), inv_freq.half())
    else:
        angles = torch.einsum("bt,j->btj", positions.float(), inv_freq)
    return angles.cos().to(dtype), angles.sin().to(dtype)


EMULATED_ROPE_CASES = {
    "interleaved": ROPE_CASES + [(1, 2, 4, 2, 128, 0)],
    "half": ROPE_CASES + [(1, 2, 4, 2, 128, 0), (2, 2, 3, 3, 128, 128)],
    "2d": ROPE_2D_CASES,
}


@pytest.mark.parametrize("kind", ROPE_KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_rope(emulated, dtype, kind):
    g = torch.Generator().manual_seed(8)
    for case_index, (b, t, nh, nkv, hd, rd) in enumerate(EMULATED_ROPE_CASES[kind]):
        # ChatGLM-6B's fp16 angles, in an fp16 model (where every rule agrees), or fp32 angles
        table_dtype = "float16" if dtype == torch.float16 and case_index % 2 else "float32"
        qkv, positions = _rope_inputs(b, t, nh, nkv, hd, rd, dtype, g, kind=kind)
        if kind == "2d":
            tables = [_independent_rope_tables(positions[:, j], hd // 2, 10000.0, dtype, table_dtype) for j in (0, 1)]
        else:
            tables = [_independent_rope_tables(positions, rd, 10000.0, dtype, table_dtype)]
        flat = [x.contiguous() for pair in tables for x in pair]
        second = (flat[2].data_ptr(), flat[3].data_ptr()) if kind == "2d" else (0, 0)
        want_q, want_k = _independent_rope(qkv, tables, nh, nkv, hd, kind)
        q = torch.full((b * t, nh, hd), float("nan"), dtype=dtype)
        k = torch.full((b * t, nkv, hd), float("nan"), dtype=dtype)
        _within_timeout(emulated.rope, qkv.data_ptr(), CODES[dtype], {"interleaved": 0, "half": 1, "2d": 2}[kind],
                        flat[0].data_ptr(), flat[1].data_ptr(), *second, q.data_ptr(), k.data_ptr(), b * t, nh, nkv,
                        hd, rd, 0, 0)
        what = f"emulated rope {kind} B{b} T{t} nh{nh} nkv{nkv} hd{hd} rd{rd} {dtype} tables {table_dtype}"
        assert torch.equal(q, want_q), f"{what}: q {_first_mismatch(q, want_q)}"
        assert torch.equal(k, want_k), f"{what}: k {_first_mismatch(k, want_k)}"
        if rd:  # and the reference op agrees with the independent formula
            node = rope_node(nh, nkv, hd, rd, dtype, kind=kind, table_dtype=table_dtype)
            ref_q, ref_k, _ = ops.rope(ops.ForwardContext(positions=positions, allowed=None), node, [qkv], {})
            assert torch.equal(ref_q.reshape(b * t, nh, hd), want_q), f"{what}: ops.rope q"
            assert torch.equal(ref_k.reshape(b * t, nkv, hd), want_k), f"{what}: ops.rope k"


# ============================================================ attention (all three parts for one op)
# The kernel of native/gpu/attention.cu: predicates and argument errors (no GPU), the kernel emulated
# on the CPU at warp 32 and 64 against the formulas, and on a GPU against glmrt.ops.attention.
def attention_node(nh, nkv, hd, dtype, scaling="standard", layer=0, mask_kind="causal", q_len="T"):
    return Node(f"layers.{layer}.attention", "attention", ["q", "k", "v"], ["o"],
                attrs=dict(layer_index=layer, num_heads=nh, num_kv_heads=nkv, head_dim=hd, scale=1.0 / hd ** 0.5,
                           scaling=scaling, mask_kind=mask_kind),
                input_specs=[ValueSpec(("B", q_len, nh, hd), dtype), ValueSpec(("B", q_len, nkv, hd), dtype),
                             ValueSpec(("B", q_len, nkv, hd), dtype)],
                output_specs=[ValueSpec(("B", q_len, nh * hd), dtype)])


def test_attention_supports_predicate():
    from glmrt.backends.cuda.kernels import ATTENTION_MAX_Q, NativeGpuKernels

    ok = NativeGpuKernels.attention_supports
    for dtype in DTYPES:
        for scaling, layer in (("standard", 0), ("layer_scaled", 27)):
            assert ok(attention_node(32, 2, 128, dtype, scaling, layer)) is None  # GLM-4 / ChatGLM2 GQA
            assert ok(attention_node(32, 32, 128, dtype, scaling, layer, "prefix")) is None  # ChatGLM-6B
            assert ok(attention_node(5, 1, 20, dtype, scaling, layer)) is None  # MQA, odd head_dim
            assert ok(attention_node(4, 1, 256, dtype, scaling, layer)) is None
    assert ok(attention_node(8, 2, 64, torch.bfloat16, q_len=ATTENTION_MAX_Q)) is None
    assert ok(attention_node(8, 2, 64, torch.bfloat16, q_len=1)) is None
    assert "prefill-sized" in ok(attention_node(8, 2, 64, torch.bfloat16, q_len=ATTENTION_MAX_Q + 1))
    assert "scaling 'alibi'" in ok(attention_node(8, 2, 64, torch.float16, "alibi"))
    assert "multiple" in ok(attention_node(6, 4, 64, torch.float16))
    assert "head_dim 512" in ok(attention_node(8, 2, 512, torch.float16))
    assert "float64" in ok(attention_node(8, 2, 64, torch.float64))
    mixed = attention_node(8, 2, 64, torch.bfloat16)
    mixed.input_specs[2] = ValueSpec(("B", "T", 2, 64), torch.float32)
    assert "different dtypes" in ok(mixed)
    bad_scale = attention_node(8, 2, 64, torch.bfloat16)
    bad_scale.attrs = dict(bad_scale.attrs, scale=float("nan"))
    assert "finite" in ok(bad_scale)
    symbolic = attention_node(8, 2, 64, torch.bfloat16)
    symbolic.attrs = dict(symbolic.attrs, head_dim="hd")
    assert "positive integers" in ok(symbolic)


@pytest.mark.parametrize("platform", sorted(PLATFORMS))
def test_attention_argument_errors_are_raised_before_touching_a_device(platform):
    module, why = _module_for(platform)
    if module is None:
        pytest.skip(f"glmrt.{PLATFORMS[platform][0]} is not built: {why}")
    assert module.ATTENTION_MAX_HEAD_DIM == 256
    need = module.attention_workspace_bytes(1, 1, 100, 8, 2, 64)
    assert need >= 8 * 100 * 4  # at least the scores of the 8 query rows
    assert module.attention_kv_splits(1, 1, 100, 8, 2, 64, 32) == 4  # 100 keys in splits of 32
    assert module.attention_kv_splits(1, 1, 100, 8, 2, 64) == module.attention_kv_splits(1, 1, 100, 8, 2, 64, 0)
    with pytest.raises(RuntimeError, match="invalid shapes"):
        module.attention_workspace_bytes(1, 1, 100, 6, 4, 64)

    def call(dtype=1, B=1, T=1, S=100, nh=8, nkv=2, hd=64, workspace=16, nbytes=need, kv_split=0):
        #                 ptr strides             k  strides  v  strides  mask strides out
        module.attention(dtype, B, T, S, nh, nkv, hd, 16, 0, 0, 0, 16, 0, 0, 0, 16, 0, 0, 0, 16, 0, 0, 0, 16,
                         False, 0.125, 8.0, 1.0, workspace, nbytes, kv_split, 0, 0)

    with pytest.raises(RuntimeError, match="attention: dtype"):
        call(dtype=3)
    with pytest.raises(RuntimeError, match="multiple of num_kv_heads"):
        call(nh=6, nkv=4)
    with pytest.raises(RuntimeError, match="head_dim must be <= 256"):
        call(hd=320)
    with pytest.raises(RuntimeError, match="kv_len"):
        call(S=0)
    with pytest.raises(RuntimeError, match="workspace is smaller"):
        call(nbytes=need - 1)
    with pytest.raises(RuntimeError, match="16-byte aligned"):
        call(workspace=8)
    with pytest.raises(RuntimeError, match="device pointers"):
        call(workspace=0)
    call(B=0, nbytes=0)  # no query row: nothing to do, no launch


@pytest.mark.parametrize("platform", sorted(PLATFORMS))
def test_plans_use_the_native_attention_kernel(platform):
    """Decode attention of every GLM layout runs the native kernel (GQA and layer-scaled MHA)."""
    from glmrt.api import plan as plan_for

    module, why = _module_for(platform)
    if module is None:
        pytest.skip(f"glmrt.{PLATFORMS[platform][0]} is not built: {why}")
    for source in ("synthetic:glm-4-9b-0414", "synthetic:chatglm-6b"):
        plan = plan_for(source, backend=PLATFORMS[platform][1], layers=2)
        steps = [s for s in plan.steps if s.node.op == "attention"]
        assert len(steps) == 2 and all(s.impl == "native.attention" for s in steps), [(s.impl, s.reason) for s in steps]


def _attention_mask(B, T, valid, total, kind, pad, context):
    """(B, T, total) bool for queries at valid - T .. valid - 1 over keys 0 .. total - 1: causal
    (key <= query), GLM's prefix mask (also every key before context[b]), never a key before pad[b]
    (left padding), never a key >= valid (the unwritten part of a static cache)."""
    q_pos = torch.arange(valid - T, valid)[:, None]
    k_pos = torch.arange(total)[None, :]
    rows = []
    for b in range(B):
        real = (k_pos >= pad[b]) & (k_pos < valid)
        allowed = (k_pos <= q_pos) & real
        if kind == "prefix":
            allowed = allowed | ((k_pos < context[b]) & real)
        rows.append(allowed)
    return torch.stack(rows)  # (B, T, total)


def _attention_formula(q, keys, values, allowed, group, scaling, scale, layer):
    """The attention of the GLM releases written out from the formulas in float64, rounding to the
    model dtype where the releases' code does (layer-scaled: the scores, q / (sqrt(d) * c) as torch's
    CUDA division by a scalar computes it, q * fp32(1 / divisor), and the probabilities; standard,
    SDPA's flash kernels in the original code: exp(score - max) before its division by the sum, and
    the output). q (B, T, nh,
    d); keys / values (B, S, nkv, d); allowed (B, T, S). Query head h reads KV head h // group;
    masked scores are the dtype's lowest value (standard) or -10000 (layer-scaled), so a query that
    sees no key averages all S values. Returns the output (B, T, nh * d) and the softmax inputs
    (B, nh, T, S)."""
    dtype = q.dtype
    B, T, nh, d = q.shape

    def rnd(x):  # to the model dtype, kept in float64
        return x.to(dtype).double()

    heads = torch.arange(nh) // group
    k = keys.double()[:, :, heads]  # (B, S, nh, d)
    v = values.double()[:, :, heads]
    c = float(layer + 1)
    if scaling == "layer_scaled":
        inv = torch.tensor(1.0, dtype=torch.float32) / torch.tensor(d ** 0.5 * c, dtype=torch.float32)
        q_scaled = rnd((q.float() * inv).double())
        s = rnd(torch.einsum("bthd,bshd->bhts", q_scaled, k))
        s = torch.where(allowed[:, None], s, rnd(torch.tensor(-10000.0)))
        x = (s.float() * torch.tensor(c, dtype=torch.float32)).double()
    else:  # SDPA in the original code: fp32 scores
        s = torch.einsum("bthd,bshd->bhts", q.double(), k) * float(torch.tensor(scale, dtype=torch.float32))
        x = torch.where(allowed[:, None], s, torch.tensor(torch.finfo(torch.float32).min, dtype=torch.float64))
    e = (x - x.amax(-1, keepdim=True)).exp()
    if scaling == "layer_scaled":
        p = rnd(e / e.sum(-1, keepdim=True))  # (B, nh, T, S)
    else:  # SDPA's flash kernels: the unnormalised exps rounded, divided by their sum
        p = rnd(e) / e.sum(-1, keepdim=True)
    return torch.einsum("bhts,bshd->bthd", p, v).to(dtype).reshape(B, T, nh * d), x


def _assert_attention_close(got, want, vmax, what):
    """Within an ulp of the output plus an ulp of the largest value: the remaining differences are
    fp32 summation orders (and expf against float64 exp), which can move the rounding of a
    probability or of the output by one ulp."""
    dtype = got.dtype
    eps = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
    err = (got.double() - want.double()).abs()
    tol = eps * (want.double().abs() + vmax)
    assert got.shape == want.shape and not bool(got.isnan().any()), what
    worst = int((err - tol).flatten().argmax())
    assert bool((err <= tol).all()), (f"{what}: error {err.flatten()[worst].item():.3g} > "
                                      f"{tol.flatten()[worst].item():.3g} at flat index {worst} (got "
                                      f"{got.flatten()[worst].item()}, want {want.flatten()[worst].item()})")


# (B, T, nh, nkv, hd, layout, valid keys, cache length, mask kind, scaling, layer, dtype, kv_split, splits):
# layout "fresh" = k / v are this step's (B, T, nkv, hd) views of a fused qkv (S = T); "cache" = the
# (B, nkv, L, hd) cache read up to `valid` (eager decode); "static" = the whole cache under the mask
# (graph-capture decode: S = L, the keys past `valid` hold large stale values that must stay unseen).
# Small integer q and k make every dot product exact in fp32 (and in float64), so the scores equal
# the formula's bit for bit in bf16 / fp16; only the softmax and the sums are in another order.
EMULATED_ATTENTION_CASES = [
    (1, 1, 4, 2, 16, "fresh", 1, 1, "causal", "standard", 0, torch.float32, 0, 1),  # one key
    (2, 1, 6, 2, 20, "static", 37, 45, "prefix", "layer_scaled", 3, torch.bfloat16, 16, 2),
    (1, 3, 8, 1, 256, "cache", 50, 53, "causal", "standard", 0, torch.float16, 16, 4),  # MQA, 2 row tiles
    (3, 2, 4, 4, 8, "cache", 9, 12, "prefix", "standard", 1, torch.bfloat16, 0, 1),  # a row that sees nothing
    (1, 8, 2, 1, 64, "cache", 100, 100, "causal", "layer_scaled", 0, torch.float32, 0, 1),  # 4 key tiles
    (1, 1, 8, 2, 32, "static", 33, 70, "causal", "standard", 0, torch.float16, 32, 3),  # a fully masked split
    (2, 5, 3, 1, 12, "fresh", 5, 5, "prefix", "layer_scaled", 1, torch.float16, 0, 1),
    (1, 2, 4, 2, 16, "static", 650, 700, "causal", "standard", 0, torch.bfloat16, 0, 6),  # automatic split
    # The second key tile holds one key, which only the second query row (the second warp's) sees.
    (1, 2, 2, 2, 16, "cache", 33, 40, "causal", "standard", 0, torch.bfloat16, 0, 1),
]


def _emulated_attention_case(case, g):
    B, T, nh, nkv, hd, layout, valid, L, kind, scaling, layer, dtype, kv_split, splits = case
    fused = torch.randint(-3, 4, (B, T, (nh + 2 * nkv) * hd), generator=g).to(dtype)
    fused[..., (nh + nkv) * hd:] = torch.randn(B, T, nkv * hd, generator=g).to(dtype)  # v: any values
    q = fused[..., :nh * hd].unflatten(-1, (nh, hd))  # views with the fused row stride, as the plan's
    # The last token's key of each KV head points along the first query head of its group, so that
    # query row attends to it almost alone: a kernel that loses or swaps that key shows it in full.
    last_keys = fused[:, -1, nh * hd:(nh + nkv) * hd].view(B, nkv, hd)
    last_keys.copy_(3 * torch.sign(q[:, -1, ::nh // nkv].float()).to(dtype))
    pad = [0, 2, valid][:B]  # the last of three rows: left padding over every key, sees nothing
    context = [max(pad[b] + 1, valid // 2) for b in range(B)]
    if layout == "fresh":
        keys = fused[..., nh * hd:(nh + nkv) * hd].unflatten(-1, (nkv, hd))  # (B, T, nkv, hd)
        values = fused[..., (nh + nkv) * hd:].unflatten(-1, (nkv, hd))
        strides = [(t.stride(0), t.stride(2), t.stride(1)) for t in (keys, values)]
        ref_k, ref_v, S = keys, values, T
    else:
        keys = torch.randint(-3, 4, (B, nkv, L, hd), generator=g).to(dtype)
        values = torch.randn(B, nkv, L, hd, generator=g).to(dtype)
        keys[:, :, valid:] = 7.0  # stale slots: masked, must not be seen
        values[:, :, valid:] = 50.0
        keys[:, :, valid - T:valid] = fused[..., nh * hd:(nh + nkv) * hd].unflatten(-1, (nkv, hd)).transpose(1, 2)
        values[:, :, valid - T:valid] = fused[..., (nh + nkv) * hd:].unflatten(-1, (nkv, hd)).transpose(1, 2)
        strides = [t.stride()[:3] for t in (keys, values)]
        S = L if layout == "static" else valid
        ref_k, ref_v = keys.transpose(1, 2)[:, :S], values.transpose(1, 2)[:, :S]  # (B, S, nkv, hd)
    allowed = _attention_mask(B, T, valid, S, kind, pad, context)  # (B, T, S)
    return q, keys, values, strides, ref_k, ref_v, allowed, S


@pytest.mark.parametrize("case", EMULATED_ATTENTION_CASES,
                         ids=lambda c: f"B{c[0]}T{c[1]}-nh{c[2]}nkv{c[3]}hd{c[4]}-{c[5]}{c[6]}of{c[7]}-{c[8]}-"
                                       f"{c[9]}{c[10]}-{str(c[11])[6:]}-split{c[12]}")
def test_emulated_attention(emulated, case):
    B, T, nh, nkv, hd, layout, valid, L, kind, scaling, layer, dtype, kv_split, splits = case
    g = torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))
    q, keys, values, (ks, vs), ref_k, ref_v, allowed, S = _emulated_attention_case(case, g)
    scale, c = 1.0 / hd ** 0.5, float(layer + 1)
    assert emulated.attention_kv_splits(B, T, S, nh, nkv, hd, kv_split) == splits
    nbytes = emulated.attention_workspace_bytes(B, T, S, nh, nkv, hd, kv_split)
    workspace = torch.full((nbytes // 4,), float("nan"))  # stale scratch must not matter
    out = torch.full((B, T, nh * hd), float("nan"), dtype=dtype)
    _within_timeout(emulated.attention, CODES[dtype], B, T, S, nh, nkv, hd, q.data_ptr(), *q.stride()[:3],
                    keys.data_ptr(), *ks, values.data_ptr(), *vs, allowed.data_ptr(), *allowed.stride(),
                    out.data_ptr(), scaling == "layer_scaled", scale, hd ** 0.5 * c, c, workspace.data_ptr(), nbytes,
                    kv_split, 0, 0)
    want, want_x = _attention_formula(q, ref_k, ref_v, allowed, nh // nkv, scaling, scale, layer)
    vmax = ref_v[:, :valid].abs().max().item()  # the written keys' values (stale ones are 50)
    _assert_attention_close(out, want, vmax, f"emulated attention {case}")
    # The softmax inputs the kernel left in its workspace (attention.cu: fp32 [B, nh, T, S] at offset
    # 0, written for allowed keys only): on this exact data the same numbers as the formula's, bit
    # for bit in bf16 / fp16 (every rounding of the scores as the reference does it), and masked keys
    # never scored (their keys are never read).
    x = workspace[:B * nh * T * S].view(B, nh, T, S)
    seen = allowed[:, None].expand(B, nh, T, S)
    assert bool(x[~seen].isnan().all()), "a masked key was scored"
    if dtype == torch.float32 or scaling == "standard":  # fp32 scores: summation order only
        torch.testing.assert_close(x[seen].double(), want_x[seen], rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(x[seen], want_x[seen].float()), _first_mismatch(x[seen], want_x[seen].float())
    if not bool(allowed.any(-1).all()):  # the rows that see no key: the mean of all S values
        mean = ref_v.double().mean(1).repeat_interleave(nh // nkv, dim=1).flatten(-2)  # (B, nh * hd)
        blind = ~allowed.any(-1)  # (B, T)
        _assert_attention_close(out[blind], mean[blind.nonzero()[:, 0]].to(dtype), vmax, "rows that see no key")


# ------------------------------------------------------------------------------- on a GPU
# (batch, new tokens, cached tokens before them, mode): "none" = no cache (S = T), "eager" = the
# cache slice, "static" = the whole preallocated cache under the mask with the position as a device
# tensor (graph-capture decode). T > ATTENTION_MAX_Q is a prefill: the reference op runs.
ATTENTION_STEPS = [(1, 1, 0, "none"), (3, 6, 0, "none"), (2, 1, 9, "eager"), (1, 1, 40, "eager"), (3, 3, 4, "eager"),
                   (2, 8, 0, "eager"), (3, 1, 7, "static"), (1, 1, 3000, "static"), (2, 1, 700, "eager"),
                   (2, 12, 0, "eager")]
ATTENTION_HEADS = [(32, 2, 128), (5, 1, 20), (3, 3, 12), (8, 2, 64), (4, 1, 256)]


def _gpu_attention_case(heads, dtype, step, mask_kind, scaling, layer, device="cuda"):
    nh, nkv, hd = heads
    B, T, past, mode = step
    g = torch.Generator().manual_seed(zlib.crc32(repr((heads, str(dtype), step, mask_kind, scaling, layer)).encode()))
    fused = torch.randn(B, T, (nh + 2 * nkv) * hd, generator=g).to(dtype).to(device)
    q = fused[..., :nh * hd].unflatten(-1, (nh, hd))  # views of one fused tensor, as the rope node's
    k = fused[..., nh * hd:(nh + nkv) * hd].unflatten(-1, (nkv, hd))
    v = fused[..., (nh + nkv) * hd:].unflatten(-1, (nkv, hd))
    total = past + T
    max_len = total + (37 if mode == "static" else 5)
    past_k = torch.randn(B, nkv, past, hd, generator=g).to(dtype).to(device)
    past_v = torch.randn(B, nkv, past, hd, generator=g).to(dtype).to(device)
    pad = [0, 2, min(total - 1, 3)][:B] if B > 1 else [0]
    if B == 3 and mode == "none":
        pad[2] = 5  # a left-padded row whose first queries see no key at all
    context = [max(pad[b] + 1, total // 2) for b in range(B)]
    width = max_len if mode == "static" else total
    allowed = _attention_mask(B, T, total, width, mask_kind, pad, context)[:, None].to(device)  # (B, 1, T, S)

    def ctx():
        if mode == "none":
            return ops.ForwardContext(positions=None, allowed=allowed)
        cache = ops.KVCache(layer + 1, B, nkv, max_len, hd, dtype, torch.device(device))
        cache.k[layer][:, :, :past] = past_k
        cache.v[layer][:, :, :past] = past_v
        cache.k[layer][:, :, total:] = 7.0  # stale slots past the position: masked, never read
        cache.v[layer][:, :, total:] = 7.0
        if mode == "static":
            return ops.ForwardContext(positions=None, allowed=allowed, cache=cache,
                                      cache_pos_t=torch.tensor(past, device=device))
        return ops.ForwardContext(positions=None, allowed=allowed, cache=cache, cache_pos=past)

    values = torch.cat((past_v.transpose(1, 2), v), dim=1)  # (B, total, nkv, hd)
    return attention_node(nh, nkv, hd, dtype, scaling, layer, mask_kind), [q, k, v], ctx, values


def _check_attention_against_reference(kernel_fn, heads, dtype, step, mask_kind, scaling, layer, device):
    """kernel_fn (the plan wrapper) against glmrt.ops.attention on one step: the cache written
    exactly as the reference writes it; the output within a couple of ulps of the values (the same
    roundings; the fp32 summation order of the dot products differs from cuBLAS's / the CPU's, which
    can flip the rounding of a score or a probability); a prefill (T > ATTENTION_MAX_Q) is the
    reference op itself."""
    from glmrt.backends.cuda.kernels import ATTENTION_MAX_Q, NativeGpuKernels

    nh, nkv, hd = heads
    node, inputs, make_ctx, values = _gpu_attention_case(heads, dtype, step, mask_kind, scaling, layer, device)
    assert NativeGpuKernels.attention_supports(node) is None
    ctx_native, ctx_ref = make_ctx(), make_ctx()
    got = kernel_fn(ctx_native, node, inputs, {})
    want = ops.attention(ctx_ref, node, inputs, {})
    B, T = step[:2]
    what = f"attention {heads} {dtype} {step} {mask_kind} {scaling} layer {layer}"
    assert got.shape == (B, T, nh * hd) and got.dtype == dtype and got.device == want.device, what
    if ctx_ref.cache is not None:
        assert torch.equal(ctx_native.cache.k[layer], ctx_ref.cache.k[layer]), what
        assert torch.equal(ctx_native.cache.v[layer], ctx_ref.cache.v[layer]), what
    if T > ATTENTION_MAX_Q:
        assert torch.equal(got, want), what
        return
    vmax = values.abs().max().item()
    tol = 2 * torch.finfo(dtype).eps * vmax if dtype != torch.float32 else 1e-5 * vmax
    torch.testing.assert_close(got.double(), want.double(), atol=tol, rtol=0, msg=lambda m: f"{what}: {m}")


def test_emulated_attention_plan_wrapper(emulated, monkeypatch):
    """The plan wrapper (cache write, key layouts and strides, the mask's broadcast strides, the
    prefill fallback) on the emulated kernel, on CPU tensors, against glmrt.ops.attention."""
    from glmrt.backends.cuda import kernels as gpu_kernels

    wrapper = gpu_kernels.NativeGpuKernels("_native_cuda")
    monkeypatch.setattr(wrapper, "module", lambda: (emulated, ""))
    monkeypatch.setattr(gpu_kernels, "_stream", lambda device: 0)
    steps = [(1, 1, 0, "none"), (3, 6, 0, "none"), (2, 1, 9, "eager"), (3, 3, 4, "eager"), (3, 1, 7, "static"),
             (1, 1, 300, "static"), (2, 12, 0, "eager")]
    for dtype in DTYPES:
        for heads in [(8, 2, 64), (5, 1, 20)]:
            for mask_kind, scaling, layer in [("causal", "standard", 0), ("prefix", "layer_scaled", 5)]:
                for step in steps:
                    _check_attention_against_reference(wrapper.attention, heads, dtype, step, mask_kind, scaling,
                                                       layer, "cpu")


@needs_gpu
@pytest.mark.parametrize("mask_kind,scaling,layer", [("causal", "standard", 0), ("prefix", "layer_scaled", 0),
                                                     ("prefix", "layer_scaled", 5), ("prefix", "standard", 1)])
@pytest.mark.parametrize("heads", ATTENTION_HEADS, ids=[f"nh{a}-nkv{b}-hd{c}" for a, b, c in ATTENTION_HEADS])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_matches_reference(dtype, heads, mask_kind, scaling, layer):
    kernel = _kernels()["native.attention"]
    for step in ATTENTION_STEPS:
        _check_attention_against_reference(kernel.fn, heads, dtype, step, mask_kind, scaling, layer, "cuda")


@needs_gpu
def test_attention_under_graph_capture_follows_the_device_position():
    """The model's static decode step: the mask is computed on the device from the position tensor
    inside the graph; replays at other positions (other valid lengths) must give what the reference
    gives at each, and what an eager launch gives, bit for bit."""
    kernel = _kernels()["native.attention"]
    B, nh, nkv, hd, L, layer, dtype = 2, 8, 2, 64, 300, 0, torch.bfloat16
    node = attention_node(nh, nkv, hd, dtype)
    g = torch.Generator().manual_seed(21)
    cache = ops.KVCache(layer + 1, B, nkv, L, hd, dtype, torch.device("cuda"))
    cache.k[layer].copy_(torch.randn(B, nkv, L, hd, generator=g).to(dtype))  # stale everywhere past pos
    cache.v[layer].copy_((3 * torch.randn(B, nkv, L, hd, generator=g)).to(dtype))
    key_valid = torch.ones(B, L, dtype=torch.bool, device="cuda")
    key_valid[1, :3] = False  # left padding of the second row
    key_index = torch.arange(L, device="cuda")
    pos = torch.zeros((), dtype=torch.long, device="cuda")
    qkv = [torch.zeros(B, 1, n, hd, dtype=dtype, device="cuda") for n in (nh, nkv, nkv)]

    def context(kv_cache):
        allowed = (key_valid & (key_index <= pos))[:, None, None, :]  # (B, 1, 1, L), as the model builds it
        return ops.ForwardContext(positions=None, allowed=allowed, cache=kv_cache, cache_pos_t=pos)

    def clone(kv_cache):
        copy = ops.KVCache(layer + 1, B, nkv, L, hd, dtype, torch.device("cuda"))
        copy.k[layer].copy_(kv_cache.k[layer])
        copy.v[layer].copy_(kv_cache.v[layer])
        return copy

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        kernel.fn(context(clone(cache)), node, qkv, {})  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = kernel.fn(context(cache), node, qkv, {})
    for step, p in enumerate([5, 6, 40, 127, 128, 299, 17]):
        for t in qkv:
            t.copy_(torch.randn(t.shape, generator=g).to(dtype))
        pos.fill_(p)
        before = clone(cache)
        ref_cache, eager_cache = clone(before), clone(before)
        want = ops.attention(context(ref_cache), node, qkv, {})
        eager = kernel.fn(context(eager_cache), node, qkv, {})
        graph.replay()
        torch.cuda.synchronize()
        what = f"replay {step} at position {p}"
        assert torch.equal(cache.k[layer], ref_cache.k[layer]) and torch.equal(cache.v[layer], ref_cache.v[layer]), what
        assert torch.equal(captured, eager), f"{what}: the replay differs from an eager launch"
        vmax = cache.v[layer][:, :, :p + 1].abs().max().item()
        torch.testing.assert_close(captured.double(), want.double(), atol=2 * torch.finfo(dtype).eps * vmax, rtol=0,
                                   msg=lambda m: f"{what}: {m}")


@needs_gpu
@pytest.mark.parametrize("kv_split", [32, 96, 0])
def test_attention_kv_splits_agree(kv_split):
    """Forced splits (many partial rows, the reduction launch) against the automatic choice and the
    reference, on a long static cache whose second half is unwritten."""
    kernel = _kernels()["native.attention"]
    node, inputs, make_ctx, values = _gpu_attention_case((32, 2, 128), torch.bfloat16, (1, 1, 2000, "static"),
                                                          "causal", "standard", 0)
    ctx = make_ctx()
    want = ops.attention(make_ctx(), node, inputs, {})
    auto = kernel.fn(ctx, node, inputs, {})
    module = gpu_module
    q = inputs[0]
    keys, vals = ctx.cache.k[0], ctx.cache.v[0]
    S = keys.shape[2]
    allowed = ctx.allowed.expand(1, 1, 1, S)
    nbytes = module.attention_workspace_bytes(1, 1, S, 32, 2, 128, kv_split)
    workspace = torch.full((nbytes,), 255, dtype=torch.uint8, device="cuda")  # NaN-filled scratch
    out = torch.empty_like(auto)
    module.attention(CODES[torch.bfloat16], 1, 1, S, 32, 2, 128, q.data_ptr(), *q.stride()[:3], keys.data_ptr(),
                     *keys.stride()[:3], vals.data_ptr(), *vals.stride()[:3], allowed.data_ptr(), allowed.stride(0),
                     allowed.stride(2), allowed.stride(3), out.data_ptr(), False, 1.0 / 128 ** 0.5, 128 ** 0.5, 1.0,
                     workspace.data_ptr(), nbytes, kv_split, torch.cuda.current_device(),
                     torch.cuda.current_stream().cuda_stream)
    vmax = values.abs().max().item()
    tol = 2 * torch.finfo(torch.bfloat16).eps * vmax
    torch.testing.assert_close(out.double(), want.double(), atol=tol, rtol=0)
    torch.testing.assert_close(out.double(), auto.double(), atol=tol, rtol=0)
