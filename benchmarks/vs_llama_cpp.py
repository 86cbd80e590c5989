"""glmrt against llama.cpp on the same GGUF files: CPU prefill (`pp`) and decode (`tg`), in one run.

    python benchmarks/vs_llama_cpp.py [--sdist llama_cpp_python-X.tar.gz | --src DIR] [--layers 8]
        [--formats f16,bf16,q8_0,q4_0] [--pp 128,512] [--tg 32] [--rounds 3] [--out DIR]

llama.cpp is not vendored: its source comes from the `llama-cpp-python` source distribution
(`pip download --no-deps --no-binary llama-cpp-python`, unless --sdist or --src names one), and it
is built into --work (default /work/llama-build, kept between runs: the build directory is named
after the source and the options) with its CPU backend for this machine's instruction set: AVX /
AVX2 / FMA / F16C / BMI2 and, where the CPU has them, AVX-512 (F, VNNI, VBMI, BF16) and AVX-VNNI,
each switched explicitly (GGML_NATIVE=OFF, so the options are the record); AMX always OFF (its path
crashes with an invalid opcode on the VMs of this project); Q4_0 repacking (GGML_CPU_REPACK) and
OpenMP on, as in a default build. `cmake_options` in results.json is the exact list.

Timing is llama-bench's own (`llama-bench -o json`): `pp N` is the prompt of N tokens decoded as one
batch on an empty context (tokens/s = N / time), `tg N` N single-token steps from an empty context
(tokens/s = N / time). glmrt is timed the same way through its public API in a worker process that
keeps the model loaded: `pp N` is the time from the call to the first token of
`model.stream(prompt of N random ids, max_new_tokens=1)` (the prefill, the LM head of the last
position and the argmax), `tg N` the N steps after the first token of a 1-token prompt.

Both engines read the SAME file, written here by glmrt.gguf_writer (random weights at the
ChatGLM3-6B widths, the synthetic byte-level vocabulary llama.cpp needs): one file per format, with
the embedding and the LM head (`token_embd.weight`, `output.weight`) in F16 in the quantized files,
so that both engines read the same bytes per token (glmrt keeps its LM head in 16 bits; a default
llama.cpp conversion would quantize it). glmrt loads each file as it is: F16 -> float16,
BF16 -> bfloat16 weights and activations; Q8_0 / Q4_0 -> its INT8 / INT4 with groups of 32 (the
same integers and scales, bit for bit), bfloat16 activations.

Engines alternate round by round (llama-bench is run with -r 1 per round, after its own warm-up;
glmrt's worker is warmed by one round), both with --threads threads (llama-bench -t; glmrt
OMP_NUM_THREADS / torch.set_num_threads). The read bandwidth from glmrt's native read probe is
measured before and after, and each tg figure is reported with the fraction of it that its bytes
per token imply (every weight but the embedding, of which one row is read).

Cross-check first (--check-layers, default 2): an F32 file of the same widths; llama.cpp's greedy
tokens (benchmarks/llama_cpp/greedy.cpp, a 20-line driver against libllama) after a 32-token prompt
must equal glmrt's (kernels="reference", float32) on that file: the evidence that both engines run
the same model, so the speed comparison is fair. A mismatch stops the run.

--profile adds glmrt's per-op profile (wall time per IR op and the kernel that ran it) of one pp
(the longest prompt) and one tg round of each format, after the timed rounds. llama.cpp is not
profiled per op by this script (its eval callback serializes the graph, which changes what it
measures).

--worker-per-round starts glmrt's worker anew every round (paying the load each time), so that
glmrt's copy of the weights and llama.cpp's are never in memory together: needed at full depth in
16 bits on a machine with less than twice the file size in RAM.

Results: results.json and README.md in --out (default benchmarks/results/<date>-cpu-vs-llama-cpp-
chatglm3-6b-L<layers>).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
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

# file format -> (GGUF type of the matrices, glmrt dtype, glmrt's name for the weight format)
FORMATS = {
    "f32": ("F32", "float32", "float32"),
    "f16": ("F16", "float16", "float16"),
    "bf16": ("BF16", "bfloat16", "bfloat16"),
    "q8_0": ("Q8_0", "bfloat16", "INT8-g32"),
    "q4_0": ("Q4_0", "bfloat16", "INT4-g32"),
}
SIXTEEN_BIT_TENSORS = {"token_embd.weight": "F16", "output.weight": "F16"}
PRESET = "chatglm3-6b"
DEFAULT_WORK = "/work/llama-build"
PACKAGE = "llama-cpp-python"
# The targets of issue 16 (glmrt / llama.cpp tokens/s).
DECODE_TARGETS = {"q4_0": 1.4, "q8_0": 1.4, "f16": 1.05, "bf16": 1.05}
PREFILL_TARGET = 1.5


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--sdist", help=f"{PACKAGE} source distribution (default: pip download it into --work)")
    src.add_argument("--src", help="a llama.cpp source tree (the sdist's vendor/llama.cpp)")
    ap.add_argument("--work", default=DEFAULT_WORK, help="sdist, build trees and GGUF files (kept between runs)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=8, help=f"layers of {PRESET} (28: the whole model)")
    ap.add_argument("--formats", default="f16,bf16,q8_0,q4_0", help=f"GGUF formats, of {', '.join(FORMATS)}")
    ap.add_argument("--pp", default="128,512", help="prompt lengths of the pp tests (comma-separated; '' for none)")
    ap.add_argument("--tg", type=int, default=32, help="decode steps of the tg test (0 for none)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--check-layers", type=int, default=2, help="layers of the F32 cross-check (0 to skip it)")
    ap.add_argument("--check-tokens", type=int, default=8)
    ap.add_argument("--profile", action="store_true", help="a per-op profile of glmrt's pp and tg for each format")
    ap.add_argument("--delete-files", action="store_true", help="delete each GGUF file after its format ran")
    ap.add_argument("--worker-per-round", action="store_true",
                    help="a new glmrt process every round, so that both engines' weights are never in memory together")
    ap.add_argument("--build-only", action="store_true", help="build llama.cpp, print the binaries, and stop")
    ap.add_argument("--out", default=None)
    ap.add_argument("--glmrt-worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.format_list = parse_formats(args.formats)
    args.pp_list = parse_lengths(args.pp)
    if args.threads < 1 or args.layers < 1 or args.rounds < 1 or args.tg < 0:
        ap.error("--threads, --layers and --rounds must be >= 1 and --tg >= 0")
    if not args.pp_list and not args.tg:
        ap.error("nothing to time: give --pp lengths or --tg > 0")
    return args


def parse_formats(text: str) -> list[str]:
    out = []
    for name in (t.strip().lower() for t in text.split(",") if t.strip()):
        if name not in FORMATS:
            raise SystemExit(f"--formats: {name!r} is not one of {', '.join(FORMATS)}")
        if name not in out:
            out.append(name)
    if not out:
        raise SystemExit("--formats: name at least one format")
    return out


def parse_lengths(text: str) -> list[int]:
    try:
        out = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise SystemExit(f"--pp: {text!r} is not a comma-separated list of prompt lengths") from None
    if any(n < 1 for n in out):
        raise SystemExit(f"--pp: prompt lengths must be >= 1, got {text!r}")
    return out


# ----------------------------------------------------------------------------- GGUF files
def gguf_tensor_types(fmt: str) -> dict[str, str]:
    """Per-tensor overrides of the file's type: the embedding and the LM head in F16 for the
    quantized formats (both engines then read the same 16-bit LM head); none for float formats."""
    qtype = FORMATS[fmt][0]
    return dict(SIXTEEN_BIT_TENSORS) if qtype.startswith("Q") else {}


def gguf_file(work: Path, layers: int, fmt: str, seed: int = 0) -> Path:
    """Where the file of this model and format lives under --work (the name says what is in it)."""
    extra = "-embd-out-f16" if gguf_tensor_types(fmt) else ""
    return work / "gguf" / f"{PRESET}-L{layers}-{fmt}{extra}-seed{seed}.gguf"


def ensure_gguf(work: Path, layers: int, fmt: str, seed: int = 0) -> Path:
    from glmrt.gguf_writer import write_gguf
    path = gguf_file(work, layers, fmt, seed)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        write_gguf(path, PRESET, layers=layers, qtype=FORMATS[fmt][0], tensor_qtypes=gguf_tensor_types(fmt),
                   seed=seed)
        log(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB, {time.perf_counter() - t0:.0f} s)")
    return path


def decode_read_bytes(path: Path) -> int:
    """Bytes a decode step reads: every tensor of the file but the embedding, plus one of its rows."""
    from gguf import GGUFReader
    total = embed = rows = 0
    for t in GGUFReader(str(path)).tensors:
        total += int(t.n_bytes)
        if t.name == "token_embd.weight":
            embed, rows = int(t.n_bytes), int(t.shape[-1])
    return total - embed + (embed // rows if rows else 0)


# ----------------------------------------------------------------------------- llama.cpp build
def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cmake_options(flags: set[str]) -> list[str]:
    """The exact configure options: Release, shared libraries (for the greedy driver), the CPU
    backend only, each ISA switch from this CPU's flags, AMX off, no tests/examples/server/curl."""
    on = lambda flag: "ON" if flag in flags else "OFF"  # noqa: E731
    return ["-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DGGML_NATIVE=OFF", "-DGGML_CPU=ON",
            f"-DGGML_AVX={on('avx')}", f"-DGGML_AVX2={on('avx2')}", f"-DGGML_FMA={on('fma')}",
            f"-DGGML_F16C={on('f16c')}", f"-DGGML_BMI2={on('bmi2')}", f"-DGGML_AVX_VNNI={on('avx_vnni')}",
            f"-DGGML_AVX512={on('avx512f')}", f"-DGGML_AVX512_VNNI={on('avx512_vnni')}",
            f"-DGGML_AVX512_VBMI={on('avx512vbmi')}", f"-DGGML_AVX512_BF16={on('avx512_bf16')}",
            "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF",
            "-DGGML_CPU_REPACK=ON", "-DGGML_OPENMP=ON", "-DGGML_CUDA=OFF", "-DGGML_VULKAN=OFF", "-DGGML_METAL=OFF",
            "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
            "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF"]


def build_dir_name(source_id: str, options: list[str]) -> str:
    """A build tree per (source, options): a changed option never reuses a stale cache."""
    digest = hashlib.sha256("\n".join([source_id, *options]).encode()).hexdigest()[:10]
    return f"build-{digest}"


def source_tree(args, work: Path) -> tuple[Path, str]:
    """The llama.cpp tree and a name for it (the sdist file name, or the --src path)."""
    if args.src:
        src = Path(args.src).resolve()
        return src, str(src)
    sdist = Path(args.sdist).resolve() if args.sdist else None
    if sdist is None:
        dl = work / "sdist"
        dl.mkdir(parents=True, exist_ok=True)
        found = sorted(dl.glob("llama_cpp_python-*.tar.gz"))
        if not found:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", PACKAGE, PACKAGE,
                            "-d", str(dl)], check=True)
            found = sorted(dl.glob("llama_cpp_python-*.tar.gz"))
        sdist = found[-1]
    top = sdist.name[: -len(".tar.gz")]
    tree = work / top
    if not (tree / "vendor" / "llama.cpp" / "CMakeLists.txt").exists():
        with tarfile.open(sdist) as tar:
            tar.extractall(work, filter="data")
    return tree / "vendor" / "llama.cpp", sdist.name


def build_llama_cpp(args, work: Path) -> dict:
    src, source_id = source_tree(args, work)
    options = cmake_options(cpu_flags())
    build = work / build_dir_name(source_id, options)
    bench, lib = build / "bin" / "llama-bench", build / "bin"
    if not bench.exists():
        log(f"building llama.cpp from {source_id} into {build} ...")
        subprocess.run(["cmake", "-S", str(src), "-B", str(build), *options], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2), "--target", "llama-bench"],
                       check=True, stdout=subprocess.DEVNULL)
    driver = build / "bin" / "glmrt_llama_greedy"
    source = HERE / "llama_cpp" / "greedy.cpp"
    if not driver.exists() or driver.stat().st_mtime < source.stat().st_mtime:
        subprocess.run(["c++", "-O2", "-std=c++17", str(source), "-o", str(driver), f"-I{src / 'include'}",
                        f"-I{src / 'ggml' / 'include'}", f"-L{lib}", "-lllama", "-lggml", "-lggml-base",
                        f"-Wl,-rpath,{lib}"], check=True)
    return {"source": source_id, "tree": str(src), "build_dir": str(build), "cmake_options": options,
            "llama_bench": str(bench), "greedy_driver": str(driver)}


def run_llama_bench(llama: dict, model: Path, pp: list[int], tg: int, threads: int) -> dict:
    """One llama-bench invocation (-r 1, its warm-up on): {"pp128": tokens/s, ..., "tg32": tokens/s}."""
    cmd = [llama["llama_bench"], "-m", str(model), "-t", str(threads), "-r", "1", "-o", "json",
           "-p", ",".join(map(str, pp)) if pp else "0", "-n", str(tg)]
    if pp:
        cmd += ["-b", str(max(pp)), "-ub", str(max(pp))]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"llama-bench failed ({out.returncode}): {' '.join(cmd)}\n{out.stderr[-2000:]}")
    records = json.loads(out.stdout)
    if records:  # llama.cpp's own build stamp, as llama-bench reports it
        llama["build_commit"] = records[0].get("build_commit")
        llama["build_number"] = records[0].get("build_number")
        llama["cpu_info"] = records[0].get("cpu_info")
    return parse_llama_bench(out.stdout)


def parse_llama_bench(text: str) -> dict:
    """llama-bench's -o json list -> {test name: tokens/s}; a test is pp (n_gen 0) or tg (n_prompt 0)."""
    out = {}
    for rec in json.loads(text):
        n_prompt, n_gen = int(rec["n_prompt"]), int(rec["n_gen"])
        if n_prompt and n_gen:
            continue  # a pp+tg test: not asked for
        name = f"pp{n_prompt}" if n_prompt else f"tg{n_gen}"
        out[name] = float(rec["avg_ts"])
    return out


def llama_greedy(llama: dict, model: Path, ids: list[int], tokens: int, threads: int) -> list[int]:
    out = subprocess.run([llama["greedy_driver"], str(model), str(threads), str(tokens), *map(str, ids)],
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"llama.cpp's greedy driver failed ({out.returncode}) on {model}:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["generated"]


# ----------------------------------------------------------------------------- glmrt side
def glmrt_worker(spec: dict) -> None:
    """In its own process: load the file once, print one JSON line about the model, then for every
    line read from stdin one JSON line of timings ({"pp128": tokens/s, ..., "tg32": tokens/s}, or a
    profile when the line is "profile"), until stdin closes."""
    import torch
    import glmrt

    torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    model = glmrt.load(spec["path"], dtype=spec["dtype"], backend="cpu", progress=False)
    load_s = time.perf_counter() - t0
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    prompts = {n: torch.randint(0, vocab, (1, n), generator=gen) for n in spec["pp"]}
    linears = sorted({s.impl for s in model.plan.steps if s.node.op == "linear"})
    print(json.dumps({"load_s": load_s, "weight_bytes": model.weight_bytes(), "linear_impls": linears,
                      "threads": torch.get_num_threads()}), flush=True)

    def pp(n: int) -> float:
        t = time.perf_counter()
        for _ in model.stream(prompts[n], max_new_tokens=1, eos_token_id=[]):
            break
        return n / (time.perf_counter() - t)

    def tg(n: int) -> float:
        stamps = []
        for _ in model.stream(torch.tensor([[1]]), max_new_tokens=n + 1, eos_token_id=[]):
            stamps.append(time.perf_counter())
        return n / (stamps[-1] - stamps[0])

    for line in sys.stdin:
        if line.strip() == "profile":
            print(json.dumps(glmrt_profile(model, prompts, spec, pp, tg)), flush=True)
            continue
        res = {f"pp{n}": pp(n) for n in spec["pp"]}
        if spec["tg"]:
            res[f"tg{spec['tg']}"] = tg(spec["tg"])
        print(json.dumps(res), flush=True)


def glmrt_profile(model, prompts, spec, pp, tg) -> dict:
    """Wall time per op kind (and per linear's weight format) of one pp (the longest prompt) and one tg."""
    plan = model.plan
    totals: dict[str, float] = {}
    original = [s.fn for s in plan.steps]

    def timed(step, fn):
        key = f"{step.node.op} ({step.impl})"

        def run(ctx, node, inputs, params):
            t = time.perf_counter()
            out = fn(ctx, node, inputs, params)
            totals[key] = totals.get(key, 0.0) + time.perf_counter() - t
            return out
        return run

    out = {}
    try:
        for s in plan.steps:
            s.fn = timed(s, s.fn)
        for name, run in ((f"pp{max(spec['pp'])}", lambda: pp(max(spec["pp"]))) if spec["pp"] else (None, None),
                          (f"tg{spec['tg']}", lambda: tg(spec["tg"])) if spec["tg"] else (None, None)):
            if name is None:
                continue
            totals.clear()
            t = time.perf_counter()
            rate = run()
            wall = time.perf_counter() - t
            out[name] = {"tokens_per_s": rate, "wall_s": wall,
                         "ops_s": dict(sorted(totals.items(), key=lambda kv: -kv[1]))}
    finally:
        for s, fn in zip(plan.steps, original):
            s.fn = fn
    return out


class GlmrtWorker:
    """A glmrt process that keeps its model loaded, so that the engines can alternate round by round
    without paying the load again."""

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

    def ask(self, what: str = "round") -> dict:
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


# ----------------------------------------------------------------------------- helpers
def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


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


def summarize(rounds: list[dict]) -> dict:
    """Per test: median / min / max tokens/s over the rounds."""
    out = {}
    for name in rounds[0]:
        vals = [r[name] for r in rounds]
        out[name] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "rounds": vals}
    return out


def target_of(fmt: str, test: str) -> float | None:
    if test.startswith("tg"):
        return DECODE_TARGETS.get(fmt)
    return PREFILL_TARGET if test.startswith("pp") else None


# ----------------------------------------------------------------------------- main
def cross_check(args, llama: dict, work: Path) -> dict:
    import torch
    import glmrt

    path = ensure_gguf(work, args.check_layers, "f32")
    gen = torch.Generator().manual_seed(2)
    model = glmrt.load(str(path), dtype="float32", backend="cpu", kernels="reference", progress=False)
    ids = torch.randint(0, model.config.vocab_size, (32,), generator=gen).tolist()
    ours = [int(t[0]) for t in model.stream(torch.tensor([ids]), max_new_tokens=args.check_tokens, eos_token_id=[])]
    del model
    theirs = llama_greedy(llama, path, ids, args.check_tokens, args.threads)
    same = ours == theirs
    log(f"cross-check ({args.check_layers} layers, F32 file {path.name}): glmrt {ours}\n"
        f"                                  llama.cpp {theirs}: {'EQUAL' if same else 'DIFFERENT'}")
    return {"layers": args.check_layers, "file": path.name, "prompt_ids": ids, "tokens": args.check_tokens,
            "glmrt": ours, "llama_cpp": theirs, "equal": same}


def main(argv=None):
    args = parse_args(argv)
    if args.glmrt_worker:
        glmrt_worker(json.loads(args.glmrt_worker))
        return 0
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    llama = build_llama_cpp(args, work)
    if args.build_only:
        print(json.dumps(llama, indent=1))
        return 0
    from glmrt.bench.machine import cpu_read_bandwidth, git_commit as glmrt_git

    doc = {"date": datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
           "commit": git_commit(), "glmrt_git": glmrt_git(),
           "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
           "hardware": {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "threads": args.threads,
                        "isa_flags": sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma", "f16c")))},
           "llama_cpp": llama,
           "settings": {"preset": PRESET, "layers": args.layers, "formats": args.format_list, "pp": args.pp_list,
                        "tg": args.tg, "rounds": args.rounds, "threads": args.threads,
                        "worker_per_round": args.worker_per_round,
                        "sixteen_bit_tensors_in_quantized_files": SIXTEEN_BIT_TENSORS},
           "load_average_start": os.getloadavg()}
    if args.check_layers:
        doc["cross_check"] = cc = cross_check(args, llama, work)
        if not cc["equal"]:
            raise SystemExit("the cross-check failed: llama.cpp's greedy tokens differ from glmrt's on the same F32 "
                             "file, so the two do not run the same model; fix that before timing anything")

    bw_before = cpu_read_bandwidth(args.threads)
    rows = []
    for fmt in args.format_list:
        path = ensure_gguf(work, args.layers, fmt)
        spec = {"path": str(path), "dtype": FORMATS[fmt][1], "pp": args.pp_list, "tg": args.tg,
                "threads": args.threads}
        theirs, ours, worker = [], [], None
        for _ in range(args.rounds):  # alternating, so that a busy spell of the machine hits both
            theirs.append(run_llama_bench(llama, path, args.pp_list, args.tg, args.threads))
            if worker is None:
                worker = GlmrtWorker(spec, args.threads)
                worker.ask()  # warm-up
            ours.append(worker.ask())
            if args.worker_per_round:
                worker.close()
                info, worker = worker.info, None
        if worker is None:
            worker = GlmrtWorker(spec, args.threads) if args.profile else None
        profile = worker.ask("profile") if args.profile else None
        if worker is not None:
            info = worker.info
            worker.close()
        row = {"format": fmt, "file": path.name, "file_bytes": path.stat().st_size,
               "decode_read_bytes": decode_read_bytes(path), "glmrt_weights": FORMATS[fmt][2],
               "glmrt_dtype": FORMATS[fmt][1], "glmrt_info": info,
               "llama_cpp": summarize(theirs), "glmrt": summarize(ours), "load_average": os.getloadavg()}
        if profile:
            row["glmrt_profile"] = profile
        row["speedup"] = {t: row["glmrt"][t]["median"] / row["llama_cpp"][t]["median"] for t in row["glmrt"]}
        rows.append(row)
        log(f"{fmt}: " + ", ".join(f"{t} glmrt {row['glmrt'][t]['median']:.1f} / llama.cpp "
                                   f"{row['llama_cpp'][t]['median']:.1f} tok/s ({s:.2f}x)"
                                   for t, s in row["speedup"].items()))
        if args.delete_files:
            path.unlink()
    bw_after = cpu_read_bandwidth(args.threads)
    bw = statistics.median([bw_before["median_bytes_per_s"], bw_after["median_bytes_per_s"]])
    doc["bandwidth"] = {"before": bw_before, "after": bw_after, "median_bytes_per_s": bw}
    for row in rows:
        tg = f"tg{args.tg}"
        if args.tg:
            for side in ("glmrt", "llama_cpp"):
                rate = row[side][tg]["median"]
                row[side][tg]["read_gb_per_s"] = row["decode_read_bytes"] * rate / 1e9
                row[side][tg]["fraction_of_bandwidth"] = row["decode_read_bytes"] * rate / bw
    doc["rows"] = rows
    doc["load_average_end"] = os.getloadavg()
    out = Path(args.out) if args.out else (REPO / "benchmarks" / "results" /
                                           f"{doc['date']}-cpu-vs-llama-cpp-{PRESET}-L{args.layers}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(doc, indent=1) + "\n")
    (out / "README.md").write_text(markdown(doc))
    print(markdown(doc))
    return 0


def markdown(doc: dict) -> str:
    s, ll = doc["settings"], doc["llama_cpp"]
    la = lambda v: " / ".join(f"{x:.2f}" for x in v)  # noqa: E731
    lines = [f"# glmrt vs llama.cpp on the same GGUF files, CPU, {s['preset']} widths at {s['layers']} layers "
             f"({doc['date']})", "",
             f"- hardware: {doc['hardware']['cpu']}, {doc['hardware']['logical_cpus']} logical CPUs "
             f"({', '.join(doc['hardware']['isa_flags'])}); {s['threads']} threads for both engines",
             f"- glmrt commit: {doc['commit']}; llama.cpp: {ll['source']} (llama.cpp commit {ll.get('build_commit')}), built "
             "with "
             f"`{' '.join(ll['cmake_options'])}`",
             f"- command: `{doc['command']}`",
             f"- model: random weights at the {s['preset']} widths, {s['layers']} layers, one GGUF file per format "
             "written by glmrt.gguf_writer and read by both engines; the quantized files keep "
             "`token_embd.weight` and `output.weight` in F16, so both engines read the same bytes per token",
             "- timing: llama-bench's tests (`pp N`: an N-token prompt on an empty context, `tg N`: N single-token "
             f"steps), {s['rounds']} rounds per engine alternating round by round (llama-bench -r 1 with its "
             "warm-up; glmrt's worker process warmed by one round); the medians, [min-max] over the rounds",
             f"- load average (1 / 5 / 15 min): start {la(doc['load_average_start'])}, end "
             f"{la(doc['load_average_end'])}; after each format: "
             + "; ".join(f"{r['format']} {r['load_average'][0]:.2f}" for r in doc["rows"]),
             f"- read bandwidth (glmrt's native read probe, {s['threads']} threads, median of the probes before and "
             f"after): {doc['bandwidth']['median_bytes_per_s'] / 1e9:.1f} GB/s", ""]
    cc = doc.get("cross_check")
    if cc:
        lines += [f"Cross-check on an F32 file of {cc['layers']} layers (glmrt's reference kernels in float32 vs "
                  f"llama.cpp): greedy tokens after a 32-token prompt {'**equal**' if cc['equal'] else '**DIFFERENT**'}"
                  f" over {cc['tokens']} steps (glmrt {cc['glmrt']}, llama.cpp {cc['llama_cpp']}).", ""]
    tests = list(doc["rows"][0]["glmrt"]) if doc["rows"] else []
    lines += ["| file | glmrt runs it as | test | glmrt tokens/s | llama.cpp tokens/s | glmrt / llama.cpp | target | "
              "glmrt % of bandwidth | llama.cpp % of bandwidth |", "|" + " --- |" * 9]
    for row in doc["rows"]:
        for t in tests:
            g, l = row["glmrt"][t], row["llama_cpp"][t]
            target = target_of(row["format"], t)
            ratio = row["speedup"][t]
            mark = "" if target is None else (f">= {target}x " + ("met" if ratio >= target else "**not met**"))
            bwg = f"{100 * g['fraction_of_bandwidth']:.0f}%" if "fraction_of_bandwidth" in g else ""
            bwl = f"{100 * l['fraction_of_bandwidth']:.0f}%" if "fraction_of_bandwidth" in l else ""
            lines.append(f"| {row['format'].upper()} ({row['file_bytes'] / 1e9:.2f} GB) | {row['glmrt_weights']} | "
                         f"{t} | {g['median']:.2f} [{g['min']:.2f}-{g['max']:.2f}] | {l['median']:.2f} "
                         f"[{l['min']:.2f}-{l['max']:.2f}] | {ratio:.2f}x | {mark} | {bwg} | {bwl} |")
    lines += ["", "Bandwidth fraction (tg only): bytes a decode step reads (every tensor of the file but the embedding, "
              "plus one embedding row) x tokens/s / the measured read bandwidth.", ""]
    quant_pp = [(r["format"], t, r["glmrt"][t]["median"]) for r in doc["rows"] for t in tests if t.startswith("pp")]
    bf = {t: v for f, t, v in quant_pp if f == "bf16"}
    if bf:
        for f, t, v in quant_pp:
            if f in ("q8_0", "q4_0") and t in bf:
                lines.append(f"- glmrt {FORMATS[f][2]} {t} / its bf16 {t}: {v / bf[t]:.2f}x "
                             f"({'at least as fast: met' if v >= bf[t] else '**slower: not met**'})")
        lines.append("")
    for row in doc["rows"]:
        lines.append(f"- {row['format']}: glmrt's linears run {', '.join(row['glmrt_info']['linear_impls'])}")
        for name, prof in (row.get("glmrt_profile") or {}).items():
            top = sorted(prof["ops_s"].items(), key=lambda kv: -kv[1])[:6]
            lines.append(f"  - glmrt profile {name} ({prof['wall_s']:.2f} s): " + ", ".join(
                f"{k} {100 * v / prof['wall_s']:.0f}%" for k, v in top))
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
