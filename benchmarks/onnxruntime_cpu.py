"""onnxruntime (CPU provider) decode speed on glmrt's ONNX exports, against glmrt's cpu backend and
transformers, float32 and INT4, same preset, same prompt, in one run.

    .venv/bin/python benchmarks/onnxruntime_cpu.py --model synthetic:chatglm3-6b --layers 1 \
        --threads 2 --prompt-len 16 --gen-len 32 --out benchmarks/results/<date>-cpu-onnxruntime-chatglm3-6b-L1

Every setting runs in a fresh process (its peak RSS is its own), one warm-up request then
--repeat timed ones, greedy, end-of-sequence disabled, so each generates exactly --gen-len tokens:
- glmrt-cpu:            glmrt.load(MODEL, backend="cpu") (native kernels), Model.stream
- onnxruntime (glmrt):  glmrt export (ort flavor) then glmrt.load(DIR): the onnxruntime backend,
                        the same Model.stream; includes the KV copies of glmrt's cache seam
- onnxruntime (direct): the same export driven with numpy + onnxruntime only, present fed back as
                        past (what a caller without glmrt runs)
- transformers:         GlmForCausalLM with the same weights, model.generate (float32 only)
INT4 is glmrt's per-row symmetric INT4 (glmrt-cpu: native INT4 kernels; onnxruntime: MatMulNBits,
accuracy_level 4, i.e. int8 activations, the fast CPU path). decode tokens/s = batch / TPOT,
TPOT = (time of the last token - time of the first) / (tokens - 1). The export itself is not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = [("glmrt-cpu", "float32", None), ("onnxruntime", "float32", None), ("onnxruntime-direct", "float32", None),
            ("transformers", "float32", None), ("glmrt-cpu", "float32", "int4"), ("onnxruntime", "float32", "int4"),
            ("onnxruntime-direct", "float32", "int4")]


def _peak_rss() -> int | None:
    try:
        with open(f"/proc/{os.getpid()}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def worker(args) -> dict:
    import numpy as np
    import torch
    torch.set_num_threads(args.threads)
    import glmrt
    prompt = torch.randint(0, 1 << 30, (1, args.prompt_len), generator=torch.Generator().manual_seed(args.seed))
    runner, dtype, quant = args.setting.split("/")
    quant = None if quant == "none" else quant

    if runner == "glmrt-cpu":
        model = glmrt.load(args.model, backend="cpu", layers=args.layers, dtype=dtype, quantize=quant, progress=False)
        prompt = prompt % model.config.vocab_size

        def once():
            t0 = time.perf_counter()
            times, tokens = [], []
            for tok in model.stream(prompt, max_new_tokens=args.gen_len, eos_token_id=[]):
                times.append(time.perf_counter() - t0)
                tokens.append(int(tok[0]))
            return times, tokens
    elif runner in ("onnxruntime", "onnxruntime-direct"):
        directory = Path(args.export)
        if runner == "onnxruntime":
            model = glmrt.load(str(directory), backend="onnxruntime")
            prompt = prompt % model.config.vocab_size

            def once():
                t0 = time.perf_counter()
                times, tokens = [], []
                for tok in model.stream(prompt, max_new_tokens=args.gen_len, eos_token_id=[]):
                    times.append(time.perf_counter() - t0)
                    tokens.append(int(tok[0]))
                return times, tokens
        else:
            import onnxruntime as ort
            manifest = json.loads((directory / "glmrt_onnx.json").read_text())
            cfg = manifest["config"]
            so = ort.SessionOptions()
            so.intra_op_num_threads = args.threads
            for k, v in manifest["session_config"].items():
                so.add_session_config_entry(k, v)
            sess = ort.InferenceSession(str(directory / "model.onnx"), so, providers=["CPUExecutionProvider"])
            names = [o.name for o in sess.get_outputs()]
            ids0 = (prompt % cfg["vocab_size"]).numpy()
            L = cfg["num_layers"]

            def once():
                t0 = time.perf_counter()
                times, tokens = [], []
                T = ids0.shape[1]
                feeds = {"input_ids": ids0, "attention_mask": np.ones_like(ids0),
                         "position_ids": np.arange(T, dtype=np.int64)[None]}
                for i in range(L):
                    for k in ("key", "value"):
                        feeds[f"past_key_values.{i}.{k}"] = np.zeros((1, cfg["num_kv_heads"], 0, cfg["head_dim"]),
                                                                    np.float32)
                for step in range(args.gen_len):
                    out = dict(zip(names, sess.run(None, feeds)))
                    tok = int(out["logits"][0, -1].argmax())
                    times.append(time.perf_counter() - t0)
                    tokens.append(tok)
                    total = T + step + 1
                    feeds = {"input_ids": np.array([[tok]], np.int64),
                             "attention_mask": np.ones((1, total), np.int64),
                             "position_ids": np.array([[total - 1]], np.int64)}
                    for i in range(L):
                        for k in ("key", "value"):
                            feeds[f"past_key_values.{i}.{k}"] = out[f"present.{i}.{k}"]
                return times, tokens
    elif runner == "transformers":
        from glmrt.api import prepare
        from glmrt.bench.baselines import TransformersRunner
        prep = prepare(args.model, layers=args.layers, dtype=dtype, progress=False)
        tr = TransformersRunner(prep.cfg, prep.weights, "cpu")
        prompt = prompt % prep.cfg.vocab_size

        class Clock:
            def __init__(self):
                self.t0, self.times, self.tokens = time.perf_counter(), [], []

            def tick(self, token):
                self.times.append(time.perf_counter() - self.t0)
                self.tokens.append(int(token[0]))

        def once():
            c = Clock()
            tr.generate(prompt, args.gen_len, c)
            return c.times, c.tokens
    else:
        raise SystemExit(f"unknown runner {runner}")

    once()  # warm-up
    runs = [once() for _ in range(args.repeat)]
    tpots = [(t[-1] - t[0]) / (len(t) - 1) for t, _ in runs]
    return {"setting": args.setting, "ttft_s": [t[0] for t, _ in runs], "tpot_s": tpots,
            "decode_tokens_per_s": [1.0 / x for x in tpots], "tokens": runs[0][1], "peak_rss_bytes": _peak_rss()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="synthetic:chatglm3-6b")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=False)
    p.add_argument("--setting", help=argparse.SUPPRESS)
    p.add_argument("--export", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.setting:
        print(json.dumps(worker(args)))
        return 0

    import glmrt
    from glmrt.bench.machine import stamp
    info = stamp(args.threads)
    info["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    rows = []
    with tempfile.TemporaryDirectory(prefix="glmrt-ort-bench-") as tmp:
        exports = {}
        for quant in (None, "int4"):
            t0 = time.perf_counter()
            d = glmrt.export_onnx(args.model, Path(tmp) / f"export-{quant}", layers=args.layers, dtype="float32",
                                  quantize=quant, flavor="ort", accuracy_level=4, progress=False)
            exports[quant] = (d, round(time.perf_counter() - t0, 1),
                              sum(f.stat().st_size for f in d.iterdir()))
            print(f"exported {quant or 'float32'} in {exports[quant][1]} s", file=sys.stderr)
        for runner, dtype, quant in SETTINGS:
            setting = f"{runner}/{dtype}/{quant or 'none'}"
            cmd = [sys.executable, __file__, "--setting", setting, "--model", args.model, "--layers", str(args.layers),
                   "--threads", str(args.threads), "--prompt-len", str(args.prompt_len), "--gen-len", str(args.gen_len),
                   "--repeat", str(args.repeat), "--seed", str(args.seed), "--export", str(exports[quant][0])]
            print(f"running {setting}", file=sys.stderr)
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
            if proc.returncode != 0:
                rows.append({"setting": setting, "error": proc.stderr[-2000:]})
                continue
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    info["hardware"]["load_average"]["end"] = [round(x, 2) for x in os.getloadavg()]
    info["config"] = {"model": args.model, "layers": args.layers, "threads": args.threads,
                      "prompt_len": args.prompt_len, "gen_len": args.gen_len, "repeat": args.repeat,
                      "seed": args.seed, "batch": 1,
                      "exports": {str(q or "float32"): {"seconds": v[1], "bytes": v[2]} for q, v in exports.items()}}
    info["results"] = rows
    lines = [f"# onnxruntime CPU decode vs glmrt cpu and transformers ({args.model}, {args.layers} layer(s))", "",
             f"Command: `{info['command']}`", "",
             f"CPU: {info['hardware']['cpu']['model']}, {args.threads} threads; load average at start "
             f"{info['hardware']['load_average']['start']}, at end {info['hardware']['load_average']['end']}; "
             f"glmrt {info['software']['glmrt']} commit {info['software']['commit']}; torch {info['software']['torch']}",
             "", "| setting | decode tokens/s (per repeat) | TTFT s | peak RSS GB | tokens equal to glmrt-cpu |",
             "| --- | --- | --- | --- | --- |"]
    base = {r["setting"].split("/", 1)[1]: r["tokens"] for r in rows if r["setting"].startswith("glmrt-cpu") and "tokens" in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['setting']} | failed: {r['error'].splitlines()[-1] if r['error'] else '?'} | | | |")
            continue
        same = base.get(r["setting"].split("/", 1)[1])
        eq = "-" if r["setting"].startswith("glmrt-cpu") or same is None else ("yes" if r["tokens"] == same else
                                                                                 f"first {next((i for i, (a, b) in enumerate(zip(r['tokens'], same)) if a != b), len(same))} equal")
        lines.append(f"| {r['setting']} | {', '.join(f'{x:.2f}' for x in r['decode_tokens_per_s'])} | "
                     f"{min(r['ttft_s']):.3f} | {(r['peak_rss_bytes'] or 0) / 1e9:.2f} | {eq} |")
    lines += ["", "Decode tokens/s = 1 / TPOT, TPOT = (time of the last token - time of the first) / (tokens - 1), "
              "batch 1, greedy, end-of-sequence disabled; one warm-up request, then the repeats. INT4: glmrt's "
              "per-row symmetric INT4; onnxruntime runs it as MatMulNBits with accuracy_level 4 (int8 "
              "activations), glmrt-cpu with its native INT4 kernels (int8 activations in blocks of 32). Token "
              "equality is informative only: INT4 paths quantize activations differently, and the "
              "synthetic weights give near-ties.", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(info, indent=2) + "\n")
        (out / "results.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
