"""The device-agnostic GLM graph.

A Graph is a flat list of IR nodes in execution order. Each node names its input and output
values, the parameters it reads (by canonical name, e.g. ``layers.3.attn.qkv.weight``) and the
attributes its op needs. Shapes use the symbols ``B`` (batch) and ``T`` (new tokens this step);
everything else is concrete, so a backend's ``supports(node)`` sees exactly what it will be asked
to compute (GLM's 64-of-128 interleaved RoPE is the classic case a shape-blind check gets wrong).

Passes (quantization, fusion, tensor-parallel sharding) are functions Graph -> Graph that rewrite
nodes and parameter specs; nothing here knows about devices.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import GLMConfig

# Every op the graph uses; each has a plain-torch reference in glmrt.ops.
OPS = ("embedding", "norm", "linear", "rope", "attention", "activation", "residual", "lm_head",
       # Made by a pass, never by build_graph: residual then norm in one node (glmrt.fusion).
       "residual_norm",
       # Made by the shard pass (glmrt.shard): the tensor-parallel collectives.
       "all_reduce", "all_gather")

Shape = tuple  # of int | str ("B", "T")


@dataclass(frozen=True)
class ParamSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype
    # What the parameter is, for passes and synthetic initialisation: "embedding", "linear",
    # "bias", "norm_weight", "norm_bias".
    role: str


@dataclass(frozen=True)
class ValueSpec:
    shape: Shape
    dtype: torch.dtype


@dataclass
class Node:
    name: str
    op: str
    inputs: list[str]
    outputs: list[str]
    params: dict[str, str] = field(default_factory=dict)  # role in the op -> canonical param name
    attrs: dict[str, Any] = field(default_factory=dict)
    input_specs: list[ValueSpec] = field(default_factory=list)
    output_specs: list[ValueSpec] = field(default_factory=list)

    def describe(self) -> str:
        ins = ", ".join(f"{tuple(s.shape)}" for s in self.input_specs)
        outs = ", ".join(f"{tuple(s.shape)}" for s in self.output_specs)
        return f"{self.op} {ins} -> {outs}"


@dataclass
class Graph:
    config: GLMConfig
    dtype: torch.dtype
    nodes: list[Node]
    params: dict[str, ParamSpec]
    inputs: list[str]
    output: str
    # (size, rank) once the shard pass (glmrt.shard) has made this the graph of one tensor-parallel
    # rank; None for the whole model.
    tensor_parallel: tuple[int, int] | None = None

    def replace_nodes(self, nodes: list[Node], params: dict[str, ParamSpec] | None = None) -> "Graph":
        return dataclasses.replace(self, nodes=nodes, params=dict(self.params if params is None else params))

    def param_spec(self, node: Node, role: str) -> ParamSpec:
        return self.params[node.params[role]]

    def ops_used(self) -> list[str]:
        return sorted({n.op for n in self.nodes})


class _Builder:
    def __init__(self, config: GLMConfig, dtype: torch.dtype):
        self.cfg = config
        self.dtype = dtype
        self.nodes: list[Node] = []
        self.params: dict[str, ParamSpec] = {}

    def param(self, name: str, shape: tuple[int, ...], role: str) -> str:
        self.params[name] = ParamSpec(tuple(shape), self.dtype, role)
        return name

    def add(self, name: str, op: str, inputs: list[tuple[str, ValueSpec]], outputs: list[tuple[str, ValueSpec]],
            params: dict[str, str] | None = None, **attrs: Any) -> list[str]:
        self.nodes.append(Node(
            name=name, op=op,
            inputs=[n for n, _ in inputs], outputs=[n for n, _ in outputs],
            params=dict(params or {}), attrs=attrs,
            input_specs=[s for _, s in inputs], output_specs=[s for _, s in outputs],
        ))
        return [n for n, _ in outputs]

    def v(self, *dims: Any) -> ValueSpec:
        return ValueSpec(tuple(dims), self.dtype)

    # ------------------------------------------------------------------ pieces
    def norm(self, name: str, x: tuple[str, ValueSpec], prefix: str) -> tuple[str, ValueSpec]:
        cfg = self.cfg
        params = {"weight": self.param(f"{prefix}.weight", (cfg.hidden_size,), "norm_weight")}
        if cfg.norm_kind == "layernorm":
            params["bias"] = self.param(f"{prefix}.bias", (cfg.hidden_size,), "norm_bias")
        out = (name, x[1])
        self.add(name, "norm", [x], [out], params, kind=cfg.norm_kind, eps=cfg.norm_eps,
                 round_before_weight=cfg.rmsnorm_round_before_weight)
        return out

    def linear(self, name: str, x: tuple[str, ValueSpec], prefix: str, in_f: int, out_f: int,
               bias: bool, bias_after_matmul: bool = False) -> tuple[str, ValueSpec]:
        params = {"weight": self.param(f"{prefix}.weight", (out_f, in_f), "linear")}
        extra = {}
        if bias:
            params["bias"] = self.param(f"{prefix}.bias", (out_f,), "bias")
            if bias_after_matmul:  # y = round(x @ W^T) + b, two roundings (glmrt.lowering binds it)
                extra["bias_after_matmul"] = True
        out = (name, self.v("B", "T", out_f))
        self.add(name, "linear", [x], [out], params, in_features=in_f, out_features=out_f, **extra)
        return out

    def residual(self, name: str, residual: tuple[str, ValueSpec], branch: tuple[str, ValueSpec],
                 alpha: float) -> tuple[str, ValueSpec]:
        out = (name, branch[1])
        self.add(name, "residual", [residual, branch], [out], alpha=alpha)
        return out

    def layer(self, i: int, h: tuple[str, ValueSpec]) -> tuple[str, ValueSpec]:
        cfg = self.cfg
        p = f"layers.{i}"
        hd, nh, nkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        deepnorm = cfg.norm_placement == "deepnorm"
        alpha = cfg.residual_alpha if deepnorm else 1.0

        # Attention block.  (B, T, hidden)
        x = self.norm(f"{p}.attn_norm", h, f"{p}.attn_norm")
        qkv = self.linear(f"{p}.attn.qkv", x, f"{p}.attn.qkv", cfg.hidden_size, cfg.qkv_size, cfg.qkv_bias)
        q_spec, kv_spec = self.v("B", "T", nh, hd), self.v("B", "T", nkv, hd)
        q, k = (f"{p}.q", q_spec), (f"{p}.k", kv_spec)
        v = (f"{p}.v", kv_spec)
        self.add(f"{p}.rope", "rope", [qkv], [q, k, v], kind=cfg.rope_kind, rotary_dim=cfg.rotary_dim,
                 head_dim=hd, num_heads=nh, num_kv_heads=nkv, base=cfg.rope_base,
                 table_dtype=cfg.rope_table_dtype)
        ctx = (f"{p}.attn.ctx", self.v("B", "T", nh * hd))
        self.add(f"{p}.attn.core", "attention", [q, k, v], [ctx], layer_index=i, num_heads=nh,
                 num_kv_heads=nkv, head_dim=hd, scale=1.0 / math.sqrt(hd), scaling=cfg.attention_scaling,
                 mask_kind=cfg.mask_kind)
        attn = self.linear(f"{p}.attn.dense", ctx, f"{p}.attn.dense", nh * hd, cfg.hidden_size, cfg.dense_bias,
                           cfg.row_bias_after_matmul)
        if cfg.norm_placement == "sandwich":
            attn = self.norm(f"{p}.attn_out_norm", attn, f"{p}.attn_out_norm")
        h = self.residual(f"{p}.attn_residual", x if deepnorm else h, attn, alpha)

        # MLP block.
        x = self.norm(f"{p}.mlp_norm", h, f"{p}.mlp_norm")
        up = self.linear(f"{p}.mlp.up", x, f"{p}.mlp.up", cfg.hidden_size, cfg.mlp_in_size, cfg.mlp_bias)
        act = (f"{p}.mlp.act", self.v("B", "T", cfg.ffn_hidden_size))
        self.add(f"{p}.mlp.act", "activation", [up], [act], kind=cfg.activation)
        down = self.linear(f"{p}.mlp.down", act, f"{p}.mlp.down", cfg.ffn_hidden_size, cfg.hidden_size, cfg.mlp_bias,
                           cfg.row_bias_after_matmul)
        if cfg.norm_placement == "sandwich":
            down = self.norm(f"{p}.mlp_out_norm", down, f"{p}.mlp_out_norm")
        return self.residual(f"{p}.mlp_residual", x if deepnorm else h, down, alpha)


def build_graph(config: GLMConfig, dtype: torch.dtype | None = None) -> Graph:
    """Build the whole-model graph of ``config`` with parameters in ``dtype``."""
    dtype = dtype or config.dtype
    b = _Builder(config, dtype)
    cfg = config
    ids = ("input_ids", ValueSpec(("B", "T"), torch.int64))
    embed = b.param("embed.weight", (cfg.vocab_size, cfg.hidden_size), "embedding")
    h = ("embed", b.v("B", "T", cfg.hidden_size))
    b.add("embed", "embedding", [ids], [h], {"weight": embed})
    for i in range(cfg.num_layers):
        h = b.layer(i, h)
    if cfg.final_norm:
        h = b.norm("final_norm", h, "final_norm")
    head = embed if cfg.tie_word_embeddings else b.param("lm_head.weight", (cfg.vocab_size, cfg.hidden_size), "linear")
    logits = ("logits", ValueSpec(("B", "T", cfg.vocab_size), dtype))
    b.add("lm_head", "lm_head", [h], [logits], {"weight": head}, vocab_size=cfg.vocab_size)
    return Graph(config=cfg, dtype=dtype, nodes=b.nodes, params=b.params, inputs=["input_ids"], output="logits")
