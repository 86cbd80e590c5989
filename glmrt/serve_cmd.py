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
    p.add_argument("--tensor-parallel", type=int, default=1,
                   help="not available in serve yet (glmrt run and the Python API take it under torchrun)")
    p.add_argument("--log-level", default="warning", help="uvicorn's log level (default: warning)")
    p.set_defaults(handler=run_serve)


def run_serve(args) -> int:
    if args.tensor_parallel != 1 or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise GLMRTError("glmrt serve --tensor-parallel is not available yet: the server's engine schedules requests "
                         "in one process, and under tensor parallelism every rank would have to take the same "
                         "scheduling steps (rank 0 serving HTTP and sending each step to the others), which is not "
                         "built. Serve on one device, or run tensor-parallel with `torchrun --nproc-per-node N -m "
                         "glmrt run MODEL --tensor-parallel N` or glmrt.load(..., tensor_parallel=N) in a script")
    for name in ("max_batch", "port", "max_waiting"):
        if getattr(args, name) < 1:
            raise GLMRTError(f"--{name.replace('_', '-')} must be a positive integer")
    from .server import serve
    return serve(args.model, backend=args.backend, dtype=args.dtype, quantize=args.quantize, layers=args.layers,
                 host=args.host, port=args.port, max_batch=args.max_batch, max_len=args.max_len,
                 max_waiting=args.max_waiting, served_model_name=args.served_model_name, strict=args.strict,
                 log_level=args.log_level)
