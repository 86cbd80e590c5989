"""GGUF files (llama.cpp, ollama, LM Studio) as one more checkpoint format, read with the `gguf`
package (llama.cpp's own reader; ``pip install glmrt[gguf]``).

``glmrt.load("model.gguf")`` (or a directory holding exactly one ``.gguf`` and no config.json) reads:

- the config from the metadata (glmrt.models.gguf: architectures ``chatglm`` and ``glm4``);
- every tensor through an explicit name map, checked against the metadata before anything is
  converted (every tensor used, every parameter filled, shapes as the metadata implies);
- the weights: F32 / F16 / BF16 as they are. Q8_0 and Q4_0 blocks of the quantized linears (qkv,
  attention output, both MLP projections) become glmrt's INT8 / INT4 with groups of 32 and float16
  scales, exactly: a Q8_0 block is ``d`` (fp16) and 32 int8 ``q``, value ``q * d``; a Q4_0 block is
  ``d`` and 16 bytes whose low nibbles are elements 0..15 and high nibbles 16..31, value
  ``(nibble - 8) * d`` in [-8, 7] * d, which glmrt's INT4 holds (a signed nibble, even index in the
  high nibble). Every other type is dequantized by the gguf package: for the embedding, the LM head
  and norms that is just their float value; for a quantized linear it would have to be quantized
  again, which is lossy, so it is done only when ``quantize=`` names the glmrt format to use (with a
  LossyConversionWarning), and refused otherwise;
- the tokenizer from the GGUF's own vocabulary: ChatGLM3's SentencePiece pieces (``tokenizer.ggml.model``
  ``llama``, pre-tokenizer ``chatglm-spm``) are rebuilt into a SentencePiece BPE model with the
  ChatGLM3 command tokens after them; GLM-4's byte-level BPE (``gpt2``, pre-tokenizer
  ``chatglm-bpe`` or ``glm4``: GLM-4's split pattern) becomes a ``tokenizers`` BPE from its tokens and
  merges, with a whole pre-token found in the vocabulary taken as one token, as GLM-4's tiktoken does.

Nothing here reaches the graph or the backends: the result is the same Prepared (config, graph,
weights on the CPU) that a checkpoint directory gives.
"""

from __future__ import annotations

import importlib
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import CheckpointError, ConfigError, UnsupportedModelError
from .tokenizer import MissingDependencyError

GGUF_MAGIC = b"GGUF"
_INSTALL_HINT = "pip install glmrt[gguf]"

# glmrt's exact counterparts of ggml block formats: type name -> bits (groups of 32, fp16 scales).
EXACT_FORMATS = {"Q8_0": 8, "Q4_0": 4}
FLOAT_TYPES = ("F32", "F16", "BF16")
BLOCK = 32
# ggml token types (llama.cpp's llama_token_type; SentencePiece uses the same numbers).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6
GLM4_PRE_TOKENIZERS = ("chatglm-bpe", "glm4")  # llama.cpp maps both onto the GLM-4 split pattern
CHATGLM_SPM_PRE_TOKENIZERS = ("chatglm-spm", "default")


class LossyConversionWarning(UserWarning):
    """GGUF weights re-quantized into another format than the file stores (values change)."""


def require_gguf():
    try:
        return importlib.import_module("gguf")
    except ImportError as exc:
        raise MissingDependencyError(f"the 'gguf' package is needed to read GGUF files but is not installed; run "
                                     f"`{_INSTALL_HINT}`") from exc


def is_gguf_file(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def find_gguf(spec) -> Path | None:
    """The GGUF file ``spec`` names: a file that starts with the GGUF magic, or a directory without
    config.json that holds exactly one ``*.gguf``. None for anything else (a checkpoint directory,
    a synthetic preset), which the other loaders handle."""
    path = Path(str(spec)).expanduser()
    if path.is_file():
        if is_gguf_file(path):
            return path
        if path.suffix.lower() == ".gguf":
            raise CheckpointError(f"{path} does not start with the GGUF magic: the file is damaged, incomplete or not "
                                  "GGUF; download or convert it again")
        return None
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    found = sorted(p for p in path.glob("*.gguf") if p.is_file() and is_gguf_file(p))
    if len(found) > 1:
        raise ConfigError(f"{path} holds {len(found)} GGUF files ({', '.join(p.name for p in found[:5])}): pass the "
                          "path of the one to load")
    return found[0] if found else None


# ---------------------------------------------------------------------------------------------- reading
class GGUFFile:
    """The metadata and tensor table of one GGUF file (memory-mapped by the gguf package)."""

    def __init__(self, path: str | Path):
        gguf = require_gguf()
        self.path = Path(path)
        self._gguf = gguf
        self._dequantizable: dict[str, bool] = {}
        size = self.path.stat().st_size
        try:
            reader = gguf.GGUFReader(str(self.path))
        except Exception as exc:  # noqa: BLE001 - the reader raises ValueError, IndexError, numpy errors
            raise CheckpointError(f"{self.path} cannot be read as GGUF ({type(exc).__name__}: {exc}): the file is "
                                  "truncated or damaged; download or convert it again") from exc
        if reader.byte_order != "I":
            raise CheckpointError(f"{self.path} is a big-endian GGUF: glmrt reads little-endian files (what "
                                  "llama.cpp's converter writes by default); convert the model again without "
                                  "--bigendian")
        self.version = int(reader.fields["GGUF.version"].contents())
        self.metadata: dict[str, Any] = {name: field.contents() for name, field in reader.fields.items()
                                         if not name.startswith("GGUF.")}
        self.tensors = {t.name: t for t in reader.tensors}
        for t in reader.tensors:
            if t.data_offset + t.n_bytes > size:
                raise CheckpointError(f"{self.path} is truncated: tensor {t.name} needs bytes up to "
                                      f"{t.data_offset + t.n_bytes}, the file has {size}; download or convert it "
                                      "again")
        self.architecture = self.metadata.get("general.architecture")
        split = self.metadata.get("split.count")
        if isinstance(split, int) and split > 1:
            raise UnsupportedModelError(f"{self.path} is part {self.metadata.get('split.no', 0) + 1} of a GGUF split "
                                        f"in {split} files: merge them first (llama.cpp's `llama-gguf-split --merge`)")

    def type_name(self, name: str) -> str:
        return self.tensors[name].tensor_type.name

    def shape(self, name: str) -> tuple[int, ...]:
        """The logical shape in torch order (rows first): ggml lists ne0 (the row length) first."""
        return tuple(int(d) for d in reversed(self.tensors[name].shape.tolist()))

    # ------------------------------------------------------------------ tensor data
    # Each reader takes an optional slice (dim, start, stop) of the tensor it returns, in that
    # tensor's own units, so a tensor-parallel rank copies only its part out of the file's map.
    def float_tensor(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The values of a tensor: F32/F16/BF16 as stored, anything else dequantized by the gguf
        package to float32."""
        t = self.tensors[name]
        kind, shape = t.tensor_type.name, self.shape(name)
        if kind in ("F32", "F16", "BF16"):
            view = np.asarray(t.data)  # the file's map: nothing read yet
            view = (view.view(np.int16) if kind == "BF16" else view).reshape(shape)
            part = torch.from_numpy(np.array(_narrow(view, dim, start, stop)))
            return part.view(torch.bfloat16) if kind == "BF16" else part
        # Other types (k-quants): a row slice dequantizes the rank's rows only; a column slice
        # dequantizes the whole tensor (this one tensor, transiently), then narrows.
        rows = np.asarray(t.data).reshape(shape[0], -1) if len(shape) == 2 else None
        if dim == 0 and rows is not None:
            data, shape, dim = rows[start:stop], (len(range(shape[0])[start:stop]), shape[1]), None
        else:
            data = np.asarray(t.data)
        try:
            values = self._gguf.quants.dequantize(data, t.tensor_type)
        except NotImplementedError as exc:
            raise CheckpointError(f"{self.path}: tensor {name} is {kind}, which the installed gguf package cannot "
                                  "dequantize; upgrade gguf") from exc
        whole = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).reshape(shape)
        return whole if dim is None else whole.narrow(dim, start, (stop if stop is not None else shape[dim]) - start)

    def _blocks(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None):
        """The [rows, blocks, bytes] view of a Q8_0 / Q4_0 tensor, sliced by rows or by blocks."""
        t = self.tensors[name]
        n, k = self.shape(name)
        blocks = _narrow(np.asarray(t.data).reshape(n, k // BLOCK, -1), dim, start, stop)
        return blocks, blocks.shape[0], blocks.shape[1] * BLOCK

    def block_scales(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The fp16 ``d`` of each 32-wide block of a Q8_0 / Q4_0 tensor: [N, K / 32] (a slice of
        it in those units)."""
        blocks, n, k = self._blocks(name, dim, start, stop)
        return torch.from_numpy(np.ascontiguousarray(blocks[..., :2]).view(np.float16).reshape(n, k // BLOCK))

    def block_values(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """glmrt's integer weights of a Q8_0 / Q4_0 tensor, so that value = q * d: Q8_0's int8 q as
        they are, [N, K]; Q4_0's q = nibble - 8 packed glmrt's way, [N, K / 2] int8 (a slice of it
        in those units; a column slice that cuts a block reads the rows whole, then narrows)."""
        per_block = BLOCK if self.type_name(name) == "Q8_0" else BLOCK // 2  # columns of the returned tensor
        if dim == 1:
            n, k = self.shape(name)
            stop = (k if per_block == BLOCK else k // 2) if stop is None else stop
            if start % per_block or stop % per_block:
                return self.block_values(name).narrow(1, start, stop - start)
            start, stop = start // per_block, stop // per_block
        blocks, n, k = self._blocks(name, dim, start, stop)
        if self.type_name(name) == "Q8_0":
            return torch.from_numpy(np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(n, k))
        packed = blocks[..., 2:]  # [N, K/32, 16]: element j in the low nibble, element j + 16 in the high one
        nibbles = np.concatenate([packed & 0x0F, packed >> 4], axis=-1)  # [N, K/32, 32], elements in order
        # glmrt's INT4 byte: (q[2j] << 4) | (q[2j+1] & 0xF) with q = nibble - 8, i.e. nibble ^ 8 in each half.
        glmrt_bytes = ((nibbles[..., 0::2] ^ 8) << 4) | (nibbles[..., 1::2] ^ 8)
        return torch.from_numpy(np.ascontiguousarray(glmrt_bytes).view(np.int8).reshape(n, k // 2))

    def dequantizable(self, kind: str) -> bool:
        """Whether the gguf package can dequantize a tensor type (probed once on one zero block)."""
        if kind not in self._dequantizable:
            qtype = self._gguf.GGMLQuantizationType[kind]
            ok = not (kind.startswith("I") and kind[1:].isdigit() or kind == "F64")  # not weight formats here
            if ok:
                size = self._gguf.GGML_QUANT_SIZES[qtype][1]
                try:
                    self._gguf.quants.dequantize(np.zeros((1, size), dtype=np.uint8), qtype)
                except (NotImplementedError, ValueError, KeyError):
                    ok = False
            self._dequantizable[kind] = ok
        return self._dequantizable[kind]


def _narrow(array: np.ndarray, dim: int | None, start: int, stop: int | None) -> np.ndarray:
    if dim is None:
        return array
    index = [slice(None)] * array.ndim
    index[dim] = slice(start, stop)
    return array[tuple(index)]


class _GGUFTensors:
    """The tensors of a GGUF file as checkpoint.load_weights reads checkpoint files: names, shapes
    (torch order) and values, with each Q8_0 / Q4_0 linear that maps exactly onto glmrt's format
    shown as glmrt stores it: ``<name>`` int8 ([N, K]; INT4 packed to [N, K / 2]) and
    ``<name>_scale`` float16 [N, K / 32]."""

    def __init__(self, file: GGUFFile, exact: dict[str, int]):
        self.file = file
        self.directory = file.path  # named in load_weights' messages
        self.exact = exact  # GGUF tensor name -> bits, for the linears kept quantized

    def names(self) -> set[str]:
        return set(self.file.tensors) | {n + "_scale" for n in self.exact}

    def shape(self, name: str) -> tuple[int, ...]:
        if name.endswith("_scale") and name.removesuffix("_scale") in self.exact:
            n, k = self.file.shape(name.removesuffix("_scale"))
            return (n, k // BLOCK)
        if name in self.exact:
            n, k = self.file.shape(name)
            return (n, k) if self.exact[name] == 8 else (n, k // 2)
        return self.file.shape(name)

    def get(self, name: str) -> torch.Tensor:
        if name.endswith("_scale") and name.removesuffix("_scale") in self.exact:
            return self.file.block_scales(name.removesuffix("_scale"))
        if name in self.exact:
            return self.file.block_values(name)
        return self.file.float_tensor(name)

    def get_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """``get(name).narrow(dim, start, stop - start)``, reading only that part (a tensor-parallel
        rank's slice, glmrt.checkpoint.load_weights)."""
        if name.endswith("_scale") and name.removesuffix("_scale") in self.exact:
            return self.file.block_scales(name.removesuffix("_scale"), dim, start, stop)
        if name in self.exact:
            return self.file.block_values(name, dim, start, stop)
        return self.file.float_tensor(name, dim, start, stop)

    def release(self, name: str) -> None:
        """As checkpoint.WeightFiles.release: ``get`` copied tensor ``name`` out of the file's
        memory map and it has been consumed; drop its resident pages from the map."""
        from .checkpoint import drop_mapped_range
        base = name.removesuffix("_scale") if name.endswith("_scale") and name.removesuffix("_scale") in self.exact \
            else name
        data = self.file.tensors[base].data
        owner = data
        while owner is not None and not isinstance(owner, np.memmap):
            owner = getattr(owner, "base", None)
        if owner is not None:  # a view of the reader's read-only file map (never anonymous memory)
            drop_mapped_range(data.ctypes.data, data.nbytes)


# ---------------------------------------------------------------------------------------------- vocabulary
class _Vocab:
    """The GGUF's vocabulary metadata (``tokenizer.ggml.*``), or an empty one."""

    def __init__(self, meta: dict):
        self.model = meta.get("tokenizer.ggml.model")
        self.pre = meta.get("tokenizer.ggml.pre")
        self.tokens: list[str] = list(meta.get("tokenizer.ggml.tokens") or [])
        types = meta.get("tokenizer.ggml.token_type")
        self.types: list[int] = list(types) if types else [TOKEN_NORMAL] * len(self.tokens)
        self.scores: list[float] = list(meta.get("tokenizer.ggml.scores") or [0.0] * len(self.tokens))
        self.merges: list[str] = list(meta.get("tokenizer.ggml.merges") or [])
        self.meta = meta
        self.index: dict[str, int] = {}
        for i, token in enumerate(self.tokens):
            self.index.setdefault(token, i)

    def check(self, where: str) -> None:
        if len(self.types) != len(self.tokens) or len(self.scores) != len(self.tokens):
            raise CheckpointError(f"{where}: tokenizer.ggml.tokens has {len(self.tokens)} entries but token_type "
                                  f"{len(self.types)} and scores {len(self.scores)}; the vocabulary is damaged")

    def special_id(self, key: str) -> int | None:
        value = self.meta.get(f"tokenizer.ggml.{key}_token_id")
        return int(value) if isinstance(value, int) and 0 <= value < max(len(self.tokens), 1) else None

    def control(self, *names: str) -> int | None:
        """The id of the first of ``names`` that is a control token."""
        for name in names:
            i = self.index.get(name)
            if i is not None and self.types[i] == TOKEN_CONTROL:
                return i
        return None


def _chatglm_commands(vocab: _Vocab) -> tuple[int, tuple[str, ...]] | None:
    """(first command id, the commands) when ChatGLM2/3's command tokens follow the SentencePiece
    pieces, as llama.cpp's converter writes them; None otherwise."""
    from .tokenizer import CHATGLM2_COMMANDS, CHATGLM3_COMMANDS
    start = vocab.index.get(CHATGLM2_COMMANDS[0])
    if start is None:
        return None
    for commands in (CHATGLM3_COMMANDS, CHATGLM2_COMMANDS):
        if tuple(vocab.tokens[start:start + len(commands)]) == commands:
            return start, commands
    return None


def _spm_tokenizer(vocab: _Vocab, path: Path):
    """ChatGLM2/3: the SentencePiece pieces before the command tokens, rebuilt into a BPE model.

    The GGUF holds each piece, score and type but no normalizer: as llama.cpp does, nothing is
    normalized beyond SentencePiece's whitespace escaping and its dummy prefix
    (``tokenizer.ggml.add_space_prefix``, default on)."""
    from .tokenizer import ChatGLMSentencePieceTokenizer, _require
    found = _chatglm_commands(vocab)
    if found is None:
        warnings.warn(f"{path}: the SentencePiece vocabulary lacks ChatGLM's command tokens ([MASK] [gMASK] [sMASK] "
                      "sop eop ...); the model loads without a tokenizer (work with token ids)", stacklevel=4)
        return None, None
    n, commands = found
    _require("sentencepiece", f"read the vocabulary of {path.name}")
    try:
        pb = importlib.import_module("sentencepiece.sentencepiece_model_pb2")
    except ImportError as exc:
        raise MissingDependencyError(f"the 'protobuf' package is needed to rebuild the SentencePiece model of "
                                     f"{path.name}; run `{_INSTALL_HINT}`") from exc
    model = pb.ModelProto()
    for i in range(n):
        piece = model.pieces.add()
        piece.piece, piece.score, piece.type = vocab.tokens[i], float(vocab.scores[i]), int(vocab.types[i])
    spec = model.trainer_spec
    spec.model_type = pb.TrainerSpec.BPE  # llama.cpp's SPM tokenizer merges by score, as SentencePiece BPE does
    spec.vocab_size = n
    spec.byte_fallback = TOKEN_BYTE in vocab.types[:n]
    unk = vocab.special_id("unknown")
    unk = unk if unk is not None and unk < n else next((i for i in range(n) if vocab.types[i] == TOKEN_UNKNOWN), 0)
    bos, eos = vocab.special_id("bos"), vocab.special_id("eos")
    spec.unk_id, spec.unk_piece = unk, vocab.tokens[unk]
    spec.bos_id = bos if bos is not None and bos < n else 1
    spec.eos_id = eos if eos is not None and eos < n else 2
    spec.bos_piece, spec.eos_piece = vocab.tokens[spec.bos_id], vocab.tokens[spec.eos_id]
    spec.pad_id = -1
    norm = model.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = bool(vocab.meta.get("tokenizer.ggml.add_space_prefix", True))
    norm.remove_extra_whitespaces = bool(vocab.meta.get("tokenizer.ggml.remove_extra_whitespaces", False))
    norm.escape_whitespaces = True
    family = "chatglm3" if "<|observation|>" in commands else "chatglm2"
    try:
        tok = ChatGLMSentencePieceTokenizer(path, family=family, commands=commands,
                                            model_proto=model.SerializeToString())
    except (RuntimeError, OSError) as exc:  # sentencepiece rejects an inconsistent model
        raise CheckpointError(f"{path}: its SentencePiece vocabulary does not form a valid model ({exc}); the "
                              "vocabulary is damaged") from exc
    return tok, family


def _bpe_tokenizer(vocab: _Vocab, path: Path):
    """GLM-4: byte-level BPE over GLM-4's split pattern, from the GGUF's tokens and merges; control
    tokens are special, user-defined ones are matched as text."""
    from .tokenizer import GLM4_COMMANDS, GLM4_SPLIT_PATTERN, HFTokenizer, _require
    tk = _require("tokenizers", f"read the vocabulary of {path.name}")
    if len(vocab.index) != len(vocab.tokens):
        raise CheckpointError(f"{path}: tokenizer.ggml.tokens holds duplicate entries; the vocabulary is damaged")
    merges = []
    for line in vocab.merges:
        left, sep, right = line.partition(" ")
        if not sep or left not in vocab.index or right not in vocab.index or left + right not in vocab.index:
            raise CheckpointError(f"{path}: merge {line!r} in tokenizer.ggml.merges does not join two tokens of the "
                                  "vocabulary into a third; the vocabulary is damaged")
        merges.append((left, right))
    # ignore_merges: a pre-token that is itself in the vocabulary is one token, GLM-4's tiktoken rule.
    bpe = tk.models.BPE(vocab=dict(vocab.index), merges=merges, ignore_merges=True)
    tokenizer = tk.Tokenizer(bpe)
    tokenizer.pre_tokenizer = tk.pre_tokenizers.Sequence([
        tk.pre_tokenizers.Split(tk.Regex(GLM4_SPLIT_PATTERN), behavior="isolated"),
        tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = tk.decoders.ByteLevel()
    specials = [tk.AddedToken(t, special=True, normalized=False) for t, kind in zip(vocab.tokens, vocab.types)
                if kind == TOKEN_CONTROL]
    user = [tk.AddedToken(t, special=False, normalized=False) for t, kind in zip(vocab.tokens, vocab.types)
            if kind == TOKEN_USER_DEFINED]
    tokenizer.add_special_tokens(specials)
    if user:
        tokenizer.add_tokens(user)
    eos = vocab.special_id("eos")
    pad = vocab.special_id("padding")
    config = {"eos_token": vocab.tokens[eos] if eos is not None else None,
              "pad_token": vocab.tokens[pad] if pad is not None else None}
    chat = all(vocab.control(name) is not None for name in GLM4_COMMANDS[:10] if name not in ("[sMASK]", "[MASK]"))
    family = "glm4" if chat else None
    try:
        tok = HFTokenizer(path, config=config, family=family or "hf", tokenizer=tokenizer,
                          eos_token=None if eos is not None else "<|endoftext|>")
    except CheckpointError:
        raise CheckpointError(f"{path}: its BPE vocabulary names no end-of-text token (tokenizer.ggml.eos_token_id) "
                              "and has no <|endoftext|>; the vocabulary is incomplete") from None
    return tok, family


def build_tokenizer(file: GGUFFile):
    """(glmrt Tokenizer, glmrt.chat family) from the GGUF's vocabulary; (None, None) without one."""
    vocab = _Vocab(file.metadata)
    if not vocab.tokens or vocab.model in (None, "none", "no_vocab"):
        return None, None
    vocab.check(str(file.path))
    if vocab.model == "llama" and (vocab.pre is None or vocab.pre in CHATGLM_SPM_PRE_TOKENIZERS):
        return _spm_tokenizer(vocab, file.path)
    if vocab.model == "gpt2" and vocab.pre in GLM4_PRE_TOKENIZERS:
        return _bpe_tokenizer(vocab, file.path)
    warnings.warn(f"{file.path}: vocabulary {vocab.model!r} with pre-tokenizer {vocab.pre!r} is not one llama.cpp "
                  "writes for GLM models (llama + chatglm-spm, gpt2 + chatglm-bpe / glm4); the model loads without "
                  "a tokenizer (work with token ids)", stacklevel=3)
    return None, None


# ---------------------------------------------------------------------------------------------- config
def _torch_dtype(file: GGUFFile) -> str:
    """The dtype a model runs in by default: that of a float embedding or LM head, else the one
    ``general.file_type`` names (MOSTLY_F16 / MOSTLY_BF16), else float32, in which llama.cpp
    computes quantized models."""
    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
    for name in ("token_embd.weight", "output.weight"):
        if name in file.tensors and file.type_name(name) in names:
            return names[file.type_name(name)]
    file_types = {int(file._gguf.LlamaFileType.MOSTLY_F16): "float16",
                  int(file._gguf.LlamaFileType.MOSTLY_BF16): "bfloat16"}
    return file_types.get(file.metadata.get("general.file_type"), "float32")


def config_from_file(file: GGUFFile):
    """GLMConfig of a GGUF file (architecture, widths, vocabulary, special ids)."""
    from .models import gguf as gguf_models
    where = str(file.path)
    arch = gguf_models.check_architecture(file.architecture, where)
    names = set(file.tensors)
    if gguf_models.is_first_generation_layout(names):
        raise UnsupportedModelError(f"{where} holds LayerNorm biases / biased linears (ChatGLM-6B or GLM-130B "
                                    "blocks): llama.cpp has no converter for those and glmrt does not read them from "
                                    "GGUF; load the original checkpoint directory instead")
    vocab = _Vocab(file.metadata)
    if vocab.tokens:
        vocab_size = len(vocab.tokens)
    elif isinstance(file.metadata.get(f"{arch}.vocab_size"), int):
        vocab_size = file.metadata[f"{arch}.vocab_size"]
    elif "token_embd.weight" in names:
        vocab_size = file.shape("token_embd.weight")[0]
    else:
        raise CheckpointError(f"{where} has neither a vocabulary nor a token_embd.weight tensor: not a complete model")
    eos = [vocab.special_id(k) for k in ("eos", "eot", "eom")]
    eos += [vocab.control(t) for t in ("<|user|>", "<|observation|>")]  # the releases' chat stops
    eos_ids = tuple(dict.fromkeys(i for i in eos if i is not None))
    pad = next((i for i in (vocab.special_id("padding"), vocab.special_id("unknown")) if i is not None),
               eos_ids[0] if eos_ids else 0)
    if arch == "glm4":
        generation = "glm4-0414"
    elif vocab.model == "llama" and _chatglm_commands(vocab):
        generation = "chatglm3" if "<|observation|>" in _chatglm_commands(vocab)[1] else "chatglm2"
    elif vocab.model == "gpt2" and vocab.control("[gMASK]") is not None:
        generation = "glm-4-9b"
    else:
        generation = arch
    return gguf_models.config_from_metadata(
        file.metadata, vocab_size=vocab_size, has_output="output.weight" in names,
        qkv_bias=gguf_models.has_qkv_bias(names), torch_dtype=_torch_dtype(file), generation=generation,
        eos_token_ids=eos_ids, pad_token_id=pad, gmask_token_id=vocab.control("[gMASK]"),
        sop_token_id=vocab.control("<sop>", "sop"), where=where)


# ---------------------------------------------------------------------------------------------- checks
def _metadata_summary(file: GGUFFile, cfg) -> str:
    arch = file.architecture
    return (f"{arch}.block_count {file.metadata.get(f'{arch}.block_count')}, embedding_length {cfg.hidden_size}, "
            f"feed_forward_length {cfg.ffn_hidden_size}, heads {cfg.num_heads} / kv heads {cfg.num_kv_heads} of "
            f"{cfg.head_dim}, vocabulary {cfg.vocab_size}")


def check_tensors(file: GGUFFile, wmap, graph) -> None:
    """Every parameter has its tensors with the shapes the metadata implies, every tensor is used
    (or ignored on purpose) and stored in a type glmrt reads; one error lists every problem."""
    where = str(file.path)
    names = set(file.tensors)
    bad_types = sorted({(n, file.type_name(n)) for n in names if file.type_name(n) not in FLOAT_TYPES
                        and file.type_name(n) not in EXACT_FORMATS and not wmap.is_ignored(n)
                        and not file.dequantizable(file.type_name(n))})
    if bad_types:
        listed = ", ".join(f"{n} ({t})" for n, t in bad_types[:8])
        raise CheckpointError(f"{where}: tensor(s) {listed} are stored in a ggml type glmrt cannot read as weights; "
                              f"it reads {', '.join(FLOAT_TYPES)}, {', '.join(EXACT_FORMATS)} exactly and the other "
                              "block formats the gguf package dequantizes (k-quants, Q4_1, Q5_0, ...); convert the "
                              "model again to one of those")
    problems, used = [], set()
    for canonical, source in wmap.sources.items():
        if canonical not in graph.params:
            continue
        want = tuple(graph.params[canonical].shape)
        absent = [n for n in source.names if n not in names]
        if absent:
            problems.append(f"missing tensor {', '.join(absent)}")
            continue
        used.update(source.names)
        shapes = [file.shape(n) for n in source.names]
        parts = source.expected_part_shapes(want) or [want]
        for n, got, need in zip(source.names, shapes, parts):
            if tuple(got) != tuple(need):
                problems.append(f"tensor {n} is {list(got)} but the metadata needs {list(need)}")
    extra = sorted(n for n in names - used if not wmap.is_ignored(n))
    if extra:
        problems.append("unexpected tensor(s) " + ", ".join(extra[:12])
                        + (f" ... ({len(extra)} in all)" if len(extra) > 12 else ""))
    if problems:
        body = "\n  ".join(problems[:30]) + (f"\n  ... {len(problems) - 30} more" if len(problems) > 30 else "")
        raise CheckpointError(f"{where}: its metadata contradicts its tensors (metadata: "
                              f"{_metadata_summary(file, graph.config)}):\n  {body}\nThe file is damaged or was not "
                              "written by llama.cpp's converter; convert the model again with llama.cpp's "
                              "convert_hf_to_gguf.py")


# ---------------------------------------------------------------------------------------------- weights
def plan_linears(file: GGUFFile, wmap, graph, quant_format: tuple[int, int] | None):
    """How each quantizable linear is loaded: (kept exactly quantized: node -> QuantSpec, quantized
    on load from float values: node -> QuantSpec, GGUF tensor name -> bits of the exact ones)."""
    from .quant import QuantSpec, quantizable_linears
    exact_layout, requant, exact_tensors = {}, {}, {}
    lossy: dict[str, set[str]] = {}  # node -> GGUF types it is re-quantized from
    mixed = []
    nodes = {n.name: n for n in graph.nodes}
    for node_name in quantizable_linears(graph):
        sources = wmap.sources[nodes[node_name].params["weight"]].names
        kinds = {file.type_name(s) for s in sources}
        exact = {EXACT_FORMATS[k] for k in kinds if k in EXACT_FORMATS}
        if len(kinds) == 1 and exact and (quant_format is None or quant_format == (next(iter(exact)), BLOCK)):
            bits = next(iter(exact))
            exact_layout[node_name] = QuantSpec(bits, BLOCK, torch.float16)
            exact_tensors.update({s: bits for s in sources})
            continue
        stored_quantized = kinds - set(FLOAT_TYPES)
        if quant_format is not None:
            requant[node_name] = QuantSpec(*quant_format)
            if stored_quantized:
                lossy[node_name] = stored_quantized
        elif stored_quantized - set(EXACT_FORMATS):
            lossy[node_name] = stored_quantized
        elif stored_quantized:
            mixed.append(node_name)  # parts in different exact formats: loaded as their exact float values
    where = str(file.path)
    if lossy and quant_format is None:
        kinds = sorted(set().union(*lossy.values()))
        raise ConfigError(f"{where} stores {len(lossy)} linear(s) as {', '.join(kinds)}, which glmrt's INT8 / INT4 "
                          f"cannot hold exactly (it maps {', '.join(EXACT_FORMATS)} exactly): load it with "
                          "quantize='int4-g32' (or 'int8-g32', 'int4', ...) to dequantize and re-quantize them, which "
                          "changes the values (a LossyConversionWarning says so), or use a Q8_0 / Q4_0 / F16 / BF16 "
                          "file of the model")
    if lossy:
        bits, group = quant_format
        kinds = sorted(set().union(*lossy.values()))
        warnings.warn(f"{where}: re-quantizing {len(lossy)} linear(s) stored as {', '.join(kinds)} to INT{bits}"
                      f"{f' groups of {group}' if group else ' per output row'} (dequantized by the gguf package, "
                      "then quantized by glmrt): the weights differ from the file's", LossyConversionWarning,
                      stacklevel=4)
    if mixed:
        warnings.warn(f"{where}: {len(mixed)} linear(s) (e.g. {mixed[0]}) have parts in different block formats; "
                      "they are loaded as float (their exact dequantized values)", stacklevel=4)
    return exact_layout, requant, exact_tensors


def prepare(path: Path, *, dtypes=None, backend_name: str = "cpu", dtype=None, layers: int | None = None,
            quantize: str | None = None, token_ids: dict | None = None, progress: bool = True,
            materialize: bool = True, device=None, tensor_parallel: tuple[int, int] | None = None):
    """glmrt.api.prepare for a GGUF file: config, graph (quantized where the file is) and weights
    (on ``device``, None: the CPU), plus the tokenizer from the file's vocabulary. Tensors that are
    re-quantized (k-quants with ``quantize``) are quantized one by one as they are read.
    ``tensor_parallel=(size, rank)``: that rank's graph (glmrt.shard), each weight read as the
    rank's slice (a column slice of a Q8_0 / Q4_0 weight in whole blocks), re-quantized after."""
    from . import checkpoint
    from .api import Prepared, _cut_layers, _MoveTo
    from .config import dtype_name, parse_dtype
    from .graph import build_graph
    from .models import gguf as gguf_models
    from .progress import Progress
    from .quant import QuantizeOnLoad, parse_format, quantize_graph_layout

    want_dtype = parse_dtype(dtype)
    quant_format = parse_format(quantize)
    if token_ids:
        raise ConfigError("token_ids overrides GLM-130B's special-token ids only; a GGUF file carries its own ids")
    file = GGUFFile(path)
    cfg = config_from_file(file)
    arch = file.architecture
    total_blocks = int(file.metadata[f"{arch}.block_count"])
    cfg = _cut_layers(cfg, layers)
    dtype_ = want_dtype or cfg.dtype
    if dtypes is not None and dtype_ not in dtypes:
        raise ConfigError(f"backend {backend_name!r} does not run {dtype_name(dtype_)}; it supports "
                          f"{', '.join(dtype_name(d) for d in dtypes)} (pass dtype=...)")
    float_graph = build_graph(cfg, dtype_)
    wmap = gguf_models.weight_map(cfg, arch, set(file.tensors), total_blocks)
    check_tensors(file, wmap, float_graph)
    exact_layout, requant, exact_tensors = plan_linears(file, wmap, float_graph, quant_format)
    graph = quantize_graph_layout(float_graph, exact_layout) if exact_layout else float_graph
    if exact_layout:
        weight_of = {n.name: n.params["weight"] for n in float_graph.nodes if n.name in exact_layout}
        wmap.add_quant_scales(weight_of[n] for n in exact_layout)
    shards = None
    local = graph
    if tensor_parallel is not None:
        from .shard import param_shards, shard_graph
        shards = param_shards(graph, *tensor_parallel)
        local = shard_graph(graph, *tensor_parallel)
    final = quantize_graph_layout(local, requant) if requant else local
    tokenizer = family = None
    if not materialize:
        weights = {n: torch.empty(p.shape, dtype=p.dtype, device="meta") for n, p in final.params.items()}
    else:
        place = QuantizeOnLoad(local, final, device) if requant else (_MoveTo(device) if device is not None else None)
        bar = Progress(f"loading {path}" + (" and re-quantizing" if requant else ""), len(graph.params),
                       enabled=progress)
        try:
            expected = {n: (p.shape, p.dtype) for n, p in graph.params.items()}
            weights = checkpoint.load_weights(_GGUFTensors(file, exact_tensors), wmap, expected, progress=bar,
                                              place=place, shards=shards)
        finally:
            bar.close()
        if requant:
            weights = place.scales_last(weights)
        tokenizer, family = build_tokenizer(file)
    raw = {k: v for k, v in file.metadata.items() if not isinstance(v, list)}  # the scalars, not the vocabulary
    return Prepared(str(path), raw, cfg, final, weights, None, gguf_models, tokenizer=tokenizer, chat_family=family)
