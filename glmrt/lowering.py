"""Lowering: Graph + Backend -> Plan.

For every node the plan records the implementation chosen and why: a native kernel of glmrt's,
else the backend's library (vendor) op, else the core's plain-torch reference on the backend's
device. Dispatch is decided here, once; the runtime's hot loop calls what the plan holds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import ops
from .errors import ConfigError, StrictFallbackError
from .graph import Graph, Node

from .backends.base import KIND_RANK, REFERENCE, VENDOR, Backend
from .shard import COLLECTIVE_OPS


@dataclass
class PlanStep:
    node: Node
    fn: Callable
    impl: str  # kernel name
    kind: str  # native | vendor | reference
    reason: str
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    free_after: tuple[str, ...] = ()  # values whose last reader is this step


@dataclass
class Plan:
    backend: Backend
    graph: Graph
    steps: list[PlanStep]
    kernels: str = "auto"  # how lower() was asked to choose (a derived plan is lowered the same way)
    strict: bool = False
    # A backend that runs an already lowered whole graph (the onnxruntime backend on an ONNX export)
    # sets session(ctx, input_ids) -> logits; execute() then calls it instead of the steps, which
    # only describe where each node runs.
    session: Callable | None = None
    # The tensor-parallel communicator of a sharded graph (glmrt.distributed), handed to the
    # collective nodes through the ForwardContext; None for a single-process model.
    comm: object = None

    @property
    def device(self) -> torch.device:
        # Asked only when running: plans for absent hardware can still be built and inspected.
        return self.backend.device()

    def report(self) -> list[dict]:
        return [{"node": s.node.name, "op": s.node.op, "impl": s.impl, "kind": s.kind, "reason": s.reason,
                 "shape": s.node.describe()} for s in self.steps]

    def summary(self) -> list[dict]:
        """One row per (op, implementation): how many nodes and why (the coverage report)."""
        rows: dict[tuple, dict] = {}
        for s in self.steps:
            key = (s.node.op, s.impl, s.kind, s.reason)
            if key not in rows:
                rows[key] = {"op": s.node.op, "impl": s.impl, "kind": s.kind, "reason": s.reason, "nodes": 0}
            rows[key]["nodes"] += 1
        return list(rows.values())

    def fallbacks(self) -> list[PlanStep]:
        return [s for s in self.steps if s.kind == REFERENCE]


def choose_kernel(backend: Backend, node: Node) -> tuple[Callable, str, str, str]:
    """(fn, name, kind, reason) for one node."""
    candidates = sorted((k for k in backend.kernels() if k.op == node.op), key=lambda k: KIND_RANK[k.kind])
    refusals = []
    for kernel in candidates:
        why_not = kernel.supports(node)
        if why_not is None:
            reason = f"{kernel.kind} kernel supports {node.describe()}"
            if refusals:
                reason += f" (preferred kernels refused: {'; '.join(refusals)})"
            return kernel.fn, kernel.name, kernel.kind, reason
        refusals.append(f"{kernel.name}: {why_not}")
    if refusals:
        reason = "fallback to the torch reference: " + "; ".join(refusals)
    else:
        reason = f"fallback to the torch reference: backend {backend.name!r} has no kernel for op {node.op!r}"
    return ops.REFERENCE[node.op], f"reference.{node.op}", REFERENCE, reason


KERNEL_CHOICES = ("auto", "reference")


def _collective(backend: Backend, node: Node) -> tuple[Callable, str, str, str]:
    """A collective node (glmrt.shard) runs on the process group, whose transport is the backend's
    collective_backend (gloo, nccl, hccl): torch.distributed, not a kernel of the backend's."""
    transport = backend.capabilities().collective_backend
    if transport is None:
        raise ConfigError(f"backend {backend.name!r} declares no collective backend, so it cannot run a "
                          "tensor-parallel graph: load with tensor_parallel=None (one process)")
    return (ops.COLLECTIVES[node.op], f"torch.distributed.{node.op}", VENDOR,
            f"the process group's {node.op} over {transport} (the backend's collective_backend)")


def _bias_after_matmul(node: Node) -> bool:
    return node.op == "linear" and "bias" in node.params and bool(node.attrs.get("bias_after_matmul"))


def _without_bias(node: Node) -> Node:
    attrs = {k: v for k, v in node.attrs.items() if k != "bias_after_matmul"}
    return dataclasses.replace(node, params={k: v for k, v in node.params.items() if k != "bias"}, attrs=attrs)


def _then_add_bias(fn: Callable, bare: Node) -> Callable:
    """A linear with ``bias_after_matmul`` (GLM-130B's row-parallel linears, glmrt.config): the
    kernel chosen for the bias-less node computes the product in the model dtype, then the bias
    is added, a second rounding, as SAT's RowParallelLinear does at every tensor-parallel size."""
    def run(ctx, node, inputs, params):
        rest = {k: v for k, v in params.items() if k != "bias"}
        return fn(ctx, bare, inputs, rest) + params["bias"]
    return run


def lower(graph: Graph, backend: Backend, weights: dict[str, torch.Tensor], *, strict: bool = False,
          kernels: str = "auto", comm=None) -> Plan:
    """Choose a kernel for every node and bind the (already placed) weights each node reads.

    kernels: "auto" (the backend's best kernel per node, native > vendor > reference) or
    "reference" (every node on the plain-torch reference op, on the backend's device: the oracle
    the backend kernels are tested against, and a way to rule the kernels out when debugging).
    """
    if kernels not in KERNEL_CHOICES:
        raise ConfigError(f"kernels={kernels!r} is not one of {', '.join(KERNEL_CHOICES)}")
    if kernels == "reference" and strict:
        raise ConfigError("kernels='reference' runs every node on the torch reference, which strict mode forbids: "
                          "use one or the other")
    steps = []
    for node in graph.nodes:
        if node.op in COLLECTIVE_OPS:
            fn, name, kind, reason = _collective(backend, node)
        elif kernels == "reference":
            fn, name, kind, reason = (ops.REFERENCE[node.op], f"reference.{node.op}", REFERENCE,
                                      "kernels='reference' was requested")
        elif _bias_after_matmul(node):
            fn, name, kind, reason = choose_kernel(backend, _without_bias(node))
            fn, name = _then_add_bias(fn, _without_bias(node)), f"{name} + bias"
            reason += "; the bias added after the rounded product (bias_after_matmul)"
        else:
            fn, name, kind, reason = choose_kernel(backend, node)
        params = {role: weights[pname] for role, pname in node.params.items()}
        steps.append(PlanStep(node, fn, name, kind, reason, params))
    if strict:
        bad = [s for s in steps if s.kind == REFERENCE]
        if bad:
            lines = "\n".join(f"  {s.node.name}: {s.reason}" for s in bad[:20])
            more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
            raise StrictFallbackError(
                f"strict lowering onto {backend.name!r}: {len(bad)} node(s) would fall back to the torch "
                f"reference:\n{lines}{more}\nAdd kernels for these ops or lower without strict mode.")
    # Liveness: drop each intermediate value after its last reader, to keep peak memory low.
    last_use: dict[str, int] = {}
    for i, s in enumerate(steps):
        for name in s.node.inputs:
            last_use[name] = i
    frees: dict[int, list[str]] = {}
    for name, i in last_use.items():
        if name not in graph.inputs:
            frees.setdefault(i, []).append(name)
    for i, s in enumerate(steps):
        s.free_after = tuple(frees.get(i, ()))
    return Plan(backend=backend, graph=graph, steps=steps, kernels=kernels, strict=strict, comm=comm)


def execute(plan: Plan, ctx: ops.ForwardContext, input_ids: torch.Tensor) -> torch.Tensor:
    """Run the plan for one step; returns the graph output (logits)."""
    if plan.session is not None:
        return plan.session(ctx, input_ids)
    if plan.comm is not None and ctx.comm is None:
        ctx.comm = plan.comm
    env: dict[str, object] = {"input_ids": input_ids}
    for step in plan.steps:
        node = step.node
        result = step.fn(ctx, node, [env[n] for n in node.inputs], step.params)
        if len(node.outputs) == 1:
            env[node.outputs[0]] = result
        else:
            for name, value in zip(node.outputs, result):
                env[name] = value
        for name in step.free_after:
            env.pop(name, None)
    return env[plan.graph.output]  # type: ignore[return-value]
