"""The memory planner: how many bytes each device needs to run a model tensor-parallel over
1, 2, 4 or 8 devices, and the smallest size that fits (`glmrt memory`).

Nothing is loaded: the graph comes from glmrt.api.prepare(materialize=False), which reads the
config (and, for a checkpoint directory, the weight files' headers only), so a quantized graph has
exactly the parameter specs glmrt.load allocates; quantized byte counts come from
glmrt.quant.quant_bytes. At tensor_parallel=1 the weight bytes equal Model.weight_bytes() of the
loaded model (tests/unit/test_memory_planner.py checks that).

What each device holds under tensor parallelism (Megatron style, as issue 13 specifies it):
- embedding and LM head: vocabulary-parallel, ceil(vocab / tp) rows each (a tied head is one tensor);
- attention qkv: column-parallel by heads: num_heads / tp query heads and the KV groups those
  heads read: num_kv_heads / tp groups, or one whole group when there are fewer groups than
  ranks (each group then replicated tp / num_kv_heads times); biases alike;
- attention output and MLP down projection: row-parallel (in_features / tp columns), their bias
  whole on every rank (added once after the all-reduce);
- MLP up projection: column-parallel (both GLU halves split), bias split alike;
- norms: replicated.
A quantized linear is quantized after sharding, per rank: its scales follow the rank's rows, and a
row-parallel layer has one scale per row (or group) of its own column slice.

KV cache: 2 (keys, values) x layers x batch x context x the rank's KV heads x head_dim in the
model's float dtype (glmrt.ops.KVCache; quantization is weight-only). Activations: the peak of one
layer's prefill over ``context`` tokens; GLM-130B's and ChatGLM-6B's layer-scaled softmax
materializes the scores (B, heads / tp, T, T) with an fp32 softmax, the other generations run
fused attention; see activation_bytes.
Runtime overhead: RUNTIME_OVERHEAD per device for the driver context, the kernel libraries'
workspaces, the collectives' buffers and allocator slack. A size fits when weights + KV cache +
activations + overhead <= USABLE_FRACTION of the device's memory.
"""

from __future__ import annotations

import dataclasses
import math

from .errors import ConfigError
from .graph import Graph
from .quant import quant_bytes

GiB = 1024 ** 3
TENSOR_PARALLEL_SIZES = (1, 2, 4, 8)
# Not every byte of a device's memory can be allocated: ECC/reserved regions and what the driver
# keeps for itself (an RTX 2080 Ti reports 10.76 of its 11 GiB free after start-up, 97.8%).
USABLE_FRACTION = 0.95
RUNTIME_OVERHEAD = GiB // 2

# Memory as the vendors sell it: these parts' "GB" are binary (HBM stacks and GDDR chips come in
# powers of two; H200's 141 GB is 141 GiB of six HBM3e stacks enabled).
DEVICES: dict[str, tuple[float, str]] = {
    "a100-40g": (40, "NVIDIA A100 40GB"),
    "a100-80g": (80, "NVIDIA A100 80GB"),
    "h100-80g": (80, "NVIDIA H100 80GB"),
    "h200": (141, "NVIDIA H200 141GB"),
    "v100-32g": (32, "NVIDIA V100 32GB"),
    "rtx3090": (24, "NVIDIA GeForce RTX 3090 24GB"),
    "rtx4090": (24, "NVIDIA GeForce RTX 4090 24GB"),
    "rtx2080ti": (11, "NVIDIA GeForce RTX 2080 Ti 11GB"),
    "ascend910": (32, "Huawei Ascend 910 32GB"),
    "ascend910b": (64, "Huawei Ascend 910B 64GB"),
    "dcu-z100": (32, "Hygon DCU Z100 32GB"),
    "dcu-k100": (64, "Hygon DCU K100 64GB"),
}

WEIGHT_KINDS = ("embedding", "lm_head", "attention", "mlp", "norms")


@dataclasses.dataclass(frozen=True)
class Device:
    name: str
    memory_bytes: int
    description: str

    @property
    def budget_bytes(self) -> int:
        """What a plan may use: USABLE_FRACTION of the memory."""
        return int(self.memory_bytes * USABLE_FRACTION)

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "memory_bytes": self.memory_bytes,
                "usable_fraction": USABLE_FRACTION, "budget_bytes": self.budget_bytes}


def device_by_name(name: str) -> Device:
    key = str(name).lower()
    if key not in DEVICES:
        raise ConfigError(f"unknown device {name!r}: known devices are {', '.join(DEVICES)} "
                          "(or give the memory of one device with --memory GiB)")
    gib, description = DEVICES[key]
    return Device(key, int(gib * GiB), description)


def device_with_memory(gib) -> Device:
    """A device given by its memory in GiB (``--memory``)."""
    try:
        value = float(gib)
    except (TypeError, ValueError):
        raise ConfigError(f"--memory must be a number of GiB (e.g. 24 or 79.6), got {gib!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"--memory must be a positive, finite number of GiB, got {gib!r}")
    return Device(f"{value:g}GiB", int(value * GiB), f"a device with {value:g} GiB")


# ----------------------------------------------------------------------------- one rank's share
def kv_heads_per_rank(num_kv_heads: int, tp: int) -> int:
    """KV heads one rank holds: its share of the groups, or one whole group replicated when there
    are fewer groups than ranks."""
    return num_kv_heads // tp if num_kv_heads >= tp else 1


def check_tensor_parallel(graph: Graph, tp: int) -> str | None:
    """Why ``tp`` cannot shard this model (None: it can): the numbers that do not divide."""
    cfg = graph.config
    if tp < 1:
        return f"tensor-parallel size {tp} must be at least 1"
    if cfg.num_heads % tp:
        return f"{cfg.num_heads} attention heads do not divide among {tp} ranks"
    nkv = cfg.num_kv_heads
    if (nkv >= tp and nkv % tp) or (nkv < tp and tp % nkv):
        return f"{nkv} KV groups and {tp} ranks: one must divide the other"
    if cfg.ffn_hidden_size % tp:
        return f"the MLP width {cfg.ffn_hidden_size} does not divide among {tp} ranks"
    return None


def _rank_linear_shape(graph: Graph, node_name: str, n: int, k: int, tp: int) -> tuple[int, int]:
    """(out, in) features of one rank's slice of a linear's weight."""
    cfg = graph.config
    if node_name.endswith("attn.qkv"):
        return (cfg.num_heads // tp + 2 * kv_heads_per_rank(cfg.num_kv_heads, tp)) * cfg.head_dim, k
    if node_name.endswith("mlp.up"):
        return n // tp, k
    if node_name.endswith("attn.dense") or node_name.endswith("mlp.down"):
        return n, k // tp
    raise ConfigError(f"internal: no tensor-parallel rule for linear {node_name}")


def weight_bytes_per_rank(graph: Graph, tp: int) -> dict[str, dict[str, int]]:
    """kind -> {"float": bytes, "quantized": bytes} on one rank of ``tp`` (tp=1: the whole model,
    byte for byte what glmrt.load allocates for ``graph``)."""
    out = {kind: {"float": 0, "quantized": 0} for kind in WEIGHT_KINDS}
    done: set[str] = set()

    def add(kind: str, name: str, nbytes: int, quantized: bool = False) -> None:
        done.add(name)
        out[kind]["quantized" if quantized else "float"] += nbytes

    for node in graph.nodes:
        if node.op in ("embedding", "lm_head"):
            name = node.params["weight"]
            if name in done:  # a tied LM head is the embedding itself
                continue
            spec = graph.params[name]
            rows = -(-spec.shape[0] // tp)
            kind = "lm_head" if node.op == "lm_head" else "embedding"
            add(kind, name, rows * math.prod(spec.shape[1:]) * spec.dtype.itemsize)
        elif node.op in ("norm", "residual_norm"):
            for name in node.params.values():
                spec = graph.params[name]
                add("norms", name, math.prod(spec.shape) * spec.dtype.itemsize)
        elif node.op == "linear":
            kind = "attention" if ".attn." in node.name else "mlp"
            wname = node.params["weight"]
            wspec = graph.params[wname]
            q = node.attrs.get("quant")
            n = wspec.shape[0]
            k = q["in_features"] if q else wspec.shape[1]
            rn, rk = _rank_linear_shape(graph, node.name, n, k, tp)
            if q:
                sname = node.params["scale"]
                sspec = graph.params[sname]
                add(kind, wname, quant_bytes(rn, rk, q["bits"], q["group_size"], sspec.dtype.itemsize), True)
                done.add(sname)
            else:
                add(kind, wname, rn * rk * wspec.dtype.itemsize)
            if "bias" in node.params:
                bname = node.params["bias"]
                bspec = graph.params[bname]
                whole_bias = node.name.endswith("attn.dense") or node.name.endswith("mlp.down")
                add(kind, bname, (n if whole_bias else rn) * bspec.dtype.itemsize)
    missed = sorted(set(graph.params) - done)
    if missed:
        raise ConfigError(f"internal: the memory planner does not account for {', '.join(missed[:5])}")
    return out


def kv_cache_bytes(graph: Graph, tp: int, context: int, batch: int) -> int:
    """The KV cache of ``batch`` sequences of ``context`` tokens on one rank, in the model dtype."""
    cfg = graph.config
    per_token = 2 * kv_heads_per_rank(cfg.num_kv_heads, tp) * cfg.head_dim * graph.dtype.itemsize
    return cfg.num_layers * batch * context * per_token


def activation_bytes(graph: Graph, tp: int, context: int, batch: int) -> int:
    """The peak of one layer's prefill of ``batch`` x ``context`` tokens on one rank (a layer's
    tensors are freed before the next starts):
    - the residual stream, the normed input and the branch output: 3 x (B, T, hidden);
    - attention: the qkv output and the rotated q, k, v (2 x qkv width), the KV groups repeated to
      the query heads, the boolean mask (B, 1, T, T) and the context (B, T, heads x head_dim); with
      GLM-130B's / ChatGLM-6B's layer-scaled softmax, which only the reference op computes, also
      the scores (B, heads, T, T) in the model dtype plus two fp32 copies (the softmax's input and
      output); standard scaling runs torch's fused scaled_dot_product_attention, whose flash /
      memory-efficient kernels keep no T x T scores (its math fallback on the CPU does);
    - MLP: the up projection (B, T, 2 x ffn for GLU) and the activation with its temporary (2 x ffn);
    plus the last position's logits over the whole vocabulary in fp32 (prefill computes no others)."""
    cfg = graph.config
    d = graph.dtype.itemsize
    bt = batch * context
    heads = cfg.num_heads // tp
    kv = kv_heads_per_rank(cfg.num_kv_heads, tp)
    hd = cfg.head_dim
    stream = 3 * bt * cfg.hidden_size * d
    qkv = bt * (heads + 2 * kv) * hd * d
    repeated = 2 * batch * heads * context * hd * d if heads > kv else 0
    mask = batch * context * context
    scores = batch * heads * context * context * (d + 8) if materialized_scores(graph) else 0
    attention = 2 * qkv + repeated + mask + scores + bt * heads * hd * d
    ffn = cfg.ffn_hidden_size // tp
    mlp = bt * (cfg.mlp_in_size // tp) * d + 2 * bt * ffn * d
    logits = batch * cfg.vocab_size * 4
    return stream + max(attention, mlp) + logits


def materialized_scores(graph: Graph) -> bool:
    """Whether attention materializes its (T x T) scores: the layer-scaled softmax (GLM-130B,
    ChatGLM-6B) runs on the reference op only (backends/torch_fused.py refuses it for SDPA)."""
    return any(n.op == "attention" and n.attrs.get("scaling") == "layer_scaled" for n in graph.nodes)


# ----------------------------------------------------------------------------- the plan
def plan_sizes(graph: Graph, *, context: int, batch: int, device: Device | None,
               sizes=TENSOR_PARALLEL_SIZES) -> list[dict]:
    """One entry per tensor-parallel size: {"tensor_parallel", "bytes_per_device", "fits",
    "breakdown"} (bytes_per_device None and "invalid" set where the size cannot shard the model)."""
    rows = []
    for tp in sizes:
        why = check_tensor_parallel(graph, tp)
        if why is not None:
            rows.append({"tensor_parallel": tp, "bytes_per_device": None, "fits": False, "invalid": why,
                         "breakdown": None})
            continue
        weights = weight_bytes_per_rank(graph, tp)
        breakdown = {
            "weights": {kind: dict(v) for kind, v in weights.items()},
            "weights_total": sum(v["float"] + v["quantized"] for v in weights.values()),
            "weights_quantized": sum(v["quantized"] for v in weights.values()),
            "kv_cache": kv_cache_bytes(graph, tp, context, batch),
            "activations": activation_bytes(graph, tp, context, batch),
            "runtime_overhead": RUNTIME_OVERHEAD,
        }
        total = breakdown["weights_total"] + breakdown["kv_cache"] + breakdown["activations"] + RUNTIME_OVERHEAD
        fits = None if device is None else total <= device.budget_bytes
        rows.append({"tensor_parallel": tp, "bytes_per_device": total, "fits": fits, "breakdown": breakdown})
    return rows


def plan_memory(model: str, *, device: Device | None = None, dtype=None, quantize: str | None = None,
                context: int = 2048, batch: int = 1, layers: int | None = None,
                sizes=TENSOR_PARALLEL_SIZES) -> dict:
    """The planner's result for a preset ("synthetic:<name>") or a checkpoint directory, without
    loading any weight: {"model", "device", "dtype", "quantize", "context", "batch", "sizes",
    "tensor_parallel" (the smallest size that fits, or None), "assumptions"}."""
    from .api import prepare
    from .config import dtype_name
    for label, value in (("context", context), ("batch", batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{label} must be a positive number of tokens{'' if label == 'context' else ' (rows)'}, "
                              f"got {value!r}")
    prep = prepare(model, dtype=dtype, quantize=quantize, layers=layers, progress=False, materialize=False)
    graph = prep.graph
    cfg = graph.config
    if context > cfg.max_positions:
        raise ConfigError(f"context {context} exceeds the {cfg.max_positions} positions {model} supports: "
                          f"plan for --context {cfg.max_positions} or less")
    rows = plan_sizes(graph, context=context, batch=batch, device=device, sizes=sizes)
    if device is None:
        for row in rows:
            if row["bytes_per_device"] is not None:
                row["fits_on"] = [name for name in DEVICES if row["bytes_per_device"] <= device_by_name(name).budget_bytes]
    smallest = next((r["tensor_parallel"] for r in rows if r["fits"]), None)
    quant = sorted({f"int{n.attrs['quant']['bits']}" + (f"-g{n.attrs['quant']['group_size']}"
                                                         if n.attrs['quant']['group_size'] else "")
                    for n in graph.nodes if "quant" in n.attrs})
    return {
        "model": model,
        "device": None if device is None else device.to_dict(),
        "dtype": dtype_name(graph.dtype),
        "quantize": quant[0] if len(quant) == 1 else (quant or None),
        "context": context,
        "batch": batch,
        "config": {"generation": cfg.generation, "layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
                   "heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads, "vocab_size": cfg.vocab_size},
        "sizes": rows,
        "tensor_parallel": smallest,
        "assumptions": {
            "usable_fraction": USABLE_FRACTION,
            "runtime_overhead_bytes": RUNTIME_OVERHEAD,
            "kv_cache": f"keys and values of {context} tokens x {batch} rows in {dtype_name(graph.dtype)}",
            "activations": "one layer's prefill over the whole context; attention scores " +
                           ("materialized (the layer-scaled softmax runs on the reference op)"
                            if materialized_scores(graph) else "not materialized (fused attention)"),
            "tensor_parallel": "vocab-parallel embedding and LM head; qkv and MLP up column-parallel; attention "
                               "output and MLP down row-parallel (their bias whole on each rank); norms "
                               "replicated; KV groups replicated where there are fewer than ranks; quantized "
                               "per rank after sharding",
        },
    }


def render(result: dict) -> str:
    """The planner's table as text."""
    def gib(b):
        return "-" if b is None else f"{b / GiB:.2f}"

    dev = result["device"]
    head = (f"{result['model']}: {result['config']['generation']}, {result['config']['layers']} layers, "
            f"{result['dtype']}" + (f", weights {result['quantize']}" if result["quantize"] else "") +
            f"; context {result['context']} x batch {result['batch']}")
    lines = [head]
    if dev is not None:
        lines.append(f"device {dev['name']} ({dev['description']}): {dev['memory_bytes'] / GiB:.2f} GiB, planning "
                     f"with {dev['usable_fraction']:.0%} = {dev['budget_bytes'] / GiB:.2f} GiB")
    lines.append("GiB per device:")
    lines.append("  tp  weights (quantized)  kv cache  activations  overhead   total  fits")
    for row in result["sizes"]:
        tp = row["tensor_parallel"]
        if row["bytes_per_device"] is None:
            lines.append(f"{tp:>4}  cannot shard: {row['invalid']}")
            continue
        b = row["breakdown"]
        if dev is not None:
            fits = "yes" if row["fits"] else "no"
        else:
            fits = ", ".join(row.get("fits_on", [])) or "none of the known devices"
        lines.append(f"{tp:>4}  {gib(b['weights_total']):>7} ({gib(b['weights_quantized']):>7})   "
                     f"{gib(b['kv_cache']):>8}  {gib(b['activations']):>11}  {gib(b['runtime_overhead']):>8}  "
                     f"{gib(row['bytes_per_device']):>6}  {fits}")
    first = next((r for r in result["sizes"] if r["breakdown"]), None)
    if first is not None:
        w = first["breakdown"]["weights"]
        tied = not (w["lm_head"]["float"] + w["lm_head"]["quantized"])
        parts = ", ".join(f"{'embedding (tied LM head)' if kind == 'embedding' and tied else kind} "
                          f"{gib(v['float'] + v['quantized'])}" for kind, v in w.items() if v["float"] + v["quantized"])
        lines.append(f"weights at tp={first['tensor_parallel']} by kind (GiB): {parts}")
    if dev is not None:
        tp = result["tensor_parallel"]
        lines.append(f"smallest tensor-parallel size that fits: {tp}" if tp else
                     f"no size up to {result['sizes'][-1]['tensor_parallel']} fits on {dev['name']}")
    a = result["assumptions"]
    lines.append(f"assumed: {a['usable_fraction']:.0%} of a device's memory usable; "
                 f"{a['runtime_overhead_bytes'] / GiB:.1f} GiB runtime overhead per device (driver context, "
                 "libraries' workspaces, collectives' buffers); activations: " + a["activations"])
    return "\n".join(lines)
