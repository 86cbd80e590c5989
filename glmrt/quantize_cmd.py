"""`glmrt quantize SRC DST --bits 4|8 [--group-size 0|32|64|128]`: write a weight-only quantized checkpoint.

SRC is a checkpoint directory (any generation glmrt loads, FP16/BF16/FP32, or an already quantized
one in the same format) or `synthetic:<preset>` (with --layers). DST is a new directory in glmrt's
quantized format, version 1 (glmrt.quant.FORMAT_NAME / FORMAT_VERSION):

- config.json: SRC's own config (its generation's format; the layer count cut when --layers is
  given; the releases' `quantization_bit` / `--quantization-bit-width` dropped), plus the entry
  `"glmrt_quantization": {"format": "glmrt-weight-only", "version": 1, "bits", "group_size", "dtype",
  "scheme", "modules": {"layers.N.attn.qkv": {"bits", "group_size", "scale_dtype"}, ...}}` naming
  every quantized linear;
- model.safetensors, or model-0000X-of-0000N.safetensors + model.safetensors.index.json, holding
  glmrt's canonical parameters: for a quantized linear `<node>.weight` int8 [N, K] (INT8) or
  [N, ceil(K/2)] (INT4, two per byte, even index in the high nibble) and `<node>.weight_scale`
  [N] (per output row) or [N, ceil(K/group_size)]; every other parameter in the model dtype. Each
  file's safetensors header carries `glmrt_format` and `glmrt_format_version`;
- SRC's tokenizer files, so DST chats like SRC.

`glmrt.load(DST)` reads the int8 weights and scales as they are (no float copy of a quantized
linear is ever made) and gives the same logits as `glmrt.load(SRC, quantize=...)` with the same
dtype. The directory is written under a temporary name (`.DST.partial-PID`, created and checked
before SRC is read) and renamed when complete, so a failed or interrupted run (an error, Ctrl-C or
SIGTERM) never leaves a half-written DST; the partial directory of a run that was killed outright
(SIGKILL, a crash) is removed by the next run in the same folder. Reading, quantizing and writing
show progress on stderr.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import sys
import threading
from pathlib import Path

import torch

from .config import dtype_name
from .errors import ConfigError, GLMRTError
from .progress import Progress
from .quant import FORMAT_KEY, FORMAT_NAME, FORMAT_VERSION, GROUP_SIZES, format_entry

DEFAULT_MAX_SHARD = "2GB"
# Written first into a run's partial directory: whose it is (pid, host), so a later run can tell a
# dead run's leftovers from a live run's work and from directories that are not glmrt's.
PARTIAL_MARKER = "glmrt-partial.json"
_PARTIAL = re.compile(r"\.(?P<name>.+)\.partial-(?P<pid>\d+)")
# Keys by which the releases' configs declare quantized weights; DST's layout is FORMAT_KEY instead.
_RELEASE_QUANT_KEYS = ("quantization_bit", "quantization_bit_width", "quantization_embeddings")
_TOKENIZER_FILE = re.compile(r"(tokeniz.*|.*\.model|special_tokens_map\.json|added_tokens\.json|vocab.*|merges\.txt|"
                             r"generation_config\.json|chat_template.*)")


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B?|B)?\s*", str(text), flags=re.I)
    if not m:
        raise ConfigError(f"bad size {text!r}: use bytes or a number with KB / MB / GB (e.g. 2GB)")
    unit = (m.group(2) or "B").upper().rstrip("B").replace("I", "")
    factor = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[unit]
    size = int(float(m.group(1)) * factor)
    if size <= 0:
        raise ConfigError(f"size {text!r} must be positive")
    return size


def _output_config(prep, layers: int | None, dtype: torch.dtype) -> dict:
    raw = {k: v for k, v in prep.raw.items() if k not in _RELEASE_QUANT_KEYS and k != FORMAT_KEY}
    raw.pop("model_parallel_size", None)  # GLM-130B rank files are merged into canonical tensors
    if layers is not None:
        if raw.get("model_type") == "glm-130b":
            raw.setdefault("full_num_layers", int(raw["num_layers"]))  # DeepNorm's alpha keeps the full depth
        for key in ("num_layers", "num_hidden_layers"):
            if key in raw:
                raw[key] = layers
    raw[FORMAT_KEY] = format_entry(prep.graph, dtype_name(dtype))
    return raw


def _copy_tokenizer(src: Path | None, dst: Path) -> list[str]:
    if src is None:
        return []
    copied = []
    for p in sorted(src.iterdir()):
        if p.is_file() and p.name != "config.json" and _TOKENIZER_FILE.fullmatch(p.name):
            shutil.copy2(p, dst / p.name)
            copied.append(p.name)
    return copied


def quantized_linear_bytes(graph) -> tuple[int, int]:
    """(bytes of the quantized linears' weights + scales, bytes the same weights take in fp16)."""
    quant = fp16 = 0
    for node in graph.nodes:
        q = node.attrs.get("quant")
        if q is None:
            continue
        w, s = graph.params[node.params["weight"]], graph.params[node.params["scale"]]
        scale_count = 1
        for d in s.shape:
            scale_count *= d
        quant += w.shape[0] * w.shape[1] + scale_count * torch.tensor([], dtype=s.dtype).element_size()
        fp16 += w.shape[0] * q["in_features"] * 2
    return quant, fp16


def quantize_checkpoint(src: str, dst: str | os.PathLike, bits: int, group_size: int = 0, *,
                        layers: int | None = None, dtype=None, token_ids: dict | None = None,
                        max_shard_bytes: int = parse_size(DEFAULT_MAX_SHARD), progress: bool = True) -> dict:
    """Write SRC quantized to DST (see the module docstring); returns a summary dict."""
    from . import checkpoint
    from .api import prepare
    if bits not in (4, 8):
        raise ConfigError(f"--bits {bits}: glmrt writes INT8 or INT4 weights (8 or 4)")
    if group_size not in GROUP_SIZES:
        raise ConfigError(f"--group-size {group_size}: use 0 (one scale per output row), 32, 64 or 128")
    dst = Path(dst).expanduser()
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ConfigError(f"{dst} already exists and is not an empty directory: choose a new DST (glmrt quantize "
                          "never overwrites a checkpoint)")
    if str(dst.resolve()) == str(Path(src).expanduser().resolve()):
        raise ConfigError("DST must differ from SRC")
    from .gguf_checkpoint import find_gguf
    if find_gguf(src) is not None:
        raise ConfigError(f"{src} is a GGUF file: glmrt loads it directly (glmrt.load / --model), Q8_0 and Q4_0 as "
                          "INT8 / INT4 in groups of 32; `glmrt quantize` converts checkpoint directories only")
    quantize = f"int{bits}" + (f"-g{group_size}" if group_size else "")

    with _terminate_cleanly(), _partial_directory(dst) as tmp:  # before SRC is read: a bad DST fails first
        prep = prepare(src, dtype=dtype, layers=layers, quantize=quantize, token_ids=token_ids, progress=progress)
        model_dtype = prep.graph.dtype
        config = _output_config(prep, layers, model_dtype)
        metadata = {"format": "pt", "glmrt_format": FORMAT_NAME, "glmrt_format_version": str(FORMAT_VERSION)}
        tensors = {n: t.cpu() for n, t in prep.weights.items()}
        total_mib = max(1, round(sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20))
        # Shown at once (a file is written in one call, so the bar moves once per file).
        bar = Progress(f"writing {dst} (MiB)", total_mib, enabled=progress, delay=0.0)
        bar(0)
        try:
            files = checkpoint.write_safetensors_shards(
                tmp, tensors, metadata, max_shard_bytes,
                progress=lambda done, total: bar(round(done * total_mib / max(total, 1)), total_mib))
        finally:
            bar.close()
        (tmp / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        tokenizer_files = _copy_tokenizer(prep.directory, tmp)
        (tmp / PARTIAL_MARKER).unlink()
        if dst.exists():
            dst.rmdir()  # empty (checked above)
        os.replace(tmp, dst)
    quant_bytes, fp16_bytes = quantized_linear_bytes(prep.graph)
    return {
        "source": prep.source, "destination": str(dst), "format": FORMAT_NAME, "version": FORMAT_VERSION,
        "bits": bits, "group_size": group_size, "dtype": dtype_name(model_dtype),
        "quantized_linears": sum(1 for n in prep.graph.nodes if "quant" in n.attrs),
        "quantized_linear_bytes": quant_bytes, "fp16_linear_bytes": fp16_bytes,
        "ratio_vs_fp16": quant_bytes / fp16_bytes if fp16_bytes else None,
        "files": [p.name for p in files] + ["config.json"] + tokenizer_files,
        "file_bytes": sum((dst / p.name).stat().st_size for p in files),
    }


@contextlib.contextmanager
def _partial_directory(dst: Path):
    """`.DST.partial-PID` next to DST, created now (so a DST that cannot be made fails before any
    work), removed on any error or interrupt; the caller renames it to DST when complete. Leftovers
    of runs that died in the same folder are removed first."""
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_partials(dst)
        tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        (tmp / PARTIAL_MARKER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                      "destination": str(dst)}) + "\n", encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot create the destination {dst}: {exc.strerror or exc} ({exc.filename or dst}); "
                          "choose a DST in a directory you can write") from None
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_dead_partials(dst: Path) -> None:
    """Remove the partial directories that runs which died left in DST's folder: DST's own
    (`.DST.partial-PID`, whatever glmrt wrote it) and any other carrying this host's PARTIAL_MARKER,
    when their process is gone. Anything else is left alone."""
    host = socket.gethostname()
    for path in dst.parent.iterdir():
        found = _PARTIAL.fullmatch(path.name)
        if not found or not path.is_dir() or int(found["pid"]) == os.getpid():
            continue
        pid = int(found["pid"])
        try:
            marker = json.loads((path / PARTIAL_MARKER).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            marker = None
        ours = (isinstance(marker, dict) and marker.get("host") == host and marker.get("pid") == pid) or \
            (marker is None and found["name"] == dst.name)
        if ours and not _alive(pid):
            shutil.rmtree(path, ignore_errors=True)
            print(f"glmrt quantize: removed {path}, left by a run (pid {pid}) that did not finish", file=sys.stderr)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OSError:
        return True
    return True


class _Terminated(SystemExit):
    """SIGTERM, turned into an exception so that cleanup runs as it does for Ctrl-C; exits with 128 + 15."""


@contextlib.contextmanager
def _terminate_cleanly():
    """While the partial directory exists, SIGTERM raises _Terminated (in the main thread, where
    Python runs signal handlers) instead of killing the process outright. An ignored SIGTERM stays
    ignored; the previous handler comes back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_IGN:
        yield
        return

    def handler(signum, frame):
        raise _Terminated(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


# ----------------------------------------------------------------------------- CLI
def register(subparsers) -> None:
    """Adds `glmrt quantize` (see glmrt.cli's _COMMAND_MODULES)."""
    p = subparsers.add_parser("quantize", help="write a weight-only INT8/INT4 quantized checkpoint "
                                               f"({FORMAT_NAME} v{FORMAT_VERSION}) that glmrt.load reads directly")
    add_arguments(p)
    p.set_defaults(handler=run_quantize)


def add_arguments(p) -> None:
    p.add_argument("src", help="checkpoint directory, or synthetic:<preset> (with --layers)")
    p.add_argument("dst", help="new directory to write (must not exist, or be empty)")
    p.add_argument("--bits", type=int, required=True, choices=(4, 8), help="4 (INT4, packed) or 8 (INT8)")
    p.add_argument("--group-size", type=int, default=0, choices=GROUP_SIZES,
                   help="0: one scale per output row (the GLM-130B/ChatGLM scheme); 32/64/128: one per group "
                        "of input columns (default: 0)")
    p.add_argument("--layers", type=int, default=None, help="keep only the first N layers")
    p.add_argument("--dtype", default=None, help="model dtype of DST (non-quantized weights and the scales): "
                                                 "float32 | bfloat16 | float16 (default: SRC's)")
    p.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD,
                   help=f"split the weights into safetensors shards of at most this size (default: {DEFAULT_MAX_SHARD})")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def run_quantize(args) -> int:
    summary = quantize_checkpoint(args.src, args.dst, args.bits, args.group_size, layers=args.layers,
                                  dtype=args.dtype, max_shard_bytes=parse_size(args.max_shard_size),
                                  progress=not args.json)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"wrote {summary['destination']}: {FORMAT_NAME} v{FORMAT_VERSION}, INT{summary['bits']}"
              f"{f' groups of {args.group_size}' if args.group_size else ' per output row'}, "
              f"{summary['quantized_linears']} quantized linears, {summary['dtype']} elsewhere")
        print(f"quantized linears: {summary['quantized_linear_bytes'] / 2**20:.1f} MiB "
              f"({100 * summary['ratio_vs_fp16']:.1f}% of their fp16 size, scales included); "
              f"files: {', '.join(summary['files'])}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m glmrt.quantize_cmd ...`, the same as `glmrt quantize ...`."""
    import argparse
    parser = argparse.ArgumentParser(prog="glmrt quantize", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_quantize(args)
    except GLMRTError as exc:
        print(f"glmrt: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
