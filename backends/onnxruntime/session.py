"""Load an ONNX export into a glmrt Model that runs it with onnxruntime (see the package docstring)."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

from ...errors import BackendError, InputError
from . import PROVIDERS, OnnxRuntimeBackend


def parse_backend(spec) -> str:
    """"auto" / "onnxruntime" / "ort" / "onnxruntime:<provider>" -> the provider key."""
    text = str(spec or "auto").strip().lower()
    name, _, provider = text.partition(":")
    if name not in ("auto", "onnxruntime", "ort"):
        raise BackendError(f"an ONNX export runs on the onnxruntime backend, not {spec!r}: load it with "
                           "backend='onnxruntime' (or 'onnxruntime:cuda', ...), or load the original checkpoint for "
                           "the other backends")
    provider = provider or "cpu"
    if provider not in PROVIDERS:
        raise BackendError(f"unknown onnxruntime provider {provider!r}: use one of {', '.join(PROVIDERS)}")
    return provider


def _capture_fd2(fn):
    """Run fn() with the process's stderr (fd 2, where onnxruntime's C++ logger writes) sent to a
    temporary file; -> (fn's result, what was written)."""
    fd, path = tempfile.mkstemp(prefix="glmrt-ort-log-")
    saved = os.dup(2)
    try:
        os.dup2(fd, 2)
        try:
            result = fn()
        finally:
            os.dup2(saved, 2)
        with open(path, errors="replace") as f:
            return result, f.read()
    finally:
        os.close(saved)
        os.close(fd)
        os.unlink(path)


_PLACED = re.compile(r"(All nodes|Node\(s\)) placed on \[(\w+)\]\. Number of nodes: (\d+)")


def parse_placement(log: str) -> dict[str, int]:
    """onnxruntime's verbose 'Node placements' lines -> {provider: number of nodes}."""
    out: dict[str, int] = {}
    for _, provider, count in _PLACED.findall(log):
        out[provider] = out.get(provider, 0) + int(count)
    return out


class OnnxSession:
    """One onnxruntime session over an export, called by the Model's plan for every step."""

    def __init__(self, directory: Path, manifest: dict, provider: str, threads: int | None):
        import onnxruntime as ort
        self.manifest = manifest
        self.provider = PROVIDERS[provider]
        if self.provider not in ort.get_available_providers():
            raise BackendError(f"onnxruntime {ort.__version__} here has no {self.provider} (it has "
                               f"{', '.join(ort.get_available_providers())}): install the onnxruntime build for that "
                               "device (onnxruntime-gpu, onnxruntime-cann, onnxruntime-migraphx) or use 'onnxruntime:cpu'")
        cfg = manifest["config"]
        self.layers = cfg["num_layers"]
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = int(threads or torch.get_num_threads())
        so.log_severity_level = 0  # verbose while the session is built: the node placement is logged
        for key, value in (manifest.get("session_config") or {}).items():
            so.add_session_config_entry(key, str(value))
        if self.provider != "CPUExecutionProvider":
            so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        path = str(directory / manifest["files"]["model"])
        try:
            self.session, log = _capture_fd2(lambda: ort.InferenceSession(path, so, providers=[self.provider]))
        except Exception as exc:  # noqa: BLE001 - name what onnxruntime refused
            raise BackendError(f"onnxruntime ({self.provider}) could not load {path}: {exc}. A {manifest['dtype']} "
                               f"{manifest['flavor']}-flavor export needs kernels for every node on that provider; "
                               "on the CPU provider export float32 (or quantized) weights") from None
        self.placement = parse_placement(log)
        self.run_options = ort.RunOptions()
        self.run_options.log_severity_level = 3  # quiet while running
        self.outputs = [o.name for o in self.session.get_outputs()]

    def placement_text(self) -> str:
        if not self.placement:
            return f"onnxruntime did not report the placement; requested {self.provider} only"
        return ", ".join(f"{n} nodes on {p}" for p, n in self.placement.items())

    def __call__(self, ctx, input_ids: torch.Tensor) -> torch.Tensor:
        """One step: ctx is the Model's ForwardContext (positions, mask, KV cache); -> logits."""
        if ctx.cache_pos_t is not None:
            raise InputError("the onnxruntime backend decodes eagerly: set model.decode_mode = 'eager' (or 'auto')")
        if getattr(ctx, "cache_positions", None) is not None:
            raise InputError("the onnxruntime backend runs one batch at a time (Model.generate / stream / chat); "
                             "the serving engine's rows at different cache positions are not supported on it")
        B, T = input_ids.shape
        past_len = ctx.cache_pos if ctx.cache is not None else 0
        S = past_len + T
        # The last query row of the visibility mask is the key-validity row: a causal last query sees
        # every earlier key, and the prefix (GLM-130B, ChatGLM-6B) only adds keys that are valid.
        mask = ctx.allowed[:, 0, -1, :S].to(torch.int64).numpy()
        feeds = {"input_ids": input_ids.numpy(), "attention_mask": mask, "position_ids": ctx.positions.numpy()}
        cfg = self.manifest["config"]
        for i in range(self.layers):
            for kind, store in (("key", "k"), ("value", "v")):
                if ctx.cache is None:
                    past = np.zeros((B, cfg["num_kv_heads"], 0, cfg["head_dim"]), dtype=_np_dtype(self.manifest))
                else:
                    past = np.ascontiguousarray(getattr(ctx.cache, store)[i][:, :, :past_len].numpy())
                feeds[f"past_key_values.{i}.{kind}"] = past
        out = dict(zip(self.outputs, self.session.run(None, feeds, self.run_options)))
        if ctx.cache is not None:
            for i in range(self.layers):
                for kind, store in (("key", "k"), ("value", "v")):
                    present = torch.from_numpy(out[f"present.{i}.{kind}"])
                    getattr(ctx.cache, store)[i][:, :, past_len:S] = present[:, :, past_len:S]
        logits = torch.from_numpy(out["logits"])
        return logits[:, -1:] if ctx.last_only else logits


def _np_dtype(manifest: dict):
    return {"float32": np.float32, "float16": np.float16}[manifest["dtype"]]


def load_export(directory, *, backend="auto", dtype=None, layers=None, quantize=None, strict: bool = False,
                kernels: str = "auto", threads: int | None = None):
    """A Model over an export directory (what glmrt.load does when it is given one)."""
    from ...config import GLMConfig, parse_dtype
    from ...errors import ConfigError
    from ...graph import build_graph
    from ...lowering import Plan, PlanStep
    from ...model import Model
    from ...models import tokenizer_family
    from ...onnx_export import read_manifest
    from ...quant import quantize_graph
    from ..base import VENDOR

    directory = Path(directory).expanduser()
    manifest = read_manifest(directory)
    provider = parse_backend(backend)
    if manifest["dtype"] not in ("float32", "float16"):
        raise ConfigError(f"{directory} holds {manifest['dtype']} activations; onnxruntime's Python API feeds numpy "
                          "arrays, which have no bfloat16: export with --dtype float32 or float16")
    if dtype is not None and parse_dtype(dtype) != getattr(torch, manifest["dtype"]):
        raise ConfigError(f"{directory} was exported in {manifest['dtype']}; dtype={dtype!r} would need another "
                          "export: run glmrt export again with --dtype")
    for name, value in (("layers", layers), ("quantize", quantize)):
        if value is not None:
            raise ConfigError(f"{name}= is chosen when exporting: {directory} is already fixed "
                              f"(glmrt export ... --{name} ...)")
    if kernels != "auto":
        raise ConfigError("kernels= selects glmrt kernels; an ONNX export runs onnxruntime's (use kernels='auto')")
    raw = dict(manifest["config"])
    raw["eos_token_ids"] = tuple(raw.get("eos_token_ids") or ())
    cfg = GLMConfig(**raw)
    dtype_ = getattr(torch, manifest["dtype"])
    graph = build_graph(cfg, dtype_)
    q = manifest.get("quantization")
    if q:
        graph = quantize_graph(graph, q["bits"] if isinstance(q["bits"], int) else q["bits"][0], q["group_size"])
    session = OnnxSession(directory, manifest, provider, threads)
    be = OnnxRuntimeBackend()
    reason = f"in the {manifest['flavor']}-flavor ONNX graph, run by onnxruntime ({session.placement_text()})"
    if strict and any(p != session.provider for p in session.placement):
        raise BackendError(f"strict: nodes of {directory} run outside {session.provider}: {session.placement_text()}")
    steps = [PlanStep(node, session, f"onnxruntime.{session.provider}", VENDOR, reason) for node in graph.nodes]
    plan = Plan(backend=be, graph=graph, steps=steps, session=session)
    # The weights live in onnxruntime's session; a meta tensor the size of the external-data file lets
    # Model.weight_bytes() (info, bench) report them without holding a second copy.
    data_bytes = (directory / manifest["files"]["external_data"]).stat().st_size
    weights = {"onnx.external_data": torch.empty(data_bytes, dtype=torch.uint8, device="meta")}
    model = Model(cfg, graph, plan, weights, str(directory))
    model.decode_mode = "eager"
    family = tokenizer_family(cfg, directory)
    if family is not None:
        from ...tokenizer import load_tokenizer
        model.tokenizer = load_tokenizer(directory, family)
        model.chat_family = family
    model.onnx_manifest = manifest
    model.onnx_session = session
    return model
