"""``deepspeed.comm`` for the Sunway shim: torch.distributed's API with DeepSpeed 0.19's signatures.

Code written as ``from deepspeed import comm as dist`` (or ``import torch.distributed as dist``)
works with ``from glmrt.backends.sunway.swdeepspeed import comm as dist``. Where a real
``swDeepSpeed`` is importable, every call goes to ``swDeepSpeed.comm`` (looked up by the same
name, keyword arguments as DeepSpeed names them); otherwise to torch.distributed, over gloo on
the host. ``collectives_provider()`` says which.

DeepSpeed's extra keyword arguments (``prof``, ``log_name``, ``debug``: comms logging) are
accepted; without swDeepSpeed they have no effect. Like DeepSpeed, rank and size queries assert
that the process group was initialised (by init_distributed()).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import os
from datetime import timedelta
from enum import Enum
from typing import Any, Optional

import torch.distributed as torch_dist

from .config import DeepSpeedAssertionError

TORCH_DISTRIBUTED_DEFAULT_PORT = 29500
default_pg_timeout = timedelta(minutes=int(os.getenv("DEEPSPEED_TIMEOUT", default=10)))

VENDOR_MODULE = "swDeepSpeed"
# Collective backends torch offers on a CPU host.
HOST_BACKENDS = ("gloo", "mpi")


class ReduceOp(Enum):
    """DeepSpeed's ReduceOp (deepspeed/comm/reduce_op.py)."""

    SUM = 0
    PRODUCT = 1
    MIN = 2
    MAX = 3
    BAND = 4
    BOR = 5
    BXOR = 6
    AVG = 7
    UNUSED = 8


_vendor: tuple[Any, str] | None = None


def vendor_comm(refresh: bool = False):
    """swDeepSpeed.comm when a real swDeepSpeed imports, else None. Looked up once (``refresh``
    looks again, e.g. after sys.path changed)."""
    global _vendor
    if _vendor is None or refresh:
        if importlib.util.find_spec(VENDOR_MODULE) is None:
            _vendor = (None, f"{VENDOR_MODULE} is not installed")
        else:
            try:
                _vendor = (importlib.import_module(f"{VENDOR_MODULE}.comm"), f"{VENDOR_MODULE}.comm")
            except Exception as exc:  # noqa: BLE001 - a broken vendor install falls back, with the reason
                _vendor = (None, f"{VENDOR_MODULE} is installed but {VENDOR_MODULE}.comm does not import: "
                                 f"{type(exc).__name__}: {exc}")
    return _vendor[0]


def collectives_provider() -> str:
    """Where the collectives go: "swDeepSpeed.comm" or "torch.distributed (...)" with the reason."""
    module = vendor_comm()
    if module is not None:
        return f"{VENDOR_MODULE}.comm"
    return f"torch.distributed ({_vendor[1]})"


def _vendor_op(vendor, op):
    """Our ReduceOp as the vendor's (by name); torch's ReduceOp passes through."""
    if isinstance(op, ReduceOp) and hasattr(vendor, "ReduceOp"):
        return getattr(vendor.ReduceOp, op.name)
    return op


def _mirrored(fn):
    """Send the call to swDeepSpeed.comm's function of the same name when there is one;
    otherwise run the torch.distributed body."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        vendor = vendor_comm()
        target = getattr(vendor, fn.__name__, None) if vendor is not None else None
        if target is None:
            return fn(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        arguments = dict(bound.arguments)
        if arguments.get("debug") is None:
            arguments.pop("debug", None)  # DeepSpeed fills it with the caller's name
        if "op" in arguments:
            arguments["op"] = _vendor_op(vendor, arguments["op"])
        return target(**arguments)

    return call


def _torch_op(op) -> torch_dist.ReduceOp:
    if isinstance(op, ReduceOp):
        if op is ReduceOp.UNUSED:
            raise ValueError("ReduceOp.UNUSED is not a reduction")
        return getattr(torch_dist.ReduceOp, op.name)
    return op


def _require_initialized() -> None:
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        raise DeepSpeedAssertionError("DeepSpeed backend not set, please initialize it using init_process_group() "
                                      "(call deepspeed.init_distributed() first)")


# ----------------------------------------------------------------------------- process group
@_mirrored
def init_distributed(dist_backend: Optional[str] = None,
                     auto_mpi_discovery: bool = True,
                     distributed_port: int = TORCH_DISTRIBUTED_DEFAULT_PORT,
                     verbose: bool = True,
                     timeout: timedelta = default_pg_timeout,
                     init_method: Optional[str] = None,
                     dist_init_required: Optional[bool] = None,
                     config: Optional[Any] = None,
                     rank: int = -1,
                     world_size: int = -1) -> None:
    """Initialise the process group, as deepspeed.init_distributed does, on the host: gloo (or
    mpi where torch has it). A process started by a launcher (RANK / WORLD_SIZE / MASTER_ADDR in
    the environment) joins that world through ``init_method`` (default ``env://``, MASTER_PORT
    defaulting to ``distributed_port``); a process started alone, with no rank or size given,
    becomes a world of one. An already initialised group is left as it is. With
    ``dist_init_required=False`` the group must already exist (DeepSpeed asserts that too).
    ``auto_mpi_discovery`` (mpi4py) is not attempted: pass rank / world_size or use a launcher."""
    if dist_init_required is None:
        dist_init_required = not torch_dist.is_initialized()
    if dist_init_required is False:
        if not torch_dist.is_initialized():
            raise DeepSpeedAssertionError("Distributed backend is not initialized. Please set dist_init_required to "
                                          "True or initialize before calling deepspeed.initialize()")
        return
    if torch_dist.is_initialized():
        return
    backend = dist_backend or "gloo"
    if backend not in HOST_BACKENDS or (backend == "mpi" and not torch_dist.is_mpi_available()):
        raise ValueError(f"dist_backend {backend!r}: collectives on the Sunway host run over gloo"
                         f"{' or mpi' if torch_dist.is_mpi_available() else ''} (without swDeepSpeed installed)")
    if not isinstance(timeout, timedelta):
        raise DeepSpeedAssertionError(f"timeout must be a datetime.timedelta, got {type(timeout).__name__}")
    env_rank, env_world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
    from_launcher = env_rank is not None and env_world is not None
    if init_method is None and rank < 0 and world_size <= 0 and not from_launcher:
        store = torch_dist.HashStore()  # a world of one needs no rendezvous
        torch_dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
        return
    if init_method is None:
        init_method = "env://"
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(distributed_port))
    if rank < 0 and env_rank is not None:
        rank = int(env_rank)
    if world_size <= 0 and env_world is not None:
        world_size = int(env_world)
    torch_dist.init_process_group(backend, init_method=init_method, timeout=timeout, rank=rank, world_size=world_size)


@_mirrored
def is_initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


@_mirrored
def is_available() -> bool:
    return True


@_mirrored
def destroy_process_group(group: Optional[Any] = None) -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group(group)


@_mirrored
def new_group(ranks):
    _require_initialized()
    return torch_dist.new_group(ranks)


@_mirrored
def get_world_group():
    _require_initialized()
    return torch_dist.group.WORLD


@_mirrored
def get_world_size(group: Optional[Any] = None) -> int:
    _require_initialized()
    return torch_dist.get_world_size(group)


@_mirrored
def get_rank(group: Optional[Any] = None) -> int:
    _require_initialized()
    return torch_dist.get_rank(group)


@_mirrored
def get_local_rank() -> int:
    """LOCAL_RANK from the launcher (or Open MPI's), 0 when there is none."""
    _require_initialized()
    for name in ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK"):
        if name in os.environ:
            return int(os.environ[name])
    return 0


@_mirrored
def get_global_rank(group: Optional[Any] = None, group_rank: int = 0) -> int:
    _require_initialized()
    if group is None:
        return group_rank
    return torch_dist.get_global_rank(group, group_rank)


@_mirrored
def get_all_ranks_from_group(group=None):
    _require_initialized()
    return torch_dist.get_process_group_ranks(group or torch_dist.group.WORLD)


# ----------------------------------------------------------------------------- collectives
@_mirrored
def barrier(group=None, async_op=False, device_ids=None, prof=False, log_name="barrier", debug=None):
    _require_initialized()
    return torch_dist.barrier(group=group, async_op=async_op, device_ids=device_ids)


@_mirrored
def monitored_barrier(group=None, timeout=None, wait_all_ranks=False, prof=False, log_name="monitored_barrier",
                      debug=None):
    _require_initialized()
    return torch_dist.monitored_barrier(group=group, timeout=timeout, wait_all_ranks=wait_all_ranks)


@_mirrored
def broadcast(tensor, src, group=None, async_op=False, prof=False, log_name="broadcast", debug=None):
    _require_initialized()
    return torch_dist.broadcast(tensor, src, group=group, async_op=async_op)


@_mirrored
def broadcast_object_list(object_list, src, group=None, device=None, prof=False, log_name="broadcast_object_list",
                          debug=None):
    _require_initialized()
    return torch_dist.broadcast_object_list(object_list, src, group=group, device=device)


@_mirrored
def all_reduce(tensor, op=ReduceOp.SUM, group=None, async_op=False, prof=False, log_name="all_reduce", debug=None):
    _require_initialized()
    return torch_dist.all_reduce(tensor, op=_torch_op(op), group=group, async_op=async_op)


@_mirrored
def inference_all_reduce(tensor, op=ReduceOp.SUM, group=None, async_op=False, prof=False, log_name="all_reduce",
                         debug=None):
    """DeepSpeed's all-reduce for inference (a fused op where it has one; a plain one here)."""
    _require_initialized()
    return torch_dist.all_reduce(tensor, op=_torch_op(op), group=group, async_op=False)


@_mirrored
def all_reduce_coalesced(tensors, op=ReduceOp.SUM, group=None, async_op=False, prof=False, log_name="all_reduce",
                         debug=None):
    _require_initialized()
    works = [torch_dist.all_reduce(t, op=_torch_op(op), group=group, async_op=async_op) for t in tensors]
    return works if async_op else None


@_mirrored
def reduce(tensor, dst, op=ReduceOp.SUM, group=None, async_op=False, prof=False, log_name="reduce", debug=None):
    _require_initialized()
    return torch_dist.reduce(tensor, dst, op=_torch_op(op), group=group, async_op=async_op)


@_mirrored
def all_gather(tensor_list, tensor, group=None, async_op=False, prof=False, log_name="all_gather", debug=None):
    _require_initialized()
    return torch_dist.all_gather(tensor_list, tensor, group=group, async_op=async_op)


@_mirrored
def all_gather_into_tensor(output_tensor, tensor, group=None, async_op=False, prof=False,
                           log_name="all_gather_into_tensor", debug=None):
    _require_initialized()
    return torch_dist.all_gather_into_tensor(output_tensor, tensor, group=group, async_op=async_op)


@_mirrored
def all_gather_object(object_list, obj, group=None, prof=False, log_name="all_gather_object", debug=None):
    _require_initialized()
    return torch_dist.all_gather_object(object_list, obj, group=group)


@_mirrored
def reduce_scatter(output, input_list, op=ReduceOp.SUM, group=None, async_op=False, prof=False,
                   log_name="reduce_scatter", debug=None):
    _require_initialized()
    return torch_dist.reduce_scatter(output, input_list, op=_torch_op(op), group=group, async_op=async_op)


@_mirrored
def reduce_scatter_tensor(output_tensor, tensor, op=ReduceOp.SUM, group=None, async_op=False, prof=False,
                          log_name="reduce_scatter_tensor", debug=None):
    _require_initialized()
    return torch_dist.reduce_scatter_tensor(output_tensor, tensor, op=_torch_op(op), group=group, async_op=async_op)


@_mirrored
def all_to_all_single(output, tensor, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False,
                      prof=False, log_name="all_to_all_single", debug=None):
    _require_initialized()
    return torch_dist.all_to_all_single(output, tensor, output_split_sizes=output_split_sizes,
                                        input_split_sizes=input_split_sizes, group=group, async_op=async_op)


@_mirrored
def all_to_all(output_tensor_list, input_tensor_list, group=None, async_op=False, prof=False, log_name="all_to_all",
               debug=None):
    _require_initialized()
    return torch_dist.all_to_all(output_tensor_list, input_tensor_list, group=group, async_op=async_op)


@_mirrored
def gather(tensor, gather_list=None, dst=0, group=None, async_op=False, prof=False, log_name="gather", debug=None):
    _require_initialized()
    return torch_dist.gather(tensor, gather_list=gather_list, dst=dst, group=group, async_op=async_op)


@_mirrored
def scatter(tensor, scatter_list=None, src=0, group=None, async_op=False, prof=False, log_name="scatter", debug=None):
    _require_initialized()
    return torch_dist.scatter(tensor, scatter_list=scatter_list, src=src, group=group, async_op=async_op)


@_mirrored
def send(tensor, dst, group=None, tag=0, prof=False, log_name="send", debug=None):
    _require_initialized()
    return torch_dist.send(tensor, dst, group=group, tag=tag)


@_mirrored
def recv(tensor, src=None, group=None, tag=0, prof=False, log_name="recv", debug=None):
    _require_initialized()
    return torch_dist.recv(tensor, src=src, group=group, tag=tag)


@_mirrored
def isend(tensor, dst, group=None, tag=0, prof=False, log_name="isend", debug=None):
    _require_initialized()
    return torch_dist.isend(tensor, dst, group=group, tag=tag)


@_mirrored
def irecv(tensor, src=None, group=None, tag=0, prof=False, log_name="irecv", debug=None):
    _require_initialized()
    return torch_dist.irecv(tensor, src=src, group=group, tag=tag)


__all__ = [
    "ReduceOp", "TORCH_DISTRIBUTED_DEFAULT_PORT", "default_pg_timeout", "collectives_provider", "vendor_comm",
    "init_distributed", "is_initialized", "is_available", "destroy_process_group", "new_group", "get_world_group",
    "get_world_size", "get_rank", "get_local_rank", "get_global_rank", "get_all_ranks_from_group",
    "barrier", "monitored_barrier", "broadcast", "broadcast_object_list", "all_reduce", "inference_all_reduce",
    "all_reduce_coalesced", "reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "reduce_scatter",
    "reduce_scatter_tensor", "all_to_all_single", "all_to_all", "gather", "scatter", "send", "recv", "isend", "irecv",
]
