"""`glmrt bench`: the same model and the same prompts on every available backend and baseline: TTFT,
TPOT, tokens/s, peak memory, achieved bandwidth and drift against the float32 reference (defined in
metrics.METRIC_NOTES, benchmarks/README.md and every results.md), written as JSON + markdown + a plot;
`glmrt bench --compare A B` puts two runs side by side.

    glmrt bench synthetic:chatglm3-6b --layers 2 --backends cpu --dtype float32,bfloat16 \\
        --quantize none,int8 --repeat 3 --threads 2 --out benchmarks/results/DATE-cpu-chatglm3-6b-L2
    glmrt bench --compare A/results.json B/results.json

How a run is made
- Settings: every requested and available backend x dtype x quantization (glmrt), plus a baseline
  per device and dtype: what a user would otherwise run (see baselines.BASELINE_LABELS). Unavailable backends
  and unsupported dtypes are skipped with one line naming the reason.
- Every setting runs in a fresh worker process (`python -m glmrt.bench --worker TASK RESULT`), so
  that its peak resident set is its own (VmHWM is process-wide and never goes down) and nothing
  one setting allocates slows the next. The worker loads the model, warms up, then times `repeat`
  generations of `gen_len` tokens from the same prompt (greedy, eos disabled so every run makes
  exactly gen_len tokens), synchronizing the device after every token.
- The reference for numerical drift is the float32 model on the CPU with every op on the plain
  torch reference implementation (glmrt.ops), computed once per run in its own worker; every
  setting's `Model.logits` (a baseline's full forward) on the same prompt is compared with it.
- The device bandwidth that achieved bandwidth is compared with is measured in the same run: on a
  CPU a STREAM-like read (glmrt._native_cpu.read_stream, else torch.sum, over a buffer 4 x the
  last-level caches, within 256 MiB..2 GiB: machine.cpu_stream_buffer_bytes; same thread count); on a GPU the published figure (matched from the device name) and a measured
  device-to-device copy.

Metric definitions (also written next to every table in results.md): metrics.METRIC_NOTES.

The package, one file per part:
- settings.py: BenchConfig (the command line's choices), the model described without loading a
  weight, and the settings to run (with the reason for every one skipped);
- machine.py: the hardware/software stamp and the device bandwidth probes;
- metrics.py: per-token timing, bytes per decode step, drift, peak memory, and their definitions;
- baselines.py: the transformers and torch-eager baselines;
- workers.py: the worker process of one setting (and of the reference and a GPU bandwidth probe);
- runner.py: a whole run, from the settings to the results document;
- render.py: the text table, results.md, results.png, --compare, and the results schema (schema.json);
- command.py: the `glmrt bench` arguments and `register` for the glmrt command.
A new baseline is a runner class in baselines.py (its name in BASELINES, its label in BASELINE_LABELS)
picked in workers._task_baseline; a new kind of worker task is one function in workers.WORKER_TASKS.
"""

from __future__ import annotations

from .command import DESCRIPTION, add_arguments, handle, main, register
from .runner import run_bench
from .settings import BenchConfig

__all__ = ["BenchConfig", "DESCRIPTION", "add_arguments", "handle", "main", "register", "run_bench"]
