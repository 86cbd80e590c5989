"""glmrt against chatglm.cpp: batch-1 CPU decode at the chatglm3-6b widths, in one run.

    python benchmarks/vs_chatglm_cpp.py [--sdist chatglm_cpp-0.4.2.tar.gz | --src DIR] [--layers 28]

chatglm.cpp (https://github.com/li-plus/chatglm.cpp, on PyPI as chatglm-cpp) is a C++/ggml
implementation of the same models. It is not vendored: this script builds it from its source
distribution (downloaded with pip when neither --sdist nor --src is given) into --work, with a
small timing driver (benchmarks/chatglm_cpp/driver.cpp) linked against its library, and with the
ISA flags this CPU supports (AVX2 and, where present, AVX-512 / VNNI / VBMI), as a user building it
for this machine would.

chatglm.cpp's converter needs THUDM's modeling code through transformers' trust_remote_code, which
cannot be downloaded here, so the GGML files are written by benchmarks/chatglm_cpp/ggml_file.py
from the file format, with ggml's Q4_0 / Q8_0 block formats.

1. Cross-check (--check-layers, default 2): glmrt's synthetic chatglm3-6b weights at full width,
   float32, written as a GGML F32 file; chatglm.cpp's greedy tokens after a 32-token prompt must
   equal glmrt's (kernels="reference", float32). An independent implementation agreeing on every
   argmax is the evidence that the two run the same model, so that the speed comparison is fair.
2. Speed (--layers, default 28: the whole model): for each pair (glmrt INT4 per-channel vs
   chatglm.cpp q4_0, glmrt INT8 vs q8_0), a 32-token prompt then --tokens greedy decode steps,
   --rounds times, each engine in its own process, engines alternating round by round (glmrt's
   process keeps its model loaded; chatglm.cpp's is started per round and warmed by one generation). Per-token time, tokens/s,
   and the weight bytes a decode step reads (every matrix but the embedding, of which one row is
   read) per second, against the machine's read bandwidth measured in the same run (glmrt's native
   read probe, as glmrt bench reports it). Optionally (--reference-tokens) glmrt's plain-torch
   reference plan (dequantize, then matmul, in eager torch) for the INT4 model.

Weights are random (real widths): these are speed numbers; step 1 is the correctness evidence.
Both engines use 2 threads here (chatglm.cpp's default: hardware_concurrency when <= 4; glmrt:
OMP_NUM_THREADS). Writes results.json and README.md under benchmarks/results/<date>-cpu-vs-chatglm-cpp/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE / "chatglm_cpp"))

PAIRS = {"int4": "q4_0", "int8": "q8_0", "bf16": "f16"}
CHATGLM_CPP_VERSION = "0.4.2"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--sdist", help=f"chatglm-cpp source distribution (default: pip download chatglm-cpp=="
                                     f"{CHATGLM_CPP_VERSION})")
    src.add_argument("--src", help="an unpacked chatglm-cpp source tree")
    ap.add_argument("--work", default="/tmp/glmrt-vs-chatglm-cpp", help="build tree and GGML files")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--formats", default="int4,int8", help=f"glmrt formats, paired as {PAIRS}")
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=32, help="decode steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--check-layers", type=int, default=2, help="layers of the cross-check (0 to skip it)")
    ap.add_argument("--check-tokens", type=int, default=8)
    ap.add_argument("--reference-tokens", type=int, default=0,
                    help="decode steps of glmrt's plain-torch reference plan on the INT4 model (0: skip)")
    ap.add_argument("--keep-files", action="store_true", help="keep the GGML files in --work")
    ap.add_argument("--out", default=None)
    ap.add_argument("--glmrt-worker", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------- chatglm.cpp build
def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def ggml_isa_options() -> list[str]:
    flags = cpu_flags()
    opts = ["-DGGML_AVX=ON", f"-DGGML_AVX2={'ON' if 'avx2' in flags else 'OFF'}",
            f"-DGGML_FMA={'ON' if 'fma' in flags else 'OFF'}", f"-DGGML_F16C={'ON' if 'f16c' in flags else 'OFF'}"]
    for flag, opt in (("avx512f", "GGML_AVX512"), ("avx512_vnni", "GGML_AVX512_VNNI"),
                      ("avx512vbmi", "GGML_AVX512_VBMI")):
        opts.append(f"-D{opt}={'ON' if flag in flags else 'OFF'}")
    return opts


def source_tree(args, work: Path) -> Path:
    if args.src:
        return Path(args.src).resolve()
    sdist = Path(args.sdist).resolve() if args.sdist else None
    if sdist is None:
        dl = work / "sdist"
        dl.mkdir(parents=True, exist_ok=True)
        found = sorted(dl.glob("chatglm_cpp-*.tar.gz"))
        if not found:
            # --no-build-isolation: pip only reads the metadata; it must not build cmake from source.
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
                            "--no-binary", "chatglm-cpp", f"chatglm-cpp=={CHATGLM_CPP_VERSION}", "-d", str(dl)],
                           check=True)
            found = sorted(dl.glob("chatglm_cpp-*.tar.gz"))
        sdist = found[-1]
    dest = work / "src"
    if not (dest / "chatglm.cpp").exists():
        shutil.rmtree(dest, ignore_errors=True)
        with tarfile.open(sdist) as tar:
            top = tar.getnames()[0].split("/")[0]
            tar.extractall(work, filter="data")
        (work / top).rename(dest)
    return dest


def build_driver(src: Path, work: Path) -> tuple[Path, list[str]]:
    """A scratch copy of the tree, the driver target appended to its CMakeLists; examples off (the
    0.4.2 sdist lacks tests/perplexity.cpp, which its examples target needs)."""
    tree = work / "tree"
    if not (tree / "chatglm.cpp").exists():
        shutil.rmtree(tree, ignore_errors=True)
        shutil.copytree(src, tree, symlinks=True)
    driver = HERE / "chatglm_cpp" / "driver.cpp"
    lists = tree / "CMakeLists.txt"
    text = lists.read_text()
    marker = "# glmrt benchmark driver"
    if marker not in text:
        lists.write_text(text + f"\n{marker}\nadd_executable(glmrt_driver \"{driver}\")\n"
                         "target_link_libraries(glmrt_driver PRIVATE chatglm)\n")
    build = work / "build"
    options = ["-DCMAKE_BUILD_TYPE=Release", "-DCHATGLM_ENABLE_EXAMPLES=OFF", "-DCHATGLM_ENABLE_PYBIND=OFF",
               *ggml_isa_options()]
    subprocess.run(["cmake", "-S", str(tree), "-B", str(build), *options], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2), "--target", "glmrt_driver"],
                   check=True, stdout=subprocess.DEVNULL)
    return build / "bin" / "glmrt_driver", options


def run_driver(binary: Path, model: Path, ids: list[int], tokens: int, rounds: int, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run([str(binary), str(model), str(tokens), str(rounds), *map(str, ids)], env=env, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- glmrt side
def glmrt_worker(spec: dict) -> None:
    """In its own process: load once, print one JSON line about the model, then one JSON line per
    round (prompt + greedy decode) for every line read from stdin, until stdin closes."""
    import torch
    import glmrt

    kw = {} if spec.get("kernels") is None else {"kernels": spec["kernels"]}
    t0 = time.perf_counter()
    model = glmrt.load("synthetic:chatglm3-6b", layers=spec["layers"], dtype=spec["dtype"], backend="cpu",
                       quantize=spec["quantize"], progress=False, **kw)
    load_s = time.perf_counter() - t0
    embed = model.weights["embed.weight"]
    linears = sorted({s.impl for s in model.plan.steps if s.node.op == "linear"})
    print(json.dumps({"load_s": load_s, "weight_bytes": model.weight_bytes(),
                      "read_bytes": model.weight_bytes() - embed.numel() * embed.element_size(),
                      "linear_impls": linears}), flush=True)
    ids = torch.tensor([spec["ids"]])
    for _ in sys.stdin:
        stamps, generated = [time.perf_counter()], []
        for tok in model.stream(ids, max_new_tokens=spec["tokens"], eos_token_id=[]):
            stamps.append(time.perf_counter())
            generated.append(int(tok[0]))
        print(json.dumps({"generated": generated, "step_s": [b - a for a, b in zip(stamps, stamps[1:])]}),
              flush=True)


class GlmrtWorker:
    """A glmrt process that keeps its model loaded, so the engines can alternate round by round
    without paying the load (minutes at 28 layers) again."""

    def __init__(self, spec: dict, threads: int):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--glmrt-worker",
                                      json.dumps(spec)], env=env, cwd=str(HERE), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the glmrt worker exited with {self.proc.wait()}")
        return json.loads(line)

    def round(self) -> dict:
        self.proc.stdin.write("round\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


# ----------------------------------------------------------------------------- helpers
def decode_stats(rounds: list[dict]) -> dict:
    """Per-token decode time over the rounds (step 0 of a round is the prompt pass: excluded)."""
    steps = [s for r in rounds for s in r["step_s"][1:]]
    round_medians = [statistics.median(r["step_s"][1:]) for r in rounds if len(r["step_s"]) > 1]
    return {"median_s": statistics.median(steps), "best_s": min(steps), "mean_s": statistics.fmean(steps),
            "round_medians_s": round_medians, "steps": len(steps),
            "prompt_s": statistics.median(r["step_s"][0] for r in rounds)}


def chatglm3_config(layers: int) -> dict:
    from glmrt import api
    raw = dict(api.prepare("synthetic:chatglm3-6b", materialize=False, progress=False).raw)
    raw["num_layers"] = layers
    return raw


def ggml_read_bytes(path: Path, cfg: dict, gtype: str) -> int:
    """Bytes of every matrix but the embedding, from the file's tensor table."""
    import ggml_file as gf
    h, vocab = int(cfg["hidden_size"]), int(cfg["padded_vocab_size"])
    per_weight = {"f32": 4, "f16": 2}.get(gtype)
    embed = vocab * h * per_weight if per_weight else vocab * h // gf.QK * gf.BLOCK_BYTES[gf.TYPES[gtype]]
    return path.stat().st_size - embed  # norms, bias and header are < 0.01% of the file


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# ----------------------------------------------------------------------------- main
def cross_check(args, binary: Path, work: Path, ids: list[int]) -> dict:
    import glmrt
    import ggml_file as gf

    layers = args.check_layers
    model = glmrt.load("synthetic:chatglm3-6b", layers=layers, dtype="float32", backend="cpu",
                       kernels="reference", progress=False)
    import torch
    ours = [int(t[0]) for t in model.stream(torch.tensor([ids]), max_new_tokens=args.check_tokens, eos_token_id=[])]
    path = work / f"check-L{layers}-f32.bin"
    gf.write(path, chatglm3_config(layers), "f32", gf.from_glmrt_weights(model.weights))
    del model
    theirs = run_driver(binary, path, ids, args.check_tokens, 1, args.threads)["rounds"][0]["generated"]
    if not args.keep_files:
        path.unlink()
    same = ours == theirs
    print(f"cross-check ({layers} layers, float32): glmrt {ours}\n                  chatglm.cpp {theirs}: "
          f"{'EQUAL' if same else 'DIFFERENT'}", file=sys.stderr, flush=True)
    return {"layers": layers, "tokens": args.check_tokens, "glmrt": ours, "chatglm_cpp": theirs, "equal": same}


def main():
    args = parse_args()
    if args.glmrt_worker:
        glmrt_worker(json.loads(args.glmrt_worker))
        return 0
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch
    import ggml_file as gf
    from glmrt.bench.machine import cpu_read_bandwidth

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    src = source_tree(args, work)
    print(f"building chatglm.cpp from {src} ...", file=sys.stderr, flush=True)
    binary, cmake_options = build_driver(src, work)

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 65024, (args.prompt,), generator=gen).tolist()
    doc = {"date": datetime.date.today().isoformat(), "commit": git_commit(),
           "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
           "hardware": {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "threads": args.threads},
           "chatglm_cpp": {"source": str(src), "cmake_options": cmake_options},
           "settings": {"layers": args.layers, "prompt": args.prompt, "tokens": args.tokens, "rounds": args.rounds,
                        "prompt_ids": ids}}
    if args.check_layers:
        doc["cross_check"] = cross_check(args, binary, work, ids)

    doc["load_average_start"] = os.getloadavg()
    bw_before = cpu_read_bandwidth(args.threads)
    cfg = chatglm3_config(args.layers)
    rows = []
    for fmt in args.formats.split(","):
        gtype = PAIRS[fmt]
        path = work / f"chatglm3-L{args.layers}-{gtype}.bin"
        if not path.exists():
            t0 = time.perf_counter()
            gf.write(path, cfg, gtype, gf.synthetic_tensors(cfg))
            print(f"wrote {path.name} ({path.stat().st_size / 1e9:.2f} GB, {time.perf_counter() - t0:.0f} s)",
                  file=sys.stderr, flush=True)
        spec = {"layers": args.layers, "dtype": "bfloat16", "quantize": None if fmt == "bf16" else fmt,
                "ids": ids, "tokens": args.tokens}
        worker = GlmrtWorker(spec, args.threads)
        worker.round()  # warm-up
        theirs, ours = [], []
        # The engines alternate round by round, so that a busy spell of the machine hits both.
        # chatglm.cpp's first generation after its process starts faults the mmapped weights in, so
        # each start runs 2 generations and the first is dropped.
        for _ in range(args.rounds):
            theirs.append(run_driver(binary, path, ids, args.tokens, 2, args.threads)["rounds"][1])
            ours.append(worker.round())
        worker.close()
        st, so = decode_stats(theirs), decode_stats(ours)
        rb_t, rb_o = ggml_read_bytes(path, cfg, gtype), worker.info["read_bytes"]
        row = {"glmrt_format": fmt, "chatglm_cpp_type": gtype,
               "glmrt": {**so, "read_bytes": rb_o, "weight_bytes": worker.info["weight_bytes"],
                         "linear_impls": worker.info["linear_impls"], "load_s": worker.info["load_s"]},
               "chatglm_cpp": {**st, "read_bytes": rb_t, "file_bytes": path.stat().st_size},
               "speedup_median": st["median_s"] / so["median_s"],
               "load_average": os.getloadavg()}
        del worker
        if args.reference_tokens and fmt == "int4":
            ref = GlmrtWorker(dict(spec, tokens=args.reference_tokens, kernels="reference"), args.threads)
            row["glmrt_reference_plan"] = decode_stats([ref.round()])
            ref.close()
        rows.append(row)
        print(f"{fmt} vs {gtype}: glmrt {so['median_s'] * 1e3:.1f} ms/token, chatglm.cpp {st['median_s'] * 1e3:.1f} "
              f"ms/token (median): {row['speedup_median']:.2f}x", file=sys.stderr, flush=True)
        if not args.keep_files:
            path.unlink()
    bw_after = cpu_read_bandwidth(args.threads)
    bw = statistics.median([bw_before["median_bytes_per_s"], bw_after["median_bytes_per_s"]])
    doc["bandwidth"] = {"before": bw_before, "after": bw_after, "median_bytes_per_s": bw}
    for row in rows:
        for side in ("glmrt", "chatglm_cpp"):
            r = row[side]
            r["tokens_per_s"] = 1 / r["median_s"]
            r["read_gb_per_s"] = r["read_bytes"] / r["median_s"] / 1e9
            r["fraction_of_bandwidth"] = r["read_bytes"] / r["median_s"] / bw
    doc["rows"] = rows
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / f"{doc['date']}-cpu-vs-chatglm-cpp"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "README.md").write_text(markdown(doc))
    print(markdown(doc))
    return 0


def markdown(doc: dict) -> str:
    s = doc["settings"]
    lines = [f"# glmrt vs chatglm.cpp, CPU decode, chatglm3-6b widths ({doc['date']})", "",
             f"- hardware: {doc['hardware']['cpu']}, {doc['hardware']['logical_cpus']} logical CPUs, "
             f"{doc['hardware']['threads']} threads for both engines",
             f"- glmrt commit: {doc['commit']}; chatglm.cpp: {doc['chatglm_cpp']['source']} built with "
             f"`{' '.join(doc['chatglm_cpp']['cmake_options'])}`",
             f"- command: `{doc['command']}`",
             f"- model: synthetic:chatglm3-6b, {s['layers']} layers, random weights; batch 1, {s['prompt']}-token "
             f"prompt, {s['tokens']} greedy decode steps x {s['rounds']} rounds per engine (engines alternate, "
             "round by round after one warm-up generation each)",
             f"- read bandwidth (glmrt native read probe, median of the probes before and after): "
             f"{doc['bandwidth']['median_bytes_per_s'] / 1e9:.1f} GB/s",
             f"- load average (1 / 5 / 15 min) at the start: {' / '.join(f'{v:.1f}' for v in doc['load_average_start'])}; "
             "after each pair: " + "; ".join(f"{r['glmrt_format']} {r['load_average'][0]:.1f}" for r in doc["rows"]), ""]
    cc = doc.get("cross_check")
    if cc:
        lines += [f"Cross-check, {cc['layers']} layers in float32 (glmrt reference kernels vs chatglm.cpp F32): "
                  f"greedy tokens {'**equal**' if cc['equal'] else '**DIFFERENT**'} over {cc['tokens']} steps "
                  f"(glmrt {cc['glmrt']}, chatglm.cpp {cc['chatglm_cpp']}).", ""]
    lines += ["| engine | weights | bytes read / token | ms / token (median) | tokens/s | GB/s | % of bandwidth |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in doc["rows"]:
        for side, label, fmt in (("glmrt", "glmrt", row["glmrt_format"]),
                                 ("chatglm_cpp", "chatglm.cpp", row["chatglm_cpp_type"])):
            r = row[side]
            lines.append(f"| {label} | {fmt} | {r['read_bytes'] / 1e9:.2f} GB | {r['median_s'] * 1e3:.1f} | "
                         f"{r['tokens_per_s']:.2f} | {r['read_gb_per_s']:.1f} | {100 * r['fraction_of_bandwidth']:.0f}% |")
        ref = row.get("glmrt_reference_plan")
        if ref:
            lines.append(f"| glmrt plain-torch reference plan | {row['glmrt_format']} | | {ref['median_s'] * 1e3:.0f} | "
                         f"{1 / ref['median_s']:.3f} | | |")
    lines += [""]
    for row in doc["rows"]:
        lines.append(f"- {row['glmrt_format']} vs {row['chatglm_cpp_type']}: glmrt is **{row['speedup_median']:.2f}x** "
                     f"chatglm.cpp's tokens/s (median per-token times); glmrt's linears run "
                     f"{', '.join(row['glmrt']['linear_impls'])}.")
    lines += ["", "Bytes read per token: every matrix but the embedding (one row of it is read)."]
    if any(row["glmrt_format"] != "bf16" for row in doc["rows"]):
        lines += ["chatglm.cpp's q4_0 / q8_0 files quantize the output layer too (as its converter does); glmrt keeps "
                  "the LM head in bf16 and quantizes the four linears of each layer (as the ChatGLM / GLM-130B "
                  "releases do)."]
    lines += [""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
