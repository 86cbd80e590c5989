"""The sunway backend: LDM-tiled native kernels (glmrt._native_sunway) and the swDeepSpeed shim.

Native-kernel tests skip where the module is not built (a source-tree run); everything else runs
anywhere. No SW26010-Pro and no swDeepSpeed exist here: the tiling runs on the host CPU, and the
shim is checked against DeepSpeed 0.19's documented signatures and config rules (and against the
real deepspeed package, where it happens to be installed).
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os
import socket
import subprocess
import sys
import textwrap
from datetime import timedelta

import pytest
import torch

import glmrt
from glmrt import _native, ops
from glmrt.backends import get_backend
from glmrt.backends.base import NATIVE, VENDOR
from glmrt.errors import ConfigError, InputError
from glmrt.graph import Node, ValueSpec, build_graph
from glmrt.lowering import lower
from glmrt.quant import pack_int4, quantize_graph, quantize_weight

native, why_not_built = _native.load("_native_sunway")
needs_native = pytest.mark.glmrt_native(available=native is not None,
                                        reason=f"glmrt._native_sunway not built: {why_not_built}")

LDM = 256 * 1024


def test_native_module_is_built_when_required():
    if os.environ.get("GLMRT_REQUIRE_NATIVE") == "1":
        assert native is not None, why_not_built


# ----------------------------------------------------------------------------- backend
def test_backend_names_and_aliases():
    for name in ("sunway", "sw", "swdeepspeed", "SW"):
        assert get_backend(name).name == "sunway"


def test_probe_and_verification_say_what_was_verified():
    backend = get_backend("sunway")
    probe = backend.probe()
    assert probe.available and "host CPU" in probe.reason
    assert ("not built" in probe.reason) == (native is None)
    v = backend.verification()
    assert v.level == "contract-verified"
    for phrase in ("x86-64 host CPUs emulating the Sunway tiling", "never run on SW26010-Pro hardware",
                   "swDeepSpeed API is not public", "mirrors DeepSpeed's public API"):
        assert phrase in v.detail
    row = next(r for r in glmrt.list_backends() if r["name"] == "sunway")
    assert row["available"] and row["verification"] == "contract-verified"


def test_without_the_native_module_every_op_runs_torch_cpu_ops(monkeypatch):
    from glmrt.backends.sunway import kernels
    monkeypatch.setattr(kernels, "native", lambda: (None, "glmrt._native_sunway is not built (test)"))
    backend = get_backend("sunway")
    assert "not built" in backend.probe().reason
    assert backend.native_info()["built"] is False
    assert {k.kind for k in backend.kernels()} == {VENDOR}
    cfg = _tiny_config()
    graph = build_graph(cfg, torch.float16)
    plan = lower(graph, backend, _meta_weights(graph), strict=True)  # torch CPU ops: no fallback
    assert {s.impl for s in plan.steps} == {f"torch-cpu.{n.op}" for n in graph.nodes}


def test_import_of_glmrt_does_not_import_the_shim_or_vendor_modules():
    code = ("import sys, glmrt; glmrt.list_backends(); "
            "print([m for m in ('swDeepSpeed', 'deepspeed', 'glmrt.backends.sunway.swdeepspeed') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _tiny_config(**over):
    from glmrt.models import PRESETS, config_from_dict
    _, cfg = config_from_dict(dict(PRESETS["chatglm3-6b"]))
    return cfg.replace(num_layers=1, **over)


def _meta_weights(graph):
    return {n: torch.empty(p.shape, dtype=p.dtype, device="meta") for n, p in graph.params.items()}


@needs_native
@pytest.mark.parametrize("quant", [None, (8, 0), (4, 32), (4, 128)])
def test_plan_runs_linear_lm_head_and_norm_natively(quant):
    graph = build_graph(_tiny_config(), torch.float16)
    if quant:
        graph = quantize_graph(graph, *quant)
    plan = lower(graph, get_backend("sunway"), _meta_weights(graph), strict=True)
    kinds = {(s.node.op, s.kind) for s in plan.steps}
    assert {("linear", NATIVE), ("lm_head", NATIVE), ("norm", NATIVE)} <= kinds
    assert ("linear", VENDOR) not in kinds


@needs_native
def test_supports_refuses_what_the_tiles_cannot_take():
    kernel = next(k for k in get_backend("sunway").kernels() if k.name == "sunway.tiled_linear")
    node = _linear_node(8, 64, 64, torch.float32, quant=(4, 48))
    assert "group of 48" in kernel.supports(node)
    assert "int8 and int4" in kernel.supports(_linear_node(8, 64, 64, torch.float32, quant=(2, 0)))
    assert "float32, bfloat16 or float16" in kernel.supports(_linear_node(8, 64, 64, torch.float64))
    assert kernel.supports(_linear_node(8, 64, 64, torch.bfloat16, quant=(4, 256))) is None


# ----------------------------------------------------------------------------- LDM tiling
@needs_native
def test_native_info_names_the_module_and_what_it_was_built_for():
    info = get_backend("sunway").native_info()
    assert info["built"] and info["module"] == "glmrt._native_sunway"
    assert info["archs"] == [f"{native.target_arch()}-{p}" for p in native.isa_paths()]
    assert native.isa_paths()[-1] == "scalar" and info["simd"] in native.isa_paths()
    assert "not built for or run on sw_64 hardware" in info["reason"]
    assert info["ldm_bytes"] == LDM and info["logical_workers"] == 64


@needs_native
def test_ldm_constants():
    assert native.LDM_BYTES == LDM
    assert native.LOGICAL_WORKERS == 64
    assert native.LDM_RESERVE_BYTES > 0 and native.LDM_TILE_BUDGET == LDM - native.LDM_RESERVE_BYTES
    assert 1 <= native.host_threads() <= 64


def _run_linear(bits, group, M, N, K, dtype=torch.float32):
    """One call of sunway.tiled_linear; returns the LDM bytes its busiest worker actually held."""
    x = torch.randn(1, M, K).to(dtype)
    w = (0.05 * torch.randn(N, K)).to(dtype)
    params = {"weight": w, "bias": torch.zeros(N, dtype=dtype)}
    if bits:
        params["weight"], params["scale"] = quantize_weight(w, bits, group, dtype)
    node = _linear_node(M, N, K, dtype, (bits, group) if bits else None, bias=True)
    kernel = next(k for k in get_backend("sunway").kernels() if k.name == "sunway.tiled_linear")
    assert kernel.supports(node) is None
    kernel.fn(None, node, [x], params)
    return native.last_ldm_peak()


@needs_native
@pytest.mark.parametrize("bits,group", [(0, 0), (8, 0), (4, 0), (8, 32), (4, 32), (4, 64), (4, 128), (8, 256)])
def test_every_linear_tile_fits_the_ldm(bits, group):
    """Every shape of the sweep is planned, and for every tile variant the planner picks on it
    ((tile_m, tile_n, tile_k), which alone sizes a worker's buffers) the cheapest shape that gets it
    is RUN: the LDM its busiest logical worker actually held (last_ldm_peak) must be the plan's
    count and within the budget -- the plan's arithmetic is not trusted on its own."""
    cheapest = {}
    for M in (1, 2, 7, 32, 33, 100, 4096):
        for N in (1, 9, 128, 129, 4608, 13696, 65024, 151552):
            for K in (1, 45, 255, 256, 257, 4096, 13696):
                plan = native.linear_plan(bits, M, N, K, group)
                assert plan["ldm_bytes"] == sum(plan["buffer_bytes"].values())
                assert plan["fits"] and plan["ldm_bytes"] <= native.LDM_TILE_BUDGET < LDM, plan
                assert plan["tile_m"] <= native.TILE_M and plan["tile_n"] <= native.TILE_N_MAX
                assert plan["tile_k"] <= native.TILE_K
                assert plan["tiles"] == -(-M // plan["tile_m"]) * -(-N // plan["tile_n"])
                if group:
                    assert native.TILE_K % group == 0 or plan["k_slices"] == 1  # a slice never cuts a group
                tile = (plan["tile_m"], plan["tile_n"], plan["tile_k"])
                if tile not in cheapest or M * N * K < cheapest[tile][0] * cheapest[tile][1] * cheapest[tile][2]:
                    cheapest[tile] = (M, N, K, plan["ldm_bytes"])
    # A worker's buffers grow with each tile size, so the tiles no other tile dominates bound all
    # the others: those are run (with the smallest tiles, for the kernel's small-shape paths).
    def dominated(t):
        return any(o != t and all(a >= b for a, b in zip(o, t)) for o in cheapest)
    run = [t for t in cheapest if not dominated(t)] + [min(cheapest)]
    for tile in sorted(set(run)):
        M, N, K, planned = cheapest[tile]
        used = _run_linear(bits, group, M, N, K)
        assert used == planned <= native.LDM_TILE_BUDGET, (tile, (M, N, K), used, planned)
    assert max(cheapest[t][3] for t in run) > native.LDM_TILE_BUDGET // 2  # the big tiles ran


@needs_native
def test_small_outputs_are_cut_for_all_64_workers():
    plan = native.linear_plan(0, 1, 4096, 4096, 0)  # a decode GEMV of the hidden size
    assert plan["tiles"] >= 64
    plan = native.linear_plan(0, 1, 65024, 4096, 0)
    assert plan["tile_n"] == native.TILE_N_MAX  # wide outputs use the widest tile


@needs_native
def test_unsupported_group_sizes_are_refused_by_the_planner():
    for group in (16, 48, 96, 512):
        with pytest.raises(ValueError, match="group_size"):
            native.linear_plan(4, 1, 64, 1024, group)


@needs_native
@pytest.mark.parametrize("cols", [1, 7, 4096, 4097, 13696, 151552])
def test_norm_chunks_fit_the_ldm(cols):
    """Planned and RUN: the arena bytes the norm kernels actually held (last_ldm_peak) within the
    plan's count and the budget."""
    plan = native.norm_plan(3, cols, True)
    assert plan["chunk"] <= native.NORM_CHUNK and plan["chunks"] == -(-cols // plan["chunk"])
    assert plan["ldm_bytes"] == sum(plan["buffer_bytes"].values()) <= native.LDM_TILE_BUDGET
    kernel = next(k for k in get_backend("sunway").kernels() if k.name == "sunway.tiled_norm")
    x = torch.randn(1, 3, cols)
    for kind, has_bias in (("layernorm", True), ("rmsnorm", False)):
        params = {"weight": torch.ones(cols), **({"bias": torch.zeros(cols)} if has_bias else {})}
        node = Node("n", "norm", ["x"], ["y"], {}, {"kind": kind, "eps": 1e-5, "round_before_weight": False},
                    [ValueSpec(("B", "T", cols), torch.float32)], [ValueSpec(("B", "T", cols), torch.float32)])
        kernel.fn(None, node, [x], params)
        used = native.last_ldm_peak()
        assert 0 < used <= native.norm_plan(3, cols, has_bias)["ldm_bytes"] <= native.LDM_TILE_BUDGET, (kind, used)


# ----------------------------------------------------------------------------- kernels vs reference
def _linear_node(M, N, K, dtype, quant=None, bias=False):
    attrs = {"in_features": K, "out_features": N}
    if quant:
        attrs["quant"] = {"bits": quant[0], "group_size": quant[1], "in_features": K}
    params = {"weight": "w", **({"bias": "b"} if bias else {}), **({"scale": "s"} if quant else {})}
    return Node("l", "linear", ["x"], ["y"], params, attrs, [ValueSpec(("B", "T", K), dtype)],
                [ValueSpec(("B", "T", N), dtype)])


TOL = {torch.float32: 2e-5, torch.bfloat16: 8e-3, torch.float16: 2e-3}


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("quant", [None, (8, 0), (4, 0), (8, 32), (4, 32), (4, 64), (4, 128)])
@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (3, 7, 5), (1, 257, 300), (37, 130, 513), (5, 64, 4096)])
def test_tiled_linear_matches_reference(dtype, quant, M, N, K):
    g = torch.Generator().manual_seed(M * 1000 + N + K)
    x = torch.randn(1, M, K, generator=g).to(dtype)
    w = (0.1 * torch.randn(N, K, generator=g)).to(dtype)
    params = {"weight": w, "bias": (0.1 * torch.randn(N, generator=g)).to(dtype)}
    if quant:
        params["weight"], params["scale"] = quantize_weight(w, quant[0], quant[1], dtype)
    node = _linear_node(M, N, K, dtype, quant, bias=True)
    kernel = next(k for k in get_backend("sunway").kernels() if k.name == "sunway.tiled_linear")
    assert kernel.supports(node) is None
    got = kernel.fn(None, node, [x], params)
    want = ops.linear(None, node, [x], params)
    assert got.dtype == dtype and got.shape == want.shape
    scale = want.float().abs().max().item()
    assert (got.float() - want.float()).abs().max().item() <= TOL[dtype] * max(scale, 1.0)


@needs_native
def test_int4_even_index_is_the_high_nibble():
    # W = [[1, -2, 3]] packed as bytes (1 << 4 | -2 & 0xF), (3 << 4 | 0): x = [1, 10, 100] -> 281.
    q = pack_int4(torch.tensor([[1, -2, 3]], dtype=torch.int8))
    assert q.tolist() == [[0x1E, 0x30]]
    node = _linear_node(1, 1, 3, torch.float32, quant=(4, 0))
    kernel = next(k for k in get_backend("sunway").kernels() if k.name == "sunway.tiled_linear")
    got = kernel.fn(None, node, [torch.tensor([[[1.0, 10.0, 100.0]]])], {"weight": q, "scale": torch.ones(1)})
    assert got.item() == 281.0


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind,round_before_weight", [("rmsnorm", False), ("rmsnorm", True), ("layernorm", False)])
@pytest.mark.parametrize("cols", [1, 45, 4096, 4100, 13696])
def test_tiled_norms_match_reference(dtype, kind, round_before_weight, cols):
    g = torch.Generator().manual_seed(cols)
    x = (2 * torch.randn(2, 3, cols, generator=g) + 0.5).to(dtype)
    params = {"weight": (1 + 0.2 * torch.randn(cols, generator=g)).to(dtype)}
    if kind == "layernorm":
        params["bias"] = (0.1 * torch.randn(cols, generator=g)).to(dtype)
    node = Node("n", "norm", ["x"], ["y"], {}, {"kind": kind, "eps": 1e-5, "round_before_weight": round_before_weight},
                [ValueSpec(("B", "T", cols), dtype)], [ValueSpec(("B", "T", cols), dtype)])
    kernel = next(k for k in get_backend("sunway").kernels() if k.name == "sunway.tiled_norm")
    got = kernel.fn(None, node, [x], params)
    want = ops.norm(None, node, [x], params)
    ulp = {torch.float32: 1e-5, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}[dtype]
    scale = max(want.float().abs().max().item(), 1.0)
    assert (got.float() - want.float()).abs().max().item() <= 2 * ulp * scale


@needs_native
def test_lm_head_last_only():
    kernel = next(k for k in get_backend("sunway").kernels() if k.name == "sunway.tiled_lm_head")
    node = Node("h", "lm_head", ["x"], ["y"], {"weight": "w"}, {"vocab_size": 11},
                [ValueSpec(("B", "T", 8), torch.float32)], [ValueSpec(("B", "T", 11), torch.float32)])
    x, w = torch.randn(2, 5, 8), torch.randn(11, 8)
    ctx = ops.ForwardContext(positions=torch.zeros(2, 5), allowed=torch.ones(2, 1, 5, 5, dtype=torch.bool),
                             last_only=True)
    got = kernel.fn(ctx, node, [x], {"weight": w})
    torch.testing.assert_close(got, ops.lm_head(ctx, node, [x], {"weight": w}), atol=1e-5, rtol=1e-5)
    assert got.shape == (2, 1, 11)


# ----------------------------------------------------------------------------- glmrt check
def check_command() -> list[str]:
    """`glmrt check`, or the module itself until the command is registered in glmrt.cli."""
    from glmrt import cli
    if "glmrt.conformance" in cli._COMMAND_MODULES:
        return [sys.executable, "-m", "glmrt", "check"]
    return [sys.executable, "-m", "glmrt.conformance"]


def test_glmrt_check_passes_for_sunway():
    """Every kernel over the sweep, then synthetic:chatglm3-6b (1 layer, fp16) against CPU fp32."""
    proc = subprocess.run(check_command() + ["--backend", "sunway", "--json"], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(proc.stdout)
    assert result["passed"] and result["backend"] == "sunway"
    kernels = {row["kernel"]: row for row in result["kernels"]}
    if native is not None:
        for name in ("sunway.tiled_linear", "sunway.tiled_lm_head", "sunway.tiled_norm"):
            assert kernels[name]["status"] == "pass" and kernels[name]["cases"] > 0
    model = {row["kernel"]: row for row in result["model"]}
    assert model["logits"]["status"] == "pass" and model["greedy 8 tokens"]["status"] == "pass"
    greedy = model["greedy 8 tokens"]  # every token the argmax except at counted near-ties
    assert greedy["cases"] == 16 and greedy["argmax"] + greedy["near_tie_flips"] == 16
    assert greedy["near_tie_flips"] <= greedy["near_ties"] and "near-ties" in greedy["detail"]
    assert not [row for row in result["kernels"] if row["status"] == "fallback"]


# ----------------------------------------------------------------------------- the swDeepSpeed shim
from glmrt.backends.sunway import swdeepspeed as deepspeed  # noqa: E402  (the documented import)
from glmrt.backends.sunway.swdeepspeed import comm  # noqa: E402
from glmrt.backends.sunway.swdeepspeed.config import (DeepSpeedAssertionError,  # noqa: E402
                                                      TrainingNotSupportedError, parse_inference_config)

_ = object()  # "no default" in the tables below
# DeepSpeed 0.19's public signatures (deepspeed/__init__.py, deepspeed/comm/comm.py), as documented
# in ACCELERATORS.md: parameter names in order, with their defaults.
DEEPSPEED_SIGNATURES = {
    "initialize": [("args", None), ("model", None), ("optimizer", None), ("model_parameters", None),
                   ("training_data", None), ("lr_scheduler", None), ("distributed_port", 29500), ("mpu", None),
                   ("dist_init_required", None), ("collate_fn", None), ("config", None), ("mesh_param", None),
                   ("config_params", None)],
    "init_inference": [("model", _), ("config", None), ("kwargs", _)],
    "init_distributed": [("dist_backend", None), ("auto_mpi_discovery", True), ("distributed_port", 29500),
                         ("verbose", True), ("timeout", timedelta(minutes=int(os.getenv("DEEPSPEED_TIMEOUT", "10")))),
                         ("init_method", None), ("dist_init_required", None), ("config", None), ("rank", -1),
                         ("world_size", -1)],
}
COMM_SIGNATURES = {  # leading parameters (DeepSpeed adds prof, log_name, debug after them)
    "all_reduce": ["tensor", "op", "group", "async_op"],
    "inference_all_reduce": ["tensor", "op", "group", "async_op"],
    "broadcast": ["tensor", "src", "group", "async_op"],
    "all_gather": ["tensor_list", "tensor", "group", "async_op"],
    "all_gather_into_tensor": ["output_tensor", "tensor", "group", "async_op"],
    "reduce": ["tensor", "dst", "op", "group", "async_op"],
    "reduce_scatter": ["output", "input_list", "op", "group", "async_op"],
    "reduce_scatter_tensor": ["output_tensor", "tensor", "op", "group", "async_op"],
    "all_to_all_single": ["output", "tensor", "output_split_sizes", "input_split_sizes", "group", "async_op"],
    "gather": ["tensor", "gather_list", "dst", "group", "async_op"],
    "scatter": ["tensor", "scatter_list", "src", "group", "async_op"],
    "send": ["tensor", "dst", "group", "tag"],
    "recv": ["tensor", "src", "group", "tag"],
    "barrier": ["group", "async_op", "device_ids"],
    "get_rank": ["group"],
    "get_world_size": ["group"],
    "get_local_rank": [],
    "get_global_rank": ["group", "group_rank"],
    "is_initialized": [],
    "new_group": ["ranks"],
    "destroy_process_group": ["group"],
}


@pytest.mark.parametrize("name", sorted(DEEPSPEED_SIGNATURES))
def test_entry_points_have_deepspeeds_signatures(name):
    params = list(inspect.signature(getattr(deepspeed, name)).parameters.values())
    got = [(p.name, _ if p.default is inspect.Parameter.empty else p.default) for p in params]
    assert got == DEEPSPEED_SIGNATURES[name]
    if name == "init_inference":
        assert params[-1].kind is inspect.Parameter.VAR_KEYWORD


@pytest.mark.parametrize("name", sorted(COMM_SIGNATURES))
def test_comm_mirrors_deepspeed_comm(name):
    params = list(inspect.signature(getattr(comm, name)).parameters)
    expected = COMM_SIGNATURES[name]
    assert params[:len(expected)] == expected
    if "op" in expected:
        assert inspect.signature(getattr(comm, name)).parameters["op"].default is comm.ReduceOp.SUM
    assert deepspeed.comm is comm and deepspeed.init_distributed is comm.init_distributed


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="the deepspeed package is not installed")
def test_signatures_match_the_installed_deepspeed():
    real = pytest.importorskip("deepspeed")
    for name in ("initialize", "init_inference", "init_distributed"):
        ours = list(inspect.signature(getattr(deepspeed, name)).parameters)
        assert ours == list(inspect.signature(getattr(real, name)).parameters), name
    for name, expected in COMM_SIGNATURES.items():
        theirs = list(inspect.signature(getattr(real.comm, name)).parameters)
        assert list(inspect.signature(getattr(comm, name)).parameters) == theirs, name


# --- init_inference's config, by DeepSpeed's rules
def test_mp_size_and_tensor_parallel_tp_size_together_raise_even_when_equal():
    for tp in (1, 2):
        with pytest.raises(AssertionError, match="Cannot provide deprecated parameter 'mp_size'"):
            parse_inference_config(mp_size=tp, tensor_parallel={"tp_size": tp})
    with pytest.raises(DeepSpeedAssertionError):
        parse_inference_config(config={"mp_size": 1}, tp={"tp_size": 1})  # "tp" is tensor_parallel's alias
    assert parse_inference_config(mp_size=1).tp_size == 1  # the deprecated alias alone is fine


def test_config_and_kwargs_that_disagree_raise():
    with pytest.raises(ValueError, match="Conflicting argument 'dtype'"):
        parse_inference_config(config={"dtype": torch.float16}, dtype=torch.bfloat16)
    cfg = parse_inference_config(config={"dtype": torch.float16, "max_out_tokens": 64}, dtype=torch.float16)
    assert cfg.dtype == torch.float16 and cfg.max_out_tokens == 64


def test_a_field_and_its_alias_together_raise():
    for name, alias, value in (("replace_with_kernel_inject", "kernel_inject", True),
                               ("max_out_tokens", "max_tokens", 16), ("tensor_parallel", "tp", {"tp_size": 1})):
        with pytest.raises(ValueError, match="alias"):
            parse_inference_config(**{name: value, alias: value})
        assert parse_inference_config(**{alias: value}).given[name] == value


def test_defaults_and_dtype_names():
    cfg = parse_inference_config()
    assert (cfg.dtype, cfg.tp_size, cfg.replace_with_kernel_inject, cfg.max_out_tokens) == (torch.float16, 1, False,
                                                                                           1024)
    for name, dtype in (("fp16", torch.float16), ("half", torch.float16), ("bf16", torch.bfloat16),
                        ("torch.float32", torch.float32), ("int8", torch.int8)):
        assert parse_inference_config(dtype=name).dtype == dtype
    assert parse_inference_config(dtype="int8").quantize == "int8"
    assert parse_inference_config(kernel_inject=True).replace_with_kernel_inject
    assert parse_inference_config(dtype="auto").dtype == torch.float16  # "auto" counts as not given


@pytest.mark.parametrize("kwargs,error,match", [
    ({"dtype": "fp8"}, ValueError, "DtypeEnum"),
    ({"dtype": 3}, TypeError, "Invalid type for dtype"),
    ({"max_out_tokens": 0}, ValueError, "greater than 0"),
    ({"no_such_field": 1}, ValueError, "unknown field"),
    ({"tensor_parallel": {"tp_size": 0}}, ConfigError, "positive integer"),
    ({"tensor_parallel": {"size": 1}}, ConfigError, "unknown field"),
    ({"enable_cuda_graph": True}, ConfigError, "graph capture"),
    ({"checkpoint": "ds.json"}, ConfigError, "checkpoint"),
    ({"replace_with_kernel_inject": "yes"}, ConfigError, "bool"),
])
def test_bad_inference_configs_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        parse_inference_config(**kwargs)


def test_config_must_be_a_dict_or_a_json_path(tmp_path):
    with pytest.raises(ValueError, match="expected string or dictionary"):
        parse_inference_config(config=42)
    path = tmp_path / "ds_inference.json"
    path.write_text(json.dumps({"dtype": "bf16", "tensor_parallel": {"tp_size": 1}, "max_out_tokens": 99}))
    cfg = parse_inference_config(config=str(path))
    assert (cfg.dtype, cfg.max_out_tokens) == (torch.bfloat16, 99)


# --- engines on a real (1-layer, real-width) model
@pytest.fixture(scope="module")
def cpu_model():
    return glmrt.load("synthetic:chatglm3-6b", layers=1, backend="cpu", dtype="float32", progress=False)


@pytest.fixture
def no_process_group():
    yield
    if comm.is_initialized():
        comm.destroy_process_group()


PROMPT = [[11, 22, 33, 44, 55]]


def test_init_inference_generates_on_the_sunway_backend(cpu_model):
    engine = deepspeed.init_inference(cpu_model, tensor_parallel={"tp_size": 1}, dtype=torch.half,
                                      replace_with_kernel_inject=True, max_out_tokens=32)
    assert isinstance(engine, deepspeed.InferenceEngine)
    assert engine.module.backend.name == "sunway" and engine.dtype == torch.float16
    assert engine.mp_world_size == 1 and not engine.module.plan.fallbacks()  # kernel inject = strict lowering
    out = engine.generate(PROMPT, max_new_tokens=6)
    assert out.shape == (1, 11) and out[0, :5].tolist() == PROMPT[0]
    # The same model loaded directly onto the backend generates the same tokens.
    direct = glmrt.load("synthetic:chatglm3-6b", layers=1, backend="sunway", dtype="float16", progress=False)
    assert torch.equal(out, direct.generate(PROMPT, max_new_tokens=6))
    logits = engine(torch.tensor(PROMPT))
    assert logits.shape == (1, 5, cpu_model.config.vocab_size) and logits.dtype == torch.float32
    with pytest.raises(InputError, match="max_out_tokens=32"):
        engine.generate(PROMPT, max_new_tokens=40)
    with pytest.raises(NotImplementedError, match="num_beams"):
        engine.generate(PROMPT, max_new_tokens=2, num_beams=4)


def test_init_inference_int8_and_refuses_torch_modules(cpu_model):
    engine = deepspeed.init_inference(cpu_model, dtype=torch.int8)  # DeepSpeed's int8: weight-only int8 here
    assert engine.dtype == torch.float16
    assert any("quant" in n.attrs for n in engine.module.graph.nodes)
    assert engine.generate(PROMPT, max_new_tokens=2).shape == (1, 7)
    with pytest.raises(ConfigError, match="torch.nn.Module"):
        deepspeed.init_inference(torch.nn.Linear(2, 2))


def test_initialize_returns_deepspeeds_four_tuple(cpu_model, no_process_group):
    engine, optimizer, dataloader, scheduler = deepspeed.initialize(model=cpu_model,
                                                                    config={"fp16": {"enabled": True}})
    assert (optimizer, dataloader, scheduler) == (None, None, None)
    assert isinstance(engine, deepspeed.DeepSpeedEngine)
    assert engine.module.backend.name == "sunway" and engine.dtype == torch.float16
    assert comm.is_initialized() and comm.get_world_size() == 1 and engine.global_rank == 0
    assert engine.eval() is engine
    assert engine.generate(PROMPT, max_new_tokens=2).shape == (1, 7)
    for call in (lambda: engine.train(), lambda: engine.backward(torch.zeros(())), lambda: engine.step()):
        with pytest.raises(TrainingNotSupportedError, match="inference"):
            call()


def test_initialize_refuses_training(cpu_model, no_process_group):
    params = [torch.nn.Parameter(torch.zeros(2))]
    for kwargs in ({"optimizer": torch.optim.SGD(params, lr=0.1)}, {"model_parameters": params},
                   {"lr_scheduler": object()}, {"training_data": [1, 2]}):
        with pytest.raises(TrainingNotSupportedError, match="inference-only"):
            deepspeed.initialize(model=cpu_model, config={}, **kwargs)
    with pytest.raises(TrainingNotSupportedError, match="'optimizer' section"):
        deepspeed.initialize(model=cpu_model, config={"optimizer": {"type": "Adam", "params": {"lr": 1e-4}}})


def test_initialize_config_rules(cpu_model, tmp_path, no_process_group):
    with pytest.raises(AssertionError, match="requires a model"):
        deepspeed.initialize(config={})
    with pytest.raises(AssertionError, match="deepspeed_config"):
        deepspeed.initialize(model=cpu_model)
    with pytest.raises(AssertionError, match="simultaneously"):
        deepspeed.initialize(model=cpu_model, config={"fp16": {"enabled": True}, "bf16": {"enabled": True}})
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True}}))

    class Args:
        deepspeed_config = str(path)

    engine, *_ = deepspeed.initialize(args=Args(), model=cpu_model)
    assert engine.dtype == torch.bfloat16 and engine.config["train_micro_batch_size_per_gpu"] == 1
    with pytest.raises(AssertionError, match="Not sure how to proceed"):
        deepspeed.initialize(args=Args(), model=cpu_model, config={})


def test_dist_init_required_false_needs_a_process_group(cpu_model, no_process_group):
    with pytest.raises(AssertionError, match="Distributed backend is not initialized"):
        deepspeed.initialize(model=cpu_model, config={}, dist_init_required=False)


# --- comm
def test_comm_in_a_world_of_one(no_process_group):
    with pytest.raises(AssertionError, match="init_distributed"):
        comm.get_rank()
    deepspeed.init_distributed()
    assert comm.is_initialized() and comm.get_rank() == 0 and comm.get_world_size() == 1
    assert comm.get_local_rank() == 0 and comm.get_global_rank() == 0
    t = torch.arange(4.0)
    comm.all_reduce(t, op=comm.ReduceOp.MAX)
    comm.broadcast(t, src=0)
    comm.barrier()
    gathered = [torch.empty(4)]
    comm.all_gather(gathered, t)
    assert torch.equal(gathered[0], torch.arange(4.0))
    assert comm.collectives_provider().startswith("torch.distributed")
    comm.destroy_process_group()
    with pytest.raises(ValueError, match="gloo"):
        comm.init_distributed(dist_backend="nccl")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_all_reduce_across_two_processes_over_gloo(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(textwrap.dedent("""
        import torch
        from glmrt.backends.sunway import swdeepspeed as deepspeed
        deepspeed.init_distributed()  # RANK / WORLD_SIZE / MASTER_* from the environment, as a launcher sets
        dist = deepspeed.comm
        t = torch.full((3,), float(dist.get_rank() + 1))
        dist.all_reduce(t)
        src = torch.tensor([7.0 if dist.get_rank() == 1 else 0.0])
        dist.broadcast(src, src=1)
        dist.barrier()
        print(dist.get_rank(), dist.get_world_size(), t.tolist(), src.item())
        dist.destroy_process_group()
    """))
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    lines = sorted(out.strip() for out, _ in outs)
    assert lines == ["0 2 [3.0, 3.0, 3.0] 7.0", "1 2 [3.0, 3.0, 3.0] 7.0"]


def test_a_real_swdeepspeed_takes_the_collectives(tmp_path, monkeypatch):
    """A stand-in swDeepSpeed package (records its calls) is used for every comm call once importable."""
    package = tmp_path / "swDeepSpeed"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "comm.py").write_text(textwrap.dedent("""
        import enum
        calls = []
        class ReduceOp(enum.Enum):
            SUM = 0
            MAX = 3
        def all_reduce(tensor, op=ReduceOp.SUM, group=None, async_op=False, prof=False, log_name="all_reduce"):
            calls.append(("all_reduce", op, log_name))
            tensor.mul_(2)
        def get_rank(group=None):
            calls.append(("get_rank", group))
            return 5
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert comm.vendor_comm(refresh=True) is not None
        assert comm.collectives_provider() == "swDeepSpeed.comm"
        assert "swDeepSpeed is installed" in get_backend("sunway").probe().reason
        t = torch.ones(2)
        comm.all_reduce(t, op=comm.ReduceOp.MAX)
        assert t.tolist() == [2.0, 2.0] and comm.get_rank() == 5
        vendor = sys.modules["swDeepSpeed.comm"]
        assert vendor.calls == [("all_reduce", vendor.ReduceOp.MAX, "all_reduce"), ("get_rank", None)]
    finally:
        for name in ("swDeepSpeed.comm", "swDeepSpeed"):
            sys.modules.pop(name, None)
        monkeypatch.undo()
        comm.vendor_comm(refresh=True)
    assert comm.vendor_comm() is None


# --- tensor parallelism (init_inference(tensor_parallel={"tp_size": 2})) over two gloo processes
TP_RANK_SCRIPT = """
import json, sys, torch
from glmrt.api import synthetic_weights
from glmrt.backends import get_backend
from glmrt.backends.sunway import swdeepspeed as deepspeed
from glmrt.config import GLMConfig
from glmrt.graph import build_graph
from glmrt.lowering import lower
from glmrt.model import Model

def tiny(kind):
    base = dict(generation="tp-test", num_layers=2, max_positions=64, vocab_size=97)
    if kind == "swiglu-gqa":  # gated MLP (two halves to split), 4 heads over 2 KV heads, qkv bias
        cfg = GLMConfig(**base, hidden_size=48, num_heads=4, num_kv_heads=2, head_dim=12, ffn_hidden_size=40,
                        rotary_dim=6)
    else:  # plain GELU MLP, LayerNorm + DeepNorm, biases on the row-parallel projections (added once)
        cfg = GLMConfig(**base, hidden_size=36, num_heads=4, num_kv_heads=4, head_dim=8, ffn_hidden_size=30,
                        norm_kind="layernorm", norm_placement="deepnorm", residual_alpha=2.0 ** 0.5,
                        rope_kind="half", rotary_dim=4, activation="gelu_tanh", dense_bias=True, mlp_bias=True)
    graph = build_graph(cfg, torch.float32)
    weights = synthetic_weights(graph, seed=7)
    return Model(cfg, graph, lower(graph, get_backend("sunway"), weights), weights, "tiny " + kind)

deepspeed.init_distributed()  # RANK / WORLD_SIZE / MASTER_* from the environment, as a launcher sets them
out = {}
ids = torch.tensor([[5, 9, 17, 3, 44, 2]])
for kind in ("swiglu-gqa", "gelu-bias"):
    model = tiny(kind)
    engine = deepspeed.init_inference(model, tensor_parallel={"tp_size": 2}, dtype=torch.float32,
                                      replace_with_kernel_inject=True)
    local = engine.module
    out[kind] = {"heads": [local.config.num_heads, local.config.num_kv_heads, local.config.ffn_hidden_size],
                 "full_heads": [model.config.num_heads, model.config.num_kv_heads, model.config.ffn_hidden_size],
                 "all_reduced": sum("all-reduced" in s.reason for s in local.plan.steps),
                 "logits": engine(ids).tolist(), "tokens": engine.generate(ids, max_new_tokens=5).tolist()}
    single = deepspeed.init_inference(model, dtype=torch.float32)  # tp_size 1: the whole model here
    out[kind]["ref_logits"] = single(ids).tolist()
    out[kind]["ref_tokens"] = single.generate(ids, max_new_tokens=5).tolist()
print(json.dumps(out))
"""


def test_tensor_parallel_over_two_gloo_processes(tmp_path):
    """Two ranks each hold half the heads and half the MLP width; their logits and greedy tokens
    equal the whole model's (fp32, so only the summation order differs)."""
    script = tmp_path / "tp_rank.py"
    script.write_text(TP_RANK_SCRIPT)
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=dict(os.environ, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r),
                                                  MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
             for r in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    ranks = [json.loads(out) for out, _ in outs]
    for kind in ("swiglu-gqa", "gelu-bias"):
        full = ranks[0][kind]["full_heads"]
        for r in ranks:
            got = r[kind]
            assert got["heads"] == [n // 2 for n in full]  # each rank builds the half-width graph
            assert got["all_reduced"] == 2 * 2  # attention output and MLP down, in each of 2 layers
            want = torch.tensor(got["ref_logits"])
            assert (torch.tensor(got["logits"]) - want).abs().max().item() <= 1e-5 * want.abs().max().item()
            assert got["tokens"] == got["ref_tokens"]


def test_tensor_parallel_refusals(cpu_model, no_process_group):
    from glmrt.backends.sunway.swdeepspeed import tensor_parallel
    with pytest.raises(ConfigError, match="does not divide the world size 1"):
        deepspeed.init_inference(cpu_model, tensor_parallel={"tp_size": 2}, dtype=torch.float32)
    with pytest.raises(ConfigError, match=r"does not divide the model's attention heads \(32\)"):
        tensor_parallel.check_divisible(cpu_model.config, 3)
    tensor_parallel.check_divisible(cpu_model.config, 2)  # 32 heads, 2 KV heads, 13696

    class MPU:
        def get_model_parallel_world_size(self):
            return 2

    with pytest.raises(ConfigError, match="mpu's model-parallel size is 2"):
        parse_inference_config(tensor_parallel={"tp_size": 4, "mpu": MPU()})
    assert parse_inference_config(tensor_parallel={"mpu": MPU()}).tp_size == 2
