"""Fusion passes: Graph -> Graph rewrites that merge a run of nodes into one fused node.

residual + norm -> ``residual_norm``
    A ``residual`` node whose sum is read by a ``norm`` node (every generation has this pattern:
    pre-norm ChatGLM2/3 and GLM-4, where the sum after attention feeds mlp_norm and the sum after
    the MLP feeds the next layer's attn_norm or final_norm; DeepNorm ChatGLM-6B / GLM-130B, where
    ``alpha * x + branch`` feeds the next norm; GLM-4-0414's sandwich layers, where the sum after
    the attention block's post-norm feeds mlp_norm) becomes one node with

        inputs  [residual, branch]              (the residual node's, unchanged)
        outputs [h, norm(h)]                    (the two nodes' value names, unchanged)
        params  the norm's (weight, bias)
        attrs   the residual's alpha + the norm's kind, eps, round_before_weight,
                emit_residual (False when nothing else reads h: outputs are then [norm(h)] only)

    h is the residual sum rounded to the model dtype exactly as the residual op rounds it, and
    norm(h) is computed from that rounded h, so the fused node computes bit for bit what the two
    nodes did (``glmrt.ops.residual_norm`` is the two reference ops in sequence). A norm that
    feeds a residual (the sandwich post-norms) is a different pattern and stays as it is.

    The fused node takes the residual node's place in the order; the norm node is removed.
"""

from __future__ import annotations

from typing import Callable

from .graph import Graph, Node

RESIDUAL_NORM = "residual_norm"

# accept(fused node, (residual node, norm node)) -> None to fuse, or the reason not to (e.g. no
# kernel of the target backend runs the fused node as well as it runs the two nodes).
AcceptFn = Callable[[Node, tuple], "str | None"]


def residual_norm_node(residual: Node, norm: Node, emit_residual: bool = True) -> Node:
    """The fused node of ``residual`` followed by ``norm`` (which must read the residual's sum)."""
    if residual.op != "residual" or norm.op != "norm":
        raise ValueError(f"residual_norm fuses a residual node and a norm node, got {residual.op!r} "
                         f"({residual.name}) and {norm.op!r} ({norm.name})")
    if norm.inputs != residual.outputs:
        raise ValueError(f"{norm.name} reads {norm.inputs}, not the sum {residual.outputs} of {residual.name}")
    attrs = {"alpha": residual.attrs["alpha"], "kind": norm.attrs["kind"], "eps": norm.attrs["eps"],
             "round_before_weight": norm.attrs["round_before_weight"], "emit_residual": emit_residual}
    outputs = ([residual.outputs[0]] if emit_residual else []) + [norm.outputs[0]]
    output_specs = ([residual.output_specs[0]] if emit_residual else []) + [norm.output_specs[0]]
    return Node(name=f"{residual.name}+{norm.name}", op=RESIDUAL_NORM, inputs=list(residual.inputs),
                outputs=outputs, params=dict(norm.params), attrs=attrs,
                input_specs=list(residual.input_specs), output_specs=output_specs)


def fuse_residual_norm(graph: Graph, accept: AcceptFn | None = None) -> Graph:
    """Fuse every residual node whose sum feeds a norm node (see the module docstring) into a
    ``residual_norm`` node, where ``accept`` (None: everywhere) agrees. Returns a new graph; the
    parameters are unchanged."""
    nodes = graph.nodes
    readers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in node.inputs:
            readers.setdefault(name, []).append(i)
    replaced: dict[int, Node] = {}
    removed: set[int] = set()
    for i, node in enumerate(nodes):
        if node.op != "residual" or len(node.outputs) != 1:
            continue
        h = node.outputs[0]
        norms = [j for j in readers.get(h, []) if nodes[j].op == "norm" and nodes[j].inputs == [h] and j not in removed]
        if not norms:
            continue
        j = norms[0]
        others = [k for k in readers.get(h, []) if k != j]
        fused = residual_norm_node(node, nodes[j], emit_residual=bool(others) or h == graph.output)
        if accept is not None and accept(fused, (node, nodes[j])) is not None:
            continue
        replaced[i] = fused
        removed.add(j)
    if not replaced:
        return graph
    out = [replaced.get(i, node) for i, node in enumerate(nodes) if i not in removed]
    return graph.replace_nodes(out)


def backend_accepts(backend) -> AcceptFn:
    """accept() for lowering onto ``backend``: fuse where one of its kernels (native or vendor)
    runs the fused node, and is of a kind at least as preferred as the kernels the two separate
    nodes get (a backend with a native norm but only a library residual_norm keeps its native
    norm). Elsewhere the two nodes stay, rather than the fused node falling back to the reference."""
    from .backends.base import KIND_RANK, REFERENCE
    from .lowering import choose_kernel

    def accept(node: Node, parts: tuple) -> str | None:
        _, name, kind, reason = choose_kernel(backend, node)
        if kind == REFERENCE:
            return reason
        for part in parts:
            _, part_name, part_kind, _ = choose_kernel(backend, part)
            if KIND_RANK[part_kind] < KIND_RANK[kind]:
                return (f"{name} is a {kind} kernel; {part.name} runs the {part_kind} kernel {part_name}, which is "
                        "preferred")
        return None

    return accept


def fused_nodes(graph: Graph) -> list[Node]:
    return [n for n in graph.nodes if n.op == RESIDUAL_NORM]
