"""Write a ChatGLM3 model file in chatglm.cpp's GGML format (model type 3, config record v2).

Written from the format as chatglm.cpp 0.4.x reads it (``Pipeline::Pipeline`` and
``ModelLoader::read_state_dict`` in chatglm.cpp), so that glmrt and chatglm.cpp can run the same
weights without THUDM's remote code (chatglm.cpp's own converter loads the checkpoint through
``transformers`` with ``trust_remote_code``, and that code cannot be downloaded here):

    b"ggml", int32 model_type (3 = ChatGLM3)
    int32 config_version (2), then int32 weight_type, vocab_size, hidden_size, num_attention_heads,
          num_kv_heads, num_layers, ffn_hidden_size, float32 norm_eps, int32 pre_seq_len (0),
          float32 rope_theta, int32 max_length, eos_token_id, pad_token_id
    int32 n, then n bytes: a serialized sentencepiece ModelProto (the tokenizer)
    then per tensor: int32 name length, name, int32 ndim, the dims (torch order, outermost first),
          int32 ggml type, zero padding to a 16-byte file offset, the data.

Matrices (embedding, qkv, dense, both MLP projections, output layer) are stored in the file's
weight type; norm weights and the qkv bias in F32, as chatglm.cpp's converter stores them.

The two block formats, as ggml defines them (32 weights per block, row-major within a row):
  * Q8_0: fp16 d = max|x| / 127, then 32 int8 round(x / d).            34 bytes per 32 weights.
  * Q4_0: m = the element of largest magnitude (with its sign), d = m / -8, q = min(15,
    trunc(x / d + 8.5)) in [0, 15]; fp16 d, then 16 bytes: byte j holds q[j] in its low nibble and
    q[j + 16] in its high nibble.                                        18 bytes per 32 weights.
The tokenizer is a synthetic sentencepiece model (no tokenizer of the release can be downloaded
either): ``vocab_size`` pieces, so that chatglm.cpp's ChatGLM3 special tokens (numbered after the
last piece) lie outside the model's vocabulary and a random-weight model can never emit one and
stop early. Benchmarks feed token ids directly, never text.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

MODEL_TYPE_CHATGLM3 = 3
CONFIG_VERSION = 2
ALIGN = 16
QK = 32  # weights per Q4_0 / Q8_0 block

F32, F16, Q4_0, Q8_0 = 0, 1, 2, 8
TYPES = {"f32": F32, "f16": F16, "q4_0": Q4_0, "q8_0": Q8_0}
BLOCK_BYTES = {Q4_0: 18, Q8_0: 34}


def quantize_q8_0(w: torch.Tensor) -> np.ndarray:
    """Q8_0 blocks of a (rows, cols) matrix, cols a multiple of 32: uint8 (rows * cols / 32, 34)."""
    blocks = w.float().reshape(-1, QK)  # (nb, 32)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127.0  # (nb, 1)
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(blocks * inv).clamp_(-128, 127).to(torch.int8)  # (nb, 32)
    out = np.empty((blocks.shape[0], 34), dtype=np.uint8)
    out[:, :2] = d.half().numpy().view(np.uint8).reshape(-1, 2)
    out[:, 2:] = q.numpy().view(np.uint8)
    return out


def quantize_q4_0(w: torch.Tensor) -> np.ndarray:
    """Q4_0 blocks of a (rows, cols) matrix, cols a multiple of 32: uint8 (rows * cols / 32, 18)."""
    blocks = w.float().reshape(-1, QK)  # (nb, 32)
    idx = blocks.abs().argmax(dim=1, keepdim=True)  # (nb, 1)
    m = torch.gather(blocks, 1, idx)  # signed element of largest magnitude
    d = m / -8.0
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    q = torch.clamp(torch.trunc(blocks * inv + 8.5), 0, 15).to(torch.uint8)  # (nb, 32) in [0, 15]
    out = np.empty((blocks.shape[0], 18), dtype=np.uint8)
    out[:, :2] = d.half().numpy().view(np.uint8).reshape(-1, 2)
    out[:, 2:] = (q[:, :16] | (q[:, 16:] << 4)).numpy()
    return out


def dequantize(blocks: np.ndarray, ggml_type: int, shape: tuple[int, int]) -> torch.Tensor:
    """The float32 matrix that chatglm.cpp computes with (for tests of the block writers)."""
    d = torch.from_numpy(blocks[:, :2].copy().view(np.float16).astype(np.float32))  # (nb, 1)
    if ggml_type == Q8_0:
        q = torch.from_numpy(blocks[:, 2:].copy().view(np.int8)).float()
    elif ggml_type == Q4_0:
        b = torch.from_numpy(blocks[:, 2:].copy()).to(torch.int16)
        q = torch.cat([b & 0xF, b >> 4], dim=1).float() - 8.0
    else:
        raise ValueError(f"no block format for ggml type {ggml_type}")
    return (q * d).reshape(shape)


def synthetic_tokenizer(vocab_size: int) -> bytes:
    """A serialized sentencepiece unigram model with exactly vocab_size pieces (see the module doc)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    piece = pb.ModelProto.SentencePiece
    m = pb.ModelProto()
    m.trainer_spec.model_type = pb.TrainerSpec.UNIGRAM
    m.trainer_spec.byte_fallback = True
    m.trainer_spec.unk_id, m.trainer_spec.bos_id, m.trainer_spec.eos_id, m.trainer_spec.pad_id = 0, 1, 2, -1
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = False

    def add(text: str, kind, score: float = 0.0) -> None:
        p = m.pieces.add()
        p.piece, p.type, p.score = text, kind, score

    add("<unk>", piece.UNKNOWN)
    add("<s>", piece.CONTROL)
    add("</s>", piece.CONTROL)
    for b in range(256):
        add(f"<0x{b:02X}>", piece.BYTE)
    i = 0
    while len(m.pieces) < vocab_size:
        add(f"\u2581w{i}", piece.NORMAL, -i / 1000.0)
        i += 1
    m.trainer_spec.vocab_size = len(m.pieces)
    return m.SerializeToString()


def tensor_names(num_layers: int) -> list[tuple[str, str]]:
    """(chatglm3 checkpoint name, "matrix" | "f32") in the order chatglm.cpp's converter writes them."""
    out = [("transformer.embedding.word_embeddings.weight", "matrix")]
    for i in range(num_layers):
        p = f"transformer.encoder.layers.{i}."
        out += [(p + "input_layernorm.weight", "f32"),
                (p + "self_attention.query_key_value.weight", "matrix"),
                (p + "self_attention.query_key_value.bias", "f32"),
                (p + "self_attention.dense.weight", "matrix"),
                (p + "post_attention_layernorm.weight", "f32"),
                (p + "mlp.dense_h_to_4h.weight", "matrix"),
                (p + "mlp.dense_4h_to_h.weight", "matrix")]
    out += [("transformer.encoder.final_layernorm.weight", "f32"), ("transformer.output_layer.weight", "matrix")]
    return out


def glmrt_name(name: str) -> str:
    """The glmrt graph parameter that holds a chatglm3 checkpoint tensor (glmrt keeps the released
    qkv and gate/up row order for ChatGLM2/3, so the tensors are the same, only renamed)."""
    fixed = {"transformer.embedding.word_embeddings.weight": "embed.weight",
             "transformer.encoder.final_layernorm.weight": "final_norm.weight",
             "transformer.output_layer.weight": "lm_head.weight"}
    if name in fixed:
        return fixed[name]
    layer, rest = name[len("transformer.encoder.layers."):].split(".", 1)
    rest = {"input_layernorm.weight": "attn_norm.weight",
            "self_attention.query_key_value.weight": "attn.qkv.weight",
            "self_attention.query_key_value.bias": "attn.qkv.bias",
            "self_attention.dense.weight": "attn.dense.weight",
            "post_attention_layernorm.weight": "mlp_norm.weight",
            "mlp.dense_h_to_4h.weight": "mlp.up.weight",
            "mlp.dense_4h_to_h.weight": "mlp.down.weight"}[rest]
    return f"layers.{layer}.{rest}"


def _encode(t: torch.Tensor, ggml_type: int) -> np.ndarray:
    if ggml_type == F32:
        return t.float().contiguous().numpy()
    if ggml_type == F16:
        return t.half().contiguous().numpy()
    if t.dim() != 2 or t.shape[1] % QK:
        raise ValueError(f"block formats need a matrix whose rows are a multiple of {QK} wide, got {tuple(t.shape)}")
    rows_per_chunk = max(1, (1 << 24) // t.shape[1])  # bounded fp32 temporaries
    parts = [quantize_q4_0(c) if ggml_type == Q4_0 else quantize_q8_0(c) for c in t.split(rows_per_chunk)]
    return np.concatenate(parts)


def write(path: str | Path, config: Mapping, weight_type: str, tensors: Callable[[str], torch.Tensor],
          *, tokenizer: bytes | None = None, progress: Callable[[str], None] | None = None) -> int:
    """Write the file; ``tensors(name)`` returns each chatglm3 checkpoint tensor (called once per
    name, in file order, so a caller can generate them lazily). ``config`` holds the chatglm3
    config.json keys. Returns the bytes written for matrices (what a decode step reads)."""
    wtype = TYPES[weight_type]
    vocab = int(config["padded_vocab_size"])
    kv = int(config["multi_query_group_num"]) if config.get("multi_query_attention") else int(
        config["num_attention_heads"])
    eos = config.get("eos_token_id")
    head = struct.pack("<4si", b"ggml", MODEL_TYPE_CHATGLM3)
    head += struct.pack("<iiiiiiiififiii", CONFIG_VERSION, wtype, vocab, int(config["hidden_size"]),
                        int(config["num_attention_heads"]), kv, int(config["num_layers"]),
                        int(config["ffn_hidden_size"]), float(config["layernorm_epsilon"]), 0,
                        10000.0 * float(config.get("rope_ratio", 1.0)), int(config["seq_length"]),
                        -1 if eos is None else int(eos), int(config.get("pad_token_id") or 0))
    proto = tokenizer if tokenizer is not None else synthetic_tokenizer(vocab)
    matrix_bytes = 0
    tmp = Path(str(path) + ".part")
    with open(tmp, "wb") as f:
        f.write(head)
        f.write(struct.pack("<i", len(proto)))
        f.write(proto)
        for name, kind in tensor_names(int(config["num_layers"])):
            t = tensors(name)
            gtype = wtype if kind == "matrix" else F32
            raw = name.encode()
            f.write(struct.pack("<i", len(raw)) + raw)
            f.write(struct.pack(f"<{t.dim() + 2}i", t.dim(), *t.shape, gtype))  # ndim, dims, type
            f.write(b"\0" * (-f.tell() % ALIGN))
            data = _encode(t, gtype)
            f.write(data.tobytes())
            if kind == "matrix":
                matrix_bytes += data.nbytes
            if progress is not None:
                progress(name)
            del t, data
    tmp.replace(path)
    return matrix_bytes


def synthetic_tensors(config: Mapping, seed: int = 0) -> Callable[[str], torch.Tensor]:
    """Random chatglm3 tensors of the config's shapes (N(0, 0.02) matrices, norm weights near 1,
    small biases), generated lazily one at a time: for speed runs, where values do not matter."""
    h, ffn = int(config["hidden_size"]), int(config["ffn_hidden_size"])
    heads, kvc = int(config["num_attention_heads"]), int(config["kv_channels"])
    kv = int(config["multi_query_group_num"]) if config.get("multi_query_attention") else heads
    vocab = int(config["padded_vocab_size"])
    shapes = {"word_embeddings.weight": (vocab, h), "output_layer.weight": (vocab, h),
              "query_key_value.weight": ((heads + 2 * kv) * kvc, h), "query_key_value.bias": ((heads + 2 * kv) * kvc,),
              "dense.weight": (h, heads * kvc), "dense_h_to_4h.weight": (2 * ffn, h), "dense_4h_to_h.weight": (h, ffn),
              "layernorm.weight": (h,)}
    gen = torch.Generator().manual_seed(seed)

    def make(name: str) -> torch.Tensor:
        shape = next(s for suffix, s in shapes.items() if name.endswith(suffix))
        t = torch.randn(shape, generator=gen)
        if name.endswith("layernorm.weight"):
            return t.mul_(0.1).add_(1.0)
        return t.mul_(0.02)

    return make


def from_glmrt_weights(weights: Mapping[str, torch.Tensor]) -> Callable[[str], torch.Tensor]:
    """The chatglm3 tensors of a glmrt chatglm3 model's (unquantized) weights."""
    return lambda name: weights[glmrt_name(name)]

