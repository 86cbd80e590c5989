"""Batch-1 decode on a CUDA GPU: glmrt eager vs glmrt CUDA-graph decode vs transformers eager,
same widths, same random weights family, in one process. Prints and writes a JSON record.

    python benchmarks/cuda_decode.py --preset chatglm3-6b --dtype float16 --gen 128 --out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

import glmrt

PUBLISHED_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12, "A100": 2.04e12}


def measured_copy_bandwidth() -> float:
    """Device-to-device copy, counting bytes read and written."""
    a = torch.empty(2 * 1024 ** 3, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    torch.cuda.synchronize()
    return 2 * a.numel() * 10 / (time.perf_counter() - t)


def time_stream(stream_fn, gen: int):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    stamps = []
    for _ in stream_fn():
        torch.cuda.synchronize()
        stamps.append(time.perf_counter())
    ttft = stamps[0] - t0
    tpot = [b - a for a, b in zip(stamps, stamps[1:])]
    return ttft, tpot


def bytes_per_token(model, context: int) -> int:
    cfg = model.config
    embed = model.weights["embed.weight"]
    weights = model.weight_bytes() - embed.numel() * embed.element_size() + embed.shape[1] * embed.element_size()
    if cfg.tie_word_embeddings:
        weights += embed.numel() * embed.element_size()
    kv = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * context * embed.element_size()
    return weights + kv


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="chatglm3-6b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--quantize", default=None)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--modes", default="eager,graph")
    ap.add_argument("--transformers", action="store_true", help="also time transformers' GlmForCausalLM eager")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    name = torch.cuda.get_device_name(0)
    published = next((v for k, v in PUBLISHED_BANDWIDTH.items() if k in name), None)
    record = {
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "hardware": {"gpu": name, "driver": subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                                                            "--format=csv,noheader"], capture_output=True,
                                                           text=True).stdout.strip(),
                     "cuda": torch.version.cuda, "published_bandwidth": published,
                     "measured_copy_bandwidth": measured_copy_bandwidth()},
        "torch": torch.__version__, "python": platform.python_version(),
        "glmrt_commit": os.environ.get("GLMRT_COMMIT", "unknown"),
        "config": vars(args), "results": [],
    }
    model = glmrt.load(f"synthetic:{args.preset}", backend="cuda", dtype=args.dtype, layers=args.layers,
                       quantize=args.quantize, progress=False)
    record["model"] = {"generation": model.config.generation, "layers": model.config.num_layers,
                       "weight_bytes": model.weight_bytes(), "plan": model.plan.summary()}
    g = torch.Generator().manual_seed(0)
    prompt = model.build_inputs(torch.randint(0, 60000, (args.prompt - 2,), generator=g).tolist())
    nbytes = bytes_per_token(model, args.prompt + args.gen // 2)
    for mode in args.modes.split(","):
        model.decode_mode = mode
        list(model.stream([prompt], 8, eos_token_id=[]))  # warm-up (captures the graph)
        ttfts, tpots = [], []
        for _ in range(args.repeat):
            ttft, tpot = time_stream(lambda: model.stream([prompt], args.gen, eos_token_id=[]), args.gen)
            ttfts.append(ttft)
            tpots.append(statistics.mean(tpot))
        tpot = statistics.median(tpots)
        row = {"impl": f"glmrt-{mode}", "ttft_s": statistics.median(ttfts), "tpot_s": tpot,
               "tpot_min_s": min(tpots), "tpot_max_s": max(tpots), "decode_tok_s": 1 / tpot,
               "bytes_per_token": nbytes, "achieved_bandwidth": nbytes / tpot}
        if published:
            row["fraction_of_published"] = row["achieved_bandwidth"] / published
        row["fraction_of_measured_copy"] = row["achieved_bandwidth"] / record["hardware"]["measured_copy_bandwidth"]
        record["results"].append(row)
        print(json.dumps(row), flush=True)
    peak = torch.cuda.max_memory_allocated()
    record["peak_memory_bytes"] = peak
    if args.transformers and model.config.source_model_type in ("chatglm", "glm", "glm4"):
        del model
        torch.cuda.empty_cache()
        from transformers import GlmConfig, GlmForCausalLM
        from glmrt.models import PRESETS, config_from_dict
        _, c = config_from_dict(dict(PRESETS[args.preset]))
        hf_cfg = GlmConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                           num_hidden_layers=args.layers or c.num_layers, num_attention_heads=c.num_heads,
                           num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim,
                           intermediate_size=c.ffn_hidden_size, partial_rotary_factor=0.5, attention_bias=True,
                           rope_theta=c.rope_base, max_position_embeddings=c.max_positions, pad_token_id=0,
                           eos_token_id=[], attn_implementation="eager")
        with torch.device("cuda"):
            hf = GlmForCausalLM(hf_cfg).to(getattr(torch, args.dtype)).eval()
        ids = torch.tensor([prompt], device="cuda")
        hf.generate(ids, max_new_tokens=8, do_sample=False)
        times = []
        for _ in range(args.repeat):
            torch.cuda.synchronize()
            t = time.perf_counter()
            hf.generate(ids, max_new_tokens=args.gen, min_new_tokens=args.gen, do_sample=False)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        tpot = statistics.median(times) / args.gen  # includes prefill: an upper bound on TPOT
        row = {"impl": "transformers-eager (GlmForCausalLM, attn eager)", "tpot_s": tpot, "decode_tok_s": 1 / tpot,
               "note": "end-to-end time / new tokens, prefill included"}
        record["results"].append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(record, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
