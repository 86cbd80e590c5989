"""Serving benchmark: `glmrt serve` under 1, 4, 8 and 16 concurrent streams, vLLM's metrics.

Starts `python -m glmrt serve MODEL ...` on a free 127.0.0.1 port, sends one warm-up request, then
for each concurrency level C sends C * --requests-per-stream requests (all queued at once, at most
C in flight, as vLLM's benchmark_serving with --max-concurrency C and an infinite request rate):
token-id prompts of --prompt-len random ids, --output-len tokens each (ignore_eos, greedy), streamed
with stream_options.include_usage. Per level it reports, as vLLM does:

- request throughput (requests/s) and output token throughput (tokens/s) over the level's wall time;
- TTFT (request sent -> first streamed chunk), TPOT = (latency - TTFT) / (output tokens - 1), ITL
  (gaps between streamed chunks), each mean / p50 / p90 / p99, in ms.

The speed-up of C streams over one is output tokens/s at C over output tokens/s at 1, measured in
the same run (PERF.md's serving target: >= 4x at 8 streams).

    .venv/bin/python benchmarks/serve_bench.py --model synthetic:chatglm3-6b --layers 2 --quantize int4 \\
        --dtype bfloat16 --out benchmarks/results/DATE-cpu-serving-chatglm3-6b-L2-int4
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary_ms(values: list[float]) -> dict:
    ms = [v * 1000 for v in values]
    return {"mean": statistics.fmean(ms) if ms else float("nan"), "p50": percentile(ms, 50),
            "p90": percentile(ms, 90), "p99": percentile(ms, 99)}


def one_request(http, model: str, prompt: list[int], output_len: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    arrivals, tokens, error = [], 0, None
    with http.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            return {"error": f"HTTP {response.status_code}: {response.read().decode()[:200]}"}
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if "error" in data:
                error = data["error"]["message"]
                continue
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
            if data.get("choices") and (data["choices"][0].get("text") or data["choices"][0].get("finish_reason")):
                arrivals.append(time.perf_counter())
    end = time.perf_counter()
    if error or not arrivals:
        return {"error": error or "no chunk arrived"}
    ttft = arrivals[0] - start
    return {"ttft": ttft, "latency": end - start, "tokens": tokens,
            "itl": [b - a for a, b in zip(arrivals, arrivals[1:])],
            "tpot": (end - start - ttft) / (tokens - 1) if tokens > 1 else None}


def run_level(url: str, model: str, prompts: list[list[int]], concurrency: int, output_len: int) -> dict:
    import httpx
    results: list[dict] = []
    lock = threading.Lock()
    queue = list(prompts)

    def worker():
        with httpx.Client(base_url=url, timeout=600) as http:
            while True:
                with lock:
                    if not queue:
                        return
                    prompt = queue.pop()
                r = one_request(http, model, prompt, output_len)
                with lock:
                    results.append(r)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    duration = time.perf_counter() - start
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    output_tokens = sum(r["tokens"] for r in ok)
    return {"concurrency": concurrency, "requests": len(results), "completed": len(ok), "errors": errors[:3],
            "duration_s": duration, "output_tokens": output_tokens,
            "request_throughput": len(ok) / duration, "output_throughput": output_tokens / duration,
            "ttft_ms": summary_ms([r["ttft"] for r in ok]),
            "tpot_ms": summary_ms([r["tpot"] for r in ok if r["tpot"] is not None]),
            "itl_ms": summary_ms([g for r in ok for g in r["itl"]])}


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch
        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip() or None
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch_version,
            "commit": commit}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="synthetic:chatglm3-6b")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--quantize", default="int4")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--backend", default="cpu")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--concurrency", default="1,4,8,16")
    p.add_argument("--requests-per-stream", type=int, default=2, help="requests per level = C * this (at least 4)")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the server (default 2)")
    p.add_argument("--out", default=None, help="directory for results.json and results.md")
    args = p.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "glmrt", "serve", args.model, "--backend", args.backend, "--dtype", args.dtype,
               "--max-batch", str(args.max_batch), "--max-len", str(args.prompt_len + args.output_len + 8),
               "--port", str(port), "--served-model-name", "bench", "--max-waiting", "256"]
    if args.layers:
        command += ["--layers", str(args.layers)]
    if args.quantize and args.quantize != "none":
        command += ["--quantize", args.quantize]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONSAFEPATH="1")
    load_before = os.getloadavg()
    server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd="/")
    import httpx
    try:
        deadline = time.monotonic() + 600
        while True:
            if server.poll() is not None:
                raise SystemExit(f"the server exited: {server.stdout.read().decode()}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the server did not come up within 600 s")
            time.sleep(0.5)
        vocab = httpx.get(f"{url}/v1/models").json()["data"][0]
        rng = random.Random(0)
        warm = one_request(httpx.Client(base_url=url, timeout=600), "bench",
                           [rng.randrange(100, 30000) for _ in range(args.prompt_len)], 8)
        if "error" in warm:
            raise SystemExit(f"warm-up failed: {warm['error']}")
        rows = []
        for c in levels:
            n = max(4, c * args.requests_per_stream)
            prompts = [[rng.randrange(100, 30000) for _ in range(args.prompt_len)] for _ in range(n)]
            row = run_level(url, "bench", prompts, c, args.output_len)
            rows.append(row)
            print(f"concurrency {c:>2}: {row['completed']}/{row['requests']} ok in {row['duration_s']:.1f} s, "
                  f"{row['output_throughput']:.1f} output tok/s, {row['request_throughput']:.2f} req/s, "
                  f"TTFT p50 {row['ttft_ms']['p50']:.0f} ms, TPOT p50 {row['tpot_ms']['p50']:.1f} ms, "
                  f"ITL p50/p90/p99 {row['itl_ms']['p50']:.1f}/{row['itl_ms']['p90']:.1f}/"
                  f"{row['itl_ms']['p99']:.1f} ms", flush=True)
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
    load_after = os.getloadavg()
    base = next((r["output_throughput"] for r in rows if r["concurrency"] == 1), None)
    for r in rows:
        r["speedup_vs_1"] = r["output_throughput"] / base if base else None
    result = {"benchmark": "glmrt serve, continuous batching", "model": args.model, "layers": args.layers,
              "quantize": args.quantize, "dtype": args.dtype, "backend": args.backend, "max_batch": args.max_batch,
              "prompt_len": args.prompt_len, "output_len": args.output_len, "server_threads": args.threads,
              "command": " ".join(["python", "benchmarks/serve_bench.py"] + (argv or sys.argv[1:])),
              "server_command": " ".join(command[1:]), "machine": machine(), "served": vocab,
              "loadavg_before": load_before, "loadavg_after": load_after, "levels": rows}
    print(json.dumps({r["concurrency"]: round(r["speedup_vs_1"] or 0, 2) for r in rows}))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(result, indent=2))
        lines = [f"# glmrt serve: {args.model} --layers {args.layers} --quantize {args.quantize} --dtype {args.dtype}",
                 "", f"- machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, server "
                     f"OMP_NUM_THREADS={args.threads}; torch {result['machine']['torch']}; commit "
                     f"{result['machine']['commit']}",
                 f"- load average before / after: {', '.join(f'{x:.2f}' for x in load_before)} / "
                 f"{', '.join(f'{x:.2f}' for x in load_after)}",
                 f"- prompts {args.prompt_len} token ids, {args.output_len} output tokens each (ignore_eos, greedy), "
                 f"{args.max_batch} slots; requests per level = concurrency x {args.requests_per_stream} (at least 4)",
                 f"- command: `{result['command']}`", "",
                 "| concurrency | requests | output tok/s | x vs 1 | req/s | TTFT p50 / p90 / p99 ms | "
                 "TPOT p50 / p90 / p99 ms | ITL p50 / p90 / p99 ms |",
                 "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in rows:
            t, tp, i = r["ttft_ms"], r["tpot_ms"], r["itl_ms"]
            lines.append(f"| {r['concurrency']} | {r['completed']}/{r['requests']} | {r['output_throughput']:.1f} | "
                         f"{r['speedup_vs_1']:.2f} | {r['request_throughput']:.2f} | {t['p50']:.0f} / {t['p90']:.0f} / "
                         f"{t['p99']:.0f} | {tp['p50']:.1f} / {tp['p90']:.1f} / {tp['p99']:.1f} | "
                         f"{i['p50']:.1f} / {i['p90']:.1f} / {i['p99']:.1f} |")
        (out / "results.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
