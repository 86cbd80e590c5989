"""Plans are built against every backend, present or not: the graph, the kernel choice and the
fallback report need no device."""

import pytest
import torch

from glmrt.backends import backend_names, get_backend
from glmrt.backends.base import NATIVE, REFERENCE, VENDOR, Backend, Kernel, ProbeResult, Verification
from glmrt.errors import StrictFallbackError
from glmrt.graph import OPS, build_graph
from glmrt.lowering import lower
from glmrt.models import PRESETS, config_from_dict


def tiny_config(name="glm-4-9b-0414", **over):
    _, cfg = config_from_dict(dict(PRESETS[name]))
    return cfg.replace(num_layers=2, **over)


def meta_weights(graph):
    return {n: torch.empty(p.shape, dtype=p.dtype, device="meta") for n, p in graph.params.items()}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_builds_a_graph_with_real_widths(preset):
    _, cfg = config_from_dict(dict(PRESETS[preset]))
    graph = build_graph(cfg)
    assert set(graph.ops_used()) <= set(OPS)
    qkv = graph.params["layers.0.attn.qkv.weight"]
    assert qkv.shape == (cfg.num_heads * cfg.head_dim + 2 * cfg.num_kv_heads * cfg.head_dim, cfg.hidden_size)
    rope = next(n for n in graph.nodes if n.op == "rope")
    expected_rope = {"chatglm-6b": ("2d", 128), "glm-130b": ("half", 128)}.get(preset, ("interleaved", 64))
    assert (rope.attrs["kind"], rope.attrs["rotary_dim"]) == expected_rope
    assert sum(1 for n in graph.nodes if n.op == "attention") == cfg.num_layers


@pytest.mark.parametrize("name", backend_names())
def test_plan_for_every_backend_even_without_its_hardware(name):
    graph = build_graph(tiny_config(), torch.float32)
    plan = lower(graph, get_backend(name), meta_weights(graph))
    assert len(plan.steps) == len(graph.nodes)
    for step in plan.steps:
        assert step.kind in (NATIVE, VENDOR, REFERENCE)
        assert step.reason
    rows = plan.summary()
    assert sum(r["nodes"] for r in rows) == len(graph.nodes)


def test_cpu_plan_prefers_native_then_vendor():
    graph = build_graph(tiny_config(), torch.float32)
    plan = lower(graph, get_backend("cpu"), meta_weights(graph))
    kinds = {s.node.op: s.kind for s in plan.steps}
    if any(k.kind == NATIVE for k in get_backend("cpu").kernels()):
        assert kinds["norm"] == NATIVE
        # Float linears and the LM head: the native decode GEMV (prefill-sized calls use oneDNN inside it).
        assert kinds["linear"] == NATIVE and kinds["lm_head"] == NATIVE
    else:
        assert kinds["linear"] == VENDOR
    assert not plan.fallbacks()
    lower(graph, get_backend("cpu"), meta_weights(graph), strict=True)  # no fallback on the CPU


class ShapeFussyBackend(Backend):
    """A backend whose RoPE kernel only takes full-head rotation, like some vendor ops."""

    name = "fussy"
    device_type = "cpu"

    def probe(self):
        return ProbeResult(True, "test")

    def verification(self):
        return Verification("unverified", "test double")

    def kernels(self):
        def full_head_only(node):
            if node.attrs["rotary_dim"] != node.attrs["head_dim"]:
                return f"rotates all {node.attrs['head_dim']} dims only, node rotates {node.attrs['rotary_dim']}"
            return None
        return [Kernel("rope", "fussy.rope", NATIVE, lambda *a: None, full_head_only)]


def test_shape_aware_supports_falls_back_with_reason_and_strict_refuses():
    graph = build_graph(tiny_config(), torch.float32)
    plan = lower(graph, ShapeFussyBackend(), meta_weights(graph))
    rope = next(s for s in plan.steps if s.node.op == "rope")
    assert rope.kind == REFERENCE and "rotates 64" in rope.reason and "fussy.rope" in rope.reason
    embed = next(s for s in plan.steps if s.node.op == "embedding")
    assert embed.kind == REFERENCE and "no kernel" in embed.reason
    with pytest.raises(StrictFallbackError, match="rope"):
        lower(graph, ShapeFussyBackend(), meta_weights(graph), strict=True)


def test_deeper_graph_frees_intermediates():
    graph = build_graph(tiny_config(), torch.float32)
    plan = lower(graph, get_backend("cpu"), meta_weights(graph))
    freed = [n for s in plan.steps for n in s.free_after]
    assert "embed" in freed and "input_ids" not in freed


def test_reference_kernels_put_every_node_on_the_torch_reference():
    from glmrt import ops
    from glmrt.errors import ConfigError
    graph = build_graph(tiny_config())
    cpu = get_backend("cpu")
    auto = lower(graph, cpu, meta_weights(graph))
    assert any(s.kind != REFERENCE for s in auto.steps)  # the cpu backend has kernels of its own
    plan = lower(graph, cpu, meta_weights(graph), kernels="reference")
    assert all(s.kind == REFERENCE and s.fn is ops.REFERENCE[s.node.op] for s in plan.steps)
    assert all("kernels='reference'" in s.reason for s in plan.steps)
    with pytest.raises(ConfigError, match="not one of"):
        lower(graph, cpu, meta_weights(graph), kernels="fastest")
    with pytest.raises(ConfigError, match="strict"):
        lower(graph, cpu, meta_weights(graph), kernels="reference", strict=True)
