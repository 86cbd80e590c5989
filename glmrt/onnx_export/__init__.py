"""ONNX export of the GLM graph (``glmrt export MODEL --format onnx``, ``glmrt.export_onnx``).

The device-agnostic graph (glmrt.graph) is written to ONNX directly, one translation per IR op
(glmrt.onnx_export.translate), never by tracing. The output directory holds

    model.onnx          the graph (weights outside it)
    model.onnx.data     every weight, in one external-data file
    glmrt_onnx.json     format version, the model config, flavor, signature, the position_ids rule
    tokenizer files     copied from the checkpoint when it has them

One graph serves prefill and decode; the signature is SIGNATURE_DOC below (also in the json).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..errors import ConfigError
from .flavors import FLAVORS, ExportError

FORMAT_NAME = "glmrt-onnx"
FORMAT_VERSION = 1
MANIFEST = "glmrt_onnx.json"
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
DEFAULT_ACCURACY_LEVEL = 4
# Copied next to the graph when the checkpoint has them (glmrt.models.tokenizer_family reads them).
TOKENIZER_FILES = ("ice_text.model", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "tokenization_chatglm.py", "generation_config.json")

SIGNATURE_DOC = """\
inputs:
  input_ids                  int64 [batch, sequence]
  attention_mask             int64 [batch, past_sequence + sequence]: 1 on tokens, 0 on (left) padding,
                             covering the past and this step
  position_ids               int64 [batch, sequence] ([batch, 2, sequence] for 2-D RoPE: positions, block positions)
  past_key_values.{i}.key    [batch, kv_heads, past_sequence, head_dim] in the model dtype (past 0 for a prompt)
  past_key_values.{i}.value  same
outputs:
  logits                     float32 [batch, sequence, vocab]
  present.{i}.key / .value   [batch, kv_heads, past_sequence + sequence, head_dim]: feed back as the next past
The masks (causal; for prefix models the bidirectional context before <sop>) are computed inside the graph."""

POSITION_RULES = {
    "causal": ("ChatGLM2/3, GLM-4-9B, glm, glm4: position = number of real tokens before this one in the row "
               "(cumsum(attention_mask) - 1, 0 on padding); each generated token takes the previous position + 1."),
    "prefix-2d": ("ChatGLM-6B: position_ids[:, 0] counts real tokens from 0 up to the [gMASK] (or, without "
                  "[gMASK], [MASK]) token; <sop> and every generated token take that mask token's position. "
                  "position_ids[:, 1] (block position) is 0 over the context, 1 at <sop>, then 2, 3, ... for "
                  "generated tokens. Prompts are text + [gMASK] + <sop>; left padding does not count."),
    "prefix-1d": ("GLM-130B: positions count real tokens 0, 1, 2, ... (left padding does not count) when the "
                  "prompt uses [gMASK]; with [MASK], <sop> and every generated token take the [MASK] token's "
                  "position. Prompts are text + [gMASK] + <sop>."),
}


def position_rule(cfg) -> str:
    if cfg.mask_kind == "causal":
        return "causal"
    return "prefix-2d" if cfg.rope_kind == "2d" else "prefix-1d"


def _signature(cfg, dtype_name: str) -> dict:
    pos = ["batch", 2, "sequence"] if cfg.rope_kind == "2d" else ["batch", "sequence"]
    kv = ["batch", cfg.num_kv_heads, "past_sequence", cfg.head_dim]
    present = ["batch", cfg.num_kv_heads, "past_sequence + sequence", cfg.head_dim]
    inputs = [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "sequence"]},
              {"name": "attention_mask", "dtype": "int64", "shape": ["batch", "past_sequence + sequence"]},
              {"name": "position_ids", "dtype": "int64", "shape": pos}]
    outputs = [{"name": "logits", "dtype": "float32", "shape": ["batch", "sequence", cfg.vocab_size]}]
    for i in range(cfg.num_layers):
        for kind in ("key", "value"):
            inputs.append({"name": f"past_key_values.{i}.{kind}", "dtype": dtype_name, "shape": kv})
            outputs.append({"name": f"present.{i}.{kind}", "dtype": dtype_name, "shape": present})
    return {"inputs": inputs, "outputs": outputs, "doc": SIGNATURE_DOC}


def _check_out_dir(out: Path) -> None:
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"--out {out} is a file: give a directory for the export")
        entries = list(out.iterdir())
        if entries and not (out / MANIFEST).is_file():
            raise ConfigError(f"--out {out} is a non-empty directory that is not a glmrt ONNX export: choose a new "
                              "or empty directory (glmrt only replaces its own earlier exports)")


def export_onnx(model: str | os.PathLike, out: str | os.PathLike, *, dtype=None, quantize: str | None = None,
                flavor: str = "ort", layers: int | None = None, accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
                gqa: bool = True, token_ids: dict | None = None, check: bool = True,
                progress: bool = True) -> Path:
    """Export a checkpoint directory or synthetic preset to an ONNX directory; returns its path.

    dtype: "float32" / "float16" / "bfloat16" (None: the checkpoint's). quantize: "int8", "int4",
    "int4-g64", ... (weight-only, glmrt's scheme; an already quantized checkpoint keeps its own).
    flavor: "ort" (opset 21 + onnxruntime's com.microsoft ops) or "standard" (opset 23, standard
    ops only). accuracy_level: MatMulNBits' accuracy_level (ort) and the level onnxruntime gives the
    DequantizeLinear+MatMul pairs it fuses (standard), 0-4 (4: int8 activations, fastest on CPU).
    gqa: use GroupQueryAttention for causal attention in the ort flavor (its restriction: a step
    with a past and more than one new token must have batch 1); False writes the decomposition.
    check: run onnx.checker on the written file (by path, so the external data is checked too).
    """
    try:
        import onnx  # the `onnx` extra: imported here so glmrt works without it
    except ImportError as exc:
        raise ExportError(f"ONNX export needs the onnx package ({exc}): pip install 'glmrt[onnx]' "
                          "(or pip install onnx onnxruntime)") from None
    from .. import __version__
    from ..api import prepare
    from ..config import dtype_name
    from ..fusion import fuse_residual_norm
    from ..models import tokenizer_family

    if flavor not in FLAVORS:
        raise ConfigError(f"unknown ONNX flavor {flavor!r}: use one of {', '.join(FLAVORS)}")
    if accuracy_level not in ACCURACY_LEVELS:
        raise ConfigError(f"accuracy_level must be one of {ACCURACY_LEVELS} (MatMulNBits: 0 unset, 1 fp32, 2 fp16, "
                          f"3 bf16, 4 int8 activations), got {accuracy_level!r}")
    out = Path(out).expanduser()
    _check_out_dir(out)
    prep = prepare(model, dtype=dtype, layers=layers, quantize=quantize, token_ids=token_ids, progress=progress,
                   backend_name="onnx export")
    graph = prep.graph
    if flavor == "ort":  # residual + norm -> one Skip(Simplified)LayerNormalization node
        graph = fuse_residual_norm(graph)
    fl = FLAVORS[flavor]

    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        from .builder import OnnxBuilder
        from .translate import Lowering
        from .translate import translate as write_graph
        builder = OnnxBuilder(tmp / DATA_FILE)
        lowering = Lowering(builder, fl, graph, prep.weights, accuracy_level, gqa)
        try:
            write_graph(lowering)
        finally:
            builder.close_data()
        cfg = prep.cfg
        doc = f"{cfg.generation} exported by glmrt {__version__} ({fl.name} flavor); signature:\n{SIGNATURE_DOC}"
        proto = builder.model(f"glmrt_{cfg.generation}", fl.opsets, doc)
        onnx.save_model(proto, str(tmp / MODEL_FILE))
        del proto
        if check:
            try:
                onnx.checker.check_model(str(tmp / MODEL_FILE), full_check=True)
            except Exception as exc:  # noqa: BLE001 - a checker failure is glmrt's bug: say so plainly
                raise ExportError(f"onnx.checker rejected the exported graph ({type(exc).__name__}: {exc}); this is a "
                                  "glmrt bug: please report it with the command line") from exc
        ops: dict[str, int] = {}
        for node in builder.nodes:
            key = node.op_type if not node.domain else f"{node.domain}.{node.op_type}"
            ops[key] = ops.get(key, 0) + 1
        quant = None
        layouts = {n.attrs["quant"]["bits"] for n in graph.nodes if "quant" in n.attrs}
        if layouts:
            first = next(n for n in graph.nodes if "quant" in n.attrs)
            quant = {"bits": sorted(layouts)[0] if len(layouts) == 1 else sorted(layouts),
                     "group_size": first.attrs["quant"]["group_size"],
                     "accuracy_level": accuracy_level,
                     "op": "com.microsoft.MatMulNBits" if flavor == "ort" else "DequantizeLinear (blocked, axis 0) + MatMul",
                     "packing": ("MatMulNBits: uint8 codes q + 2^(bits-1) (default zero point), (N, k_blocks, "
                                 "block_size*bits/8), INT4 first element in the LOW nibble"
                                 if flavor == "ort" else
                                 "ONNX INT4/INT8 weight transposed to (K, N), zero point 0, INT4 first element in "
                                 "the 4 low bits (two's complement nibbles)"),
                     "block_sizes": dict(lowering.quant_blocks)}
        tokenizer_files = []
        if prep.directory is not None:
            for name in TOKENIZER_FILES:
                src = prep.directory / name
                if src.is_file():
                    shutil.copy2(src, tmp / name)
                    tokenizer_files.append(name)
        session_config = {}
        if quant is not None and flavor == "standard":
            # onnxruntime fuses DequantizeLinear + MatMul into MatMulNBits at this accuracy level.
            session_config["session.qdq_matmulnbits_accuracy_level"] = str(accuracy_level)
        manifest = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "glmrt_version": __version__,
            # absolute, so a tool run from another directory (glmrt bench's workers) finds the weights
            "source": str(prep.directory.resolve()) if prep.directory is not None else prep.source,
            "generation": prep.cfg.generation,
            "flavor": fl.name,
            "flavor_target": fl.target,
            "opsets": fl.opsets,
            "dtype": dtype_name(graph.dtype),
            "quantization": quant,
            "attention": "GroupQueryAttention" if (flavor == "ort" and gqa and cfg.mask_kind == "causal"
                                                   and cfg.attention_scaling == "standard") else
                         ("Attention" if flavor == "standard" and cfg.attention_scaling == "standard" else "decomposed"),
            "config": cfg.to_dict(),
            "signature": _signature(cfg, dtype_name(graph.dtype)),
            "position_ids": {"rule": position_rule(cfg), "text": POSITION_RULES[position_rule(cfg)]},
            "mask": ("causal" if cfg.mask_kind == "causal" else
                     f"bidirectional over the tokens before <sop> (id {cfg.sop_token_id}), causal from <sop> on; "
                     "the graph finds <sop> in this step's input_ids (a prompt must contain it; decode steps "
                     "do not need it)"),
            "special_tokens": {"gmask": cfg.gmask_token_id, "mask": cfg.mask_token_id, "sop": cfg.sop_token_id,
                               "eos": list(cfg.eos_token_ids), "pad": cfg.pad_token_id},
            "chat_family": tokenizer_family(cfg, prep.directory) if prep.directory is not None else None,
            "tokenizer_files": tokenizer_files,
            "files": {"model": MODEL_FILE, "external_data": DATA_FILE},
            "session_config": session_config,
            "ops": dict(sorted(ops.items())),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_manifest(directory: str | os.PathLike) -> dict:
    """The validated glmrt_onnx.json of an export directory."""
    d = Path(directory)
    path = d / MANIFEST
    if not path.is_file():
        raise ConfigError(f"{d} is not a glmrt ONNX export (no {MANIFEST}); write one with "
                          "`glmrt export MODEL --format onnx --out DIR`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}): export the model again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ConfigError(f"{path} is not a {FORMAT_NAME} manifest: export the model again")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise ConfigError(f"{path}: bad format_version {version!r}: export the model again")
    if version > FORMAT_VERSION:
        raise ConfigError(f"{path} is {FORMAT_NAME} version {version}, written by a newer glmrt; this glmrt reads "
                          f"version {FORMAT_VERSION}: upgrade glmrt or export again with this version")
    for name in (manifest.get("files") or {}).values():
        if not (d / name).is_file():
            raise ConfigError(f"{d} is missing {name}: the export is incomplete; export the model again")
    return manifest


def is_export(directory) -> bool:
    try:
        return (Path(directory) / MANIFEST).is_file()
    except (TypeError, OSError):
        return False


__all__ = ["export_onnx", "read_manifest", "is_export", "ExportError", "FLAVORS", "FORMAT_VERSION", "MANIFEST",
           "SIGNATURE_DOC", "POSITION_RULES"]
