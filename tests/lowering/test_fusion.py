"""The residual + norm fusion pass (glmrt.fusion): which nodes it fuses for every preset, that the
fused graph computes bit for bit what the unfused graph computes (reference kernels, prefill and
KV-cache decode), and that glmrt.load / glmrt.plan fuse only where the backend has a kernel."""

import pytest
import torch

import glmrt.api
from glmrt import _native, ops
from glmrt.api import synthetic_weights
from glmrt.backends import get_backend
from glmrt.backends.base import NATIVE, VENDOR, Backend, Kernel, ProbeResult, Verification
from glmrt.fusion import RESIDUAL_NORM, backend_accepts, fuse_residual_norm, fused_nodes, residual_norm_node
from glmrt.graph import build_graph
from glmrt.lowering import lower
from glmrt.model import Model
from glmrt.models import PRESETS, config_from_dict
from glmrt.quant import quantize_graph, quantize_weights

native_cpu = _native.load("_native_cpu")[0]
needs_native = pytest.mark.glmrt_native(available=native_cpu is not None and hasattr(native_cpu, "add_norm"),
                                        reason="native CPU module with add_norm not built")


def tiny(preset: str):
    """A preset's semantics (norm kind, placement, DeepNorm alpha, rounding, RoPE, mask) at small
    widths: 3 layers, odd hidden size."""
    _, cfg = config_from_dict(dict(PRESETS[preset]))
    gqa = cfg.num_kv_heads < cfg.num_heads
    over = dict(num_layers=3, hidden_size=72, num_heads=4, num_kv_heads=2 if gqa else 4, head_dim=16,
                ffn_hidden_size=40, vocab_size=97, max_positions=64)
    over["rotary_dim"] = 16 if cfg.rotary_dim == cfg.head_dim else 8
    if cfg.mask_kind == "prefix":
        over.update(gmask_token_id=90, sop_token_id=91, mask_token_id=92, eos_token_ids=(93,), pad_token_id=0)
    return cfg.replace(**over)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_residual_that_feeds_a_norm_is_fused(preset):
    cfg = tiny(preset)
    graph = build_graph(cfg, cfg.dtype)
    fused = fuse_residual_norm(graph)
    L = cfg.num_layers
    nodes = fused_nodes(fused)
    # Every generation: the sum after attention feeds mlp_norm, the sum after the MLP the next
    # layer's attn_norm or final_norm.
    assert len(nodes) == 2 * L
    assert not [n for n in fused.nodes if n.op == "residual"]
    names = [n.name for n in nodes]
    assert names[0] == "layers.0.attn_residual+layers.0.mlp_norm"
    assert names[1] == "layers.0.mlp_residual+layers.1.attn_norm"
    assert names[-1] == f"layers.{L - 1}.mlp_residual+final_norm"
    norms = [n.name for n in fused.nodes if n.op == "norm"]
    sandwich = cfg.norm_placement == "sandwich"
    # Left alone: the first attn_norm (it reads the embedding) and sandwich post-norms (norm -> residual).
    expect = ["layers.0.attn_norm"] + [f"layers.{i}.{p}" for i in range(L) for p in ("attn_out_norm", "mlp_out_norm")
                                       if sandwich]
    assert sorted(norms) == sorted(expect)
    assert len(fused.nodes) == len(graph.nodes) - 2 * L
    deepnorm = cfg.norm_placement == "deepnorm"
    for n in nodes:
        assert n.attrs["alpha"] == (cfg.residual_alpha if deepnorm else 1.0)
        assert n.attrs["kind"] == cfg.norm_kind and n.attrs["round_before_weight"] == cfg.rmsnorm_round_before_weight
        # h is still read by the next residual in pre-norm and sandwich layers; DeepNorm's next
        # residual reads the norm's output instead, and nothing reads the last sum.
        last = n is nodes[-1]
        assert n.attrs["emit_residual"] == (not deepnorm and not last)
        assert len(n.outputs) == (2 if n.attrs["emit_residual"] else 1)
        assert set(n.params) == ({"weight", "bias"} if cfg.norm_kind == "layernorm" else {"weight"})
    # Every value a node reads is produced earlier (the fused node sits where the residual was).
    produced = set(fused.inputs)
    for n in fused.nodes:
        assert set(n.inputs) <= produced, n.name
        produced |= set(n.outputs)
    assert fused.output in produced
    assert fused.params == graph.params


def _run(model: Model, prompt: torch.Tensor, new_tokens: int):
    return model.logits(prompt), model.generate(prompt, max_new_tokens=new_tokens)


@pytest.mark.parametrize("dtype", ["model", torch.float32])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_fused_graph_is_bit_identical_to_unfused_with_reference_kernels(preset, dtype):
    cfg = tiny(preset)
    dtype = cfg.dtype if dtype == "model" else dtype
    graph = build_graph(cfg, dtype)
    weights = synthetic_weights(graph)
    fused = fuse_residual_norm(graph)
    assert fused_nodes(fused)
    cpu = get_backend("cpu")
    plain = Model(cfg, graph, lower(graph, cpu, weights, kernels="reference"), weights, "tiny")
    merged = Model(cfg, fused, lower(fused, cpu, weights, kernels="reference"), weights, "tiny")
    assert {s.impl for s in merged.plan.steps if s.node.op == RESIDUAL_NORM} == {"reference.residual_norm"}
    gen = torch.Generator().manual_seed(3)
    high = 90 if cfg.mask_kind == "prefix" else cfg.vocab_size
    prompt = torch.randint(1, high, (2, 6), generator=gen)
    if cfg.mask_kind == "prefix":
        prompt[:, -2], prompt[:, -1] = cfg.gmask_token_id, cfg.sop_token_id
    want_logits, want_tokens = _run(plain, prompt, 4)
    got_logits, got_tokens = _run(merged, prompt, 4)
    assert torch.equal(got_logits, want_logits)
    assert torch.equal(got_tokens, want_tokens)
    assert torch.isfinite(want_logits).all()


@pytest.mark.parametrize("quant", [(8, 0), (4, 32)])
def test_fusion_after_quantization_keeps_the_quantized_linears(quant):
    cfg = tiny("chatglm3-6b")
    graph = build_graph(cfg, torch.float32)
    weights = synthetic_weights(graph)
    qgraph = quantize_graph(graph, *quant)
    qweights = quantize_weights(graph, qgraph, weights)
    fused = fuse_residual_norm(qgraph)
    assert sum("quant" in n.attrs for n in fused.nodes) == sum("quant" in n.attrs for n in qgraph.nodes) > 0
    cpu = get_backend("cpu")
    prompt = torch.randint(0, cfg.vocab_size, (1, 5), generator=torch.Generator().manual_seed(1))
    a = Model(cfg, qgraph, lower(qgraph, cpu, qweights, kernels="reference"), qweights, "t").logits(prompt)
    b = Model(cfg, fused, lower(fused, cpu, qweights, kernels="reference"), qweights, "t").logits(prompt)
    assert torch.equal(a, b)


def test_residual_norm_node_refuses_what_is_not_the_pattern():
    graph = build_graph(tiny("chatglm3-6b"), torch.float32)
    by_name = {n.name: n for n in graph.nodes}
    with pytest.raises(ValueError, match="does not read|not the sum"):
        residual_norm_node(by_name["layers.0.attn_residual"], by_name["layers.0.attn_norm"])
    with pytest.raises(ValueError, match="a residual node and a norm node"):
        residual_norm_node(by_name["layers.0.attn_norm"], by_name["layers.0.mlp_norm"])


class _NoFusedKernel(Backend):
    name = "plain"
    device_type = "cpu"

    def probe(self):
        return ProbeResult(True, "test")

    def verification(self):
        return Verification("unverified", "test")


class _RMSOnly(_NoFusedKernel):
    name = "rms-only"

    def kernels(self):
        def rms_only(node):
            return None if node.attrs["kind"] == "rmsnorm" else f"{node.attrs['kind']} is not RMSNorm"
        return [Kernel(RESIDUAL_NORM, "test.add_rms", NATIVE, ops.residual_norm, rms_only)]


def test_backend_accepts_fuses_only_what_a_kernel_runs():
    rms = build_graph(tiny("chatglm3-6b"), torch.float32)
    ln = build_graph(tiny("chatglm-6b"), torch.float32)
    assert fuse_residual_norm(rms, backend_accepts(_NoFusedKernel())) is rms  # nothing to fuse: same graph
    assert fused_nodes(fuse_residual_norm(rms, backend_accepts(_RMSOnly())))
    assert not fused_nodes(fuse_residual_norm(ln, backend_accepts(_RMSOnly())))
    node = fused_nodes(fuse_residual_norm(ln))[0]
    parts = tuple(n for n in ln.nodes if n.name in node.name.split("+"))
    why = backend_accepts(_RMSOnly())(node, parts)
    assert "test.add_rms" in why and "layernorm is not RMSNorm" in why
    assert "has no kernel for op 'residual_norm'" in backend_accepts(_NoFusedKernel())(node, parts)


class _VendorFusedNativeNorm(_NoFusedKernel):
    name = "native-norm"

    def kernels(self):
        return [Kernel("norm", "test.norm", NATIVE, ops.norm),
                Kernel(RESIDUAL_NORM, "test.residual_norm", VENDOR, ops.residual_norm)]


def test_a_library_fused_kernel_does_not_displace_a_native_norm():
    graph = build_graph(tiny("chatglm3-6b"), torch.float32)
    assert not fused_nodes(fuse_residual_norm(graph, backend_accepts(_VendorFusedNativeNorm())))
    node = fused_nodes(fuse_residual_norm(graph))[0]
    parts = tuple(n for n in graph.nodes if n.name in node.name.split("+"))
    assert "test.norm" in backend_accepts(_VendorFusedNativeNorm())(node, parts)


@needs_native
@pytest.mark.parametrize("preset", ["chatglm3-6b", "chatglm-6b", "glm-4-9b-0414"])
def test_plan_reports_the_fused_nodes_and_their_kernel(preset):
    plan = glmrt.api.plan(f"synthetic:{preset}", backend="cpu", layers=2)
    rows = [r for r in plan.report() if r["op"] == RESIDUAL_NORM]
    assert len(rows) == 4
    assert {r["impl"] for r in rows} == {"native.add_norm"} and {r["kind"] for r in rows} == {NATIVE}
    assert rows[0]["node"] == "layers.0.attn_residual+layers.0.mlp_norm"
    unfused = glmrt.api.plan(f"synthetic:{preset}", backend="cpu", layers=2, fuse=False)
    assert not [r for r in unfused.report() if r["op"] == RESIDUAL_NORM]
    assert len(unfused.steps) == len(plan.steps) + 4


@pytest.mark.parametrize("preset", ["chatglm-6b", "chatglm3-6b"])
def test_sunway_keeps_its_native_norm(preset):
    # sunway runs norms natively and has only torch's residual_norm: nothing is fused.
    plan = glmrt.api.plan(f"synthetic:{preset}", backend="sunway", layers=1)
    assert not [s for s in plan.steps if s.node.op == RESIDUAL_NORM]
    if _native.load("_native_sunway")[0] is not None:
        assert {s.kind for s in plan.steps if s.node.op == "norm"} == {NATIVE}
