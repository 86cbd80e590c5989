"""The tensor-parallel process group, on torch.distributed.

torchrun starts one process per rank and sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; ``init_tensor_parallel`` joins (or, from that environment, creates) the default
process group with the transport the backend declares as its ``collective_backend`` (gloo on the
CPU, nccl on CUDA and ROCm, hccl on Ascend) and a timeout, so that a rank that dies or hangs turns
into a glmrt error on the others instead of a silent wait. The core only uses torch.distributed;
a transport's own module (torch_npu for hccl, ...) is imported by its backend.

``Communicator`` is what the collective nodes of a sharded graph call (glmrt.ops.all_reduce /
all_gather). It counts the collectives it ran, per kind, for tests and benchmarks, and times them
when asked (``timing=True``: a wall-clock sum, for the communication share of a step).
"""

from __future__ import annotations

import collections
import datetime
import os
import time

import torch

from .errors import GLMRTError

DEFAULT_TIMEOUT_S = 300.0
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(GLMRTError):
    """A missing or mismatched process group, or a collective that failed or timed out."""


def _dist():
    import torch.distributed as dist
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed, which tensor parallelism needs: install "
                               "a torch wheel built with distributed support")
    return dist


class Communicator:
    """The collectives of one tensor-parallel group (the default process group)."""

    def __init__(self, size: int, rank: int, group=None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 transport: str = "gloo", collectives=None, accumulate_fp32: bool = False, root: int = 0):
        """``collectives``: the module whose all_reduce(tensor, group=) / all_gather(list, tensor,
        group=) / broadcast_object_list / barrier carry the data (default torch.distributed; the
        Sunway shim passes its deepspeed.comm). ``accumulate_fp32``: all-reduce half-precision
        partial sums in fp32 and round once (the shim's rule; the releases reduce in the model dtype)."""
        self.size, self.rank, self.group = size, rank, group
        self.collectives = collectives
        self.accumulate_fp32 = accumulate_fp32
        self.root = root  # the global rank of this group's rank 0 (the source of broadcasts)
        self.timeout_s = timeout_s
        self.transport = transport
        self.counts: collections.Counter = collections.Counter()
        self.timing = False
        self.seconds = 0.0  # time spent inside collectives while timing is on

    def __repr__(self) -> str:
        return f"Communicator(size={self.size}, rank={self.rank}, transport={self.transport})"

    def _run(self, kind: str, what: str, fn):
        t0 = time.perf_counter() if self.timing else 0.0
        try:
            out = fn()
        except Exception as exc:  # gloo raises RuntimeError on a timeout, nccl DistBackendError
            raise DistributedError(
                f"tensor-parallel rank {self.rank}/{self.size}: {kind} for {what} failed ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else 'no message'}); glmrt's timeout for the process group "
                f"is {self.timeout_s:g} s. Another rank died, hangs, or runs a different model or call: every rank "
                "must load the same model and make the same calls with the same arguments") from exc
        if self.timing:
            if isinstance(out, torch.Tensor) and out.device.type == "cuda":
                torch.cuda.synchronize()  # the time of the transfer, not of queueing it
            self.seconds += time.perf_counter() - t0
        self.counts[kind] += 1
        return out

    def _ops(self):
        return self.collectives if self.collectives is not None else _dist()

    def all_reduce(self, x: torch.Tensor, what: str = "a tensor") -> torch.Tensor:
        dist = self._ops()
        dtype = x.dtype
        x = x.float() if self.accumulate_fp32 and dtype != torch.float32 else x.contiguous()

        def run():
            dist.all_reduce(x, group=self.group)
            return x.to(dtype)
        return self._run("all_reduce", what, run)

    def all_gather(self, x: torch.Tensor, what: str = "a tensor", dim: int = -1) -> torch.Tensor:
        dist = self._ops()
        x = x.contiguous()

        def run():
            parts = [torch.empty_like(x) for _ in range(self.size)]
            dist.all_gather(parts, x, group=self.group)
            return torch.cat(parts, dim=dim)
        return self._run("all_gather", what, run)

    def broadcast_object(self, obj, what: str = "an object"):
        dist = self._ops()
        box = [obj if self.rank == 0 else None]

        def run():
            dist.broadcast_object_list(box, src=self.root, group=self.group)
            return box[0]
        return self._run("broadcast", what, run)

    def gather_objects(self, obj, what: str = "an object", kind: str = "gather_object") -> list:
        """Every rank's ``obj`` (picklable), in rank order, on every rank (any transport: nccl
        carries them through the device). Counted as ``kind``, apart from the model's collectives."""
        dist = self._ops()

        def run():
            parts = [None] * self.size
            dist.all_gather_object(parts, obj, group=self.group)
            return parts
        return self._run(kind, what, run)

    def agree(self, value: int, what: str = "a check") -> list[int]:
        """Every rank's ``value`` (an integer), in rank order: the ranks compare what they are about
        to run (counted as "agree")."""
        return [int(v) for v in self.gather_objects(int(value), what, kind="agree")]

    def shared_seed(self) -> int:
        """A random seed drawn on rank 0 and sent to every rank (sampling without a seed must still
        draw the same token everywhere)."""
        return int(self.broadcast_object(int(torch.randint(0, 2 ** 62, ()).item()) if self.rank == 0 else None,
                                         "the sampling seed"))

    def barrier(self, what: str = "a barrier") -> None:
        dist = self._ops()
        self._run("barrier", what, lambda: dist.barrier(group=self.group))


def torchrun_env() -> dict[str, str]:
    return {k: os.environ[k] for k in TORCHRUN_VARS + ("LOCAL_RANK",) if k in os.environ}


def init_tensor_parallel(size: int, transport: str | None, backend_name: str,
                         timeout_s: float = DEFAULT_TIMEOUT_S) -> Communicator:
    """Join the default process group (creating it from torchrun's environment when it does not
    exist yet) and check that it has ``size`` processes; returns the communicator."""
    if transport is None:
        raise DistributedError(f"backend {backend_name!r} declares no collective backend, so it cannot run "
                               f"tensor_parallel={size}; use a backend that has one (cpu: gloo, cuda/rocm: nccl, "
                               "npu: hccl) or load without tensor_parallel")
    if not isinstance(timeout_s, (int, float)) or isinstance(timeout_s, bool) or timeout_s <= 0:
        raise DistributedError(f"the tensor-parallel timeout must be a positive number of seconds, got {timeout_s!r}")
    dist = _dist()
    if not dist.is_initialized():
        missing = [k for k in TORCHRUN_VARS if k not in os.environ]
        if missing:
            raise DistributedError(
                f"tensor_parallel={size} needs a process group, and none is initialised and the torchrun variables "
                f"{', '.join(missing)} are not set: launch with `torchrun --nproc-per-node {size} ...` (or call "
                "torch.distributed.init_process_group before glmrt.load)")
        world = int(os.environ["WORLD_SIZE"])
        if world != size:
            raise DistributedError(f"tensor_parallel={size} but torchrun started WORLD_SIZE={world} processes: launch "
                                   f"with --nproc-per-node {size}, or pass tensor_parallel={world}")
        try:
            dist.init_process_group(backend=transport, timeout=datetime.timedelta(seconds=timeout_s))
        except Exception as exc:
            raise DistributedError(f"could not start the {transport} process group for tensor_parallel={size} "
                                   f"(rank {os.environ.get('RANK')}, MASTER_ADDR {os.environ.get('MASTER_ADDR')}:"
                                   f"{os.environ.get('MASTER_PORT')}) within {timeout_s:g} s: {exc}") from exc
    world, rank = dist.get_world_size(), dist.get_rank()
    if world != size:
        raise DistributedError(f"tensor_parallel={size} but the process group has {world} processes: launch with "
                               f"`torchrun --nproc-per-node {size}`, or pass tensor_parallel={world}")
    have = str(dist.get_backend()).lower()
    if transport.lower() not in have.split(":") and transport.lower() not in have:
        raise DistributedError(f"the process group runs {have!r} but backend {backend_name!r} moves its tensors with "
                               f"{transport!r}: initialise the group with backend={transport!r} (or let glmrt.load "
                               "initialise it from torchrun's environment)")
    return Communicator(size, rank, None, timeout_s, transport)
