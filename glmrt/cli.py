"""The `glmrt` command (also `python -m glmrt`).

Generation flags and their defaults are read from Model.generate's signature, so the CLI and the
Python API cannot disagree.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

from .errors import GLMRTError

# Model.generate parameters exposed as flags: name -> (type, help).
_GENERATION_FLAGS = {
    "max_new_tokens": (int, "number of tokens to generate"),
    "do_sample": (bool, "sample instead of greedy decoding"),
    "temperature": (float, "sampling temperature (0: greedy decoding)"),
    "top_k": (int, "keep the k most likely tokens (0: off)"),
    "top_p": (float, "nucleus sampling mass (1.0: off)"),
    "repetition_penalty": (float, "penalty for tokens already in the sequence (1.0: off)"),
    "seed": (int, "random seed for sampling"),
}


# Modules that add their own subcommands (see _parser).
_COMMAND_MODULES: tuple[str, ...] = ("glmrt.bench", "glmrt.conformance", "glmrt.quantize_cmd", "glmrt.serve_cmd",
                                    "glmrt.onnx_export.cli")


def _add_generation_flags(p: argparse.ArgumentParser, defaults: dict | None = None) -> None:
    """The generation flags; defaults are Model.generate's unless ``defaults`` names the API
    function's own (chat: Model.chat's max_new_tokens)."""
    from .model import Model
    defaults = {**{k: v.default for k, v in inspect.signature(Model.generate).parameters.items()}, **(defaults or {})}
    for name, (typ, help_) in _GENERATION_FLAGS.items():
        flag = "--" + name.replace("_", "-")
        if typ is bool:
            p.add_argument(flag, action="store_true", default=defaults[name], help=help_)
        else:
            p.add_argument(flag, type=typ, default=defaults[name], help=f"{help_} (default: {defaults[name]})")


def add_generation_flags(p: argparse.ArgumentParser) -> None:
    """For subcommand modules: the generation flags, defaults taken from Model.generate."""
    _add_generation_flags(p)


def add_model_flags(p: argparse.ArgumentParser, model_required: bool = True) -> None:
    """For subcommand modules: MODEL, --backend, --dtype, --layers, --strict."""
    _add_model_flags(p, model_required)


def _add_model_flags(p: argparse.ArgumentParser, model_required: bool) -> None:
    if model_required:
        p.add_argument("model", help="checkpoint directory or synthetic:<preset>")
    else:
        p.add_argument("model", nargs="?", help="checkpoint directory or synthetic:<preset> (shows its plan)")
    p.add_argument("--backend", default="auto", help="backend name or alias, or auto (default: auto)")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the checkpoint's)")
    p.add_argument("--layers", type=int, default=None, help="keep only the first N layers")
    p.add_argument("--strict", action="store_true", help="fail if any op falls back to the torch reference")


def _add_load_flags(p: argparse.ArgumentParser) -> None:
    """glmrt.load's --quantize and --kernels, for the commands that load a model to generate."""
    from .lowering import KERNEL_CHOICES
    p.add_argument("--quantize", default=None,
                   help="quantize on load: int8 | int4 | int4-g64 ... (default: the checkpoint as it is)")
    p.add_argument("--kernels", default="auto", choices=KERNEL_CHOICES,
                   help="auto: the backend's best kernel per node; reference: every node on the torch "
                        "reference (default: auto)")
    p.add_argument("--tensor-parallel", type=int, default=None, metavar="N",
                   help="run as one of N tensor-parallel ranks, under `torchrun --nproc-per-node N -m glmrt ...` "
                        "(rank 0 prints)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glmrt", description="Run GLM-family models on any accelerator.")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="backends (availability, verification) and, with a model, its plan")
    _add_model_flags(info, model_required=False)
    info.add_argument("--quantize", default=None,
                      help="int8 | int4 | int4-g64 ...: show the plan of the model quantized this way")
    info.add_argument("--json", action="store_true", help="print JSON")

    run = sub.add_parser("run", help="load a model and generate")
    _add_model_flags(run, model_required=True)
    _add_load_flags(run)
    group = run.add_mutually_exclusive_group()
    group.add_argument("--prompt-ids", default=None, help="comma-separated prompt token ids")
    group.add_argument("--prompt", default=None, help="prompt text (needs a checkpoint with a tokenizer)")
    _add_generation_flags(run)
    run.add_argument("--json", action="store_true", help="print the result as JSON")

    chat = sub.add_parser("chat", help="interactive chat with streaming replies (needs a checkpoint's tokenizer)")
    _add_model_flags(chat, model_required=True)
    _add_load_flags(chat)
    chat.add_argument("--system", default=None, help="a system message to start with")
    from .model import CHAT_MAX_NEW_TOKENS
    _add_generation_flags(chat, {"max_new_tokens": CHAT_MAX_NEW_TOKENS})

    presets = sub.add_parser("presets", help="list the synthetic presets")
    presets.add_argument("--json", action="store_true")

    memory = sub.add_parser("memory", help="bytes per device at tensor-parallel sizes 1/2/4/8, and the smallest "
                                           "that fits (nothing is loaded)")
    memory.add_argument("model", help="checkpoint directory or synthetic:<preset> (a bare preset name works too)")
    where = memory.add_mutually_exclusive_group()
    from .memory import DEVICES
    where.add_argument("--device", default=None, help=f"a known device: {', '.join(DEVICES)}")
    where.add_argument("--memory", default=None, metavar="GiB", help="the memory of one device in GiB")
    memory.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the checkpoint's)")
    memory.add_argument("--quantize", default=None, help="int8 | int4 | int4-g64 ... (default: the checkpoint as it is)")
    memory.add_argument("--context", type=int, default=2048, help="tokens per sequence: prompt + generated "
                                                                  "(default: 2048)")
    memory.add_argument("--batch", type=int, default=1, help="sequences decoded together (default: 1)")
    memory.add_argument("--layers", type=int, default=None, help="keep only the first N layers")
    memory.add_argument("--json", action="store_true", help="print JSON")

    # Larger commands live in their own modules; each has register(subparsers) that adds its
    # parser and sets `handler` (a function of the parsed args returning an exit code).
    for module_name in _COMMAND_MODULES:
        importlib.import_module(module_name).register(sub)
    return parser


def _print_backends(rows: list[dict]) -> None:
    print("backends:")
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        mark = "available  " if r["available"] else "unavailable"
        print(f"  {r['name']:<{width}}  {mark}  [{r['verification']}]  {r['reason']}")
        native = r.get("native")
        if native:
            print(f"  {'':<{width}}  native: {_native_line(native)}")


def _native_line(native: dict) -> str:
    if native.get("built"):
        return f"{native.get('module')} built for {', '.join(native.get('archs') or ['?'])}"
    return f"none ({native.get('reason', 'not built')})"


_KIND_LABEL = {"native": "native", "vendor": "vendor", "reference": "fallback"}


def _op_coverage(backend) -> list[dict]:
    """Per IR op: the kernels the backend offers, best first, or that the op falls back."""
    from . import ops
    from .backends.base import KIND_RANK
    if getattr(backend, "export_format", None):  # whole exported graphs (onnxruntime), not per-node kernels
        why = (f"runs inside the {backend.export_format} export's session; `glmrt info DIR` shows where its nodes "
               "were placed")
        return [{"op": op, "kernels": [], "plan": "session", "why": why} for op in ops.REFERENCE]
    try:
        kernels = sorted(backend.kernels(), key=lambda k: KIND_RANK.get(k.kind, 9))
    except Exception as exc:  # noqa: BLE001 - info never raises for a broken backend
        return [{"op": op, "kernels": [], "plan": "fallback", "why": f"kernels() raised {type(exc).__name__}: {exc}"}
                for op in ops.REFERENCE]
    rows = []
    for op in ops.REFERENCE:
        mine = [{"name": k.name, "kind": k.kind} for k in kernels if k.op == op]
        if mine:
            best = mine[0]["kind"]
            why = (f"{mine[0]['name']} where its supports() accepts the node's shapes and dtypes"
                   + (f", else {', '.join(k['name'] for k in mine[1:])}" if len(mine) > 1 else "")
                   + ", else the torch reference")
        else:
            best, why = "reference", f"no kernel for {op!r}: the core's torch reference runs on the backend's device"
        rows.append({"op": op, "kernels": mine, "plan": _KIND_LABEL[best], "why": why})
    return rows


def _cmd_info(args) -> int:
    from .backends import get_backend, list_backends
    from .backends.base import native_summary
    out: dict = {"glmrt": _version(), "python": platform.python_version(), "torch": _torch_version()}
    out["backends"] = list_backends()
    for row in out["backends"]:
        row["native"] = native_summary(get_backend(row["name"]))
    if args.backend != "auto" and not args.model:
        backend = get_backend(args.backend)
        out["backend"] = backend.describe()
        out["backend"]["ops"] = _op_coverage(backend)
    from .onnx_export import is_export
    if args.model and is_export(args.model):
        # An ONNX export: its session is built, which is where onnxruntime reports the node placement.
        from .api import load
        model = load(args.model, backend=args.backend, dtype=args.dtype, layers=args.layers, quantize=args.quantize,
                     strict=args.strict)
        out["model"] = model.info()
        out["plan"] = model.plan.report()
        out["backend"] = model.backend.describe()
        out["backend"]["ops"] = _op_coverage(model.backend)
    elif args.model:
        # The plan depends on the graph only (a kernel's supports() sees the node, never the data):
        # plan on meta tensors, so nothing is read or generated, and without the hardware when the
        # backend is absent.
        from .api import plan as make_plan
        from .backends.base import safe_probe
        from .config import dtype_name
        backend = get_backend(args.backend)
        probe = safe_probe(backend)
        plan = make_plan(args.model, backend=backend.name, dtype=args.dtype, layers=args.layers,
                         quantize=args.quantize, strict=args.strict)
        g = plan.graph
        if probe.available:
            device = str(backend.device())
            why = "the model was planned (kernel choice per node) on meta tensors: no weight was read or generated"
        else:
            device = "none (planned only)"
            why = (f"backend {backend.name!r} is not available here ({probe.reason}); the model was planned "
                   "(kernel choice per node) but not loaded")
        out["model"] = {"source": args.model, "config": g.config.to_dict(), "dtype": dtype_name(g.dtype),
                        "backend": backend.name, "device": device,
                        "weight_bytes": sum(math.prod(p.shape) * p.dtype.itemsize for p in g.params.values()),
                        "plan": plan.summary(), "planned_only": True, "why": why}
        out["plan"] = plan.report()
        out["backend"] = backend.describe()
        out["backend"]["ops"] = _op_coverage(backend)
    elif args.quantize:
        raise GLMRTError("--quantize needs a MODEL: it shows that model's plan quantized")
    if args.json:
        print(json.dumps(out, indent=2, default=str))
        return 0
    print(f"glmrt {out['glmrt']}  python {out['python']}  torch {out['torch']}")
    _print_backends(out["backends"])
    if "backend" in out:
        b = out["backend"]
        caps = b["capabilities"]
        print(f"\nbackend {b['name']}{' (aliases: ' + ', '.join(b['aliases']) + ')' if b['aliases'] else ''}: "
              f"{'available' if b['available'] else 'unavailable'}; {b['reason']}")
        print(f"  verification: {b['verification']['level']} - {b['verification']['detail']}")
        if "error" in caps:
            print(f"  capabilities: error: {caps['error']}")
        else:
            print(f"  dtypes: {', '.join(caps['dtypes'])}; quantized weights: "
                  f"{', '.join(caps['quant_formats']) or 'none'}; graph capture: "
                  f"{'yes' if caps['graph_capture'] else 'no'}; collectives: {caps['collective_backend'] or 'none'}; "
                  f"memory query: {'yes' if caps['memory_query'] else 'no'}")
        native = b["native"]
        print(f"  native: {_native_line(native)}")
        if native.get("built") and native.get("reason"):
            print(f"          {native['reason']}")
        extra = {k: v for k, v in native.items() if k not in ("built", "archs", "module", "reason")}
        if extra:
            print(f"          {json.dumps(extra, default=str)}")
        if not args.model:
            print("  ops (kernels best first; a node no kernel supports runs the torch reference = fallback):")
            op_width = max(len(row["op"]) for row in b["ops"])
            for row in b["ops"]:
                names = ", ".join(f"{k['name']} [{k['kind']}]" for k in row["kernels"]) or "-"
                print(f"    {row['op']:<{op_width}} {row['plan']:<9} {names}")
                if not row["kernels"]:
                    print(f"    {'':<{op_width}} {row['why']}")
    if args.model:
        m = out["model"]
        c = m["config"]
        print(f"\nmodel {m['source']}: {c['generation']}, {c['num_layers']} layers, hidden {c['hidden_size']}, "
              f"{m['dtype']}, {m['weight_bytes'] / 1e9:.2f} GB of weights on {m['device']}")
        if m.get("planned_only"):
            print(f"(planned only: {m['why']})")
        print("plan (per op: native / vendor / fallback, the kernel, and why):")
        op_width = max((len(row["op"]) for row in m["plan"]), default=0)
        impl_width = max((len(row["impl"]) for row in m["plan"]), default=0)
        for row in m["plan"]:
            label = _KIND_LABEL.get(row["kind"], row["kind"])
            print(f"  {row['op']:<{op_width}} x{row['nodes']:<4} {label:<9} {row['impl']:<{impl_width}} "
                  f"{row['reason']}")
        fallbacks = sum(row["nodes"] for row in m["plan"] if row["kind"] == "reference")
        print(f"{fallbacks} node(s) fall back to the torch reference" if fallbacks else "no fallbacks")
    return 0


def _tokenizer_family_of(spec: str) -> str | None:
    """Which tokenizer family the checkpoint ships (None: none), read from its config and files
    only, so that a command that needs text can say so before loading any weight. A source that
    cannot be read at all returns "unknown": glmrt.load then says what is wrong with it."""
    from . import checkpoint
    from .api import SYNTHETIC_PREFIX
    from .models import config_from_dict, glm130b, tokenizer_family
    from .quant import FORMAT_KEY
    if spec.startswith(SYNTHETIC_PREFIX):  # a preset gets a synthetic tokenizer of its release's kind
        from .synthetic_tokenizer import PRESET_FAMILIES
        return PRESET_FAMILIES.get(spec[len(SYNTHETIC_PREFIX):], "unknown")
    directory = Path(spec).expanduser()
    try:
        if not (directory / "config.json").is_file() and glm130b.is_sat_dir(directory):
            raw = glm130b.read_model_args(directory)
        else:
            raw = checkpoint.read_config(directory)
        _, cfg = config_from_dict({k: v for k, v in raw.items() if k != FORMAT_KEY})
    except (GLMRTError, OSError):
        return "unknown"
    return tokenizer_family(cfg, directory)


def _load_for(args, needs_text: str | None = None):
    """glmrt.load with the command's flags; ``needs_text`` (the flag or command that needs a
    tokenizer) is checked before the weights are read."""
    from .api import load
    if needs_text and _tokenizer_family_of(args.model) is None:
        raise GLMRTError(f"{args.model} has no tokenizer glmrt can read, which {needs_text} needs: load a "
                         "checkpoint directory that ships its tokenizer files (or a synthetic preset)"
                         + (", or pass --prompt-ids" if needs_text == "--prompt" else ""))
    return load(args.model, backend=args.backend, dtype=args.dtype, layers=args.layers, strict=args.strict,
                quantize=args.quantize, kernels=args.kernels, tensor_parallel=args.tensor_parallel)


def _tensor_parallel_rank(args) -> int:
    """This process's rank when the command runs tensor-parallel (0 otherwise). Launched by torchrun
    with several processes, a command must say --tensor-parallel with the same number."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    tp = getattr(args, "tensor_parallel", None)
    if tp is None:
        if world > 1 and hasattr(args, "tensor_parallel"):
            raise GLMRTError(f"torchrun started {world} processes but --tensor-parallel is not given: pass "
                             f"--tensor-parallel {world} (each process would otherwise load the whole model)")
        return 0
    if tp < 1:
        raise GLMRTError(f"--tensor-parallel must be a positive integer, got {tp}")
    return int(os.environ.get("RANK", "0") or 0)


def _parse_prompt_ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise GLMRTError(f"--prompt-ids must be comma-separated integers: {exc}") from None
    if not ids:
        raise GLMRTError("--prompt-ids is empty: give comma-separated token ids (or leave the flag out for a "
                         "fixed pseudo-random prompt)")
    return ids


def _cmd_run(args) -> int:
    import torch
    given_ids = _parse_prompt_ids(args.prompt_ids) if args.prompt_ids is not None else None
    t0 = time.perf_counter()
    model = _load_for(args, needs_text="--prompt" if args.prompt is not None else None)
    load_s = time.perf_counter() - t0
    tokenizer = model.tokenizer
    if args.prompt is not None:
        if tokenizer is None:
            raise GLMRTError(f"{args.model} has no tokenizer glmrt can use: pass --prompt-ids instead")
        prompt = model.build_inputs(tokenizer.encode(args.prompt))
    elif given_ids is not None:
        prompt = given_ids
    else:
        # A fixed pseudo-random prompt of 8 tokens so the command runs with nothing else given.
        g = torch.Generator().manual_seed(0)
        prompt = torch.randint(0, model.config.vocab_size, (8,), generator=g).tolist()
        if model.config.gmask_token_id is not None and model.config.sop_token_id is not None:
            prompt = model.build_inputs(prompt)
    gen_kwargs = {k: getattr(args, k) for k in _GENERATION_FLAGS}
    if tokenizer is not None:  # the reply is shown as text: never generate ids the tokenizer has none for
        gen_kwargs["vocab_limit"] = model.text_vocab_limit()
    tokens: list[int] = []
    t1 = time.perf_counter()
    first = None
    if not args.json:
        print(f"{model}\nprompt ids: {prompt}\nnew ids: ", end="", flush=True)
    for step in model.stream([prompt], **gen_kwargs):
        if first is None:
            first = time.perf_counter() - t1
        tokens.append(int(step[0]))
        if not args.json:
            print(tokens[-1], end=" ", flush=True)
    total = time.perf_counter() - t1
    decode = (total - first) / (len(tokens) - 1) if first is not None and len(tokens) > 1 else None
    result = {"model": str(model), "prompt_ids": prompt, "new_ids": tokens, "load_s": round(load_s, 3),
              "ttft_s": round(first, 4) if first is not None else None,
              "tpot_s": round(decode, 4) if decode is not None else None}
    if tokenizer is not None:
        result["text"] = tokenizer.decode_generated(tokens)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print()
        if "text" in result:
            print(f"text: {result['text']}")
        tpot = f", {1 / decode:.1f} tokens/s decode" if decode else ""
        print(f"loaded in {load_s:.1f}s; first token {first or 0:.3f}s{tpot}")
    return 0


def _cmd_chat(args) -> int:
    if args.tensor_parallel is not None:
        raise GLMRTError("glmrt chat --tensor-parallel is not available: the interactive prompt would have to be sent "
                         "from rank 0 to every rank; use `glmrt run --tensor-parallel N --prompt ...` under torchrun, "
                         "or Model.chat() in a script that every rank runs")
    model = _load_for(args, needs_text="glmrt chat")
    model._require_tokenizer()
    gen_kwargs = {k: getattr(args, k) for k in _GENERATION_FLAGS}
    history: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    print(f"{model} — chat format {model.chat_family}. Empty line or Ctrl-D to quit; /clear forgets the history.")
    while True:
        try:
            line = input("user> ")
        except EOFError:
            print()
            return 0
        if not line.strip():
            return 0
        if line.strip() == "/clear":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": line})
        print("assistant> ", end="", flush=True)
        pieces = []
        for text in model.chat_stream(history, **gen_kwargs):
            pieces.append(text)
            print(text, end="", flush=True)
        print()
        history.append({"role": "assistant", "content": "".join(pieces)})


def _cmd_memory(args) -> int:
    from .memory import device_by_name, device_with_memory, plan_memory, render
    from .models import PRESETS
    model = args.model
    if model in PRESETS and not Path(model).exists():
        model = f"synthetic:{model}"
    device = (device_by_name(args.device) if args.device is not None else
              device_with_memory(args.memory) if args.memory is not None else None)
    result = plan_memory(model, device=device, dtype=args.dtype, quantize=args.quantize, context=args.context,
                         batch=args.batch, layers=args.layers)
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


def _cmd_presets(args) -> int:
    from .models import PRESETS, config_from_dict
    rows = []
    for name, raw in sorted(PRESETS.items()):
        _, cfg = config_from_dict(dict(raw))
        rows.append({"preset": f"synthetic:{name}", "generation": cfg.generation, "layers": cfg.num_layers,
                     "hidden": cfg.hidden_size, "params_b": round(cfg.num_parameters() / 1e9, 2),
                     "dtype": cfg.torch_dtype})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"  {r['preset']:<32} {r['generation']:<14} {r['layers']:>3} layers  hidden {r['hidden']:<6} "
                  f"{r['params_b']:>6} B params  {r['dtype']}")
    return 0


def _version() -> str:
    from . import __version__
    return __version__


def _torch_version() -> str:
    import torch
    return torch.__version__


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {"info": _cmd_info, "run": _cmd_run, "chat": _cmd_chat, "presets": _cmd_presets,
                "memory": _cmd_memory}
    try:
        handler = getattr(args, "handler", None) or handlers[args.command]
        if _tensor_parallel_rank(args) != 0:  # every rank runs the command; rank 0 alone prints
            sys.stdout = open(os.devnull, "w")
        return handler(args)
    except GLMRTError as exc:
        print(f"glmrt: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`glmrt presets --json | head`): stop quietly, as other command-line
        # tools do. stdout now points at devnull, so the flush at exit cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by the broken pipe


if __name__ == "__main__":
    sys.exit(main())
