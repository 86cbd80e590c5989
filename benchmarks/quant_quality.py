"""Quantization quality, measured the way llama.cpp's `perplexity --kl-divergence` measures it:
for every position of a fixed token set, the quantized model's next-token distribution against the
fp32 model's -- mean KL(P_fp32 || P_quant) (with its standard error, median, 99th percentile and
maximum) and top-1 agreement (how often both pick the same most likely token).

    python benchmarks/quant_quality.py --model synthetic:chatglm3-6b --layers 2 --threads 2 \
        --out benchmarks/results/$(date -u +%F)-quant-quality

Each quantized format runs twice: with the backend's own kernels (on the CPU the native INT8/INT4
kernels, which also round activations to int8 per block of 32) and with the torch reference
linear (exact dequantize, then an fp32 matmul), which isolates the weight rounding. Weight bytes of
the quantized linears against fp16 are counted with fp16 scales (as `glmrt quantize --dtype
float16` stores them), for the model as cut and extrapolated to its full depth.

With a synthetic preset the weights are random (N(0, 0.02)): the numbers then measure the numerics
of the quantization scheme and the kernels on weights of the real widths, not the quality of a
trained model, whose weight and activation outliers behave differently. The output says so.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch

from glmrt import ops
from glmrt.api import prepare
from glmrt.backends import require_available
from glmrt.bench.machine import stamp
from glmrt.lowering import lower
from glmrt.model import Model
from glmrt.quant import parse_format, quant_bytes, quantize_graph, quantize_weights

FORMATS = ("int8", "int4", "int4-g32", "int4-g64", "int4-g128")
RANDOM_WEIGHTS_NOTE = ("synthetic preset: random N(0, 0.02) weights, so these numbers measure the numerics of the "
                       "quantization scheme and the kernels at the real widths, not the quality loss of a trained "
                       "model (whose outliers matter; GLM-130B reports INT4 LAMBADA 79.47 vs 80.21 FP16)")


def token_set(vocab: int, sequences: int, length: int, seed: int) -> torch.Tensor:
    """The fixed evaluation tokens: `sequences` rows of `length` ids drawn with a fixed seed."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (sequences, length), generator=g)


def kl_and_top1(ref_logits: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position: KL(P_ref || P) in nats, and whether the argmax agrees."""
    ref_logp = torch.log_softmax(ref_logits.double(), dim=-1)
    logp = torch.log_softmax(logits.double(), dim=-1)
    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
    same = ref_logits.argmax(-1) == logits.argmax(-1)
    return kl.flatten(), same.flatten()


def summarize(kl: torch.Tensor, same: torch.Tensor) -> dict:
    n = kl.numel()
    return {
        "positions": n,
        "mean_kl": kl.mean().item(),
        "mean_kl_stderr": (kl.std() / math.sqrt(n)).item() if n > 1 else None,
        "median_kl": kl.median().item(),
        "p99_kl": kl.quantile(0.99).item(),
        "max_kl": kl.max().item(),
        "top1_agreement": same.double().mean().item(),
    }


def linear_bytes(graph, fmt: str | None, layers_full: int, layers_cut: int) -> dict:
    """Bytes of the quantizable linears (weights + fp16 scales) against the same weights in fp16."""
    q = parse_format(fmt) if fmt else None
    quant = fp16 = 0
    linear_weights = set()
    for node in graph.nodes:
        if node.op != "linear" or not any(node.name.endswith(s) for s in ("attn.qkv", "attn.dense", "mlp.up",
                                                                           "mlp.down")):
            continue
        linear_weights.add(node.params["weight"])
        n, k = graph.params[node.params["weight"]].shape
        fp16 += n * k * 2
        quant += n * k * 2 if q is None else quant_bytes(n, k, q[0], q[1], 2)
    other = sum(math.prod(p.shape) * 2 for name, p in graph.params.items() if not name.startswith("layers."))
    per_layer_other = sum(math.prod(p.shape) * 2 for name, p in graph.params.items()
                          if name.startswith("layers.") and name not in linear_weights)
    scale = layers_full / layers_cut
    full_quant = quant * scale + per_layer_other * scale + other
    full_fp16 = fp16 * scale + per_layer_other * scale + other
    return {"linear_bytes": quant, "linear_fp16_bytes": fp16, "linear_ratio": quant / fp16,
            "full_depth_model_bytes": int(full_quant), "full_depth_model_fp16_bytes": int(full_fp16),
            "full_depth_model_ratio": full_quant / full_fp16}


def quantized_model(prep, backend, fmt: str, reference_linear: bool) -> Model:
    bits, group = parse_format(fmt)
    qgraph = quantize_graph(prep.graph, bits, group)
    weights = quantize_weights(prep.graph, qgraph, prep.weights)
    weights = {name: t.to(backend.device()) for name, t in weights.items()}
    plan = lower(qgraph, backend, weights)
    if reference_linear:
        for step in plan.steps:
            if "quant" in step.node.attrs:
                step.fn, step.impl, step.kind = ops.REFERENCE[step.node.op], f"reference.{step.node.op}", "reference"
    return Model(prep.cfg, qgraph, plan, weights, prep.source)


def logits_of(model: Model, tokens: torch.Tensor) -> torch.Tensor:
    return torch.cat([model.logits(row[None]).float().cpu() for row in tokens], dim=0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="synthetic:chatglm3-6b")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--backend", default="cpu")
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--sequences", type=int, default=4)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--seed", type=int, default=20240601)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="results directory (results.json + results.md)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python benchmarks/quant_quality.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    info = stamp(args.threads)
    backend = require_available(args.backend)
    t0 = time.time()
    prep = prepare(args.model, dtype="float32", layers=args.layers, progress=False)
    full_layers = int(prep.raw.get("num_layers") or prep.raw.get("num_hidden_layers"))
    tokens = token_set(prep.cfg.vocab_size, args.sequences, args.length, args.seed)
    fp32 = Model(prep.cfg, prep.graph, lower(prep.graph, backend, {n: t.to(backend.device())
                                                                   for n, t in prep.weights.items()}),
                 prep.weights, prep.source)
    ref = logits_of(fp32, tokens)
    rows = []
    for fmt in [f.strip() for f in args.formats.split(",") if f.strip()]:
        row = {"format": fmt, **linear_bytes(prep.graph, fmt, full_layers, args.layers)}
        for mode, reference_linear in (("kernel", False), ("reference_linear", True)):
            model = quantized_model(prep, backend, fmt, reference_linear)
            impls = sorted({s.impl for s in model.plan.steps if "quant" in s.node.attrs})
            kl, same = kl_and_top1(ref, logits_of(model, tokens))
            row[mode] = {"impl": impls, **summarize(kl, same)}
            del model
        rows.append(row)
        print(f"{fmt:>10}: kernel {', '.join(row['kernel']['impl'])}: mean KL {row['kernel']['mean_kl']:.3e}, "
              f"top-1 {100 * row['kernel']['top1_agreement']:.2f}%; reference linear: mean KL "
              f"{row['reference_linear']['mean_kl']:.3e}, top-1 {100 * row['reference_linear']['top1_agreement']:.2f}%;"
              f" linears {100 * row['linear_ratio']:.1f}% of fp16", flush=True)
    info["hardware"]["load_average"]["end"] = list(round(x, 2) for x in __import__("os").getloadavg())
    doc = {
        "what": "quantization quality: KL(P_fp32 || P_quant) and top-1 agreement over a fixed token set",
        "command": command, **info,
        "config": {"model": args.model, "layers": args.layers, "full_depth_layers": full_layers,
                   "backend": backend.name, "activation_dtype": "float32", "sequences": args.sequences,
                   "length": args.length, "seed": args.seed, "positions": tokens.numel()},
        "note": RANDOM_WEIGHTS_NOTE if args.model.startswith("synthetic:") else None,
        "method": ("fp32 model and quantized models share every non-quantized weight; quantized linears use "
                   "glmrt.quant (symmetric, per output row or per group of input columns, round half to even); "
                   "'kernel': the backend's kernels as glmrt.load lowers them; 'reference_linear': the torch "
                   "reference linear (dequantize exactly, fp32 matmul). Bytes: quantized linears with fp16 scales "
                   "vs the same linears in fp16; full depth adds embeddings, LM head, norms and biases in fp16."),
        "results": rows,
        "elapsed_s": round(time.time() - t0, 1),
    }
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
        (out / "results.md").write_text(markdown(doc))
        print(f"wrote {out}/results.json and results.md")
    return 0


def markdown(doc: dict) -> str:
    hw, sw, cfg = doc["hardware"], doc["software"], doc["config"]
    cpu = hw["cpu"]
    cpu_text = cpu.get("model", cpu) if isinstance(cpu, dict) else cpu
    lines = [
        "# Quantization quality (KL divergence and top-1 agreement vs fp32)", "",
        "```bash", doc["command"], "```", "",
        f"- hardware: {cpu_text}; {hw['threads']} threads; load average {hw['load_average']}",
        f"- software: torch {sw['torch']}, glmrt {sw['glmrt']}, commit {sw['commit']}"
        f"{' (uncommitted changes)' if sw.get('dirty') else ''}",
        f"- model: {cfg['model']}, {cfg['layers']} of {cfg['full_depth_layers']} layers, fp32 activations, backend "
        f"{cfg['backend']}; {cfg['positions']} positions ({cfg['sequences']} x {cfg['length']} tokens, seed "
        f"{cfg['seed']})",
    ]
    if doc.get("note"):
        lines.append(f"- **note**: {doc['note']}")
    lines += ["", "| format | linears vs fp16 | full model vs fp16 | kernel | mean KL (kernel) | top-1 (kernel) | "
              "p99 KL (kernel) | mean KL (reference linear) | top-1 (reference linear) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["results"]:
        k, ref = r["kernel"], r["reference_linear"]
        lines.append(
            f"| {r['format']} | {100 * r['linear_ratio']:.1f}% | {100 * r['full_depth_model_ratio']:.1f}% | "
            f"{', '.join(k['impl'])} | {k['mean_kl']:.3e} ± {k['mean_kl_stderr']:.1e} | {100 * k['top1_agreement']:.2f}% | "
            f"{k['p99_kl']:.3e} | {ref['mean_kl']:.3e} ± {ref['mean_kl_stderr']:.1e} | "
            f"{100 * ref['top1_agreement']:.2f}% |")
    lines += ["", doc["method"], "",
              "KL is in nats per position; '±' is the standard error of the mean. The issue's weight budgets: "
              "INT4 <= 28% and INT8 <= 53% of the fp16 bytes, scales included (the 'linears vs fp16' column: "
              "the quantized layers themselves; 'full model' adds the fp16 embeddings and LM head at full depth).",
              ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
