"""Tokenizers of every GLM generation behind one small interface.

Each release shipped its own tokenizer code, and prompts are only right when they reproduce it id for
id. The rules each class follows are those of THUDM's code for that release:

- GLM-130B: icetk's ``ice_text.model`` with 20000 image ids in front; the command tokens are
  counted on after the text vocabulary in SwissArmyTransformer's order.
- ChatGLM-6B: ``ice_text.model`` again, newline / tab / space runs rewritten into pieces of their
  own; its command tokens are pieces of the model (final revision: no image offset).
- ChatGLM2 / ChatGLM3: SentencePiece ``tokenizer.model``; the command tokens are appended after it.
- GLM-4 (THUDM format): a tiktoken BPE file of ``base64(token) rank`` lines; the command tokens
  follow the ranks.
- transformers ``glm`` / ``glm4``: a ``tokenizer.json`` for the ``tokenizers`` package.

The tokenizer packages are optional (``pip install glmrt[tokenizers]``) and imported on first use.
"""

from __future__ import annotations

import base64
import binascii
import importlib
import json
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Iterable, Mapping

from .errors import CheckpointError, ConfigError, GLMRTError, InputError

__all__ = [
    "FAMILIES", "Tokenizer", "IceTextTokenizer", "ChatGLMSentencePieceTokenizer", "GLM4TiktokenTokenizer",
    "HFTokenizer", "MissingDependencyError", "load_tokenizer", "GLM4_SPLIT_PATTERN",
]

FAMILIES = ("glm-130b", "chatglm-6b", "chatglm2", "chatglm3", "glm4", "hf")

# The exact pre-tokenizer regex of glm-4-9b's tokenization_chatglm.py.
GLM4_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                      r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Command tokens, in each release's own spelling and order.
GLM130B_COMMANDS = ("[MASK]", "[gMASK]", "[sMASK]", "eod", "sop", "eop", "ENC", "dBLOCK")  # SwissArmyTransformer
CHATGLM6B_COMMANDS = ("[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>")
CHATGLM2_COMMANDS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
CHATGLM3_COMMANDS = CHATGLM2_COMMANDS + ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
GLM4_COMMANDS = ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                 "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>",
                 "<|begin_of_video|>", "<|end_of_video|>")

# Releases spell start/end of a generated piece "sop"/"eop" or "<sop>"/"<eop>"; both names work everywhere.
_UNIFORM_ALIASES = {"sop": "<sop>", "eop": "<eop>"}

_INSTALL_HINT = "pip install glmrt[tokenizers]"


class MissingDependencyError(GLMRTError, ImportError):
    """An optional package a tokenizer needs is not installed."""


def _require(module: str, purpose: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"the '{module}' package is needed to {purpose} but is not installed; run `{_INSTALL_HINT}`") from exc


class Tokenizer(ABC):
    """What the runtime needs from a tokenizer.

    ``encode`` never adds command tokens: where they go depends on the chat format (see glmrt.chat).
    Text that spells a special token (``"<|user|>"``) is encoded as plain text unless
    ``allow_special=True``, so user input can never forge a role or mask token.
    """

    family: str
    special: dict[str, int]  # release spelling and the uniform "<sop>"/"<eop>" spelling, both
    eos_id: int
    pad_id: int | None
    vocab_size: int

    @abstractmethod
    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Ids of ``text`` as the release tokenizes it (SentencePiece's dummy prefix included)."""

    @abstractmethod
    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of ``ids``; with ``skip_special=False`` command and role tokens appear as their names,
        which reply parsing needs (a ChatGLM3 / GLM-4 reply may hold ``<|assistant|>``)."""

    @abstractmethod
    def _lookup(self, token: str) -> int | None:
        """The id of a vocabulary entry, or None when the vocabulary has no such entry."""

    @abstractmethod
    def id_to_token(self, token_id: int) -> str:
        """The vocabulary entry of an id (a SentencePiece piece, a BPE token, a special's name)."""

    def decode_generated(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """decode() for ids a model generated: an id outside this tokenizer's vocabulary (a padded
        output row of the model) becomes U+FFFD instead of an error, so a reply is never lost.
        Runs of known ids decode together, exactly as decode() does."""
        out, run = [], []
        for i in (int(t) for t in ids):
            if 0 <= i < self.vocab_size:
                run.append(i)
                continue
            if run:
                out.append(self.decode(run, skip_special))
                run = []
            out.append("\ufffd")
        if run or not out:
            out.append(self.decode(run, skip_special))
        return "".join(out)

    def token_to_id(self, token: str) -> int:
        if token in self.special:
            return self.special[token]
        found = self._lookup(token)
        if found is None:
            raise InputError(f"{token!r} is not in the {self.family} tokenizer's vocabulary "
                             f"(special tokens: {sorted(self.special)})")
        return found

    def _special_names_by_id(self, release_names: Iterable[str]) -> dict[int, str]:
        names = {}
        for name in release_names:
            if name in self.special:
                names.setdefault(self.special[name], name)
        return names

    def __repr__(self) -> str:
        return f"<{type(self).__name__} family={self.family} vocab_size={self.vocab_size} eos_id={self.eos_id}>"


def _with_uniform_aliases(special: dict[str, int]) -> dict[str, int]:
    out = dict(special)
    for release_name, uniform in _UNIFORM_ALIASES.items():
        if release_name in out and uniform not in out:
            out[uniform] = out[release_name]
    return out


def _special_regex(names: Iterable[str]) -> re.Pattern[str]:
    """Matches the special tokens spelled in text, for ``allow_special=True``.

    Only bracketed spellings count: ChatGLM3's own expression also matched the bare names "sop" and
    "eop", which turns the middle of words like "isopropyl" into command tokens."""
    bracketed = {n for n in names if n[:1] in "[<"}
    if not bracketed:
        return re.compile(r"(?!)")
    # Longest first, so that a name that prefixes another never wins.
    return re.compile("|".join(re.escape(n) for n in sorted(bracketed, key=len, reverse=True)))


def _split_on_specials(text: str, pattern: re.Pattern[str]) -> list[tuple[str, bool]]:
    """text -> [(chunk, is_special)], in order, dropping empty chunks."""
    parts, last = [], 0
    for match in pattern.finditer(text):
        if match.start() > last:
            parts.append((text[last:match.start()], False))
        parts.append((match.group(), True))
        last = match.end()
    if last < len(text):
        parts.append((text[last:], False))
    return parts


def _load_sentencepiece(path: Path, family: str) -> Any:
    spm = _require("sentencepiece", f"read {path.name} ({family})")
    if not path.is_file():
        raise CheckpointError(f"{path} not found: a {family} checkpoint keeps its SentencePiece model in "
                              f"{path.name}; copy it from the model's release into {path.parent}")
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except Exception as exc:  # sentencepiece raises OSError or RuntimeError, depending on the version
        raise CheckpointError(f"{path} is not a readable SentencePiece model ({exc}); the file is truncated or "
                              f"corrupt, or the family {family!r} is wrong: download {path.name} again") from exc


def _sp_has_piece(sp: Any, piece: str) -> bool:
    return sp.piece_to_id(piece) != sp.unk_id() or sp.id_to_piece(sp.unk_id()) == piece


class IceTextTokenizer(Tokenizer):
    """icetk ``ice_text.model``: GLM-130B and ChatGLM-6B.

    Text ids are SentencePiece ids plus ``image_offset`` (icetk keeps 20000 image ids in front;
    ChatGLM-6B's final revision has none). ChatGLM-6B rewrites newline, tab and runs of 2..80
    spaces into pieces of their own before SentencePiece sees them, because the model's normalizer
    would otherwise fold them away; icetk's ``encode`` (GLM-130B) does not, by default.

    A command token's id is its piece's id (plus the offset) when the model holds the piece, as
    ChatGLM-6B's does; otherwise SwissArmyTransformer's rule for GLM-130B applies: the commands
    follow the text vocabulary in ``command_order``. ``special`` overrides either.
    """

    _BLANK = re.compile(r"<\|blank_(\d+)\|>")
    _SPACE_RUN = re.compile(r" {2,}")

    def __init__(self, model_path: str | Path, *, family: str, image_offset: int, linebreak: bool,
                 whitespaces: bool, command_order: tuple[str, ...], eos_token: str,
                 special: Mapping[str, int] | None = None, max_blank_length: int = 80):
        self.family = family
        self.path = Path(model_path)
        self._sp = _load_sentencepiece(self.path, family)
        self.image_offset = int(image_offset)
        self.linebreak = linebreak
        self.whitespaces = whitespaces
        self.max_blank_length = max_blank_length
        n_pieces = self._sp.get_piece_size()
        needed = (["<n>"] if linebreak else []) + (["<|tab|>", "<|blank_2|>"] if whitespaces else [])
        absent = [piece for piece in needed if not _sp_has_piece(self._sp, piece)]
        if absent:
            raise CheckpointError(
                f"{self.path} has no {', '.join(absent)} piece, so newlines/tabs/space runs cannot be encoded the "
                f"{family} way; use the final revision's ice_text.model, or pass linebreak=False / whitespaces=False")

        ids: dict[str, int] = {}
        for index, name in enumerate(command_order):
            if _sp_has_piece(self._sp, name):
                ids[name] = self._sp.piece_to_id(name) + self.image_offset
            else:
                ids[name] = self.image_offset + n_pieces + index
        for name, value in (special or {}).items():
            ids[name] = int(value)
        self.special = _with_uniform_aliases(ids)
        self._command_names = tuple(ids)
        self._id_to_special = self._special_names_by_id(self._command_names)
        self._special_pattern = _special_regex(self.special)

        self.eos_id = self.token_to_id(eos_token)
        self.pad_id = self._sp.piece_to_id("<pad>") + self.image_offset if _sp_has_piece(self._sp, "<pad>") else None
        self.vocab_size = max([self.image_offset + n_pieces] + [i + 1 for i in self.special.values()])

    def _preprocess(self, text: str) -> str:
        if self.linebreak:
            text = text.replace("\n", "<n>")
        if self.whitespaces:
            text = text.replace("\t", "<|tab|>")
            text = self._SPACE_RUN.sub(self._blank_run, text)
        return text

    def _blank_run(self, match: re.Match[str]) -> str:
        # Same result as the release's replace() from the longest run down: whole chunks of the
        # longest blank first, a remainder of one space stays a space.
        full, rest = divmod(len(match.group()), self.max_blank_length)
        tail = f"<|blank_{rest}|>" if rest >= 2 else " " * rest
        return f"<|blank_{self.max_blank_length}|>" * full + tail

    def _postprocess(self, text: str) -> str:
        text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
        return self._BLANK.sub(lambda m: " " * int(m.group(1)) if 2 <= int(m.group(1)) <= self.max_blank_length
                               else m.group(), text)

    def _encode_plain(self, text: str) -> list[int]:
        return [i + self.image_offset for i in self._sp.encode(self._preprocess(text))]

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        if not allow_special:
            return self._encode_plain(text)
        ids: list[int] = []
        for chunk, is_special in _split_on_specials(text, self._special_pattern):
            ids.extend([self.special[chunk]] if is_special else self._encode_plain(chunk))
        return ids

    def _decode_text_ids(self, ids: list[int]) -> str:
        # Image ids (below the offset) have no text; the release drops them too.
        text_ids = [i - self.image_offset for i in ids if i >= self.image_offset]
        n = self._sp.get_piece_size()
        return self._postprocess(self._sp.decode([i for i in text_ids if i < n]))

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            return self._decode_text_ids([i for i in ids if i not in self._id_to_special])
        out, run = [], []
        for i in ids:
            if i in self._id_to_special:
                out.append(self._decode_text_ids(run))
                out.append(self._id_to_special[i])
                run = []
            else:
                run.append(i)
        out.append(self._decode_text_ids(run))
        return "".join(out)

    def _lookup(self, token: str) -> int | None:
        return self._sp.piece_to_id(token) + self.image_offset if _sp_has_piece(self._sp, token) else None

    def id_to_token(self, token_id: int) -> str:
        if token_id in self._id_to_special:
            return self._id_to_special[token_id]
        if token_id < self.image_offset:
            return f"<image_{token_id}>"
        return self._sp.id_to_piece(token_id - self.image_offset)


class ChatGLMSentencePieceTokenizer(Tokenizer):
    """ChatGLM2 / ChatGLM3 ``tokenizer.model``: plain SentencePiece, command tokens appended after
    its n pieces (n = 64789 in the release). bos/eos/pad are the model's own (1, 2 and unk 0).

    ``decode`` drops bos, eos and pad/unk, as the release's ``convert_id_to_token`` maps them to ""."""

    def __init__(self, model_path: str | Path, *, family: str, commands: tuple[str, ...],
                 model_proto: bytes | None = None):
        self.family = family
        self.path = Path(model_path)
        # model_proto: a model rebuilt from another file's vocabulary (a GGUF's), which model_path names.
        self._sp = (_load_sentencepiece(self.path, family) if model_proto is None else
                    _require("sentencepiece", f"read {self.path.name}").SentencePieceProcessor(model_proto=model_proto))
        n = self._sp.get_piece_size()
        self.special = _with_uniform_aliases({name: n + i for i, name in enumerate(commands)})
        self._id_to_special = self._special_names_by_id(commands)
        self._special_pattern = _special_regex(self.special)
        self.eos_id = self._sp.eos_id()
        self.bos_id = self._sp.bos_id()
        self.pad_id = self._sp.unk_id()
        if self.eos_id < 0:
            raise CheckpointError(f"{self.path} defines no end-of-sequence piece; it is not a {family} tokenizer.model")
        self.vocab_size = n + len(commands)
        self._silent = {self.bos_id, self.eos_id, self.pad_id}

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        if not allow_special:
            return self._sp.encode(text)
        ids: list[int] = []
        for chunk, is_special in _split_on_specials(text, self._special_pattern):
            ids.extend([self.special[chunk]] if is_special else self._sp.encode(chunk))
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        ids = [int(i) for i in ids if int(i) not in self._silent]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise InputError(f"token id {bad[0]} is outside the {self.family} vocabulary (size {self.vocab_size})")
        if skip_special:
            return self._sp.decode([i for i in ids if i not in self._id_to_special])
        # The release decodes the runs between command tokens separately, writing each command as text.
        out, run = [], []
        for i in ids:
            if i in self._id_to_special:
                if run:
                    out.append(self._sp.decode(run))
                out.append(self._id_to_special[i])
                run = []
            else:
                run.append(i)
        if run:
            out.append(self._sp.decode(run))
        return "".join(out)

    def _lookup(self, token: str) -> int | None:
        return self._sp.piece_to_id(token) if _sp_has_piece(self._sp, token) else None

    def id_to_token(self, token_id: int) -> str:
        if token_id in self._id_to_special:
            return self._id_to_special[token_id]
        return self._sp.id_to_piece(token_id)


def _read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    if not path.is_file():
        raise CheckpointError(f"{path} not found: a glm4 (THUDM-format) checkpoint keeps its BPE ranks in "
                              f"{path.name}; copy it from the model's release into {path.parent}")
    ranks: dict[bytes, int] = {}
    try:
        with open(path, "rb") as f:
            for line_no, raw in enumerate(f, 1):
                line = raw.strip()
                if not line:
                    continue
                token_b64, rank = line.split()
                ranks[base64.b64decode(token_b64, validate=True)] = int(rank)
    except (ValueError, binascii.Error) as exc:
        raise CheckpointError(f"{path} line {line_no} is not `base64(token) rank` ({exc}): the file is corrupt or "
                              f"not a GLM-4 tiktoken file (is the family right? a SentencePiece tokenizer.model "
                              f"means chatglm2/chatglm3)") from exc
    if not ranks:
        raise CheckpointError(f"{path} holds no ranks; download {path.name} again")
    return ranks


class GLM4TiktokenTokenizer(Tokenizer):
    """glm-4-9b's tiktoken BPE. The command tokens take the ids right after the ranks (151329 on)."""

    def __init__(self, model_path: str | Path, *, family: str = "glm4"):
        tiktoken = _require("tiktoken", "read a GLM-4 tokenizer.model")
        self.family = family
        self.path = Path(model_path)
        ranks = _read_tiktoken_ranks(self.path)
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:
            raise CheckpointError(f"{self.path} lacks single-byte tokens (e.g. byte {missing[0]}), so some text "
                                  f"could not be encoded: the file is not a complete BPE rank file")
        commands = {name: len(ranks) + i for i, name in enumerate(GLM4_COMMANDS)}
        self._enc = tiktoken.Encoding(name=f"glmrt-glm4-{self.path}", pat_str=GLM4_SPLIT_PATTERN,
                                      mergeable_ranks=ranks, special_tokens=commands)
        self._ranks = ranks
        self._id_to_bytes = {rank: token for token, rank in ranks.items()}
        self.special = _with_uniform_aliases(commands)
        self._id_to_special = {i: name for name, i in commands.items()}
        self.eos_id = commands["<|endoftext|>"]
        self.pad_id = self.eos_id  # glm-4-9b's tokenizer_config sets pad_token to <|endoftext|>
        self.vocab_size = len(ranks) + len(commands)

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        if allow_special:
            return self._enc.encode(text, allowed_special="all")
        return self._enc.encode_ordinary(text)

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        # Bytes of consecutive ordinary tokens are joined before decoding, so a character split
        # across tokens survives; an incomplete one becomes U+FFFD, as in the release.
        out, buffer = [], b""
        for i in (int(t) for t in ids):
            if i in self._id_to_special:
                if not skip_special:
                    out.append(buffer.decode("utf-8", errors="replace"))
                    out.append(self._id_to_special[i])
                    buffer = b""
                continue
            if i not in self._id_to_bytes:
                raise InputError(f"token id {i} is outside the glm4 vocabulary (size {self.vocab_size})")
            buffer += self._id_to_bytes[i]
        out.append(buffer.decode("utf-8", errors="replace"))
        return "".join(out)

    def _lookup(self, token: str) -> int | None:
        return self._ranks.get(token.encode("utf-8"))

    def id_to_token(self, token_id: int) -> str:
        if token_id in self._id_to_special:
            return self._id_to_special[token_id]
        return self._id_to_bytes[token_id].decode("utf-8", errors="backslashreplace")


def _read_json_if_present(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); restore it from the model's release") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} should hold a JSON object; restore it from the model's release")
    return data


def _token_content(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _pick_chat_template(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # transformers' named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        return named.get("default") or next(iter(named.values()), None)
    return None


class HFTokenizer(Tokenizer):
    """A ``tokenizer.json`` (transformers ``glm`` / ``glm4`` checkpoints), run by ``tokenizers``.

    The checkpoint's own post-processor decides which command tokens open a sequence
    ([gMASK] <sop> for GLM); ``prefix_ids`` holds them. ``chat_template`` is the checkpoint's
    Jinja template when its tokenizer_config.json (or chat_template.jinja) has one."""

    def __init__(self, tokenizer_path: str | Path, *, config: Mapping[str, Any] | None = None,
                 chat_template: str | None = None, eos_token: str | None = None, family: str = "hf",
                 tokenizer: Any = None):
        tokenizers = _require("tokenizers", "read tokenizer.json")
        self.family = family
        self.path = Path(tokenizer_path)
        # tokenizer: a tokenizers.Tokenizer built in memory (from a GGUF's vocabulary), which tokenizer_path names.
        if tokenizer is None and not self.path.is_file():
            raise CheckpointError(f"{self.path} not found: an HF-format checkpoint keeps its tokenizer in "
                                  f"tokenizer.json; copy it from the model's release into {self.path.parent}")
        try:
            self._tok = tokenizer if tokenizer is not None else tokenizers.Tokenizer.from_file(str(self.path))
        except Exception as exc:  # tokenizers raises its own Exception subclass
            raise CheckpointError(f"{self.path} could not be read by the tokenizers package ({exc}); the file is "
                                  f"corrupt or from a newer tokenizers release: download it again or upgrade "
                                  f"tokenizers") from exc
        # A twin that treats special-token text as plain text, for untrusted input.
        self._tok_plain = tokenizers.Tokenizer.from_str(self._tok.to_str())
        self._tok_plain.encode_special_tokens = True

        config = dict(config or {})
        added = self._tok.get_added_tokens_decoder()
        self.special = {tok.content: i for i, tok in added.items() if tok.special}
        self._special_ids = set(self.special.values())
        self.chat_template = chat_template or _pick_chat_template(config.get("chat_template"))
        # transformers hands a chat template the special tokens' text under these names.
        self.template_variables = {name: _token_content(config.get(name)) for name in
                                   ("bos_token", "eos_token", "unk_token", "pad_token")
                                   if _token_content(config.get(name)) is not None}

        eos_name = eos_token or _token_content(config.get("eos_token"))
        if eos_name is None and self._tok.token_to_id("<|endoftext|>") is not None:
            eos_name = "<|endoftext|>"
        eos = self._tok.token_to_id(eos_name) if eos_name else None
        if eos is None:
            raise CheckpointError(f"cannot tell the end-of-text token of {self.path}: tokenizer_config.json names "
                                  f"no eos_token found in the vocabulary; pass eos_token=... to load_tokenizer")
        self.eos_id = eos
        pad_name = _token_content(config.get("pad_token"))
        self.pad_id = self._tok.token_to_id(pad_name) if pad_name else None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.prefix_ids, self.suffix_ids = self._post_processor_frame()

    def _post_processor_frame(self) -> tuple[list[int], list[int]]:
        """The ids the post-processor puts before and after a text, found by wrapping a probe."""
        probe = "a"
        plain = self._tok.encode(probe, add_special_tokens=False).ids
        framed = self._tok.encode(probe, add_special_tokens=True).ids
        for start in range(len(framed) - len(plain) + 1):
            if framed[start:start + len(plain)] == plain:
                return framed[:start], framed[start + len(plain):]
        return [], []

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        tok = self._tok if allow_special else self._tok_plain
        return tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def _lookup(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        token = self._tok.id_to_token(token_id)
        if token is None:
            raise InputError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
        return token


_FILE_OF_FAMILY = {"glm-130b": "ice_text.model", "chatglm-6b": "ice_text.model", "chatglm2": "tokenizer.model",
                   "chatglm3": "tokenizer.model", "glm4": "tokenizer.model", "hf": "tokenizer.json"}

_OVERRIDES_OF_FAMILY = {
    "glm-130b": {"image_offset", "special", "linebreak", "whitespaces"},
    "chatglm-6b": {"image_offset", "special", "linebreak", "whitespaces"},
    "chatglm2": set(), "chatglm3": set(), "glm4": set(),
    "hf": {"eos_token", "chat_template"},
}


def load_tokenizer(directory: str | Path, family: str, **overrides: Any) -> Tokenizer:
    """Load the tokenizer of a checkpoint directory. ``family`` is one of FAMILIES; it is never
    guessed from file names.

    Overrides: ``image_offset`` (glm-130b default 20000; chatglm-6b default tokenizer_config.json's
    ``num_image_tokens``, else 0 as in the final release), ``special`` (name -> id, for a model file
    that lacks a command piece), ``linebreak`` / ``whitespaces`` (the newline / tab / blank-run
    rewriting: on for chatglm-6b, off for glm-130b as in icetk's ``encode``), ``eos_token`` and
    ``chat_template`` (hf).
    """
    if family not in FAMILIES:
        raise ConfigError(f"unknown tokenizer family {family!r}; expected one of {', '.join(FAMILIES)}")
    unknown = set(overrides) - _OVERRIDES_OF_FAMILY[family]
    if unknown:
        allowed = ", ".join(sorted(_OVERRIDES_OF_FAMILY[family])) or "none"
        raise ConfigError(f"load_tokenizer(family={family!r}) does not take {', '.join(sorted(unknown))}; "
                          f"allowed overrides: {allowed}")
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory; pass the checkpoint folder that holds "
                              f"{_FILE_OF_FAMILY[family]}")
    path = directory / _FILE_OF_FAMILY[family]
    config = _read_json_if_present(directory / "tokenizer_config.json")

    if family == "glm-130b":
        return IceTextTokenizer(path, family=family, image_offset=overrides.get("image_offset", 20000),
                                linebreak=overrides.get("linebreak", False),
                                whitespaces=overrides.get("whitespaces", False),
                                command_order=GLM130B_COMMANDS, eos_token="</s>", special=overrides.get("special"))
    if family == "chatglm-6b":
        offset = overrides.get("image_offset", config.get("num_image_tokens", 0))
        return IceTextTokenizer(path, family=family, image_offset=offset,
                                linebreak=overrides.get("linebreak", True),
                                whitespaces=overrides.get("whitespaces", True),
                                command_order=CHATGLM6B_COMMANDS, eos_token="<eop>", special=overrides.get("special"))
    if family in ("chatglm2", "chatglm3"):
        commands = CHATGLM2_COMMANDS if family == "chatglm2" else CHATGLM3_COMMANDS
        return ChatGLMSentencePieceTokenizer(path, family=family, commands=commands)
    if family == "glm4":
        return GLM4TiktokenTokenizer(path, family=family)
    template = overrides.get("chat_template")
    if template is None and (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text(encoding="utf-8")
    return HFTokenizer(path, config=config, chat_template=template, eos_token=overrides.get("eos_token"))
