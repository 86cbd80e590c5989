"""`glmrt serve`: the command-line entry of glmrt.server (FastAPI is imported only when it runs)."""

from __future__ import annotations

import os

from .errors import GLMRTError


def register(subparsers) -> None:
    """Adds `glmrt serve` (see glmrt.cli's _COMMAND_MODULES)."""
    from .cli import add_model_flags
    p = subparsers.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching")
    add_model_flags(p, model_required=True)
    p.add_argument("--quantize", default=None, help="int8 | int4 | int4-g64 ...: weight-only quantization on load")
    p.add_argument("--max-batch", type=int, default=8,
                   help="KV-cache slots: requests decoded together (default: 8; the CPU GEMVs take 8 rows a pass)")
    p.add_argument("--max-len", type=int, default=None,
                   help="positions per slot, prompt + completion (default: the model's context, at most 2048)")
    p.add_argument("--max-waiting", type=int, default=64,
                   help="requests that may wait for a slot; more get 429 with Retry-After (default: 64)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: MODEL as given)")
    p.add_argument("--tensor-parallel", type=int, default=None, metavar="N",
                   help="serve as one of N tensor-parallel ranks, under `torchrun --nproc-per-node N -m glmrt serve "
                        "MODEL --tensor-parallel N`: rank 0 runs the HTTP server and the scheduler, the other ranks "
                        "replay each engine step on their shard")
    p.add_argument("--distributed-timeout", type=float, default=300.0, metavar="S",
                   help="seconds a tensor-parallel rank waits for the others before it fails with an error; an idle "
                        "rank 0 sends a keep-alive well within it (default: 300)")
    p.add_argument("--log-level", default="warning", help="uvicorn's log level (default: warning)")
    p.set_defaults(handler=run_serve)


def run_serve(args) -> int:
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if args.tensor_parallel is None and world > 1:
        raise GLMRTError(f"torchrun started {world} processes but --tensor-parallel is not given: pass "
                         f"--tensor-parallel {world}")
    for name in ("max_batch", "port", "max_waiting"):
        if getattr(args, name) < 1:
            raise GLMRTError(f"--{name.replace('_', '-')} must be a positive integer")
    if args.tensor_parallel is not None and args.tensor_parallel < 1:
        raise GLMRTError(f"--tensor-parallel must be a positive integer, got {args.tensor_parallel}")
    if not args.distributed_timeout > 0:
        raise GLMRTError(f"--distributed-timeout must be a positive number of seconds, got {args.distributed_timeout}")
    from .server import serve
    return serve(args.model, backend=args.backend, dtype=args.dtype, quantize=args.quantize, layers=args.layers,
                 host=args.host, port=args.port, max_batch=args.max_batch, max_len=args.max_len,
                 max_waiting=args.max_waiting, served_model_name=args.served_model_name, strict=args.strict,
                 log_level=args.log_level, tensor_parallel=args.tensor_parallel,
                 distributed_timeout=args.distributed_timeout)
