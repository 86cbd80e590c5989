"""Synthetic tokenizers for the synthetic presets: each of its release's kind (icetk / SentencePiece /
tiktoken / tokenizer.json), with the release's vocabulary size and its special tokens at the
release's ids (../shared/GLM_FAMILY.md), so text, chat and the server run on a preset with no
download. The ordinary vocabulary is made up (bytes, ASCII, the CJK block, letter runs): random
weights produce random text either way; what must be right is the ids the chat formats and the
stop conditions use.

Built on first use (``Model.tokenizer`` of a preset) and cached per family for the process; the
files live in a temporary directory removed at exit.
"""

from __future__ import annotations

import atexit
import base64
import functools
import itertools
import json
import shutil
import string
import tempfile
from pathlib import Path

from .tokenizer import (CHATGLM6B_COMMANDS, GLM130B_COMMANDS, GLM4_COMMANDS, GLM4_SPLIT_PATTERN, Tokenizer, _require,
                        load_tokenizer)

# preset name -> glmrt.tokenizer family of its release
PRESET_FAMILIES = {
    "chatglm2-6b": "chatglm2", "chatglm3-6b": "chatglm3", "glm-4-9b": "glm4", "glm-4-9b-chat-1m": "glm4",
    "glm-4-9b-hf": "hf", "glm-4-9b-0414": "hf", "glm-4-32b-0414": "hf", "chatglm-6b": "chatglm-6b",
    "glm-130b": "glm-130b",
}

CHATGLM2_PIECES = 64789  # specials follow: [MASK] 64789, [gMASK] 64790, ..., <|observation|> 64797
GLM4_RANKS = 151329  # specials follow: <|endoftext|> 151329, [MASK], [gMASK] 151331, ...
CHATGLM6B_COMMAND_ID = 130000  # [MASK] 130000, [gMASK] 130001, <sop> 130004, <eop> 130005 (pieces)
GLM130B_PIECES = 130000  # + 20000 image ids: [MASK] 150000, [gMASK] 150001, sop 150004; eos 20002

_CJK = [chr(c) for c in range(0x4E00, 0x9FA6)]
_LETTERS = string.ascii_lowercase


def _words(min_len: int = 2):
    for n in itertools.count(min_len):
        for letters in itertools.product(_LETTERS, repeat=n):
            yield "".join(letters)


def _sentencepiece_model(n_pieces: int, head: list[tuple[str, str]], tail: list[str] = (),
                         space_at: int | None = None) -> bytes:
    """A unigram SentencePiece model: ``head`` pieces ((text, kind) with kind control /
    user / unknown) first, then 256 byte pieces, then made-up pieces up to ``n_pieces``, then
    ``tail`` control pieces (their ids follow n_pieces). Dummy prefix, identity normalizer, byte
    fallback, as ChatGLM2/3's model has them."""
    _require("sentencepiece", "build a synthetic SentencePiece tokenizer")
    pb = _require("sentencepiece.sentencepiece_model_pb2", "build a synthetic SentencePiece tokenizer (needs protobuf)")
    piece = pb.ModelProto.SentencePiece
    kinds = {"control": piece.CONTROL, "user": piece.USER_DEFINED, "unknown": piece.UNKNOWN}
    m = pb.ModelProto()
    m.trainer_spec.model_type = pb.TrainerSpec.UNIGRAM
    m.trainer_spec.byte_fallback = True
    m.trainer_spec.unk_id, m.trainer_spec.bos_id, m.trainer_spec.eos_id, m.trainer_spec.pad_id = 0, 1, 2, -1
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = True
    m.normalizer_spec.remove_extra_whitespaces = False
    seen = set()

    def add(text: str, kind, score: float = 0.0) -> None:
        p = m.pieces.add()
        p.piece, p.type, p.score = text, kind, score
        seen.add(text)

    for text, kind in head:
        add(text, kinds[kind])
    for b in range(256):
        add(f"<0x{b:02X}>", piece.BYTE)
    ordinary = itertools.chain(
        (c for c in string.printable[:94]), _CJK,
        (w for pair in zip((f"\u2581{w}" for w in _words(1)), _words(2)) for w in pair))
    if space_at is None:
        add("\u2581", piece.NORMAL, -1.0)
    while len(m.pieces) < n_pieces:
        if len(m.pieces) == space_at:
            add("\u2581", piece.NORMAL, -1.0)
            continue
        text = next(ordinary)
        # GLM-130B's command names are not pieces: its tokenizer numbers them after the text vocabulary.
        if text not in seen and text != "\u2581" and text not in GLM130B_COMMANDS:
            add(text, piece.NORMAL, -1.0)  # equal scores: the fewest pieces win
    for text in tail:
        add(text, piece.CONTROL)
    m.trainer_spec.vocab_size = len(m.pieces)
    return m.SerializeToString()


def _glm4_tokens() -> list[bytes]:
    """GLM4_RANKS ordinary tokens, each reachable by BPE merges of two earlier ones."""
    tokens = [bytes([b]) for b in range(256)]
    seen = set(tokens)

    def add(t: bytes) -> None:
        if t not in seen:
            seen.add(t)
            tokens.append(t)

    printable = [c.encode() for c in string.printable[:95]]
    for a in printable:
        for b in printable:
            add(a + b)
    for char in _CJK:  # a CJK character is its 2-byte prefix merged with the last byte
        encoded = char.encode()
        add(encoded[:2])
        add(encoded)
    for word in _words(3):
        if len(tokens) >= GLM4_RANKS:
            break
        add(word.encode())
        if len(tokens) < GLM4_RANKS:
            add(b" " + word[:-1].encode())
    return tokens[:GLM4_RANKS]


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's bytes -> printable characters map, which tokenizers' ByteLevel uses."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(keep, chars)}


def _hf_tokenizer_json(tokens: list[bytes]) -> str:
    alphabet = _byte_level_alphabet()

    def text(t: bytes) -> str:
        return "".join(alphabet[b] for b in t)

    vocab = {text(t): i for i, t in enumerate(tokens)}
    known = set(tokens)
    merges = []
    for t in tokens[256:]:
        for cut in range(len(t) - 1, 0, -1):
            if t[:cut] in known and t[cut:] in known:
                merges.append([text(t[:cut]), text(t[cut:])])
                break
    added = [{"id": GLM4_RANKS + i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, name in enumerate(GLM4_COMMANDS)]
    gmask, sop = GLM4_RANKS + GLM4_COMMANDS.index("[gMASK]"), GLM4_RANKS + GLM4_COMMANDS.index("<sop>")
    return json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": GLM4_SPLIT_PATTERN}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
        "post_processor": {"type": "TemplateProcessing",
                           "single": [{"SpecialToken": {"id": "[gMASK]", "type_id": 0}},
                                      {"SpecialToken": {"id": "<sop>", "type_id": 0}},
                                      {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [{"SpecialToken": {"id": "[gMASK]", "type_id": 0}},
                                    {"SpecialToken": {"id": "<sop>", "type_id": 0}},
                                    {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {"[gMASK]": {"id": "[gMASK]", "ids": [gmask], "tokens": ["[gMASK]"]},
                                              "<sop>": {"id": "<sop>", "ids": [sop], "tokens": ["<sop>"]}}},
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }, ensure_ascii=False)


@functools.lru_cache(maxsize=None)
def _directory() -> Path:
    path = Path(tempfile.mkdtemp(prefix="glmrt-synthetic-tokenizers-"))
    atexit.register(shutil.rmtree, path, True)
    return path


def _text_ids_only(tokenizer: Tokenizer) -> Tokenizer:
    """A random-weight preset emits ids of the embedding's padding rows too (65024 rows for a
    64798-id tokenizer, as in the release); they have no text, so decode drops them instead of
    failing."""
    decode, size = tokenizer.decode, tokenizer.vocab_size
    tokenizer.decode = lambda ids, skip_special=True: decode([i for i in map(int, ids) if 0 <= i < size],
                                                             skip_special)
    return tokenizer


@functools.lru_cache(maxsize=None)
def synthetic_tokenizer(family: str) -> Tokenizer:
    """The synthetic tokenizer of a release family (see PRESET_FAMILIES)."""
    return _text_ids_only(_build(family))


def _build(family: str) -> Tokenizer:
    d = _directory() / family
    d.mkdir(exist_ok=True)
    if family in ("chatglm2", "chatglm3"):
        head = [("<unk>", "unknown"), ("<s>", "control"), ("</s>", "control")]
        (d / "tokenizer.model").write_bytes(_sentencepiece_model(CHATGLM2_PIECES, head, space_at=30910))
        return load_tokenizer(d, family)
    if family == "chatglm-6b":
        head = [("<unk>", "unknown"), ("<s>", "control"), ("</s>", "control"), ("<pad>", "control"),
                ("<n>", "user"), ("<|tab|>", "user")] + [(f"<|blank_{i}|>", "user") for i in range(2, 81)]
        (d / "ice_text.model").write_bytes(_sentencepiece_model(CHATGLM6B_COMMAND_ID, head, list(CHATGLM6B_COMMANDS)))
        return load_tokenizer(d, family)
    if family == "glm-130b":
        head = [("<unk>", "unknown"), ("<s>", "control"), ("</s>", "control"), ("<pad>", "control"),
                ("<n>", "user")]
        (d / "ice_text.model").write_bytes(_sentencepiece_model(GLM130B_PIECES, head))
        return load_tokenizer(d, family)
    tokens = _glm4_tokens()
    if family == "glm4":
        lines = [f"{base64.b64encode(t).decode()} {rank}" for rank, t in enumerate(tokens)]
        (d / "tokenizer.model").write_text("\n".join(lines) + "\n")
        return load_tokenizer(d, family)
    if family == "hf":
        _require("tokenizers", "build a synthetic tokenizer.json")
        (d / "tokenizer.json").write_text(_hf_tokenizer_json(tokens), encoding="utf-8")
        (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>",
                                                             "pad_token": "<|endoftext|>"}))
        return load_tokenizer(d, family)
    raise ValueError(f"no synthetic tokenizer for family {family!r}")
