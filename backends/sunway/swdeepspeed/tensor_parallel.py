"""Tensor parallelism for the shim's init_inference(tensor_parallel={"tp_size": N}), Megatron style.

Each rank of a tensor-parallel group holds 1/N of every layer: the attention heads (q, and k / v
for its share of the KV heads) and 1/N of the MLP's inner width. The column-parallel projections
(qkv, the MLP's first projection, both halves of a gated one) keep their rows of the rank's heads /
inner columns; the row-parallel ones (attention output, MLP down) keep the matching input columns,
and their partial outputs are summed over the group with one all-reduce each (in fp32, rounded
once to the model dtype). Embedding, norms and the LM head are replicated. So a rank runs a glmrt
graph of the same model with num_heads / N, num_kv_heads / N and ffn_hidden_size / N, and its KV
cache holds only its own heads.

A bias of a row-parallel projection is added by rank 0 only (the others hold zeros), so the sum
has it once. Quantization (dtype=torch.int8) happens after sharding, on each rank's slices.
"""

from __future__ import annotations

from typing import Any

import torch

from ....errors import ConfigError
from ....graph import build_graph
from ....lowering import lower
from ....model import Model
from ....quant import parse_format, quantize_graph, quantize_weights
from . import comm

# Node-name suffixes of the row-parallel linears, whose outputs are all-reduced.
ROW_PARALLEL = (".attn.dense", ".mlp.down")


class TPGroup:
    """The ranks one model is split over: this process's rank in it, its size, the process group."""

    def __init__(self, rank: int, size: int, group: Any = None):
        self.rank, self.size, self.group = rank, size, group

    def __repr__(self) -> str:
        return f"TPGroup(rank={self.rank}, size={self.size})"


def make_group(tp_size: int, mpu: Any = None, tp_group: Any = None) -> TPGroup:
    """The tensor-parallel group, as DeepSpeed forms it: the mpu's model-parallel group when an mpu
    is given, else ``tp_group`` when given, else consecutive ranks of the world in groups of
    ``tp_size`` (the process group is initialised with init_distributed() if it is not yet)."""
    if mpu is not None:
        size = mpu.get_model_parallel_world_size()
        if size != tp_size:
            raise ConfigError(f"mpu reports model-parallel size {size} but tensor_parallel.tp_size is {tp_size}")
        return TPGroup(mpu.get_model_parallel_rank(), size, mpu.get_model_parallel_group())
    if not comm.is_initialized():
        comm.init_distributed()
    world, rank = comm.get_world_size(), comm.get_rank()
    if tp_group is not None:
        size = comm.get_world_size(tp_group)
        if size != tp_size:
            raise ConfigError(f"tensor_parallel.tp_group has {size} ranks but tp_size is {tp_size}")
        return TPGroup(comm.get_rank(tp_group), size, tp_group)
    if world % tp_size:
        raise ConfigError(f"tensor_parallel.tp_size={tp_size} does not divide the world size {world}: start "
                          f"a multiple of {tp_size} processes (e.g. torchrun --nproc-per-node {tp_size})")
    if world == tp_size:
        return TPGroup(rank, tp_size, None)  # the world group
    mine = None
    for first in range(0, world, tp_size):  # every rank creates every group, as torch requires
        group = comm.new_group(list(range(first, first + tp_size)))
        if first <= rank < first + tp_size:
            mine = group
    return TPGroup(rank % tp_size, tp_size, mine)


def check_divisible(cfg, tp_size: int) -> None:
    for what, value in (("attention heads", cfg.num_heads), ("KV heads", cfg.num_kv_heads),
                        ("MLP inner width (ffn_hidden_size)", cfg.ffn_hidden_size)):
        if value % tp_size:
            raise ConfigError(f"tensor_parallel.tp_size={tp_size} does not divide the model's {what} ({value}); "
                              f"use a tp_size that divides {cfg.num_heads} heads, {cfg.num_kv_heads} KV heads and "
                              f"{cfg.ffn_hidden_size}")


def local_config(cfg, tp_size: int):
    check_divisible(cfg, tp_size)
    return cfg.replace(num_heads=cfg.num_heads // tp_size, num_kv_heads=cfg.num_kv_heads // tp_size,
                       ffn_hidden_size=cfg.ffn_hidden_size // tp_size)


def _rows(t: torch.Tensor, start: int, count: int) -> torch.Tensor:
    return t.narrow(0, start, count)


def shard_weight(name: str, tensor: torch.Tensor, cfg, rank: int, tp_size: int) -> torch.Tensor:
    """This rank's part of the full-model parameter ``name`` (layout of glmrt.graph)."""
    hd = cfg.head_dim
    nh, nkv, ffn = cfg.num_heads // tp_size, cfg.num_kv_heads // tp_size, cfg.ffn_hidden_size // tp_size
    if ".attn.qkv." in name:  # rows: q of every head, then k, then v
        q = _rows(tensor, rank * nh * hd, nh * hd)
        k = _rows(tensor, cfg.num_heads * hd + rank * nkv * hd, nkv * hd)
        v = _rows(tensor, (cfg.num_heads + cfg.num_kv_heads) * hd + rank * nkv * hd, nkv * hd)
        return torch.cat((q, k, v)).contiguous()
    if ".mlp.up." in name:  # rows; a gated activation has two halves of ffn rows each
        if cfg.mlp_in_size == 2 * cfg.ffn_hidden_size:
            return torch.cat((_rows(tensor, rank * ffn, ffn),
                              _rows(tensor, cfg.ffn_hidden_size + rank * ffn, ffn))).contiguous()
        return _rows(tensor, rank * ffn, ffn).contiguous()
    for suffix, width in ((".attn.dense.", nh * hd), (".mlp.down.", ffn)):
        if suffix in name:
            if name.endswith(".bias"):  # added once, by rank 0
                return tensor.clone() if rank == 0 else torch.zeros_like(tensor)
            return tensor.narrow(1, rank * width, width).contiguous()  # input columns
    return tensor  # replicated: embedding, norms, LM head


def _all_reduced(fn, group: TPGroup):
    def run(ctx, node, inputs, params):
        partial = fn(ctx, node, inputs, params)
        total = partial.float()
        comm.all_reduce(total, group=group.group)
        return total.to(partial.dtype)
    return run


def shard_model(model: Model, group: TPGroup, quantize: str | None, strict: bool) -> Model:
    """``model`` (float weights, on the sunway backend) split for ``group.rank`` of ``group.size``."""
    if any("quant" in node.attrs for node in model.graph.nodes):
        raise ConfigError("tensor parallelism splits float weights: pass the float model (or checkpoint) and ask "
                          "for int8 with dtype=torch.int8, which quantizes each rank's slices")
    cfg = local_config(model.config, group.size)
    graph = build_graph(cfg, model.dtype)
    weights = {name: shard_weight(name, model.weights[name], model.config, group.rank, group.size)
               for name in graph.params}
    for name, spec in graph.params.items():
        if tuple(weights[name].shape) != tuple(spec.shape):
            raise AssertionError(f"shard of {name} is {tuple(weights[name].shape)}, the local graph wants "
                                 f"{tuple(spec.shape)} (a bug in shard_weight)")
    want = parse_format(quantize)
    if want is not None:
        quantized = quantize_graph(graph, *want)
        weights = quantize_weights(graph, quantized, weights)
        graph = quantized
    plan = lower(graph, model.backend, weights, strict=strict)
    for step in plan.steps:
        if step.node.op == "linear" and step.node.name.endswith(ROW_PARALLEL):
            step.fn = _all_reduced(step.fn, group)
            step.reason += f"; partial sums all-reduced over {group.size} tensor-parallel ranks"
    out = Model(cfg, graph, plan, weights, f"{model.source} [tensor-parallel rank {group.rank} of {group.size}]")
    out.tokenizer, out.chat_family = model.tokenizer, model.chat_family
    return out
