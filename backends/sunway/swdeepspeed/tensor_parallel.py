"""Tensor parallelism for the shim's init_inference(tensor_parallel={"tp_size": N}), Megatron style.

One implementation with glmrt's own: the model's graph goes through the shard pass
(glmrt.shard: qkv column-parallel by heads, KV groups split or replicated, attention output and
MLP down row-parallel with one all-reduce each and the full bias added after it, GLU halves split
per half, vocab-parallel embedding and LM head with the logits gathered), and the collectives go
through the shim's comm module (swDeepSpeed.comm when installed, else torch.distributed over
gloo), with the partial sums all-reduced in fp32 and rounded once to the model dtype. A rank's
Model config has its share of the heads, KV groups and MLP width; its KV cache holds only its own
groups. Quantization (dtype=torch.int8) happens after sharding, on each rank's slices.
"""

from __future__ import annotations

from typing import Any


from ....distributed import Communicator
from ....errors import ConfigError
from ....graph import build_graph
from ....lowering import lower
from ....model import Model
from ....quant import parse_format, quantize_graph, quantize_weights
from ....shard import ALL_REDUCE, ROW_PARALLEL, shard_graph, shard_weights, tp_layout
from . import comm


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
    """The shard pass's rule (glmrt.shard.tp_layout: heads divide, KV groups divide or are
    replicated, MLP width divides), with DeepSpeed's option name in the message."""
    try:
        tp_layout(cfg, tp_size, 0)
    except ConfigError as exc:
        for what, value in (("attention heads", cfg.num_heads), ("MLP inner width (ffn_hidden_size)",
                                                                 cfg.ffn_hidden_size)):
            if value % tp_size:
                raise ConfigError(f"tensor_parallel.tp_size={tp_size} does not divide the model's {what} ({value}); "
                                  f"use a tp_size that divides {cfg.num_heads} heads and {cfg.ffn_hidden_size}") from None
        raise ConfigError(f"tensor_parallel.tp_size={tp_size}: {exc}") from None


def local_config(cfg, tp_size: int):
    """The config of one rank's share: its heads, KV groups and MLP width (the vocabulary and the
    rest stay the whole model's)."""
    check_divisible(cfg, tp_size)
    lay = tp_layout(cfg, tp_size, 0)
    return cfg.replace(num_heads=lay.heads, num_kv_heads=lay.kv_heads, ffn_hidden_size=lay.ffn)


def shard_model(model: Model, group: TPGroup, quantize: str | None, strict: bool) -> Model:
    """``model`` (float weights, on the sunway backend) split for ``group.rank`` of ``group.size``
    by glmrt's shard pass (glmrt.shard), its collectives carried by the shim's comm module."""
    if any("quant" in node.attrs for node in model.graph.nodes):
        raise ConfigError("tensor parallelism splits float weights: pass the float model (or checkpoint) and ask "
                          "for int8 with dtype=torch.int8, which quantizes each rank's slices")
    cfg = local_config(model.config, group.size)
    full = build_graph(model.config, model.dtype)  # the unfused graph of the whole model
    graph = shard_graph(full, group.size, group.rank)
    weights = shard_weights(full, {name: model.weights[name] for name in full.params}, group.size, group.rank)
    want = parse_format(quantize)
    if want is not None:
        quantized = quantize_graph(graph, *want)
        weights = quantize_weights(graph, quantized, weights)
        graph = quantized
    root = comm.get_rank() - group.rank  # the groups are consecutive ranks (make_group)
    communicator = Communicator(group.size, group.rank, group.group, transport="gloo", collectives=comm,
                                accumulate_fp32=True, root=root)
    plan = lower(graph, model.backend, weights, strict=strict, comm=communicator)
    for step in plan.steps:
        if step.node.op == ALL_REDUCE and step.node.name.removesuffix(".all_reduce").endswith(ROW_PARALLEL):
            step.reason += f"; partial sums all-reduced over {group.size} tensor-parallel ranks (fp32)"
    out = Model(cfg, graph, plan, weights, f"{model.source} [tensor-parallel rank {group.rank} of {group.size}]")
    out.tokenizer, out.chat_family = model.tokenizer, model.chat_family
    return out
