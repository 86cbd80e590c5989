"""The tensor-parallel shard pass: Graph -> the graph one rank of a tensor-parallel group runs.

Megatron style, for every generation (the graph's qkv is already in glmrt's canonical
[all q | all k | all v] layout, whatever the release stored; see models/):

- embedding: vocab-parallel. Rank r holds rows [r*Vr, (r+1)*Vr) with Vr = ceil(V / tp) (the last
  rank's missing rows are zeros); the node looks up the ids in its range (others give zeros) and an
  ``all_reduce`` node sums the ranks' rows.
- qkv: column-parallel by heads. Rank r keeps its nh/tp query heads and the KV groups they read:
  nkv/tp groups each when tp divides the groups, else (tp a multiple of nkv: ChatGLM2/3 and GLM-4
  with 2 groups at tp 4 or 8) the one group r // (tp / nkv), replicated on tp / nkv ranks. The
  bias follows the rows.
- rope and attention: rank-local on the local heads (the KV cache holds the local groups only).
- attention output and MLP down: row-parallel. The linear keeps the input columns of the rank's
  heads / inner width and loses its bias; an ``all_reduce`` node sums the partial outputs and then
  adds the full bias once. Everything after (DeepNorm's alpha in the residual, GLM-4-0414's post
  norms, the next norm) reads the reduced value.
- MLP up: column-parallel; a GLU projection ([a | b], GeGLU a * gelu(b), SwiGLU silu(a) * b) is split
  per half, so rank r holds [a_r | b_r] and the activation stays rank-local.
- norms: replicated.
- LM head (tied to the embedding for GLM-130B: the same rows): vocab-parallel; an ``all_gather``
  node concatenates the ranks' logits and trims the padding, so every rank sees all V logits.

So a step runs exactly 2 all-reduces per layer, plus one for the embedding and one all-gather for
the head. Quantization is applied after this pass, on each rank's slices (glmrt.api); for a graph
that is already quantized (a quantized checkpoint) the pass slices the packed weights and their
scales too. The pass is device-free: it rewrites nodes and parameter specs, and ``param_shards``
says which slice of each full parameter a rank holds (for slicing loaded weights, reading only
that slice from a checkpoint, and merging ranks back).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .config import GLMConfig
from .errors import ConfigError
from .graph import Graph, Node, ParamSpec, ValueSpec

ALL_REDUCE = "all_reduce"
ALL_GATHER = "all_gather"
COLLECTIVE_OPS = (ALL_REDUCE, ALL_GATHER)

COLUMN_PARALLEL = (".attn.qkv", ".mlp.up")
ROW_PARALLEL = (".attn.dense", ".mlp.down")


@dataclass(frozen=True)
class ParamShard:
    """Which part of a full parameter a rank holds: the ``ranges`` [start, stop) along ``dim`` of
    the full tensor, concatenated in order, then ``pad`` zero slices along ``dim``. dim None:
    the whole parameter (replicated)."""

    dim: int | None
    ranges: tuple[tuple[int, int], ...] = ()
    pad: int = 0

    def local_size(self) -> int:
        return sum(b - a for a, b in self.ranges) + self.pad

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's slice of ``full`` (a new contiguous tensor, or ``full`` itself if replicated)."""
        if self.dim is None:
            return full
        parts = [full.narrow(self.dim, a, b - a) for a, b in self.ranges]
        if self.pad:
            shape = list(full.shape)
            shape[self.dim] = self.pad
            parts.append(torch.zeros(shape, dtype=full.dtype, device=full.device))
        return torch.cat(parts, dim=self.dim).contiguous() if len(parts) > 1 else parts[0].contiguous()


@dataclass(frozen=True)
class TPLayout:
    """The per-rank sizes of a model at one tensor-parallel size."""

    size: int
    rank: int
    heads: int  # query heads per rank
    kv_heads: int  # KV groups per rank (1 when groups are replicated)
    kv_replicas: int  # ranks holding the same KV group (1: groups are split, not replicated)
    ffn: int  # MLP inner width per rank
    vocab: int  # vocabulary rows per rank (ceil(V / tp); the last rank's beyond V are zeros)

    @property
    def first_head(self) -> int:
        return self.rank * self.heads

    @property
    def first_kv(self) -> int:
        return (self.rank // self.kv_replicas) * self.kv_heads

    @property
    def vocab_start(self) -> int:
        return self.rank * self.vocab


def tp_layout(cfg: GLMConfig, size: int, rank: int) -> TPLayout:
    """The per-rank sizes at ``size`` ranks, or a ConfigError naming the numbers that do not divide."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ConfigError(f"tensor_parallel must be a positive integer, got {size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < size:
        raise ConfigError(f"tensor-parallel rank {rank!r} is outside [0, {size})")
    nh, nkv, ffn = cfg.num_heads, cfg.num_kv_heads, cfg.ffn_hidden_size
    what = f"{cfg.generation} (num_heads {nh}, KV groups {nkv}, ffn_hidden_size {ffn})"
    if nh % size:
        raise ConfigError(f"tensor_parallel={size} does not divide the {nh} attention heads of {what}: use a size "
                          f"that divides {nh}")
    if nkv % size and size % nkv:
        raise ConfigError(f"tensor_parallel={size} and the {nkv} KV groups of {what} neither divide each other: "
                          f"each rank must hold whole KV groups (tp dividing {nkv}) or one group shared by tp/{nkv} "
                          "ranks (tp a multiple of it)")
    if ffn % size:
        raise ConfigError(f"tensor_parallel={size} does not divide ffn_hidden_size {ffn} of {what}")
    if nkv >= size:
        kv, replicas = nkv // size, 1
    else:
        kv, replicas = 1, size // nkv
    layout = TPLayout(size, rank, nh // size, kv, replicas, ffn // size, -(-cfg.vocab_size // size))
    # Every local query head must read a local KV group (the check vLLM's #2379 was missing).
    group = nh // nkv
    for h in range(layout.first_head, layout.first_head + layout.heads):
        g = h // group
        if not layout.first_kv <= g < layout.first_kv + layout.kv_heads:  # pragma: no cover - by construction
            raise ConfigError(f"rank {rank}: query head {h} reads KV group {g}, which is not on this rank")
    return layout


def check_quantization(cfg: GLMConfig, size: int, bits: int, group_size: int) -> None:
    """Quantizing after sharding keeps the groups of the whole model only when the row-parallel
    layers' per-rank input columns hold whole groups (and, for INT4, whole bytes): refuse otherwise."""
    lay = tp_layout(cfg, size, 0)
    for what, cols in (("attention output", lay.heads * cfg.head_dim), ("MLP down projection", lay.ffn)):
        if group_size and cols % group_size:
            raise ConfigError(f"INT{bits} groups of {group_size}: at tensor_parallel={size} each rank's {what} has "
                              f"{cols} input columns, not a multiple of {group_size}: use a group size dividing "
                              f"{cols}, per-channel scales (no -g), or another tensor_parallel")
        if bits == 4 and cols % 2:
            raise ConfigError(f"INT4 at tensor_parallel={size}: each rank's {what} has an odd number of input columns "
                              f"({cols}), which INT4 cannot pack two per byte: use INT8 or another tensor_parallel")


def _role(node_name: str) -> str | None:
    if any(node_name.endswith(s) for s in COLUMN_PARALLEL):
        return "column"
    if any(node_name.endswith(s) for s in ROW_PARALLEL):
        return "row"
    return None


def _qkv_rows(cfg: GLMConfig, lay: TPLayout) -> tuple[tuple[int, int], ...]:
    hd = cfg.head_dim
    q0 = lay.first_head * hd
    k_base, v_base = cfg.q_size, cfg.q_size + cfg.kv_size
    k0 = lay.first_kv * hd
    n = lay.kv_heads * hd
    return ((q0, q0 + lay.heads * hd), (k_base + k0, k_base + k0 + n), (v_base + k0, v_base + k0 + n))


def _up_rows(cfg: GLMConfig, lay: TPLayout) -> tuple[tuple[int, int], ...]:
    f, a = cfg.ffn_hidden_size, lay.rank * lay.ffn
    if cfg.activation in ("swiglu", "geglu"):  # [a | b]: the rank's rows of each half
        return ((a, a + lay.ffn), (f + a, f + a + lay.ffn))
    return ((a, a + lay.ffn),)


def _row_cols(node: Node, cfg: GLMConfig, lay: TPLayout) -> tuple[int, int]:
    if node.name.endswith(".attn.dense"):
        a = lay.first_head * cfg.head_dim
        return a, a + lay.heads * cfg.head_dim
    a = lay.rank * lay.ffn
    return a, a + lay.ffn


def param_shards(graph: Graph, size: int, rank: int) -> dict[str, ParamShard]:
    """For every parameter of the full ``graph`` (float or quantized), the part rank ``rank`` of
    ``size`` holds."""
    cfg = graph.config
    lay = tp_layout(cfg, size, rank)
    out = {name: ParamShard(None) for name in graph.params}
    V = cfg.vocab_size
    start = min(lay.vocab_start, V)
    stop = min(lay.vocab_start + lay.vocab, V)
    vocab = ParamShard(0, ((start, stop),), lay.vocab - (stop - start))
    for node in graph.nodes:
        if node.op in ("embedding", "lm_head"):
            out[node.params["weight"]] = vocab
            continue
        role = _role(node.name) if node.op == "linear" else None
        if role is None:
            continue
        q = node.attrs.get("quant")
        if role == "column":
            rows = _qkv_rows(cfg, lay) if node.name.endswith(".attn.qkv") else _up_rows(cfg, lay)
            for p in ("weight", "bias", "scale"):  # a scale belongs to its weight row
                if p in node.params:
                    out[node.params[p]] = ParamShard(0, rows)
            continue
        a, b = _row_cols(node, cfg, lay)
        if q is None:
            out[node.params["weight"]] = ParamShard(1, ((a, b),))
        else:
            if q["bits"] == 4:
                if a % 2 or b % 2:
                    raise ConfigError(f"{node.name}: INT4 packs two input columns per byte, and the rank's columns "
                                      f"[{a}, {b}) at tensor_parallel={size} start or end inside a byte")
                out[node.params["weight"]] = ParamShard(1, ((a // 2, b // 2),))
            else:
                out[node.params["weight"]] = ParamShard(1, ((a, b),))
            g = q["group_size"]
            if g:
                if a % g or b % g:
                    raise ConfigError(f"{node.name}: the rank's input columns [{a}, {b}) at tensor_parallel={size} "
                                      f"cut this checkpoint's quantization groups of {g}: use a tensor_parallel "
                                      f"whose per-rank columns are whole groups, or the float checkpoint with "
                                      f"quantize=")
                out[node.params["scale"]] = ParamShard(1, ((a // g, b // g),))
            # one scale per output row: every column of the row shares it, so each rank keeps it whole
        # the bias moves to the all_reduce node, replicated
    return out


def _local_spec(spec: ParamSpec, shard: ParamShard) -> ParamSpec:
    if shard.dim is None:
        return spec
    shape = list(spec.shape)
    shape[shard.dim] = shard.local_size()
    return dataclasses.replace(spec, shape=tuple(shape))


def _with_last(spec: ValueSpec, n: int) -> ValueSpec:
    return ValueSpec(tuple(spec.shape[:-1]) + (n,), spec.dtype)


def shard_graph(graph: Graph, size: int, rank: int) -> Graph:
    """The graph rank ``rank`` of ``size`` runs (see the module docstring). With size 1 the
    collectives are still there (a group of one), so the path is the same at every size."""
    if graph.tensor_parallel is not None:
        raise ConfigError(f"the graph is already sharded (tensor_parallel={graph.tensor_parallel}); shard the full "
                          "graph once")
    if any(n.op == "residual_norm" for n in graph.nodes):
        raise ConfigError("shard the graph before the fusion passes (glmrt.load does)")
    cfg = graph.config
    lay = tp_layout(cfg, size, rank)
    shards = param_shards(graph, size, rank)
    params = {name: _local_spec(spec, shards[name]) for name, spec in graph.params.items()}
    hd = cfg.head_dim
    nodes: list[Node] = []
    for node in graph.nodes:
        a = dict(node.attrs)
        if node.op == "embedding":
            a.update(vocab_start=lay.vocab_start, vocab_rows=max(0, min(lay.vocab, cfg.vocab_size - lay.vocab_start)))
            partial = node.outputs[0] + ".partial"
            nodes.append(dataclasses.replace(node, attrs=a, outputs=[partial]))
            nodes.append(Node(f"{node.name}.all_reduce", ALL_REDUCE, [partial], list(node.outputs),
                              attrs={"tensor_parallel": size}, input_specs=list(node.output_specs),
                              output_specs=list(node.output_specs)))
            continue
        if node.op == "lm_head":
            partial = node.outputs[0] + ".partial"
            out_spec = node.output_specs[0]
            nodes.append(dataclasses.replace(node, attrs=dict(a, vocab_size=lay.vocab), outputs=[partial],
                                             output_specs=[_with_last(out_spec, lay.vocab)]))
            nodes.append(Node(f"{node.name}.all_gather", ALL_GATHER, [partial], list(node.outputs),
                              attrs={"tensor_parallel": size, "vocab_size": cfg.vocab_size, "dim": -1},
                              input_specs=[_with_last(out_spec, lay.vocab)], output_specs=list(node.output_specs)))
            continue
        if node.op in ("rope", "attention"):
            a.update(num_heads=lay.heads, num_kv_heads=lay.kv_heads)
            if node.op == "rope":
                specs = [ValueSpec(("B", "T", lay.heads, hd), s.dtype) if i == 0 else
                         ValueSpec(("B", "T", lay.kv_heads, hd), s.dtype) for i, s in enumerate(node.output_specs)]
                in_specs = [_with_last(node.input_specs[0], (lay.heads + 2 * lay.kv_heads) * hd)]
                nodes.append(dataclasses.replace(node, attrs=a, input_specs=in_specs, output_specs=specs))
            else:
                in_specs = [ValueSpec(("B", "T", lay.heads, hd), node.input_specs[0].dtype)] + [
                    ValueSpec(("B", "T", lay.kv_heads, hd), s.dtype) for s in node.input_specs[1:]]
                nodes.append(dataclasses.replace(node, attrs=a, input_specs=in_specs,
                                                 output_specs=[_with_last(node.output_specs[0], lay.heads * hd)]))
            continue
        if node.op == "activation":
            nodes.append(dataclasses.replace(
                node, input_specs=[_with_last(node.input_specs[0], _up_width(cfg, lay))],
                output_specs=[_with_last(node.output_specs[0], lay.ffn)]))
            continue
        role = _role(node.name) if node.op == "linear" else None
        if role == "column":
            out_f = params[node.params["weight"]].shape[0]
            nodes.append(dataclasses.replace(node, attrs=dict(a, out_features=out_f),
                                             output_specs=[_with_last(node.output_specs[0], out_f)]))
            continue
        if role == "row":
            lo, hi = _row_cols(node, cfg, lay)
            in_f = hi - lo
            if "quant" in a:
                a["quant"] = dict(a["quant"], in_features=in_f)
            p = dict(node.params)
            bias = p.pop("bias", None)
            a.pop("bias_after_matmul", None)  # the all-reduce node adds the bias, after the sum
            partial = node.outputs[0] + ".partial"
            nodes.append(dataclasses.replace(node, attrs=dict(a, in_features=in_f), params=p, outputs=[partial],
                                             input_specs=[_with_last(node.input_specs[0], in_f)]))
            nodes.append(Node(f"{node.name}.all_reduce", ALL_REDUCE, [partial], list(node.outputs),
                              params={"bias": bias} if bias is not None else {},
                              attrs={"tensor_parallel": size}, input_specs=list(node.output_specs),
                              output_specs=list(node.output_specs)))
            continue
        nodes.append(node)
    return dataclasses.replace(graph, nodes=nodes, params=params, tensor_parallel=(size, rank))


def _up_width(cfg: GLMConfig, lay: TPLayout) -> int:
    return sum(b - a for a, b in _up_rows(cfg, lay))


def shard_weights(full_graph: Graph, weights: dict[str, torch.Tensor], size: int, rank: int,
                  shards: dict[str, ParamShard] | None = None) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s slices of the full ``weights`` of ``full_graph`` (tied parameters stay one tensor)."""
    shards = shards or param_shards(full_graph, size, rank)
    return {name: shards[name].take(t) for name, t in weights.items()}


def merge_weights(full_graph: Graph, ranks: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The inverse of shard_weights over all ``len(ranks)`` ranks: the full parameters again (a
    replicated KV group is taken from the first rank holding it; vocab padding is dropped)."""
    size = len(ranks)
    per_rank = [param_shards(full_graph, size, r) for r in range(size)]
    out = {}
    for name, spec in full_graph.params.items():
        first = per_rank[0][name]
        if first.dim is None:
            out[name] = ranks[0][name]
            continue
        full = torch.empty(spec.shape, dtype=ranks[0][name].dtype)
        for r in range(size):
            shard, local, at = per_rank[r][name], ranks[r][name], 0
            for a, b in shard.ranges:
                full.narrow(shard.dim, a, b - a).copy_(local.narrow(shard.dim, at, b - a))
                at += b - a
        out[name] = full
    return out


def local_kv_heads(graph: Graph) -> int:
    """The KV groups per layer that this graph's attention nodes hold (all of them unsharded)."""
    for node in graph.nodes:
        if node.op == "attention":
            return int(node.attrs["num_kv_heads"])
    return graph.config.num_kv_heads


def collective_nodes(graph: Graph) -> list[Node]:
    return [n for n in graph.nodes if n.op in COLLECTIVE_OPS]
