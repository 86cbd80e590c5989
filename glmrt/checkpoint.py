"""Reading checkpoint directories: config.json plus safetensors or torch .bin weights, single or
sharded with an index json. Pickles are loaded with ``weights_only=True`` only.

The loader is strict: every checkpoint tensor is consumed (or explicitly ignored by the
generation's name map) and every parameter filled with the shape the config implies; otherwise
one error names everything that is missing, extra or mis-shaped, before any weight is converted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import torch

from .errors import CheckpointError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


def read_config(directory: Path) -> dict:
    path = directory / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory} has no config.json: point glmrt.load at the checkpoint directory "
                              "(the one holding config.json and the weight files)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); restore it from the original checkpoint") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} must hold a JSON object, found {type(raw).__name__}")
    return raw


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def _corrupt(path: Path, exc: BaseException, what: str = "") -> CheckpointError:
    return CheckpointError(f"cannot read {path.name} in {path.parent}: {type(exc).__name__}: {exc}. The file{what} "
                           "is truncated or corrupt: download or copy it again")


def _is_zip(path: Path) -> bool:
    """torch.save writes a zip archive since torch 1.6; the legacy format is a bare pickle stream."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


def drop_mapped_pages(tensor: torch.Tensor) -> None:
    """Let the kernel take back the resident pages of a tensor that torch.load memory-mapped from a
    file, once it has been copied (quantized) and is not needed any more. The pages are clean,
    private file pages: MADV_DONTNEED only unmaps them (a later read faults them in from the file
    again, unchanged). Only for tensors of a memory-mapped load: on anonymous memory it would zero
    them. Linux only; elsewhere nothing happens."""
    if tensor.numel():
        storage = tensor.untyped_storage()
        drop_mapped_range(storage.data_ptr(), storage.nbytes())


def drop_mapped_range(start: int, nbytes: int) -> None:
    """drop_mapped_pages for the whole pages of [start, start + nbytes) of a file mapping."""
    madvise = _libc_madvise()
    if madvise is None or nbytes <= 0:
        return
    import mmap
    end = start + nbytes
    page = mmap.PAGESIZE
    first, last = -(-start // page) * page, end // page * page  # whole pages inside the storage only
    if last > first:
        madvise(first, last - first, 4)  # MADV_DONTNEED


_MADVISE = []


def _libc_madvise():
    if not _MADVISE:
        import ctypes
        import ctypes.util
        import sys
        fn = None
        if sys.platform.startswith("linux"):
            try:
                fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).madvise
                fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
            except (OSError, AttributeError):
                fn = None
        _MADVISE.append(fn)
    return _MADVISE[0]


def load_pickle(path: Path):
    """torch.load(weights_only=True) of a .bin / .pt file: memory-mapped when it is the zip format,
    read whole when it is torch's legacy (pre-1.6, non-zip) format, which mmap cannot open. The
    errors tell a damaged file from a pickle that holds more than tensors (weights_only refuses it:
    unpickling arbitrary objects runs code from the file)."""
    import pickle
    zipped = _is_zip(path)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=zipped)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" in str(exc).lower():
            raise _unsafe_pickle(path, exc) from exc
        raise _corrupt(path, exc, "" if zipped else " (torch's legacy, non-zip format)") from exc
    except Exception as exc:  # noqa: BLE001 - zip/pickle errors vary
        raise _corrupt(path, exc, "" if zipped else " (torch's legacy, non-zip format)") from exc


def _unsafe_pickle(path: Path, exc: BaseException) -> CheckpointError:
    import re
    found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
    what = f"a {found.group(1)} object" if found else "objects other than tensors"
    return CheckpointError(
        f"{path.name} in {path.parent} is a pickle that holds {what}: glmrt loads pickles with "
        "torch.load(weights_only=True) only, which refuses them, because unpickling them would run code from the "
        "file. The file is not damaged. If you trust it, convert it once: load it with torch.load(path, "
        "weights_only=False), keep the tensors (the state dict) and save them with safetensors.torch.save_file "
        "as model.safetensors next to config.json")


def _safetensors_offsets(path: Path) -> dict[str, tuple[int, int]]:
    """name -> (first, last + 1) byte of its data in a safetensors file (8-byte little-endian
    header length, the JSON header, then the data; the header's offsets count from its end)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    base = 8 + size
    return {n: (base + int(e["data_offsets"][0]), base + int(e["data_offsets"][1]))
            for n, e in header.items() if n != "__metadata__"}


class WeightFiles:
    """A lazy view of all tensors of a checkpoint, across shards."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.name_to_file: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._metadata: dict[Path, dict] = {}
        self._open: dict[Path, object] = {}
        self._bin: dict[Path, dict] = {}
        self._offsets: dict[Path, dict[str, tuple[int, int]]] = {}
        self._mapped: set[Path] = set()  # .bin files torch.load memory-mapped
        self._headers: dict[Path, tuple[int, dict]] = {}
        self._discover()

    # -------------------------------------------------------------- discovery
    def _discover(self) -> None:
        d = self.directory
        for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
            index = d / index_name
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                except (OSError, KeyError, TypeError, json.JSONDecodeError) as exc:
                    raise CheckpointError(f"{index} is not a valid index (needs a 'weight_map' object): {exc}") from exc
                missing = sorted({f for f in weight_map.values() if not (d / f).is_file()})
                if missing:
                    raise CheckpointError(f"{index.name} lists shard file(s) missing from {d}: {', '.join(missing)}; "
                                          "the download is incomplete")
                self.name_to_file = {name: d / f for name, f in weight_map.items()}
                for path in sorted(set(self.name_to_file.values())):
                    self._scan(path, expected=[n for n, p in self.name_to_file.items() if p == path])
                return
        for single in (SAFETENSORS_SINGLE, BIN_SINGLE):
            if (d / single).is_file():
                self._scan(d / single)
                return
        others = sorted(p.name for p in d.glob("*.safetensors")) or sorted(p.name for p in d.glob("*.bin"))
        if len(others) == 1:
            self._scan(d / others[0])
            return
        raise CheckpointError(
            f"no weights found in {d}: expected {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, {BIN_SINGLE} or "
            f"{BIN_INDEX}" + (f" (found {len(others)} unindexed weight files: add the index json)" if others else ""))

    def _scan(self, path: Path, expected: list[str] | None = None) -> None:
        """Read one file's tensor names and shapes (safetensors: header only)."""
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            try:
                handle = safe_open(str(path), framework="pt")
                names = list(handle.keys())
                shapes = {n: tuple(handle.get_slice(n).get_shape()) for n in names}
                dtypes = {n: _SAFETENSORS_DTYPES.get(handle.get_slice(n).get_dtype()) for n in names}
                self._metadata[path] = dict(handle.metadata() or {})
            except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
                raise _corrupt(path, exc) from exc
            self._open[path] = handle
        else:
            state = load_pickle(path)
            if isinstance(state, dict) and "module" in state and isinstance(state["module"], dict):
                state = state["module"]  # SwissArmyTransformer / DeepSpeed checkpoints wrap the state dict
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise CheckpointError(f"{path} does not hold a state dict of tensors; is it a model checkpoint?")
            self._bin[path] = state
            if _is_zip(path):  # torch.load memory-mapped it (see load_pickle)
                self._mapped.add(path)
            names = list(state)
            shapes = {n: tuple(t.shape) for n, t in state.items()}
            dtypes = {n: t.dtype for n, t in state.items()}
        if expected is not None:
            absent = sorted(set(expected) - set(names))
            if absent:
                raise CheckpointError(f"{path.name} lacks tensor(s) its index promises: {', '.join(absent[:10])}; "
                                      "the shard is from another checkpoint or incomplete")
        for n in names:
            self.name_to_file.setdefault(n, path)
        self._shapes.update(shapes)
        self._dtypes.update(dtypes)

    # -------------------------------------------------------------- access
    def names(self) -> set[str]:
        return set(self.name_to_file)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype(self, name: str) -> torch.dtype | None:
        """The stored dtype (None for a safetensors dtype torch has no name for here)."""
        return self._dtypes[name]

    def metadata(self) -> dict[Path, dict]:
        """Each safetensors file's `__metadata__` (string -> string)."""
        return dict(self._metadata)

    def get(self, name: str) -> torch.Tensor:
        path = self.name_to_file[name]
        try:
            if path in self._open:
                return self._read_safetensors(path, name)
            return self._bin[path][name]
        except Exception as exc:  # noqa: BLE001
            raise _corrupt(path, exc) from exc

    def release(self, name: str) -> None:
        """Tensor ``name`` has been consumed (copied into what the model keeps): drop its resident
        pages if it is memory-mapped, so the mapping does not hold the whole checkpoint."""
        path = self.name_to_file[name]
        if path in self._mapped:
            drop_mapped_pages(self._bin[path][name])

    def _read_safetensors(self, path: Path, name: str) -> torch.Tensor:
        """One tensor of a safetensors file, read into memory of its own. Read, not taken from the
        file's memory map: mapped pages stay resident in the process as long as the file is open,
        so reading a model through the map would hold all of it at once (quantizing on load keeps
        only the quantized tensors)."""
        offsets = self._offsets.get(path)
        if offsets is None:
            offsets = self._offsets[path] = _safetensors_offsets(path)
        start, end = offsets[name]
        out = torch.empty(end - start, dtype=torch.uint8)
        if end > start:
            with open(path, "rb") as f:
                f.seek(start)
                if f.readinto(memoryview(out.numpy())) != end - start:
                    raise EOFError(f"{name} ends beyond the end of the file")
        dtype, shape = self._dtypes[name], self._shapes[name]
        if dtype is None:  # a dtype torch has no name for here: let safetensors say what it is
            return self._open[path].get_tensor(name)  # type: ignore[attr-defined]
        return out.view(dtype).reshape(shape)

    def get_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Rows (dim 0) or columns (dim 1) [start, stop) of a tensor, reading only those bytes:
        from a safetensors file with pread (rows: one read; columns: one read per row), never
        through the file's memory map, whose pages would stay resident in this process (a column
        slice through the map touches every page of the tensor); from a memory-mapped .bin, the
        pages of the slice."""
        path = self.name_to_file[name]
        try:
            if path in self._open:
                return self._pread_slice(path, name, dim, start, stop)
            return self._bin[path][name].narrow(dim, start, stop - start).clone()
        except Exception as exc:  # noqa: BLE001
            raise _corrupt(path, exc) from exc

    def _header(self, path: Path) -> tuple[int, dict]:
        """(where the data starts, the JSON header) of a safetensors file."""
        cached = self._headers.get(path)
        if cached is None:
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                cached = (8 + n, json.loads(f.read(n)))
            self._headers[path] = cached
        return cached

    def _pread_slice(self, path: Path, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        data_start, header = self._header(path)
        info = header[name]
        shape = [int(d) for d in info["shape"]]
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None or dim not in (0, 1) or (dim == 1 and len(shape) != 2):
            view = self._open[path].get_slice(name)  # type: ignore[attr-defined]
            return (view[start:stop] if dim == 0 else view[:, start:stop]).clone()
        out_shape = list(shape)
        out_shape[dim] = stop - start
        out = torch.empty(out_shape, dtype=dtype)
        size = out.element_size()
        row = size
        for d in shape[1:]:
            row *= d
        base = data_start + int(info["data_offsets"][0])
        buf = memoryview(out.view(-1).view(torch.uint8).numpy()).cast("B") if out.numel() else None
        if buf is None:
            return out
        fd = os.open(path, os.O_RDONLY)
        try:
            if dim == 0:  # contiguous rows
                want = (stop - start) * row
                if os.preadv(fd, [buf], base + start * row) != want:
                    raise EOFError(f"{name} ends beyond the end of the file")
            else:
                width = (stop - start) * size
                for r in range(shape[0]):
                    if os.preadv(fd, [buf[r * width:(r + 1) * width]], base + r * row + start * size) != width:
                        raise EOFError(f"{name} row {r} ends beyond the end of the file")
        finally:
            os.close(fd)
        return out

    def files(self) -> list[Path]:
        return sorted(set(self.name_to_file.values()))


def _read_shard(files, source, shard, full_shape):
    from .models.chatglm6b import DeinterleaveQKV
    from .models.common import concat_rows
    sliceable = hasattr(files, "get_slice")
    dim, ranges = shard.dim, shard.ranges

    def pad(t: torch.Tensor) -> torch.Tensor:
        if not shard.pad:
            return t
        shape = list(t.shape)
        shape[dim] = shard.pad
        return torch.cat((t, torch.zeros(shape, dtype=t.dtype)), dim=dim)

    if sliceable and len(source.names) == 1 and source.combine is None:
        name = source.names[0]
        parts = [files.get_slice(name, dim, a, b) for a, b in ranges if b > a]
        return pad(torch.cat(parts, dim=dim) if len(parts) != 1 else parts[0])
    if sliceable and dim == 0 and source.combine is concat_rows:
        offsets, at = [], 0
        for name in source.names:
            rows = files.shape(name)[0]
            offsets.append((name, at, at + rows))
            at += rows
        parts = []
        for a, b in ranges:
            for name, lo, hi in offsets:
                s, e = max(a, lo), min(b, hi)
                if e > s:
                    parts.append(files.get_slice(name, 0, s - lo, e - lo))
        return pad(torch.cat(parts, dim=0))
    if sliceable and dim == 0 and isinstance(source.combine, DeinterleaveQKV) and len(ranges) == 3 and not shard.pad:
        nh, hd = source.combine.num_heads, source.combine.head_dim
        (q0, q1), (k0, k1), (v0, v1) = ranges
        h0, h1 = q0 // hd, q1 // hd
        if (q0 % hd == 0 and q1 % hd == 0 and (k0, k1) == (nh * hd + q0, nh * hd + q1)
                and (v0, v1) == (2 * nh * hd + q0, 2 * nh * hd + q1)):
            rows = files.get_slice(source.names[0], 0, 3 * hd * h0, 3 * hd * h1)
            return DeinterleaveQKV(h1 - h0, hd)([rows])
    return shard.take(source.build([files.get(n) for n in source.names]))


def load_weights(files: WeightFiles, weight_map, expected: dict[str, tuple[tuple[int, ...], torch.dtype]],
                 progress=None, place=None, shards: dict | None = None) -> dict[str, torch.Tensor]:
    """Fill every expected canonical parameter from the checkpoint.

    ``expected``: canonical name -> (shape, dtype). All names and shapes are checked before any
    tensor is read, and one error lists every problem. ``shards`` (canonical name ->
    glmrt.shard.ParamShard): read only a tensor-parallel rank's part of each parameter (the
    shapes checked are still the whole model's). ``place(name, tensor)`` -> {name: tensor} takes
    each tensor (or the rank's part of it) as soon as it is read and converted
    (glmrt.quant.QuantizeOnLoad quantizes it there, so the float model is never whole in memory);
    None keeps it as it is."""
    available = files.names()
    problems: list[str] = []
    missing_params = sorted(set(expected) - set(weight_map.sources))
    if missing_params:  # a bug in a name map, not in the checkpoint
        raise CheckpointError(f"internal: no checkpoint name is mapped to {', '.join(missing_params[:10])}")
    used: set[str] = set()
    for canonical, source in weight_map.sources.items():
        if canonical not in expected:
            continue
        absent = [n for n in source.names if n not in available]
        if absent:
            problems.append(f"missing tensor {', '.join(absent)} (needed for {canonical})")
            continue
        used.update(source.names)
        stored_dtype = getattr(files, "dtype", None)  # sources that convert as they read (GGUF) have none
        if stored_dtype is not None and expected[canonical][1].is_floating_point:
            # An integer tensor would be cast to float silently.
            ints = [f"{n} ({str(stored_dtype(n)).removeprefix('torch.')})" for n in source.names
                    if stored_dtype(n) is not None and not stored_dtype(n).is_floating_point]
            if ints:
                problems.append(f"tensor {', '.join(ints)} is not floating point, but {canonical} is a float "
                                "weight (a quantized checkpoint needs its config's quantization entry)")
                continue
        shapes = [files.shape(n) for n in source.names]
        want = expected[canonical][0]
        parts = source.expected_part_shapes(want)
        if parts is not None:
            bad = [f"tensor {n} has shape {list(s)} but the config needs {list(p)}"
                   for n, s, p in zip(source.names, shapes, parts) if tuple(s) != tuple(p)]
            if bad:
                problems.extend(bad)
                continue
        try:
            got = _combined_shape(shapes, source)
        except (RuntimeError, ValueError) as exc:  # e.g. a fused QKV that does not split into heads
            srcs = ", ".join(f"{n} {list(s)}" for n, s in zip(source.names, shapes))
            problems.append(f"tensor {srcs} cannot form {canonical} with the config's shape {list(want)} ({exc})")
            continue
        if got != want:
            srcs = ", ".join(f"{n} {list(s)}" for n, s in zip(source.names, shapes))
            problems.append(f"tensor {srcs} gives shape {list(got)} but the config needs {list(want)} for "
                            f"{canonical}")
    extra = sorted(n for n in available - used if not weight_map.is_ignored(n))
    if extra:
        shown = ", ".join(extra[:12]) + (f" ... ({len(extra)} in all)" if len(extra) > 12 else "")
        problems.append(f"unexpected tensor(s) in the checkpoint: {shown}")
    if problems:
        shape_issue = any("config needs" in p or "config's shape" in p for p in problems)
        hint = ("config.json and the weights disagree: use the config.json shipped with these weights"
                if shape_issue else "the checkpoint does not match this model's layout")
        body = "\n  ".join(problems[:30]) + (f"\n  ... {len(problems) - 30} more" if len(problems) > 30 else "")
        raise CheckpointError(f"checkpoint {files.directory} cannot be loaded ({hint}):\n  {body}")

    out: dict[str, torch.Tensor] = {}
    items = [(c, s) for c, s in weight_map.sources.items() if c in expected]
    for i, (canonical, source) in enumerate(items):
        shard = shards.get(canonical) if shards else None
        if shard is not None and shard.dim is not None:
            value = _read_shard(files, source, shard, expected[canonical][0])
            tensors = [value]
        else:
            tensors = [files.get(n) for n in source.names]
            value = source.build(tensors)
        value = value.to(expected[canonical][1]).contiguous()
        if value.is_floating_point() and value.numel():
            _check_finite(value, source.names, tensors, files.directory)
        if place is None:
            out[canonical] = value
        else:
            placed = place(canonical, value)
            out.update(placed)
            release = getattr(files, "release", None)
            if release is not None and not _shares_memory(placed.values(), tensors):
                for n in source.names:  # copied into what the model keeps: the mapped pages can go
                    release(n)
        del tensors, value
        if progress is not None:
            progress(i + 1, len(items))
    return out


def _shares_memory(kept, sources) -> bool:
    ptrs = {t.untyped_storage().data_ptr() for t in sources if t.device.type == "cpu"}
    return any(t.device.type == "cpu" and t.untyped_storage().data_ptr() in ptrs for t in kept)


def _check_finite(value: torch.Tensor, names, tensors: list[torch.Tensor], directory) -> None:
    """Refuse NaN/Inf weights (they would load silently and make every logit NaN, so greedy
    decoding emits token 0 forever), naming the checkpoint tensor. One reduction over the
    converted tensor (no copy); the stored tensors are looked at only to explain a failure."""
    lo, hi = torch.aminmax(value)  # NaN propagates into both, Inf shows as an extreme
    if bool(torch.isfinite(lo) & torch.isfinite(hi)):
        return
    for name, t in zip(names, tensors):
        if not t.is_floating_point() or not t.numel():
            continue
        t_lo, t_hi = torch.aminmax(t)
        if bool(torch.isnan(t_lo)):
            raise CheckpointError(f"tensor {name} in {directory} holds NaN values: the weights are corrupt (or were "
                                  "saved from a diverged run); restore the checkpoint from its release")
        if not bool(torch.isfinite(t_lo) & torch.isfinite(t_hi)):
            raise CheckpointError(f"tensor {name} in {directory} holds infinite values: the weights are corrupt; "
                                  "restore the checkpoint from its release")
        biggest = max(abs(float(t_lo)), abs(float(t_hi)))
        limit = torch.finfo(value.dtype).max
        if biggest > limit:
            raise CheckpointError(f"tensor {name} in {directory} holds values up to {biggest:.4g}, beyond what "
                                  f"{str(value.dtype).removeprefix('torch.')} can hold ({limit:.4g}): load the model "
                                  "in a wider dtype (dtype='float32' or 'bfloat16')")
    raise CheckpointError(f"tensor {', '.join(names)} in {directory} is not finite once converted to "
                          f"{str(value.dtype).removeprefix('torch.')}: load the model in float32")


def _combined_shape(shapes: list[tuple[int, ...]], source) -> tuple[int, ...]:
    if len(shapes) == 1 and source.combine is None:
        return tuple(shapes[0])
    # Multi-tensor sources concatenate along rows (the only combination the name maps use);
    # check that by building meta tensors, which costs nothing.
    metas = [torch.empty(s, device="meta") for s in shapes]
    return tuple(source.build(metas).shape)


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    return Path(path).is_dir()


def write_safetensors_shards(directory: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                             max_shard_bytes: int, progress=None) -> list[Path]:
    """Write `tensors` as model.safetensors, or as model-0000X-of-0000N.safetensors plus
    model.safetensors.index.json when they exceed max_shard_bytes (a tensor is never split). Every
    file carries `metadata` in its safetensors header. ``progress(bytes_written, total_bytes)`` is
    called after each file."""
    from safetensors.torch import save_file
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    done = 0

    def written(names) -> None:
        nonlocal done
        done += sum(tensors[n].numel() * tensors[n].element_size() for n in names)
        if progress is not None:
            progress(done, total)

    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    files = []
    if len(shards) == 1:
        path = directory / SAFETENSORS_SINGLE
        save_file({n: tensors[n].contiguous() for n in shards[0]}, str(path), metadata=metadata)
        written(shards[0])
        return [path]
    weight_map = {}
    for i, names in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in names}, str(directory / fname), metadata=metadata)
        weight_map.update({n: fname for n in names})
        files.append(directory / fname)
        written(names)
    (directory / SAFETENSORS_INDEX).write_text(
        json.dumps({"metadata": {"total_size": total, **metadata}, "weight_map": weight_map}, indent=2) + "\n",
        encoding="utf-8")
    return files
