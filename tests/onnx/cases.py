"""Tiny checkpoints of every generation in its released layout, for the ONNX tests.

The writers are the model tests' own (tests/models/ckpt_writers.py, the ChatGLM-6B and GLM-130B
parity modules, the quantized-release writers of tests/unit/test_quant_checkpoints.py).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
for sub in ("models", "unit"):
    p = str(HERE.parent / sub)
    if p not in sys.path:
        sys.path.insert(0, p)

import ckpt_writers as W  # noqa: E402


@dataclass
class Case:
    name: str
    directory: Path
    vocab: int
    # two prompts (lists of ids), the second shorter, as the release's tokenizer builds them
    prompts: list
    load_kwargs: dict = field(default_factory=dict)
    text_range: tuple = (10, 180)


def _hf(kind: str, directory: Path) -> Case:
    cfg = W.hf_glm_config(model_type=kind, num_hidden_layers=2, max_position_embeddings=96)
    W.write_hf_checkpoint(directory, cfg, W.random_hf_glm_state_dict(cfg, seed=3))
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(10, 250, (n,), generator=g).tolist() for n in (9, 5)]
    return Case(kind, directory, cfg["vocab_size"], prompts, text_range=(10, 250))


def _thudm(name: str, directory: Path, rope_ratio: float) -> Case:
    """ChatGLM2/3 (rope_ratio 1) and GLM-4-9B (rope_ratio > 1): THUDM names and config."""
    hf = W.hf_glm_config(model_type="glm", num_hidden_layers=2, max_position_embeddings=96,
                         rope_theta=10000.0 * rope_ratio)
    sd = W.hf_to_thudm(W.random_hf_glm_state_dict(hf, seed=4), hf, rope_ratio=rope_ratio)
    W.write_config(directory, W.thudm_config_from_hf(hf, rope_ratio=rope_ratio))
    W.write_torch_bin(directory, sd, num_shards=2)
    g = torch.Generator().manual_seed(6)
    prompts = [[10, 11] + torch.randint(12, 250, (n,), generator=g).tolist() for n in (8, 3)]
    return Case(name, directory, hf["vocab_size"], prompts, text_range=(10, 250))


def _chatglm6b(directory: Path) -> Case:
    import test_chatglm6b_parity as C
    C.write_checkpoint(directory, C.make_state_dict(seed=2))
    prompts = [C.TEXT_A + [C.GMASK, C.SOP], C.TEXT_B[:2] + [C.MASK] + C.TEXT_B[2:] + [C.SOP]]
    return Case("chatglm-6b", directory, C.VOCAB, prompts)


def _glm130b(directory: Path) -> Case:
    import test_glm130b_parity as G
    G.write_sat(directory, G.split_like_sat(G.make_full_state_dict(seed=1), 8))
    prompts = [G.TEXT + [G.GMASK, G.SOP], G.TEXT[:3] + [G.MASK] + G.MORE[:2] + [G.SOP]]
    return Case("glm-130b", directory, G.VOCAB, prompts, load_kwargs={"token_ids": G.TOKEN_IDS})


CASES = ("glm", "glm4", "chatglm3", "glm-4-9b", "chatglm-6b", "glm-130b")


def make_case(name: str, directory: Path) -> Case:
    if name in ("glm", "glm4"):
        return _hf(name, directory)
    if name == "chatglm3":
        return _thudm(name, directory, 1.0)
    if name == "glm-4-9b":
        return _thudm(name, directory, 2.5)
    if name == "chatglm-6b":
        return _chatglm6b(directory)
    if name == "glm-130b":
        return _glm130b(directory)
    raise ValueError(name)


def quantized_glm130b(directory: Path, bits: int, ranks: int) -> Path:
    """GLM-130B rank files quantized by its own scripts (one scale per row and rank)."""
    import test_quant_checkpoints as Q
    qranks, _ = Q.quantize_ranks(Q.split_ranks(Q.glm130b_state_dict(), ranks), bits)
    return Q.write_sat(directory, qranks, bits)


GLM130B_QUANT_TOKEN_IDS = {"mask": 190, "gmask": 191, "smask": 192, "sop": 194, "eop": 195, "eos": 196}


def left_pad(prompts, pad: int = 0):
    t = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), t), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), t), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, t - len(p):] = torch.tensor(p)
        mask[i, t - len(p):] = 1
    return ids, mask
