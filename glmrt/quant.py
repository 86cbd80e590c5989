"""Weight-only INT8 / INT4 quantization, the scheme GLM-130B and ChatGLM released.

Symmetric, one scale per output row (group_size 0) or per group of `group_size` input columns:
    scale = max|W| / (2^(bits-1) - 1)      (127 for INT8, 7 for INT4)
    q     = round(W / scale)               (round half to even, as torch.round does)
INT4 values are packed two per byte with the EVEN index in the HIGH nibble:
    byte[j] = (q[2j] << 4) | (q[2j+1] & 0xF)     (odd K: the last low nibble is 0)

The quantization pass marks a linear node with ``attrs["quant"] = {"bits", "group_size",
"in_features"}`` and replaces its weight parameter by the int8 tensor (packed for INT4) plus a
``scale`` parameter; which layers are quantized follows the releases (qkv, attention output and
both MLP projections; never embeddings, LM head, norms or biases).
"""

from __future__ import annotations

import dataclasses

import torch

from .errors import ConfigError
from .graph import Graph, Node, ParamSpec

QUANT_LINEARS = ("attn.qkv", "attn.dense", "mlp.up", "mlp.down")
FORMATS = {"int8": 8, "int4": 4}
GROUP_SIZES = (0, 32, 64, 128)


def format_names() -> tuple[str, ...]:
    """Every name glmrt.load(quantize=...) takes: "int8", "int8-g32", ..., "int4-g128". Any backend
    runs them (its quantized-linear kernel where it has one, else the reference on its device),
    so this is what a backend's Capabilities.quant_formats lists."""
    names = []
    for name in FORMATS:
        names += [name] + [f"{name}-g{g}" for g in GROUP_SIZES if g]
    return tuple(names)


def parse_format(quantize: str | None) -> tuple[int, int] | None:
    """"int4", "int8", "int4-g64", ... -> (bits, group_size); None -> None."""
    if quantize is None or quantize in ("none", ""):
        return None
    name, _, group = str(quantize).lower().partition("-g")
    if name not in FORMATS:
        raise ConfigError(f"unknown quantization {quantize!r}: use int8 or int4, optionally with a group size "
                          "(int4-g32, int4-g64, int4-g128)")
    try:
        group_size = int(group) if group else 0
    except ValueError:
        raise ConfigError(f"bad group size in {quantize!r}: use -g32, -g64 or -g128") from None
    if group_size not in GROUP_SIZES:
        raise ConfigError(f"group size {group_size} not supported: use 32, 64 or 128 (or none: per output channel)")
    return FORMATS[name], group_size


def num_groups(k: int, group_size: int) -> int:
    return 1 if group_size == 0 else -(-k // group_size)


# quantize_weight works through this many weight values at a time: every step is per row (a row's
# scale, its rounding, its packing), so row blocks give exactly the one-block result while the
# float32 temporaries stay small (a whole ChatGLM-6B MLP up projection is 0.5 GB in float32, and
# three such temporaries at once would dominate the peak of quantizing on load).
QUANT_BLOCK = 1 << 22


def quantize_weight(w: torch.Tensor, bits: int, group_size: int = 0,
                    scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) float -> (q int8 (N, K) or packed (N, ceil(K/2)), scale (N,) or (N, G))."""
    n, k = w.shape
    rows = max(1, QUANT_BLOCK // max(k, 1))
    if n <= rows:
        return _quantize_rows(w, bits, group_size, scale_dtype)
    q = torch.empty((n, k if bits == 8 else -(-k // 2)), dtype=torch.int8)
    scale = torch.empty((n,) if group_size == 0 else (n, num_groups(k, group_size)), dtype=scale_dtype or w.dtype)
    for start in range(0, n, rows):
        q[start:start + rows], scale[start:start + rows] = _quantize_rows(w[start:start + rows], bits, group_size,
                                                                          scale_dtype)
    return q, scale


def _quantize_rows(w: torch.Tensor, bits: int, group_size: int,
                   scale_dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = w.shape
    qmax = 2 ** (bits - 1) - 1
    wf = w.float()
    if group_size == 0:
        scale = wf.abs().amax(dim=1) / qmax  # (N,)
        scale_b = scale[:, None]
    else:
        g = num_groups(k, group_size)
        padded = torch.nn.functional.pad(wf, (0, g * group_size - k))
        scale = padded.view(n, g, group_size).abs().amax(dim=2) / qmax  # (N, G)
        scale_b = scale.repeat_interleave(group_size, dim=1)[:, :k]
    scale = scale.to(scale_dtype or w.dtype)
    # Divide by the stored (rounded) scale so that dequantization uses exactly the same number.
    safe = scale_b.to(scale.dtype).float().clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(wf / safe).clamp(-qmax, qmax).to(torch.int8)
    if bits == 4:
        q = pack_int4(q)
    return q, scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], (N, K) -> (N, ceil(K/2)) bytes, even index in the high nibble."""
    n, k = q.shape
    if k % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    hi = q[:, 0::2].to(torch.int16)
    lo = q[:, 1::2].to(torch.int16)
    packed = ((hi << 4) | (lo & 0xF)) & 0xFF
    return torch.where(packed > 127, packed - 256, packed).to(torch.int8)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """(N, ceil(K/2)) bytes -> (N, K) int8, sign-extending each nibble."""
    p = packed.to(torch.int8)
    hi = p >> 4  # arithmetic shift sign-extends the high nibble
    lo = (p << 4) >> 4  # bring the low nibble up, then sign-extend it back down
    out = torch.stack((hi, lo), dim=-1).flatten(-2)
    return out[:, :k]


def dequantize(q: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int, k: int,
               dtype: torch.dtype) -> torch.Tensor:
    """The reference dequantization: (N, K) weights in ``dtype``."""
    values = unpack_int4(q, k) if bits == 4 else q
    s = scale.float()
    if group_size == 0:
        w = values.float() * s[:, None]
    else:
        w = values.float() * s.repeat_interleave(group_size, dim=1)[:, :k]
    return w.to(dtype)


def quant_bytes(n: int, k: int, bits: int, group_size: int, scale_bytes: int) -> int:
    weight = n * (k if bits == 8 else -(-k // 2))
    return weight + n * num_groups(k, group_size) * scale_bytes


def _is_quantized_linear(node: Node) -> bool:
    return node.op == "linear" and any(node.name.endswith(s) for s in QUANT_LINEARS)


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How one linear's weight is stored: bits, group size (0: one scale per output row) and the
    scales' dtype (None: the graph's dtype)."""

    bits: int
    group_size: int = 0
    scale_dtype: torch.dtype | None = None


def quantizable_linears(graph: Graph) -> list[str]:
    """Names of the linear nodes the releases quantize (qkv, attention output, both MLP projections)."""
    return [n.name for n in graph.nodes if _is_quantized_linear(n)]


def quantize_graph(graph: Graph, bits: int, group_size: int = 0) -> Graph:
    """The quantization pass over the graph (parameter specs only; see quantize_weights)."""
    spec = QuantSpec(bits, group_size)
    return quantize_graph_layout(graph, {name: spec for name in quantizable_linears(graph)})


def quantize_graph_layout(graph: Graph, layout: dict[str, QuantSpec]) -> Graph:
    """The quantization pass with a per-node layout (node name -> QuantSpec), as a quantized
    checkpoint describes it (e.g. GLM-130B's row-parallel layers carry one scale per shard)."""
    known = set(quantizable_linears(graph))
    unknown = sorted(set(layout) - known)
    if unknown:
        raise ConfigError(f"cannot quantize {', '.join(unknown[:5])}: not a quantizable linear of this model "
                          f"(those are the {', '.join(QUANT_LINEARS)} linears of each layer)")
    params = dict(graph.params)
    nodes = []
    for node in graph.nodes:
        spec = layout.get(node.name)
        if spec is None or "quant" in node.attrs:
            nodes.append(node)
            continue
        if spec.bits not in FORMATS.values():
            raise ConfigError(f"{node.name}: {spec.bits}-bit weights are not supported (8 or 4)")
        if spec.group_size < 0:
            raise ConfigError(f"{node.name}: group size {spec.group_size} must be 0 or positive")
        wname = node.params["weight"]
        n, k = params[wname].shape
        qshape = (n, k) if spec.bits == 8 else (n, -(-k // 2))
        params[wname] = ParamSpec(qshape, torch.int8, "qweight")
        sname = wname.removesuffix(".weight") + ".weight_scale"
        sshape = (n,) if spec.group_size == 0 else (n, num_groups(k, spec.group_size))
        params[sname] = ParamSpec(sshape, spec.scale_dtype or graph.dtype, "scale")
        attrs = dict(node.attrs, quant={"bits": spec.bits, "group_size": spec.group_size, "in_features": k})
        nodes.append(dataclasses.replace(node, attrs=attrs, params=dict(node.params, scale=sname)))
    return graph.replace_nodes(nodes, params)


def graph_layout(graph: Graph) -> dict[str, QuantSpec]:
    """The per-node layout of an already quantized graph (the inverse of quantize_graph_layout)."""
    out = {}
    for node in graph.nodes:
        q = node.attrs.get("quant")
        if q is not None:
            out[node.name] = QuantSpec(q["bits"], q["group_size"], graph.params[node.params["scale"]].dtype)
    return out


def _libc_malloc_trim():
    import ctypes
    import ctypes.util
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows): nothing to call
        return None


_MALLOC_TRIM = _libc_malloc_trim()


def release_freed_memory() -> None:
    """Give the pages of freed host tensors back to the system now (glibc's malloc_trim). Loading
    frees a large float tensor after each small quantized one is kept; glibc serves such sizes
    from its heap once its mmap threshold has grown, and keeps the freed pages between the kept
    tensors resident, so without this the peak grows towards the float model's size."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class QuantizeOnLoad:
    """The quantization pass applied to one weight at a time, as a loader produces it, so that a
    model quantized on load never holds more than one float linear besides its quantized weights.
    ``place(name, tensor)`` -> {name: tensor, ...}: the float weight of a linear that ``quantized``
    quantizes comes back as its int8 (packed for INT4) weight plus its scale; any other tensor as it is.
    ``device``: where the returned tensors go (None: stay where they are, the CPU)."""

    def __init__(self, graph: Graph, quantized: Graph, device=None):
        self.device = device
        self.todo: dict[str, tuple[int, int, str, torch.dtype]] = {}
        for old, new in zip(graph.nodes, quantized.nodes):
            q = new.attrs.get("quant")
            if q is not None and "quant" not in old.attrs:
                sname = new.params["scale"]
                self.todo[new.params["weight"]] = (q["bits"], q["group_size"], sname, quantized.params[sname].dtype)

    def __call__(self, name: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
        job = self.todo.get(name)
        if job is None:
            out = {name: value}
        else:
            bits, group_size, sname, scale_dtype = job
            qweight, scale = quantize_weight(value, bits, group_size, scale_dtype)
            out = {name: qweight, sname: scale}
            del value
            release_freed_memory()
        if self.device is not None:
            out = {n: t.to(self.device) for n, t in out.items()}
        return out

    def scales_last(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``weights`` in the order quantize_weights gives them (every new scale after the rest)."""
        scales = {job[2] for job in self.todo.values()}
        return {**{n: t for n, t in weights.items() if n not in scales},
                **{n: t for n, t in weights.items() if n in scales}}


def quantize_weights(graph: Graph, quantized: Graph, weights: dict[str, torch.Tensor],
                     progress=None) -> dict[str, torch.Tensor]:
    """Quantize the float weights of ``graph`` into the layout ``quantized`` (from quantize_graph) expects.
    ``progress(done, total)`` is called after each linear. (Loaders quantize as they read instead,
    through QuantizeOnLoad, which does the same arithmetic weight by weight.)"""
    place = QuantizeOnLoad(graph, quantized)
    out = dict(weights)
    for i, wname in enumerate(place.todo):
        out.update(place(wname, weights[wname]))
        if progress is not None:
            progress(i + 1, len(place.todo))
    return out


# ----------------------------------------------------------------------------- the on-disk format
# `glmrt quantize` writes config.json (the source's own config, plus the entry below under
# FORMAT_KEY) and safetensors shards under glmrt's canonical parameter names; every shard's
# safetensors metadata repeats the format name and version. Readers refuse versions they do not know.
FORMAT_KEY = "glmrt_quantization"
FORMAT_NAME = "glmrt-weight-only"
FORMAT_VERSION = 1


def format_entry(graph: Graph, dtype_name: str) -> dict:
    """The FORMAT_KEY entry of config.json for a quantized graph."""
    layout = graph_layout(graph)
    bits = sorted({s.bits for s in layout.values()})
    groups = sorted({s.group_size for s in layout.values()})
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "bits": bits[0] if len(bits) == 1 else bits,
        "group_size": groups[0] if len(groups) == 1 else groups,
        "dtype": dtype_name,
        "scheme": "symmetric; scale = max|W| / (2^(bits-1) - 1) per output row (group_size 0) or per group of "
                  "group_size input columns; INT4 packed two per int8 byte, even index in the high nibble",
        "modules": {name: {"bits": s.bits, "group_size": s.group_size,
                           "scale_dtype": str(s.scale_dtype or graph.dtype).removeprefix("torch.")}
                    for name, s in layout.items()},
    }


def layout_from_entry(entry, where: str) -> tuple[dict[str, QuantSpec], str | None]:
    """Validate a FORMAT_KEY entry -> (node name -> QuantSpec, stored dtype name)."""
    from .errors import CheckpointError
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: '{FORMAT_KEY}' must be an object; the config.json is damaged: write the "
                              "checkpoint again with `glmrt quantize`")
    name, version = entry.get("format"), entry.get("version")
    if name != FORMAT_NAME:
        raise CheckpointError(f"{where}: '{FORMAT_KEY}.format' is {name!r}, not {FORMAT_NAME!r}: this is not a "
                              "checkpoint written by `glmrt quantize`")
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{where}: '{FORMAT_KEY}.version' must be an integer, found {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{where} is in {FORMAT_NAME} format version {version}, written by a newer glmrt; this "
                              f"glmrt reads version {FORMAT_VERSION} and older: upgrade glmrt, or quantize the "
                              "original checkpoint again with this version's `glmrt quantize`")
    if version < 1:
        raise CheckpointError(f"{where}: {FORMAT_NAME} format version {version} does not exist (versions start at 1)")
    modules = entry.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise CheckpointError(f"{where}: '{FORMAT_KEY}.modules' must list the quantized linears; the config.json is "
                              "damaged: write the checkpoint again with `glmrt quantize`")
    layout = {}
    for module, spec in modules.items():
        try:
            bits, group = int(spec["bits"]), int(spec["group_size"])
            scale_dtype = getattr(torch, str(spec["scale_dtype"]))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"{where}: bad entry for {module} in '{FORMAT_KEY}.modules' ({exc!r}); it needs "
                                  "bits, group_size and scale_dtype") from None
        if bits not in FORMATS.values() or group < 0 or scale_dtype not in (torch.float16, torch.bfloat16,
                                                                           torch.float32):
            raise CheckpointError(f"{where}: {module} has bits={bits}, group_size={group}, scale_dtype="
                                  f"{spec['scale_dtype']}: glmrt reads 8 or 4 bits, group_size >= 0 and float16 / "
                                  "bfloat16 / float32 scales")
        layout[module] = QuantSpec(bits, group, scale_dtype)
    dtype = entry.get("dtype")
    return layout, dtype if isinstance(dtype, str) else None
