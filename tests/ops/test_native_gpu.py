"""glmrt's native GPU kernels (native/gpu -> glmrt._native_cuda / glmrt._native_hip) against torch.

The same kernel sources are built as CUDA (nvcc) and as HIP (hipcc). This file has two parts.

1. Build and wiring checks that need NO GPU (they run in CI):
   * GLMRT_REQUIRE_CUDA_BUILD=1 / GLMRT_REQUIRE_HIP_BUILD=1: the module must be installed inside the
     glmrt package and import in a fresh process with no visible GPU (both link their runtime so
     that no driver is needed to import), with the architectures it was built for;
   * the backends register the kernels, native_info() reports the module, argument errors are
     raised before anything touches a device, and the supports() predicates accept and refuse
     the right nodes (a plan for a quantized graph picks the native kernels).

   * the same kernel sources compiled as C++ against native/gpu/emulate.h (one OS thread per GPU
     thread; __syncthreads and shuffles are barriers) with 32-lane AND 64-lane warps, and checked
     bit for bit on exact data (below): the kernels' indexing and every warp reduction are
     exercised at both widths without a GPU (a few minutes of CPU; GLMRT_SKIP_GPU_EMULATION=1
     skips it).

2. Kernel conformance, which needs a GPU (skipped otherwise, with the reason). On a CUDA machine
   it tests glmrt._native_cuda through the cuda backend; on a ROCm / DTK torch, glmrt._native_hip
   through the rocm backend:

       pip install --no-build-isolation -e .       # nvcc (or hipcc) on PATH
       pytest -v tests/ops/test_native_gpu.py

   * RMSNorm vs glmrt.ops.norm, every dtype, odd widths (1, 7, 100, 257, 4096, 13696), both
     rounding conventions, a float32 weight under half activations; within one ulp of the output
     dtype (the sum of squares is reduced in another order).
   * LayerNorm (with and without bias, a float32 weight under half activations) vs
     glmrt.ops.norm, within one ulp of the output dtype.
   * Fused residual + RMSNorm vs glmrt.ops.residual_norm: h bit for bit (the same two roundings),
     norm(h) within one ulp, alpha 1 and a DeepNorm alpha, emit_residual on and off.
   * Interleaved partial RoPE (fused qkv split) vs glmrt.ops.rope: q, k bit for bit (the kernel
     rounds each product and sum as torch does), v the same view; GQA head counts, partial and
     full rotary, every dtype.
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
   * The plan wrappers: M > 8 takes the reference path (equal to glmrt.ops.linear); a weight
     whose base pointer is not 16-byte aligned (scalar-load path); non-contiguous input; a side
     stream; CUDA / HIP graph capture and replay.

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
    assert {"native.rms_norm", "native.layer_norm", "native.residual_rms_norm", "native.rope_interleaved",
            "native.quant_gemv"} <= names


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
        module.rms_norm(1, 0, 1, 5, 1, 1, 8, 1e-5, False, 0, 0)
    module.linear_int8(0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 64, 0, 0, 0)  # M = 0: nothing to do, no launch
    module.rms_norm(0, 1, 0, 1, 0, 0, 4096, 1e-5, True, 0, 0)  # rows = 0
    with pytest.raises(RuntimeError, match="layer_norm: dtype"):
        module.layer_norm(1, 0, 1, 0, 1, 9, 1, 1, 8, 1e-5, 0, 0)  # a bias dtype code 9
    module.layer_norm(1, 0, 1, 0, 0, 9, 1, 0, 8, 1e-5, 0, 0)  # no bias: its code is not read; rows = 0
    with pytest.raises(RuntimeError, match="residual_rms_norm: dtype"):
        module.residual_rms_norm(1, 1, 3, 1.0, 1, 0, 0, 1, 1, 8, 1e-5, False, 0, 0)
    with pytest.raises(RuntimeError, match="rows and cols"):
        module.residual_rms_norm(1, 1, 0, 1.0, 1, 0, 0, 1, -1, 8, 1e-5, False, 0, 0)
    module.residual_rms_norm(0, 0, 1, 1.0, 0, 1, 0, 0, 0, 4096, 1e-5, True, 0, 0)  # rows = 0
    #                      qkv d cos sin q  k  rows nh nkv hd rd device stream
    with pytest.raises(RuntimeError, match="rotary_dim"):
        module.rope_interleaved(1, 1, 1, 1, 1, 1, 1, 2, 1, 128, 130, 0, 0)
    with pytest.raises(RuntimeError, match="head_dim"):
        module.rope_interleaved(1, 1, 1, 1, 1, 1, 1, 2, 1, 7, 4, 0, 0)
    with pytest.raises(RuntimeError, match="dtype"):
        module.rope_interleaved(1, 3, 1, 1, 1, 1, 1, 2, 1, 128, 64, 0, 0)
    module.rope_interleaved(0, 1, 0, 0, 0, 0, 0, 32, 2, 128, 64, 0, 0)  # rows = 0
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


def rope_node(nh, nkv, hd, rd, dtype, kind="interleaved", lead=("B", "T")):
    return Node("layers.0.rope", "rope", ["qkv"], ["q", "k", "v"], {},
                attrs=dict(kind=kind, rotary_dim=rd, head_dim=hd, num_heads=nh, num_kv_heads=nkv, base=10000.0,
                           table_dtype="float32"),
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
    rope_ok = NativeGpuKernels.rope_interleaved_supports
    for dtype in DTYPES:
        assert rope_ok(rope_node(32, 2, 128, 64, dtype)) is None  # ChatGLM2/3, GLM-4
        assert rope_ok(rope_node(3, 1, 8, 8, dtype)) is None  # full rotary
    assert "interleaved" in rope_ok(rope_node(32, 2, 128, 64, torch.bfloat16, kind="half"))
    assert "interleaved" in rope_ok(rope_node(32, 32, 128, 64, torch.float16, kind="2d"))
    assert "even" in rope_ok(rope_node(4, 1, 128, 130, torch.bfloat16))
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
    # Symbolic B, T: decided per call. Concrete leading dims: refused above the GEMV bound.
    assert linear_ok(linear_node(4096, 4096, torch.bfloat16, 8, 0, lead=(1, GEMV_MAX_M))) is None
    assert "prefill-sized" in linear_ok(linear_node(4096, 4096, torch.bfloat16, 8, 0, lead=(2, 512)))


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
    models), and leaves LayerNorm models' nodes separate, on native.layer_norm."""
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
            assert step.impl == "native.rope_interleaved", step.reason
    plan = plan_for("synthetic:chatglm-6b", backend=backend, layers=1)
    ropes = [s for s in plan.steps if s.node.op == "rope"]  # 2-D RoPE: not the native kernel's
    assert ropes and all(s.impl != "native.rope_interleaved" and "native.rope_interleaved" in s.reason for s in ropes)
    norms = [s for s in plan.steps if s.node.op == "norm"]
    assert norms and all(s.impl == "native.layer_norm" for s in norms), [(s.impl, s.reason) for s in norms]
    assert not [s for s in plan.steps if s.node.op == "residual_norm"]


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


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_rms_norm_float32_weight_under_half_activations(dtype):
    kernel = _kernels()["native.rms_norm"]
    x = torch.randn(2, 3, 4096, device="cuda").to(dtype)
    w = 1 + 0.1 * torch.randn(4096, device="cuda")
    node = norm_node(4096, dtype, False)
    got = kernel.fn(None, node, [x], {"weight": w})
    want = ops.norm(None, node, [x], {"weight": w})  # (w.float() * normed).to(x.dtype)
    _assert_within_one_ulp(got, want, dtype, "fp32 weight")


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
    kernel = _kernels()["native.layer_norm"]
    x = torch.randn(2, 3, 4096, device="cuda").to(dtype)
    params = {"weight": 1 + 0.1 * torch.randn(4096, device="cuda"), "bias": 0.1 * torch.randn(4096, device="cuda")}
    node = norm_node(4096, dtype, False, kind="layernorm")
    got = kernel.fn(None, node, [x], params)
    want = ops.norm(None, node, [x], params)
    _assert_within_one_ulp(got, want, dtype, "fp32 weight and bias")


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


# ------------------------------------------------------------------------------------- RoPE
ROPE_CASES = [(1, 1, 1, 1, 2, 2), (2, 3, 4, 2, 8, 4), (1, 5, 32, 2, 128, 64), (2, 2, 6, 6, 64, 64),
              (1, 4, 3, 1, 96, 32)]  # (B, T, nh, nkv, hd, rotary_dim)


def _rope_inputs(b, t, nh, nkv, hd, rd, dtype, g, device="cpu"):
    qkv = (2 * torch.randn(b, t, (nh + 2 * nkv) * hd, generator=g)).to(dtype).to(device)
    positions = (torch.arange(t)[None, :] + torch.randint(0, 3000, (b, 1), generator=g)).to(device)  # (B, T)
    return qkv, positions


@needs_gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rope_interleaved_matches_reference(dtype):
    kernel = _kernels()["native.rope_interleaved"]
    g = torch.Generator().manual_seed(4)
    for b, t, nh, nkv, hd, rd in ROPE_CASES:
        node = rope_node(nh, nkv, hd, rd, dtype)
        assert kernel.supports(node) is None
        qkv, positions = _rope_inputs(b, t, nh, nkv, hd, rd, dtype, g, device="cuda")
        ctx = ops.ForwardContext(positions=positions, allowed=None)
        got = kernel.fn(ctx, node, [qkv], {})
        want = ops.rope(ops.ForwardContext(positions=positions, allowed=None), node, [qkv], {})
        for name, x, y in zip("qkv", got, want):
            assert x.shape == y.shape and x.dtype == y.dtype, name
            assert torch.equal(x, y), f"rope {name} B{b} T{t} nh{nh} nkv{nkv} hd{hd} rd{rd} {dtype}: {_first_mismatch(x, y)}"
        assert len(ctx.memo) == 1  # the tables are memoized for the other layers, as ops.rope does


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


@needs_gpu
@pytest.mark.parametrize("bits", [8, 4])
def test_quant_gemv_prefill_sized_m_takes_the_reference_path(bits):
    kernel = _kernels()["native.quant_gemv"]
    x, stored, scale, b = _realistic(3 * 7, 64, 256, bits, 32, torch.bfloat16, True, seed=3)
    node = linear_node(256, 64, torch.bfloat16, bits, 32)
    params = {"weight": stored.cuda(), "scale": scale.cuda(), "bias": b.cuda()}
    xd = x.cuda().view(3, 7, 256)  # M = 21 > GEMV_MAX_M
    assert torch.equal(kernel.fn(None, node, [xd], params), ops.linear(None, node, [xd], params))


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
               "-x", "c++", *(str(GPU_SOURCES / f) for f in ("norm.cu", "gemv_quant.cu", "rope.cu", "runtime.cu")),
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
    if isinstance(module, str):
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


@pytest.mark.parametrize("round_before_weight", [False, True])
def test_emulated_rms_norm(emulated, round_before_weight):
    g = torch.Generator().manual_seed(5)
    for dtype in DTYPES:
        for shape in [(1, 1, 1), (1, 3, 7), (2, 1, 257), (1, 1, 4096)]:
            x = (3 * torch.randn(shape, generator=g)).to(dtype)
            w = (1 + 0.2 * torch.randn(shape[-1], generator=g)).to(dtype)
            node = norm_node(shape[-1], dtype, round_before_weight)
            want = ops.norm(None, node, [x], {"weight": w})
            out = torch.empty_like(x)
            _within_timeout(emulated.rms_norm, x.data_ptr(), CODES[dtype], w.data_ptr(), CODES[dtype], out.data_ptr(),
                            x.numel() // shape[-1], shape[-1], 1e-5, round_before_weight, 0, 0)
            _assert_within_one_ulp(out, want, dtype, f"emulated rms_norm {shape} {dtype}")


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
    dtype = res.dtype
    scaled = res if alpha == 1.0 else (res.float() * torch.tensor(alpha, dtype=torch.float32)).to(dtype)
    h = (branch.float() + scaled.float()).to(dtype)
    hf = h.double()
    normed = (hf / torch.sqrt((hf * hf).mean(-1, keepdim=True) + eps)).float()
    if round_before_weight:
        product = torch.promote_types(w.dtype, dtype)
        y = (w.to(product) * normed.to(dtype).to(product)).to(dtype)
    else:
        y = (w.float() * normed).to(dtype)
    return h, y


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
                                w.data_ptr(), CODES[dtype], h.data_ptr() if emit else 0, y.data_ptr(), rows,
                                shape[-1], 1e-5, round_before_weight, 0, 0)
                what = f"emulated residual_rms_norm {shape} {dtype} alpha={alpha} emit={emit}"
                if emit:
                    assert torch.equal(h, want_h), f"{what}: h {_first_mismatch(h, want_h)}"
                else:
                    assert bool(h.isnan().all()), f"{what}: h was written though h_out is 0"
                _assert_within_one_ulp(y, want_y, dtype, what)


def _independent_rope(qkv, cos, sin, nh, nkv, hd):
    """Pair (x[2i], x[2i+1]) of every q and k head rotated by angle i, each product and sum in fp32
    rounded to the dtype; the dims past 2 * cos.shape[-1] unchanged."""
    dtype = qkv.dtype
    rows = qkv.shape[0] * qkv.shape[1]
    heads = qkv.reshape(rows, nh + 2 * nkv, hd)[:, :nh + nkv].clone()  # (rows, nh + nkv, hd)
    half = cos.shape[-1]
    c = cos.reshape(rows, 1, half).float()
    s = sin.reshape(rows, 1, half).float()
    x0, x1 = heads[..., 0:2 * half:2].float().clone(), heads[..., 1:2 * half:2].float().clone()

    def r(v):
        return v.to(dtype).float()

    heads[..., 0:2 * half:2] = (r(x0 * c) - r(x1 * s)).to(dtype)
    heads[..., 1:2 * half:2] = (r(x1 * c) + r(x0 * s)).to(dtype)
    return heads[:, :nh], heads[:, nh:]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_rope_interleaved(emulated, dtype):
    g = torch.Generator().manual_seed(8)
    for b, t, nh, nkv, hd, rd in ROPE_CASES + [(1, 2, 4, 2, 128, 0)]:
        qkv, positions = _rope_inputs(b, t, nh, nkv, hd, rd, dtype, g)
        cos, sin = (x.contiguous() for x in ops.rope_tables(positions, rd, 10000.0, dtype, "float32"))
        want_q, want_k = _independent_rope(qkv, cos, sin, nh, nkv, hd)
        q = torch.full((b * t, nh, hd), float("nan"), dtype=dtype)
        k = torch.full((b * t, nkv, hd), float("nan"), dtype=dtype)
        _within_timeout(emulated.rope_interleaved, qkv.data_ptr(), CODES[dtype], cos.data_ptr(), sin.data_ptr(),
                        q.data_ptr(), k.data_ptr(), b * t, nh, nkv, hd, rd, 0, 0)
        what = f"emulated rope B{b} T{t} nh{nh} nkv{nkv} hd{hd} rd{rd} {dtype}"
        assert torch.equal(q, want_q), f"{what}: q {_first_mismatch(q, want_q)}"
        assert torch.equal(k, want_k), f"{what}: k {_first_mismatch(k, want_k)}"
        if rd:  # and the reference op agrees with the independent formula
            ref_q, ref_k, _ = ops.rope(ops.ForwardContext(positions=positions, allowed=None),
                                       rope_node(nh, nkv, hd, rd, dtype), [qkv], {})
            assert torch.equal(ref_q.reshape(b * t, nh, hd), want_q) and torch.equal(ref_k.reshape(b * t, nkv, hd), want_k)
