"""Write GLM models as GGUF files, with the `gguf` package, the way llama.cpp's convert_hf_to_gguf.py
writes them (for tests and benchmarks: tiny or real-width models, random or given weights).

    from glmrt.gguf_writer import write_gguf
    write_gguf("chatglm3-L8-q4_0.gguf", "chatglm3-6b", layers=8, qtype="Q4_0",
               tensor_qtypes={"token_embd.weight": "F16", "output.weight": "F16"})
    write_gguf(path, config_json_dict, state_dict, qtype="F32", tokenizer="dir/with/tokenizer.model")

What it follows from the converter (ChatGLMModel for the THUDM ``chatglm`` and transformers ``glm``
formats, GLM4Model for ``glm4``):

- tensor names through the gguf package's own TensorNameMap (THUDM names with ``transformer.``
  stripped, as the converter does; the rotary ``inv_freq`` buffer dropped), tensors as the checkpoint
  stores them (the fused ``query_key_value`` stays fused, q/k/v stay split, no RoPE permutation);
- every 1-D tensor and every ``*_norm.weight`` in F32, the other tensors in ``qtype``, falling back
  to F16 where a row is not a whole number of blocks; the gguf package quantizes (Q8_0, Q4_0, ...);
- the metadata keys each converter class writes, ``general.file_type`` and the vocabulary.

It departs from the converter where that one loses information: for a transformers ``glm`` config
it writes ``rms_norm_eps`` and ``rope_theta`` (the converter writes 1e-5 and 10000 whatever they
are), and it writes ``attention.key_length`` when a head is not ``hidden / heads`` wide.

Vocabulary (``tokenizer=``): a ChatGLM3 SentencePiece ``tokenizer.model`` (its pieces, scores and
types, the ChatGLM3 command tokens after them, ``[PAD{id}]`` up to the vocabulary size: llama
vocabulary, pre-tokenizer ``chatglm-spm``), GLM-4's tiktoken ranks (a ``base64 rank`` file or a
dict; byte-level tokens, merges derived from the ranks, the GLM-4 specials: gpt2 vocabulary,
pre-tokenizer ``chatglm-bpe``), None for a synthetic byte-level vocabulary (the 256 bytes, a few
merges, ``<|endoftext|>``, padding; so that llama.cpp, which needs a vocabulary, loads the file;
omitted when the model's vocabulary has no room for it) or False for none.

Weights (``weights=``): None for random ones (matrices N(0, 0.02), norm weights 1 + N(0, 0.1),
biases N(0, 0.02), seeded), generated and written one tensor at a time, so a real-width model needs
only about one tensor's memory; or a state dict in the checkpoint format's own names (torch or numpy
arrays, or RawTensor for bytes already in a ggml block format).
"""

from __future__ import annotations

import base64
import fnmatch
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

__all__ = ["write_gguf", "RawTensor", "source_tensors", "gguf_name_map", "QTYPES"]

QTYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")  # what the gguf package quantizes to
_FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q8_0": "MOSTLY_Q8_0",
               "Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1", "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1"}
# The releases' command tokens, in order (THUDM's tokenization_chatglm.py of ChatGLM3-6B and glm-4-9b).
CHATGLM3_COMMANDS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>",
                     "<|observation|>")
GLM4_SPECIALS = ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                 "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>",
                 "<|end_of_video|>")
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


@dataclass(frozen=True)
class RawTensor:
    """A tensor already in a ggml block format, written as it is: ``data`` uint8 [rows, bytes per
    row] of ``qtype`` blocks for a ``shape`` (rows, columns) tensor."""

    data: np.ndarray
    qtype: str
    shape: tuple[int, ...]


def _gguf():
    from .gguf_checkpoint import require_gguf
    return require_gguf()


# ----------------------------------------------------------------------------------------- configs
def _resolve_config(config: Any, layers: int | None) -> dict:
    if isinstance(config, (str, os.PathLike)) and not isinstance(config, dict):
        from .models.presets import PRESETS
        name = str(config).removeprefix("synthetic:")
        if name in PRESETS:
            config = dict(PRESETS[name])
        elif (Path(config) / "config.json").is_file():
            import json
            config = json.loads((Path(config) / "config.json").read_text(encoding="utf-8"))
        else:
            raise ValueError(f"{config!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a checkpoint "
                             "directory with a config.json")
    config = dict(config)
    if layers is not None:
        for key in ("num_layers", "num_hidden_layers"):
            if key in config:
                config[key] = int(layers)
    return config


def _layout(config: Mapping) -> str:
    """'thudm' (ChatGLM2/3, GLM-4-9B: llama.cpp arch chatglm), 'glm' (transformers glm: chatglm)
    or 'glm4' (transformers glm4: glm4)."""
    kind = config.get("model_type")
    if kind == "chatglm" and "padded_vocab_size" in config:
        return "thudm"
    if kind in ("glm", "glm4"):
        return kind
    raise ValueError(f"llama.cpp converts no {kind!r} model of this layout (ChatGLM-6B and GLM-130B have no GGUF "
                     "converter); write_gguf takes a THUDM chatglm (ChatGLM2/3, GLM-4-9B) or a transformers glm / "
                     "glm4 config")


def _dims(config: Mapping) -> dict:
    layout = _layout(config)
    if layout == "thudm":
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        kv = int(config.get("multi_query_group_num", heads)) if config.get("multi_query_attention") else heads
        return dict(layout=layout, arch="chatglm", vocab=int(config["padded_vocab_size"]), hidden=hidden,
                    layers=int(config["num_layers"]), heads=heads, kv_heads=kv,
                    head_dim=int(config.get("kv_channels") or hidden // heads), ffn=int(config["ffn_hidden_size"]),
                    bias=bool(config.get("add_qkv_bias", True)), tied=False,
                    context=int(config.get("seq_length", hidden)), eps=float(config.get("layernorm_epsilon", 1e-5)),
                    rope_base=10000.0 * float(config.get("rope_ratio", 1.0)), rope_fraction=0.5)
    rope = config.get("rope_parameters") or {}
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    return dict(layout=layout, arch="glm4" if layout == "glm4" else "chatglm", vocab=int(config["vocab_size"]),
                hidden=hidden, layers=int(config["num_hidden_layers"]), heads=heads,
                kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads), ffn=int(config["intermediate_size"]),
                bias=bool(config.get("attention_bias", True)), tied=bool(config.get("tie_word_embeddings", False)),
                context=int(config.get("max_position_embeddings", 131072)),
                eps=float(config.get("rms_norm_eps", 1e-5)),
                rope_base=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
                rope_fraction=float(rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 0.5))))


def source_tensors(config: Mapping) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint ``config`` describes, in its own names, with its shape."""
    d = _dims(config)
    h, v, f = d["hidden"], d["vocab"], d["ffn"]
    q, kv = d["heads"] * d["head_dim"], d["kv_heads"] * d["head_dim"]
    out: dict[str, tuple[int, ...]] = {}
    if d["layout"] == "thudm":
        out["transformer.embedding.word_embeddings.weight"] = (v, h)
        for i in range(d["layers"]):
            p = f"transformer.encoder.layers.{i}."
            out[p + "input_layernorm.weight"] = (h,)
            out[p + "self_attention.query_key_value.weight"] = (q + 2 * kv, h)
            if d["bias"]:
                out[p + "self_attention.query_key_value.bias"] = (q + 2 * kv,)
            out[p + "self_attention.dense.weight"] = (h, q)
            out[p + "post_attention_layernorm.weight"] = (h,)
            out[p + "mlp.dense_h_to_4h.weight"] = (2 * f, h)
            out[p + "mlp.dense_4h_to_h.weight"] = (h, f)
        out["transformer.encoder.final_layernorm.weight"] = (h,)
        out["transformer.output_layer.weight"] = (v, h)
        return out
    out["model.embed_tokens.weight"] = (v, h)
    for i in range(d["layers"]):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (h,)
        for name, rows in (("q", q), ("k", kv), ("v", kv)):
            out[p + f"self_attn.{name}_proj.weight"] = (rows, h)
        if d["bias"]:
            for name, rows in (("q", q), ("k", kv), ("v", kv)):
                out[p + f"self_attn.{name}_proj.bias"] = (rows,)
        out[p + "self_attn.o_proj.weight"] = (h, q)
        out[p + "post_attention_layernorm.weight"] = (h,)
        if d["layout"] == "glm4":
            out[p + "post_self_attn_layernorm.weight"] = (h,)
            out[p + "post_mlp_layernorm.weight"] = (h,)
        out[p + "mlp.gate_up_proj.weight"] = (2 * f, h)
        out[p + "mlp.down_proj.weight"] = (h, f)
    out["model.norm.weight"] = (h,)
    if not d["tied"]:
        out["lm_head.weight"] = (v, h)
    return out


def gguf_name_map(config: Mapping) -> Callable[[str], str | None]:
    """source tensor name -> GGUF name (None: dropped), through the gguf package's TensorNameMap of
    the architecture, after the converter's own renames."""
    gguf = _gguf()
    d = _dims(config)
    arch = {"chatglm": gguf.MODEL_ARCH.CHATGLM, "glm4": gguf.MODEL_ARCH.GLM4}[d["arch"]]
    table = gguf.get_tensor_name_map(arch, d["layers"])

    def name(source: str) -> str | None:
        if source.endswith(".rotary_pos_emb.inv_freq") or source.endswith(".rotary_emb.inv_freq"):
            return None
        if d["layout"] == "thudm":
            source = source.removeprefix("transformer.")  # ChatGLMModel.filter_tensors
        mapped = table.get_name(source, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise ValueError(f"the gguf package maps no {d['arch']} tensor to {source!r}")
        return mapped
    return name


def _metadata(writer, config: Mapping, d: dict) -> None:
    writer.add_context_length(d["context"])
    writer.add_embedding_length(d["hidden"])
    writer.add_feed_forward_length(d["ffn"])
    writer.add_block_count(d["layers"])
    writer.add_head_count(d["heads"])
    writer.add_head_count_kv(d["kv_heads"])
    writer.add_layer_norm_rms_eps(d["eps"])
    writer.add_rope_freq_base(d["rope_base"])
    writer.add_rope_dimension_count(int(d["head_dim"] * d["rope_fraction"]))
    if d["head_dim"] * d["heads"] != d["hidden"] or d["layout"] == "glm4":
        writer.add_key_length(d["head_dim"])  # GLM4Model writes head_dim; llama.cpp needs it when not hidden/heads
        writer.add_value_length(d["head_dim"])
    if d["arch"] == "chatglm":
        writer.add_add_bos_token(False)


# ----------------------------------------------------------------------------------------- vocabularies
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for every byte (the byte-level BPE alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _byte_level(token: bytes, table: dict[int, str]) -> str:
    return "".join(table[b] for b in token)


def _bpe_parts(ranks: Mapping[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """The two tokens the converter's ChatGLMModel.bpe finds a token merged from: merge the lowest
    ranked pair, only through ranks below the token's own."""
    parts = [bytes([b]) for b in token]
    while True:
        best = None
        for i, pair in enumerate(zip(parts[:-1], parts[1:])):
            rank = ranks.get(pair[0] + pair[1])
            if rank is not None and rank < max_rank and (best is None or rank < best[1]):
                best = (i, rank)
        if best is None:
            return parts
        i = best[0]
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]


def _read_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _pad(tokens: list, types: list, scores: list | None, vocab: int, what: str) -> None:
    if len(tokens) > vocab:
        raise ValueError(f"the {what} vocabulary has {len(tokens)} tokens but the model only {vocab} embedding rows")
    for i in range(len(tokens), vocab):
        tokens.append(f"[PAD{i}]")
        types.append(_UNUSED)
        if scores is not None:
            scores.append(0.0)


def _glm4_vocab(writer, ranks: Mapping[bytes, int], vocab: int) -> None:
    table = _bytes_to_unicode()
    by_rank = sorted(ranks.items(), key=lambda item: item[1])
    if [r for _, r in by_rank] != list(range(len(by_rank))):
        raise ValueError("GLM-4 ranks must be 0..n-1 (they are the token ids)")
    tokens = [_byte_level(t, table) for t, _ in by_rank]
    types = [_NORMAL] * len(tokens)
    merges = []
    for token, rank in by_rank:
        if len(token) > 1:
            parts = _bpe_parts(ranks, token, rank)
            if len(parts) != 2:
                raise ValueError(f"token {token!r} is not the merge of two lower-ranked tokens")
            merges.append(" ".join(_byte_level(p, table) for p in parts))
    first_special = len(tokens)
    tokens += list(GLM4_SPECIALS)
    types += [_CONTROL] * len(GLM4_SPECIALS)
    _pad(tokens, types, None, vocab, "GLM-4")
    ids = {t: first_special + i for i, t in enumerate(GLM4_SPECIALS)}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("chatglm-bpe")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_eos_token_id(ids["<|endoftext|>"])  # ChatGLMModel.set_vocab's special tokens
    writer.add_eot_token_id(ids["<|user|>"])
    writer.add_unk_token_id(ids["<|endoftext|>"])
    writer.add_bos_token_id(ids["<|endoftext|>"])


def _chatglm3_vocab(writer, model_path: Path, vocab: int) -> None:
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    n = sp.get_piece_size()
    tokens, types, scores = [], [], []
    renamed = {0: "<unk>", 1: "<bos>", 2: "<eos>"}  # set_vocab_chatglm3 renames the three the release hides
    for i in range(n):
        tokens.append(renamed.get(i, sp.id_to_piece(i)))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(_UNKNOWN)
        elif sp.is_control(i):
            types.append(_CONTROL)
        elif sp.is_unused(i):
            types.append(_UNUSED)
        elif sp.is_byte(i):
            types.append(_BYTE)
        else:
            types.append(_NORMAL)
    tokens += list(CHATGLM3_COMMANDS)
    types += [_CONTROL] * len(CHATGLM3_COMMANDS)
    scores += [0.0] * len(CHATGLM3_COMMANDS)
    _pad(tokens, types, scores, vocab, "ChatGLM3")
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("chatglm-spm")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(sp.bos_id())  # SpecialVocab from ChatGLM3's config: eos 2, pad 0
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    writer.add_pad_token_id(sp.unk_id())


def _synthetic_vocab(writer, vocab: int) -> bool:
    table = _bytes_to_unicode()
    tokens = [table[b] for b in range(256)]
    merges = []
    for pair in (b" t", b" a", b"he", b"in", b"th"):  # a few merges: llama.cpp requires the merges key
        merges.append(" ".join(table[b] for b in pair))
        tokens.append(_byte_level(pair, table))
    types = [_NORMAL] * len(tokens)
    tokens.append("<|endoftext|>")
    types.append(_CONTROL)
    if len(tokens) > vocab:
        return False
    eos = len(tokens) - 1
    _pad(tokens, types, None, vocab, "synthetic")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("chatglm-bpe")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_eos_token_id(eos)
    return True


def _vocabulary(writer, tokenizer: Any, vocab: int) -> None:
    if tokenizer is False:
        return
    if tokenizer is None:
        _synthetic_vocab(writer, vocab)
        return
    if isinstance(tokenizer, Mapping):
        _glm4_vocab(writer, tokenizer, vocab)
        return
    path = Path(tokenizer)
    if path.is_dir():
        path = path / "tokenizer.model"
    head = path.read_bytes()[:256].split(b"\n", 1)[0].split()
    if len(head) == 2 and head[1].isdigit():  # "base64 rank" lines: GLM-4's tiktoken file
        _glm4_vocab(writer, _read_ranks(path), vocab)
    else:
        _chatglm3_vocab(writer, path, vocab)


# ----------------------------------------------------------------------------------------- tensors
def _random(shape: tuple[int, ...], name: str, seed: int, index: int) -> np.ndarray:
    import torch
    gen = torch.Generator().manual_seed(seed * 1_000_003 + index)
    t = torch.randn(shape, generator=gen)
    if name.endswith("norm.weight"):
        t.mul_(0.1).add_(1.0)
    else:
        t.mul_(0.02)
    return t.numpy()


def _as_float32(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch
        return value.detach().to("cpu").float().contiguous().numpy()
    return np.ascontiguousarray(value, dtype=np.float32)


def _qtype_of(gguf_name: str, shape: tuple[int, ...], qtype: str, overrides: Mapping[str, str]) -> str:
    gguf = _gguf()
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight"):
        return "F32"  # the converter keeps 1-D tensors and norms in F32
    chosen = overrides.get(gguf_name)
    if chosen is None:
        chosen = next((v for k, v in overrides.items() if fnmatch.fnmatchcase(gguf_name, k)), qtype)
    block, _ = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[chosen]]
    if shape[-1] % block:
        return "F16"  # the converter's fallback when a row is not a whole number of blocks
    return chosen


def _encode(values: np.ndarray, qtype: str) -> np.ndarray:
    gguf = _gguf()
    if qtype == "F32":
        return np.ascontiguousarray(values, dtype=np.float32)
    if qtype == "F16":
        return values.astype(np.float16)
    if qtype in ("I8", "I16", "I32"):  # not a weight format; for tests of the reader's refusal
        return np.round(values).astype({"I8": np.int8, "I16": np.int16, "I32": np.int32}[qtype])
    return gguf.quants.quantize(values, gguf.GGMLQuantizationType[qtype])


def write_gguf(path: str | os.PathLike, config: Any, weights: Mapping[str, Any] | None = None, *,
               qtype: str = "F16", tensor_qtypes: Mapping[str, str] | None = None, layers: int | None = None,
               tokenizer: Any = None, seed: int = 0, metadata: Mapping[str, Any] | None = None,
               name: str | None = None) -> Path:
    """Write one GGUF file and return its path.

    path: the file to write (``.gguf``), or an existing directory (``<dir>/model.gguf``); written
        under a temporary name and renamed when complete.
    config: a glmrt preset name ("chatglm3-6b", "glm-4-9b", "glm-4-9b-0414", ...), a checkpoint
        directory with a config.json, or a config.json dict: THUDM ``chatglm`` (ChatGLM2/3, GLM-4-9B;
        arch chatglm), transformers ``glm`` (arch chatglm) or ``glm4`` (GLM-4-0414; arch glm4).
    weights: None (random, seeded by ``seed``) or a state dict in the checkpoint's own tensor names.
    qtype: the type of every 2-D tensor: F32, F16, BF16, Q8_0, Q4_0 (or Q4_1, Q5_0, Q5_1).
    tensor_qtypes: per GGUF tensor name (or fnmatch pattern), a type that overrides ``qtype``, e.g.
        {"token_embd.weight": "F16", "output.weight": "F16"}; 1-D tensors and norms stay F32.
    layers: keep the first N layers (the config's layer count is cut to N).
    tokenizer: see the module docstring (None: synthetic byte-level vocabulary; False: none).
    metadata: extra or overriding key -> value (int -> uint32, float -> float32, bool, str; None
        removes a key), e.g. to write a deliberately broken file for a test.
    """
    gguf = _gguf()
    cfg = _resolve_config(config, layers)
    d = _dims(cfg)
    if qtype not in QTYPES:
        raise ValueError(f"qtype {qtype!r}: the gguf package writes {', '.join(QTYPES)}")
    overrides = dict(tensor_qtypes or {})
    shapes = source_tensors(cfg)
    to_gguf = gguf_name_map(cfg)
    if weights is not None:
        weights = dict(weights)
        unknown = sorted(n for n in set(weights) - set(shapes) if not n.endswith("inv_freq"))
        missing = sorted(set(shapes) - set(weights))
        if unknown or missing:
            raise ValueError(f"weights do not match the config: missing {missing[:5]}, unexpected {unknown[:5]}")
    plan = []  # (gguf name, source name, shape, qtype)
    for index, (source, shape) in enumerate(shapes.items()):
        target = to_gguf(source)
        if target is None:
            continue
        value = weights.get(source) if weights is not None else None
        if isinstance(value, RawTensor):
            if tuple(value.shape) != tuple(shape):
                raise ValueError(f"RawTensor for {source} has shape {value.shape}, the config needs {shape}")
            chosen = value.qtype
        else:
            chosen = _qtype_of(target, shape, qtype, overrides)
        plan.append((target, source, shape, chosen, index))

    path = Path(path)
    if path.is_dir():
        path = path / "model.gguf"
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), d["arch"])
    try:
        writer.add_name(name or f"glmrt {d['layout']} {d['layers']}L {qtype}")
        _metadata(writer, cfg, d)
        writer.add_file_type(int(gguf.LlamaFileType[_FILE_TYPES[qtype]]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _vocabulary(writer, tokenizer, d["vocab"])
        for key, value in (metadata or {}).items():
            _set_key(writer, key, value)
        for target, _, shape, chosen, _ in plan:
            qt = gguf.GGMLQuantizationType[chosen]
            block, size = gguf.GGML_QUANT_SIZES[qt]
            n_elements = int(np.prod(shape))
            writer.add_tensor_info(target, shape, np.dtype(np.float32), n_elements // block * size, raw_dtype=qt)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for target, source, shape, chosen, index in plan:
            value = weights.get(source) if weights is not None else None
            if isinstance(value, RawTensor):
                data = np.ascontiguousarray(value.data, dtype=np.uint8)
            else:
                values = _random(shape, source, seed, index) if value is None else _as_float32(value)
                if tuple(values.shape) != tuple(shape):
                    raise ValueError(f"{source} has shape {tuple(values.shape)}, the config needs {shape}")
                data = _encode(values, chosen)
            writer.write_tensor_data(data)
            del data
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return path


def _set_key(writer, key: str, value: Any) -> None:
    gguf = _gguf()
    kinds = gguf.GGUFValueType
    writer.kv_data[0].pop(key, None)
    if value is None:
        return
    if isinstance(value, bool):
        writer.add_key_value(key, value, kinds.BOOL)
    elif isinstance(value, int):
        writer.add_key_value(key, value, kinds.UINT32 if value >= 0 else kinds.INT32)
    elif isinstance(value, float):
        writer.add_key_value(key, value, kinds.FLOAT32)
    elif isinstance(value, str):
        writer.add_key_value(key, value, kinds.STRING)
    elif isinstance(value, (list, tuple)):
        writer.add_key_value(key, list(value), kinds.ARRAY)
    else:
        raise ValueError(f"metadata {key}: cannot write a {type(value).__name__}")
