"""`glmrt check`: the conformance kit. Every kernel of a backend against the plain-torch reference,
then a whole model against the CPU float32 reference.

    glmrt check --backend sunway                       # kernels, then synthetic:chatglm3-6b, 1 layer
    glmrt check --backend mychip --model /ckpt --layers 2 --dtype bfloat16 --strict --json

Kernels. Nodes come from glmrt.graph.build_graph of tiny configs that cover the axes the GLM
generations differ on (RMSNorm / LayerNorm, pre / DeepNorm / sandwich placement, interleaved /
half / 2-D RoPE, MQA / GQA / MHA, biases, SwiGLU / GeGLU / GELU, layer-scaled attention) at odd
sizes (K = 45, 37, 515; a 4100-wide hidden size; K past one 256-wide slice), in every dtype the
backend runs, with float weights and quantized ones (int8 / int4, per channel and group-wise), at
decode, padded-prefill, cached-decode, cached-chunk and static-cache-decode shapes. Each case runs
on the backend's device and is compared with the reference run on the CPU in the same dtype:
    error = max |kernel - reference|,  tolerance = RTOL[dtype] * max |reference| (+ 1e-6)
(twice that for attention, whose layer-scaled reference rounds scores and probabilities to the
model dtype).
Quantized linears may also quantize activations to int8 per block of 32 along K (llama.cpp's
scheme); their tolerance adds that rounding's bound, 0.5 * sum_k d_block(k) * |W[n, k]|.
Attention rows whose query sees no key at all (left padding) are only required to be finite:
what they hold is a convention the model never reads.

Model. The model (default synthetic:chatglm3-6b cut to 1 layer) is loaded on the backend and on
the CPU in float32 (a quantized model's reference gets the same int8 / int4 values and scales,
widened to fp32). Its logits on a padded batch of two prompts are compared (real positions
only), then 8 greedy tokens are generated on the backend and checked against the reference by
teacher forcing: each chosen token must be the reference's argmax, except at a near-tie (the
reference's top-2 margin below the logits tolerance), where a token within the tolerance of the
best is accepted; near-ties and the flips among them are counted in the report.

Exit status: 0 when everything passes, 1 on any failure (with --strict, any fallback to the
reference is one), 2 on bad arguments or an unavailable backend.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import ops
from .config import GLMConfig, dtype_name, parse_dtype
from .errors import GLMRTError, StrictFallbackError
from .graph import Node, build_graph
from .quant import quantize_graph, quantize_weights
from .fusion import RESIDUAL_NORM, fuse_residual_norm

# Relative tolerances of kernels against the reference in the same dtype (about 4 ulps of bf16,
# 4 of fp16 at the output's largest magnitude; fp32 leaves room for a different summation order).
RTOL = {torch.float32: 1e-4, torch.bfloat16: 1.6e-2, torch.float16: 4e-3}
# The reference's layer-scaled attention (GLM-130B, ChatGLM-6B) rounds scores and probabilities to
# the model dtype; a fused kernel may keep them in fp32 (SDPA, flash attention), which moves a
# half-precision output further.
OP_TOLERANCE_FACTOR = {"attention": 2.0}
# Whole-model logits against the fp32 reference, relative to max |reference logits|.
MODEL_RTOL = {torch.float32: 5e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
# A quantized model shares its quantized weights with the reference, so only the kernels' numerics
# differ; but kernels may also quantize the activations (the CPU's int8 dot products round each
# block of 32 activations to int8: about 0.5% RMS per linear, measured 2.3-2.9% of the largest
# logit through 2 random-weight layers), so a quantized model gets at least this bound.
QUANT_MODEL_RTOL = 5e-2
QUANT_FORMATS = ((8, 0), (4, 0), (8, 64), (4, 32), (4, 128))
ACTIVATION_QUANT_BLOCK = 32
DEFAULT_MODEL = "synthetic:chatglm3-6b"
DEFAULT_MODEL_LAYERS = 1
GREEDY_TOKENS = 8

@dataclass(frozen=True)
class Shape:
    batch: int
    tokens: int
    cache_pos: int = 0  # > 0: the step runs over a KV cache holding this many earlier keys
    last_only: bool = False  # logits of the last position only
    # Static-shape decode (graph capture): the cache position as a device tensor and attention
    # over the whole preallocated cache, masked (ForwardContext.cache_pos_t).
    static: bool = False

    def describe(self) -> str:
        return (f"B={self.batch} T={self.tokens} cache={self.cache_pos}{' static' if self.static else ''}"
                f"{' last-only' if self.last_only else ''}")


CASE_SHAPES = (
    Shape(1, 1),                          # a first decode step
    Shape(2, 5),                          # a left-padded prefill batch, no cache
    Shape(2, 1, cache_pos=6),             # decode over a cache
    Shape(1, 4, cache_pos=3, last_only=True),  # a chunk of prefill over a cache
    Shape(2, 1, cache_pos=6, static=True),     # static-shape decode over the whole cache
)
# Ops that read the cache, the positions or last_only get every shape; the others see only
# (batch, tokens), so the first two shapes cover them.
CONTEXT_OPS = ("attention", "rope", "lm_head")
STATIC_CACHE_SLACK = 3  # unused cache slots after the current position in static decode


def tiny_configs() -> dict[str, GLMConfig]:
    """Small configs covering the generations' axes, at sizes no kernel can assume."""
    base = dict(generation="conformance", num_layers=1, max_positions=64, vocab_size=101)
    return {
        "rmsnorm-gqa-interleaved": GLMConfig(**base, hidden_size=45, num_heads=4, num_kv_heads=2, head_dim=16,
                                             ffn_hidden_size=37, rotary_dim=8, rope_kind="interleaved"),
        "layernorm-deepnorm-2d": GLMConfig(**base, hidden_size=36, num_heads=3, num_kv_heads=3, head_dim=12,
                                           ffn_hidden_size=29, norm_kind="layernorm", norm_placement="deepnorm",
                                           residual_alpha=math.sqrt(2.0), rope_kind="2d", rotary_dim=12,
                                           attention_scaling="layer_scaled", activation="geglu", dense_bias=True,
                                           mlp_bias=True, rope_table_dtype="float16"),
        "sandwich-half-mqa": GLMConfig(**base, hidden_size=64, num_heads=5, num_kv_heads=1, head_dim=20,
                                       ffn_hidden_size=70, norm_placement="sandwich",
                                       rmsnorm_round_before_weight=True, rope_kind="half", rotary_dim=10,
                                       activation="gelu_tanh", qkv_bias=False, tie_word_embeddings=True),
        "wide-k": GLMConfig(**dict(base, vocab_size=1000), hidden_size=300, num_heads=5, num_kv_heads=1,
                            head_dim=64, ffn_hidden_size=515, rotary_dim=32),
        "hidden-4100": GLMConfig(**dict(base, vocab_size=17), hidden_size=4100, num_heads=2, num_kv_heads=1,
                                 head_dim=16, ffn_hidden_size=9, rotary_dim=8),
    }


# ----------------------------------------------------------------------------- cases
@dataclass
class Case:
    label: str
    node: Node
    inputs: list[torch.Tensor]
    params: dict[str, torch.Tensor]
    make_ctx: Callable[[torch.device], ops.ForwardContext]
    # (B, T) True where an output row must match; None: all of it. Other rows must be finite.
    compare_rows: torch.Tensor | None = None


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def _concrete(shape, batch: int, tokens: int) -> tuple[int, ...]:
    return tuple(batch if d == "B" else tokens if d == "T" else int(d) for d in shape)


def _context_factory(node: Node, shape: Shape, dtype: torch.dtype, gen: torch.Generator):
    """(device -> a fresh ForwardContext, rows to compare): each run gets its own cache copy."""
    batch, tokens, cache_pos = shape.batch, shape.tokens, shape.cache_pos
    S = cache_pos + tokens  # keys visible after this step
    cache_len = S + (STATIC_CACHE_SLACK if shape.static else 0)
    key_valid = torch.ones(batch, S, dtype=torch.bool)
    if batch > 1 and S > 1:
        key_valid[1, :min(2, S - 1)] = False  # row 1 is left-padded
    q_pos = torch.arange(cache_pos, S)[:, None]
    causal = torch.arange(S)[None, :] <= q_pos  # (T, S)
    allowed = causal[None, None] & key_valid[:, None, None, :]  # (B, 1, T, S)
    if shape.static:  # (B, 1, 1, cache_len): the slots after the current position are masked
        allowed = torch.nn.functional.pad(allowed, (0, cache_len - S))
    real = key_valid.long().cumsum(-1) - 1  # position ids counting real tokens only
    positions = real.clamp(min=0)[:, cache_pos:]  # (B, T)
    if node.op == "rope" and node.attrs["kind"] == "2d":
        positions = torch.stack((positions, torch.zeros_like(positions)), dim=1)  # (B, 2, T)
    prefix = None
    if node.op == "attention" and cache_pos > 0:
        a = node.attrs
        kv_shape = (batch, a["num_kv_heads"], cache_len, a["head_dim"])
        # Random keys everywhere, also in the slots this step writes and the masked ones after it.
        prefix = (torch.randn(kv_shape, generator=gen).to(dtype), torch.randn(kv_shape, generator=gen).to(dtype))

    def make(device: torch.device) -> ops.ForwardContext:
        cache = None
        if prefix is not None:
            a = node.attrs
            cache = ops.KVCache(a["layer_index"] + 1, batch, a["num_kv_heads"], cache_len, a["head_dim"], dtype,
                                device)
            cache.k[a["layer_index"]].copy_(prefix[0])
            cache.v[a["layer_index"]].copy_(prefix[1])
        return ops.ForwardContext(positions=positions.to(device), allowed=allowed.to(device), cache=cache,
                                  cache_pos=cache_pos if cache is not None else 0, last_only=shape.last_only,
                                  cache_pos_t=torch.tensor(cache_pos, device=device) if shape.static else None)

    compare_rows = allowed[:, 0].any(-1) if node.op == "attention" else None  # (B, T)
    return make, compare_rows


def _inputs(node: Node, batch: int, tokens: int, vocab: int, gen: torch.Generator) -> list[torch.Tensor]:
    out = []
    for spec in node.input_specs:
        shape = _concrete(spec.shape, batch, tokens)
        if spec.dtype == torch.int64:
            out.append(torch.randint(0, vocab, shape, generator=gen))
        else:
            out.append(torch.randn(shape, generator=gen).to(spec.dtype))
    return out


def _node_key(node: Node) -> tuple:
    attrs = {k: v for k, v in node.attrs.items() if k != "layer_index"}
    return node.op, node.describe(), repr(sorted(attrs.items(), key=lambda kv: kv[0])), tuple(sorted(node.params))


FUSED_SUFFIX = " fused"
TP_SUFFIX = " tp-rank-1-of-2"


def build_cases(dtypes, quant_formats=QUANT_FORMATS) -> list[Case]:
    """The sweep: every distinct node of every tiny config, in each dtype, float and quantized."""
    from .api import synthetic_weights
    from .shard import shard_graph, shard_weights
    cases = []
    for cname, cfg in tiny_configs().items():
        for dtype in dtypes:
            graph = build_graph(cfg, dtype)
            weights = synthetic_weights(graph, seed=_seed(cname, str(dtype)))
            variants = [("", graph, weights)]
            for bits, group in quant_formats:
                qgraph = quantize_graph(graph, bits, group)
                variants.append((f" int{bits}{f'-g{group}' if group else ''}", qgraph,
                                 quantize_weights(graph, qgraph, weights)))
            variants.append((FUSED_SUFFIX, fuse_residual_norm(graph), weights))
            # Rank 1 of 2 (glmrt.shard): its vocab-parallel embedding and LM head, which depend on the
            # vocabulary and hidden size only (the heads and MLP width are set so that 2 divides them).
            tp_graph = build_graph(cfg.replace(num_heads=2, num_kv_heads=2, ffn_hidden_size=2), dtype)
            tp_weights = synthetic_weights(tp_graph, seed=_seed(cname, str(dtype), "tp"))
            variants.append((TP_SUFFIX, shard_graph(tp_graph, 2, 1), shard_weights(tp_graph, tp_weights, 2, 1)))
            seen = set()
            for suffix, g, w in variants:
                for node in g.nodes:
                    if suffix == FUSED_SUFFIX:
                        if node.op != RESIDUAL_NORM:
                            continue  # the fused variant contributes its fused nodes only
                    elif suffix == TP_SUFFIX:
                        if node.op not in ("embedding", "lm_head"):
                            continue  # collectives run on the process group, not on a backend's kernels
                    elif suffix and "quant" not in node.attrs:
                        continue  # quantized variants contribute their quantized linears only
                    key = _node_key(node)
                    if key in seen:
                        continue
                    seen.add(key)
                    params = {role: w[name] for role, name in node.params.items()}
                    shapes = CASE_SHAPES if node.op in CONTEXT_OPS else CASE_SHAPES[:2]
                    for shape in shapes:
                        gen = torch.Generator().manual_seed(_seed(cname, str(dtype), suffix, node.name, shape))
                        make_ctx, rows = _context_factory(node, shape, dtype, gen)
                        label = f"{cname}: {node.name}{suffix} {dtype_name(dtype)} {shape.describe()}"
                        cases.append(Case(label, node, _inputs(node, shape.batch, shape.tokens, cfg.vocab_size, gen),
                                          params, make_ctx, rows))
    return cases


# ----------------------------------------------------------------------------- comparing
def _activation_quant_bound(node: Node, x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Bound on |y - y_ref| from rounding x to int8 per block of 32 along K: 0.5 d_block |W|."""
    from .quant import dequantize
    q = node.attrs["quant"]
    w = dequantize(params["weight"], params["scale"], q["bits"], q["group_size"], q["in_features"], torch.float32)
    xf = x.float().reshape(-1, x.shape[-1])  # (M, K)
    k = xf.shape[1]
    blocks = -(-k // ACTIVATION_QUANT_BLOCK)
    padded = torch.nn.functional.pad(xf.abs(), (0, blocks * ACTIVATION_QUANT_BLOCK - k))
    d = padded.view(xf.shape[0], blocks, ACTIVATION_QUANT_BLOCK).amax(-1) / 127.0  # (M, blocks)
    half_step = (0.5 * d).repeat_interleave(ACTIVATION_QUANT_BLOCK, dim=1)[:, :k]  # (M, K)
    bound = half_step @ w.abs().T  # (M, N)
    return bound.reshape(*x.shape[:-1], w.shape[0]).double()


@dataclass
class Comparison:
    ok: bool
    error: float
    tolerance: float
    detail: str = ""

    @property
    def ratio(self) -> float:
        if self.tolerance > 0:
            return self.error / self.tolerance
        return 0.0 if self.error == 0 and self.ok else math.inf


def compare(case: Case, got, want) -> Comparison:
    gots = got if isinstance(got, (tuple, list)) else (got,)
    wants = want if isinstance(want, (tuple, list)) else (want,)
    if len(gots) != len(wants):
        return Comparison(False, math.inf, 0.0, f"{len(gots)} outputs, the reference has {len(wants)}")
    dtype = case.node.input_specs[0].dtype if case.node.input_specs[0].dtype.is_floating_point else \
        case.node.output_specs[0].dtype
    rtol = RTOL.get(dtype, RTOL[torch.float32]) * OP_TOLERANCE_FACTOR.get(case.node.op, 1.0)
    worst = None
    for i, (g, r) in enumerate(zip(gots, wants)):
        if not isinstance(g, torch.Tensor):
            return Comparison(False, math.inf, 0.0, f"output {i} is a {type(g).__name__}, not a tensor")
        if tuple(g.shape) != tuple(r.shape):
            return Comparison(False, math.inf, 0.0,
                              f"output {i} has shape {tuple(g.shape)}, the reference {tuple(r.shape)}")
        if g.dtype != r.dtype:
            return Comparison(False, math.inf, 0.0, f"output {i} is {g.dtype}, the reference {r.dtype}")
        g64, r64 = g.detach().cpu().double(), r.double()
        if case.compare_rows is not None:
            rows = case.compare_rows
            if not torch.isfinite(g64[~rows]).all():
                return Comparison(False, math.inf, 0.0, f"output {i} is not finite on rows whose query sees no key")
            g64, r64 = g64[rows], r64[rows]
        if g64.numel() == 0:
            continue
        if not torch.isfinite(g64).all():
            return Comparison(False, math.inf, 0.0, f"output {i} holds NaN or inf")
        scale = r64.abs().max().item()
        tol = torch.full_like(r64, rtol * scale + 1e-6)
        if case.node.op == "linear" and "quant" in case.node.attrs:
            tol = tol + _activation_quant_bound(case.node, case.inputs[0], case.params)
        excess = (g64 - r64).abs() / tol
        j = int(excess.argmax())
        error, tolerance = (g64 - r64).abs().flatten()[j].item(), tol.flatten()[j].item()
        this = Comparison(error <= tolerance, error, tolerance)
        if worst is None or this.ratio > worst.ratio:
            worst = this
    return worst or Comparison(True, 0.0, 0.0, "nothing to compare")


# ----------------------------------------------------------------------------- kernel sweep
@dataclass
class Row:
    op: str
    kernel: str
    kind: str
    cases: int = 0
    error: float = 0.0
    tolerance: float = 0.0
    status: str = "pass"  # pass | FAIL | skip | fallback
    detail: str = ""
    refused: int = 0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = {"op": self.op, "kernel": self.kernel, "kind": self.kind, "cases": self.cases,
               "max_error": self.error, "tolerance": self.tolerance, "status": self.status, "detail": self.detail,
               "refused": self.refused}
        out.update(self.extra)
        return out


def _clone(x):
    return x.clone() if isinstance(x, torch.Tensor) else x


def check_kernels(backend, cases: list[Case], strict: bool = False) -> list[Row]:
    """One row per kernel of the backend, then one per op that falls back to the reference."""
    from .backends.base import KIND_RANK
    device = backend.device()
    kernels = sorted(backend.kernels(), key=lambda k: (k.op, KIND_RANK[k.kind], k.name))
    rows = []
    with torch.inference_mode():  # as the runtime calls kernels
        rows += _run_kernels(kernels, cases, device, strict=strict, backend_name=backend.name)
    return rows


def _run_kernels(kernels, cases: list[Case], device: torch.device, strict: bool, backend_name: str) -> list[Row]:
    from .backends.base import REFERENCE
    rows = []
    covered: set[int] = set()  # cases some kernel ran
    references: dict[int, object] = {}  # case index -> reference output, computed once
    refusals: dict[int, str] = {}  # case index -> the first kernel's reason for refusing it
    for kernel in kernels:
        row = Row(kernel.op, kernel.name, kernel.kind)
        worst = None
        for case_index, case in enumerate(cases):
            if case.node.op != kernel.op:
                continue
            try:
                why_not = kernel.supports(case.node)
            except Exception as exc:  # noqa: BLE001 - a broken predicate is a failure, not a crash
                row.status, row.detail = "FAIL", f"supports() raised {type(exc).__name__}: {exc} ({case.label})"
                continue
            if why_not is not None:
                refusals.setdefault(case_index, f"{kernel.name}: {why_not}")
                row.refused += 1
                if not row.detail:
                    row.detail = f"refused: {why_not}"
                continue
            covered.add(case_index)
            row.cases += 1
            if case_index not in references:
                references[case_index] = ops.REFERENCE[case.node.op](
                    case.make_ctx(torch.device("cpu")), case.node, [_clone(x) for x in case.inputs], case.params)
            want = references[case_index]
            try:
                inputs = [x.to(device, copy=True) for x in case.inputs]  # a kernel may not touch the case's
                params = {k: v.to(device) for k, v in case.params.items()}
                got = kernel.fn(case.make_ctx(device), case.node, inputs, params)
                result = compare(case, got, want)
            except Exception as exc:  # noqa: BLE001 - report, then go on with the other cases
                result = Comparison(False, math.inf, 0.0, f"raised {type(exc).__name__}: {exc}")
            if worst is None or result.ratio > worst[0].ratio or (not result.ok and worst[0].ok):
                worst = (result, case)
            if not result.ok and row.status != "FAIL":
                row.status = "FAIL"
                why = result.detail or f"error {result.error:.3g} > tolerance {result.tolerance:.3g}"
                row.detail = f"{case.label}: {why}"
        if worst is not None:
            row.error, row.tolerance = worst[0].error, worst[0].tolerance
            row.extra["worst_case"] = worst[1].label
        if row.cases == 0 and row.status != "FAIL":
            row.status = "skip"
            row.detail = row.detail or "no case for this op"
        rows.append(row)
    # Ops (or cases of ops) that no kernel of the backend takes run the reference.
    by_op: dict[str, list[int]] = {}
    for case_index, case in enumerate(cases):
        if case_index not in covered:
            by_op.setdefault(case.node.op, []).append(case_index)
    for op, missed in sorted(by_op.items()):
        if any(k.op == op for k in kernels):
            first = missed[0]
            reason = (f"{len(missed)} case(s) refused by every kernel, e.g. {cases[first].label} "
                      f"({refusals.get(first, 'refused')})")
        else:
            reason = f"backend {backend_name!r} has no kernel for {op!r}"
        rows.append(Row(op, f"reference.{op}", REFERENCE, cases=len(missed), status="FAIL" if strict else "fallback",
                        detail=reason))
    return rows


# ----------------------------------------------------------------------------- whole model
def _model_dtype(spec: str, backend) -> torch.dtype:
    """The model's own dtype when the backend runs it, else float32."""
    supported = backend.capabilities().dtypes
    dtype = torch.float32
    try:
        from .models import config_from_dict, preset
        if spec.startswith("synthetic:"):
            raw = preset(spec.removeprefix("synthetic:"))
        else:
            from pathlib import Path

            from . import checkpoint
            raw = checkpoint.read_config(Path(spec))
        dtype = config_from_dict(raw)[1].dtype
    except Exception:  # noqa: BLE001 - load() reports a bad model properly; here only a default is chosen
        pass
    return dtype if dtype in supported else torch.float32


def _share_quantized_weights(quantized: dict[str, torch.Tensor], reference) -> None:
    """Give the fp32 reference the model's own quantized values (``quantized``: name -> the
    model's int8 / int4 weights and scales). Quantizing in fp32 rounds the scales differently
    from quantizing in fp16 / bf16, which moves some int4 values by a whole step: that would be a
    different model, not an error of the backend."""
    for node in reference.graph.nodes:
        if "quant" in node.attrs:
            for role in ("weight", "scale"):
                name = node.params[role]
                reference.weights[name].copy_(quantized[name].to(reference.weights[name].device))  # in place:
                # the plan holds these tensors


def _prompt(config: GLMConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of 8 tokens, the second left-padded by 3. Models with GLM's prefix mask
    (GLM-130B, ChatGLM-6B) get their prompts as the release builds them: text + [gMASK] <sop>."""
    gen = torch.Generator().manual_seed(0)
    prefix = config.mask_kind == "prefix" and config.gmask_token_id is not None and config.sop_token_id is not None
    # Plain text ids: below every special token id (GLM's specials sit at the top of the vocabulary).
    specials = [i for i in (config.gmask_token_id, config.sop_token_id, config.mask_token_id)
                if i is not None]
    high = min([config.vocab_size] + specials)
    ids = torch.randint(0, high, (2, 8), generator=gen)
    if prefix:
        ids[:, -2] = config.gmask_token_id
        ids[:, -1] = config.sop_token_id
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids[1, :3] = 0
    return ids, mask


def check_model(backend, spec: str, layers: int | None, dtype: torch.dtype | None, quantize: str | None,
                strict: bool, tokens: int = GREEDY_TOKENS) -> list[Row]:
    from .api import load
    dtype = dtype or _model_dtype(spec, backend)
    what = f"{spec}{f', {layers} layer(s)' if layers else ''}, {dtype_name(dtype)}{f', {quantize}' if quantize else ''}"
    rows = []
    try:
        model = load(spec, backend=backend.name, dtype=dtype, layers=layers, quantize=quantize, strict=strict,
                     progress=False)
    except StrictFallbackError as exc:
        first = str(exc).splitlines()[0]
        return [Row("model", "plan", "", status="FAIL", detail=f"{what}: {first}")]
    fallbacks = model.plan.fallbacks()
    kinds: dict[str, int] = {}
    for step in model.plan.steps:
        kinds[step.kind] = kinds.get(step.kind, 0) + 1
    rows.append(Row("model", "plan", "", cases=len(model.plan.steps), status="fallback" if fallbacks else "pass",
                    detail=f"{what}: " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())),
                    extra={"plan": model.plan.summary()}))

    # The backend's results first, then the model is freed before the fp32 reference is loaded:
    # only one of the two is in memory at a time (a 1-layer GLM-130B is 13.6 GiB in fp32).
    ids, mask = _prompt(model.config)
    real = mask.bool()
    got = model.logits(ids, attention_mask=mask).double().cpu()[real]  # (real positions, V)
    out = model.generate(ids, max_new_tokens=tokens, attention_mask=mask, eos_token_id=[]).cpu()  # (2, 8 + n)
    quantized = {name: model.weights[name].cpu().clone() for node in model.graph.nodes if "quant" in node.attrs
                 for role, name in node.params.items() if role in ("weight", "scale")}
    del model
    gc.collect()

    # The oracle: every node on the plain-torch reference op (never the cpu backend's own kernels,
    # which are themselves under test when --backend cpu).
    reference = load(spec, backend="cpu", dtype=torch.float32, layers=layers, quantize=quantize, progress=False,
                     kernels="reference")
    _share_quantized_weights(quantized, reference)
    rtol = MODEL_RTOL.get(dtype, MODEL_RTOL[torch.float32])
    if quantize:
        rtol = max(rtol, QUANT_MODEL_RTOL)
    want = reference.logits(ids, attention_mask=mask).double()[real]
    tol = rtol * want.abs().max().item()
    error = (got - want).abs().max().item()
    ok = bool(torch.isfinite(got).all()) and error <= tol
    rows.append(Row("model", "logits", "", cases=int(real.sum()), error=error, tolerance=tol,
                    status="pass" if ok else "FAIL", detail=f"{what}: logits of a padded batch of 2 vs CPU float32"))

    # Greedy decoding over the KV cache, judged by teacher forcing on the reference.
    full_mask = torch.cat((mask, torch.ones(2, out.shape[1] - ids.shape[1], dtype=mask.dtype)), dim=1)
    ref = reference.logits(out, attention_mask=full_mask).double()  # (2, 8 + n, V)
    del reference
    T = ids.shape[1]
    greedy = judge_greedy(ref[:, T - 1:-1], out[:, T:], tol)  # step i of the reference predicts token i
    rows.append(Row("model", f"greedy {tokens} tokens", "", cases=greedy.total, error=greedy.worst_gap, tolerance=tol,
                    status="pass" if greedy.ok else "FAIL", detail=greedy.detail(),
                    extra={"argmax": greedy.same, "near_ties": greedy.near_ties, "near_tie_flips": greedy.flips}))
    return rows


@dataclass
class GreedyJudgement:
    """Greedy tokens against the reference by teacher forcing. Every chosen token must be the
    reference's argmax, except at a near-tie: a position whose reference top-2 margin is below the
    tolerance, where any token within the tolerance of the best is accepted (and counted)."""

    total: int
    same: int          # chosen == the reference's argmax
    near_ties: int     # positions whose top-2 margin is below the tolerance
    flips: int         # near-ties where another token (within the tolerance) was chosen
    wrong: int         # positions that break the rule
    worst_gap: float   # largest (best - chosen) reference logit gap
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.wrong == 0

    def detail(self) -> str:
        text = (f"{self.same}/{self.total} tokens are the reference's argmax; {self.near_ties} positions are "
                f"near-ties (top-2 margin < {self.tolerance:.3g}), {self.flips} of them took another token")
        if not self.ok:
            text = (f"{self.wrong} tokens are not the reference's argmax where its top-2 margin exceeds the "
                    f"tolerance (worst gap {self.worst_gap:.3g}); " + text)
        return text


def judge_greedy(reference_logits: torch.Tensor, chosen: torch.Tensor, tolerance: float) -> GreedyJudgement:
    """reference_logits (..., V): the reference's logits at the positions that predict `chosen` (...)."""
    ref = reference_logits.double().reshape(-1, reference_logits.shape[-1])  # (N, V)
    chosen = chosen.reshape(-1).to(ref.device)
    top2 = ref.topk(2, dim=-1)
    best, second = top2.values[:, 0], top2.values[:, 1]
    gap = best - ref.gather(1, chosen[:, None])[:, 0]
    argmax = chosen == top2.indices[:, 0]
    near_tie = (best - second) < tolerance
    wrong = ~argmax & (~near_tie | (gap > tolerance))
    return GreedyJudgement(total=int(chosen.numel()), same=int(argmax.sum()), near_ties=int(near_tie.sum()),
                           flips=int((near_tie & ~argmax).sum()), wrong=int(wrong.sum()),
                           worst_gap=float(gap.max()) if gap.numel() else 0.0, tolerance=float(tolerance))


# ----------------------------------------------------------------------------- command
def run_check(args) -> int:
    from .backends import require_available
    from .backends.base import safe_probe
    backend = require_available(args.backend)
    if getattr(backend, "export_format", None):
        raise GLMRTError(f"backend {backend.name!r} has no per-op kernels to check: it runs {backend.export_format} "
                         "exports as one graph. Its checks are the export tests (tests/onnx): exported models against "
                         "glmrt's reference, driven through the ONNX signature")
    dtype = parse_dtype(args.dtype)
    t0 = time.perf_counter()
    dtypes = [d for d in backend.capabilities().dtypes if d in RTOL]
    if dtype is not None and dtype not in dtypes:
        raise GLMRTError(f"backend {backend.name!r} does not run {dtype_name(dtype)}; it runs "
                         f"{', '.join(dtype_name(d) for d in dtypes)}")
    if args.no_kernels and args.no_model:
        raise GLMRTError("--no-kernels and --no-model leave nothing to check: drop one of them")
    cases = [] if args.no_kernels else build_cases(dtypes)
    rows = [] if args.no_kernels else check_kernels(backend, cases, strict=args.strict)
    kernel_seconds = time.perf_counter() - t0
    model_rows: list[Row] = []
    if not args.no_model:
        layers = args.layers if args.layers is not None else (DEFAULT_MODEL_LAYERS if args.model == DEFAULT_MODEL
                                                              else None)
        model_rows = check_model(backend, args.model, layers, dtype, args.quantize, args.strict)
        if args.strict:
            for row in model_rows:
                if row.status == "fallback":
                    row.status = "FAIL"
    all_rows = rows + model_rows
    failed = [r for r in all_rows if r.status == "FAIL"]
    verification = backend.verification()
    result = {
        "backend": backend.name, "device": str(backend.device()), "reason": safe_probe(backend).reason,
        "verification": {"level": verification.level, "detail": verification.detail},
        "dtypes": [dtype_name(d) for d in dtypes], "cases": len(cases), "strict": bool(args.strict),
        "kernels": [r.to_dict() for r in rows], "model": [r.to_dict() for r in model_rows],
        "passed": not failed, "seconds": round(time.perf_counter() - t0, 1), "kernel_seconds": round(kernel_seconds, 1),
    }
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        _print_table(result, all_rows, failed)
    return 1 if failed else 0


def _print_table(result: dict, rows: list[Row], failed: list[Row]) -> None:
    print(f"glmrt check: backend {result['backend']} on {result['device']} [{result['verification']['level']}]")
    print(f"  {result['reason']}")
    if result["cases"]:
        print(f"  {result['cases']} op cases over {', '.join(result['dtypes'])}; float, int8 and int4 weights"
              f"{'; strict: fallbacks fail' if result['strict'] else ''}\n")
    else:
        print(f"  kernels not checked (--no-kernels){'; strict: fallbacks fail' if result['strict'] else ''}\n")
    header = f"{'op':<13} {'kernel':<26} {'kind':<9} {'cases':>6} {'max error':>10} {'tolerance':>10}  status"
    print(header)
    print("-" * len(header))
    for r in rows:
        err = "-" if r.status in ("skip", "fallback") or r.op == "model" and r.kernel == "plan" else f"{r.error:.3g}"
        tol = "-" if err == "-" else f"{r.tolerance:.3g}"
        print(f"{r.op:<13} {r.kernel:<26} {r.kind:<9} {r.cases:>6} {err:>10} {tol:>10}  {r.status}")
    notes = [r for r in rows if r.detail and (r.status != "pass" or r.op == "model")]
    if notes:
        print()
        for r in notes:
            print(f"  {r.op} / {r.kernel}: {r.detail}")
    print(f"\n{'PASS' if not failed else f'FAIL ({len(failed)} row(s) failed)'} in {result['seconds']}s")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="auto", help="backend name or alias, or auto (default: auto)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"checkpoint directory or synthetic:<preset> for the whole-model check (default: "
                        f"{DEFAULT_MODEL} with --layers {DEFAULT_MODEL_LAYERS})")
    p.add_argument("--no-model", action="store_true", help="check the kernels only")
    p.add_argument("--no-kernels", action="store_true",
                   help="check the whole model only (e.g. when sweeping models after one kernel check)")
    p.add_argument("--layers", type=int, default=None,
                   help=f"keep only the first N layers of the model (default: {DEFAULT_MODEL_LAYERS} for the default "
                        "model, all for one you name)")
    p.add_argument("--dtype", default=None,
                   help="float32 | bfloat16 | float16: the model's dtype (default: its own if the backend runs it, "
                        "else float32); kernels are checked in every dtype the backend runs")
    p.add_argument("--quantize", default=None, help="int8 | int4 | int4-g64 ...: quantize the model's weights")
    p.add_argument("--strict", action="store_true", help="any fallback to the torch reference is a failure")
    p.add_argument("--json", action="store_true", help="print the results as JSON")


def register(subparsers) -> None:
    """Adds `glmrt check` (see glmrt.cli's _COMMAND_MODULES)."""
    p = subparsers.add_parser("check", help="conformance kit: every kernel of a backend, then a whole model, "
                                            "against the reference")
    add_arguments(p)
    p.set_defaults(handler=run_check)


def main(argv: list[str] | None = None) -> int:
    """`python -m glmrt.conformance ...`, the same as `glmrt check ...`."""
    parser = argparse.ArgumentParser(prog="glmrt check", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_check(args)
    except GLMRTError as exc:
        print(f"glmrt: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
