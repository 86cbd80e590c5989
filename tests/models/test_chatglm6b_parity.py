"""ChatGLM-6B (first generation) in glmrt against an independent reference written from THUDM's
original modeling_chatglm.py / tokenization_chatglm.py (tests/models/reference_glm_original.py).

A tiny random checkpoint is written in the release's exact layout (config.json with
model_type "chatglm" / position_encoding_2d, HF tensor names, per-head interleaved fused QKV rows,
the ignored rotary_emb.inv_freq buffers, separate lm_head.weight), single-file and sharded. The
reference never calls glmrt; glmrt is only used through its public API.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reference_glm_original import ChatGLM6BReference  # noqa: E402

import glmrt  # noqa: E402  (a broken glmrt must fail these tests, not skip them)
from glmrt.errors import CheckpointError, InputError  # noqa: E402

ATOL = 1e-4
VOCAB, HIDDEN, HEADS, LAYERS, INNER = 200, 64, 4, 2, 128
HEAD_DIM = HIDDEN // HEADS
MASK, GMASK, SOP, EOP, PAD = 190, 191, 194, 195, 3
MAX_SEQ = 256
MAX_NEW = 16
MIN_GREEDY_MARGIN = 1e-3  # below this a greedy mismatch could be a coin toss, not a bug

CONFIG = {
    "model_type": "chatglm", "architectures": ["ChatGLMModel"],
    "vocab_size": VOCAB, "hidden_size": HIDDEN, "num_layers": LAYERS, "num_attention_heads": HEADS,
    "inner_hidden_size": INNER, "layernorm_epsilon": 1e-5, "max_sequence_length": MAX_SEQ,
    "position_encoding_2d": True, "bos_token_id": SOP, "eos_token_id": EOP, "mask_token_id": MASK,
    "gmask_token_id": GMASK, "pad_token_id": PAD, "use_cache": True, "torch_dtype": "float32",
}

_g = torch.Generator().manual_seed(7)
TEXT_A = torch.randint(10, 180, (9,), generator=_g).tolist()
TEXT_B = torch.randint(10, 180, (4,), generator=_g).tolist()
TEXT_C = torch.randint(10, 180, (37,), generator=_g).tolist()
del _g

GMASK_PROMPT = TEXT_A + [GMASK, SOP]                       # text + [gMASK] + <sop>
MASK_PROMPT = TEXT_A[:5] + [MASK] + TEXT_A[5:] + [SOP]      # text + [MASK] + more text + <sop>
LONG_PROMPT = TEXT_C + [GMASK, SOP]                         # larger positions: fp16 tables matter
BATCH = [TEXT_A + [GMASK, SOP], TEXT_B + [GMASK, SOP], TEXT_B[:2] + [MASK] + TEXT_A[:6] + [SOP]]


# ----------------------------------------------------------------------------- checkpoint writing
def make_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the release's names. The fused QKV rows are per-head interleaved
    [q_h | k_h | v_h] -- the reference reads them that way (view(..., np, 3*hn) then split), so
    any loader that assumes [all q | all k | all v] fails the parity tests."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return std * torch.randn(*shape, generator=g)

    sd = {"transformer.word_embeddings.weight": rnd(VOCAB, HIDDEN)}
    inv_freq = (1.0 / (10000 ** (torch.arange(0, HEAD_DIM // 2, 2).float() / (HEAD_DIM // 2)))).half()
    for i in range(LAYERS):
        p = f"transformer.layers.{i}"
        sd[f"{p}.input_layernorm.weight"] = 1.0 + rnd(HIDDEN, std=0.2)
        sd[f"{p}.input_layernorm.bias"] = rnd(HIDDEN, std=0.1)
        sd[f"{p}.attention.query_key_value.weight"] = rnd(3 * HIDDEN, HIDDEN, std=0.3)
        sd[f"{p}.attention.query_key_value.bias"] = rnd(3 * HIDDEN, std=0.1)
        sd[f"{p}.attention.rotary_emb.inv_freq"] = inv_freq.clone()
        sd[f"{p}.attention.dense.weight"] = rnd(HIDDEN, HIDDEN, std=0.2)
        sd[f"{p}.attention.dense.bias"] = rnd(HIDDEN, std=0.1)
        sd[f"{p}.post_attention_layernorm.weight"] = 1.0 + rnd(HIDDEN, std=0.2)
        sd[f"{p}.post_attention_layernorm.bias"] = rnd(HIDDEN, std=0.1)
        sd[f"{p}.mlp.dense_h_to_4h.weight"] = rnd(INNER, HIDDEN, std=0.2)
        sd[f"{p}.mlp.dense_h_to_4h.bias"] = rnd(INNER, std=0.1)
        sd[f"{p}.mlp.dense_4h_to_h.weight"] = rnd(HIDDEN, INNER, std=0.2)
        sd[f"{p}.mlp.dense_4h_to_h.bias"] = rnd(HIDDEN, std=0.1)
    sd["transformer.final_layernorm.weight"] = 1.0 + rnd(HIDDEN, std=0.2)
    sd["transformer.final_layernorm.bias"] = rnd(HIDDEN, std=0.1)
    sd["lm_head.weight"] = rnd(VOCAB, HIDDEN, std=0.3)
    return {k: v.contiguous() for k, v in sd.items()}


def write_checkpoint(directory: Path, sd: dict[str, torch.Tensor], layout: str = "bin",
                     config: dict | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config or CONFIG, indent=2))
    if layout == "bin":
        torch.save(sd, directory / "pytorch_model.bin")
    elif layout == "bin-sharded":  # pytorch_model-0000X-of-0000N.bin + index, as the release ships
        names = list(sd)
        n = 3
        chunks = [names[i::n] for i in range(n)]
        weight_map = {}
        for j, chunk in enumerate(chunks):
            fname = f"pytorch_model-{j + 1:05d}-of-{n:05d}.bin"
            torch.save({k: sd[k] for k in chunk}, directory / fname)
            weight_map.update({k: fname for k in chunk})
        total = sum(t.numel() * t.element_size() for t in sd.values())
        (directory / "pytorch_model.bin.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    else:
        raise ValueError(layout)
    return directory


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def state_dict():
    return make_state_dict()


@pytest.fixture(scope="module")
def reference(state_dict):
    return ChatGLM6BReference(state_dict, CONFIG)


@pytest.fixture(scope="module")
def ckpt_dirs(state_dict, tmp_path_factory):
    return {layout: write_checkpoint(tmp_path_factory.mktemp(f"chatglm6b_{layout}"), state_dict, layout)
            for layout in ("bin", "bin-sharded")}


@pytest.fixture(scope="module")
def models(ckpt_dirs):
    return {layout: glmrt.load(str(d), dtype="float32", progress=False) for layout, d in ckpt_dirs.items()}


@pytest.fixture(scope="module")
def model(models):
    return models["bin"]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b.float().cpu()).abs().max())


# ----------------------------------------------------------------------------- logits
@pytest.mark.parametrize("layout", ["bin", "bin-sharded"])
@pytest.mark.parametrize("prompt", [GMASK_PROMPT, MASK_PROMPT, LONG_PROMPT], ids=["gmask", "mask", "long"])
def test_logits_match_original(models, reference, layout, prompt):
    ids = torch.tensor([prompt])
    ref = reference.forward(ids)  # the model builds get_masks / get_position_ids itself
    got = models[layout].logits(ids)
    assert got.shape == (1, len(prompt), VOCAB)
    assert got.dtype == torch.float32
    assert _max_diff(got, ref) <= ATOL


def test_reference_positions_follow_the_original_rules(reference):
    """Sanity of the reference itself against GLM_FAMILY.md's worked example:
    t0 t1 t2 t3 [gMASK] <sop> -> positions [0,1,2,3,4,4], blocks [0,0,0,0,0,1]."""
    ids = torch.tensor([[11, 12, 13, 14, GMASK, SOP]])
    mask, pos = reference.model_inputs(ids)
    assert pos[0, 0].tolist() == [0, 1, 2, 3, 4, 4]
    assert pos[0, 1].tolist() == [0, 0, 0, 0, 0, 1]
    allowed = ~mask[0, 0]
    assert bool(allowed[:, :5].all())          # bidirectional context before <sop>
    assert not bool(allowed[:5, 5].any())      # <sop> is not visible to the context
    m2, p2 = reference.update_for_generation(mask, pos)
    assert p2[0, 0].tolist()[-1] == 4 and p2[0, 1].tolist()[-1] == 2


def test_residual_alpha_is_hard_coded_28(model, reference, state_dict):
    """The original GLMBlock defaults num_layers=28 and ChatGLMModel.get_layer never passes the
    config's num_layers: alpha = sqrt(56) even for this 2-layer checkpoint. A runtime using
    sqrt(2 * num_layers) is measurably off."""
    ids = torch.tensor([GMASK_PROMPT])

    class NumLayersAlpha(ChatGLM6BReference):
        RESIDUAL_NUM_LAYERS = LAYERS

    wrong = NumLayersAlpha(state_dict, CONFIG).forward(ids)
    got = model.logits(ids)
    assert _max_diff(wrong, reference.forward(ids)) > 1e-2  # the two alphas are distinguishable here
    assert _max_diff(got, reference.forward(ids)) <= ATOL


def test_rope_tables_follow_the_model_dtype_like_the_original(model, reference, state_dict):
    """The original rounds inv_freq to fp16 in its constructor but builds cos/sin at run time in
    the dtype the buffer has then: in this float32 model (`model.float()`) the positions times the
    fp16-rounded frequencies, and cos/sin, are fp32. A table kept in fp16 (glmrt's old rule)
    differs by more than the tolerance on the long prompt."""
    ids = torch.tensor([LONG_PROMPT])
    fp16_tables = ChatGLM6BReference(state_dict, CONFIG, rope_precision="half").forward(ids)
    ref = reference.forward(ids)
    assert _max_diff(fp16_tables, ref) > ATOL  # the test can tell the two apart
    assert _max_diff(model.logits(ids), ref) <= ATOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dim", [HEAD_DIM // 2, 64, 128])  # this test's 2-D halves, ChatGLM-6B's, GLM-130B's
def test_rope_tables_equal_the_originals_in_every_dtype(dtype, dim):
    """glmrt's tables (every backend's kernels read them) are the original RotaryEmbedding's rows,
    bit for bit, in each dtype the model can run in: fp16 throughout in fp16, fp32 products of
    the fp16 frequencies in fp32, bf16 frequencies, positions (rounded above 256) and cos/sin in bf16."""
    from glmrt.ops import rope_tables

    from reference_glm_original import RotaryEmbedding
    positions = torch.tensor([[0, 1, 5, 37, 255, 257, 300, 1000, 2047], [2047, 3, 2, 1, 0, 0, 9, 99, 513]])
    cos, sin = RotaryEmbedding(dim)(torch.zeros(1, dtype=dtype), seq_len=2048)  # [S, 1, dim]
    got_cos, got_sin = rope_tables(positions, dim, 10000.0, dtype, "float16")  # (B, T, dim / 2)
    assert got_cos.dtype == got_sin.dtype == dtype
    assert torch.equal(got_cos, cos[positions, 0, : dim // 2])
    assert torch.equal(got_sin, sin[positions, 0, : dim // 2])


def test_rotary_inv_freq_in_checkpoint_is_ignored(state_dict, reference, tmp_path):
    """The original's RotaryEmbedding._load_from_state_dict is a no-op: whatever the checkpoint's
    inv_freq holds, it is not used."""
    sd = dict(state_dict)
    for i in range(LAYERS):
        sd[f"transformer.layers.{i}.attention.rotary_emb.inv_freq"] = torch.full((HEAD_DIM // 4,), 123.0).half()
    m = glmrt.load(str(write_checkpoint(tmp_path / "ck", sd)), dtype="float32", progress=False)
    ids = torch.tensor([GMASK_PROMPT])
    assert _max_diff(m.logits(ids), reference.forward(ids)) <= ATOL


# ----------------------------------------------------------------------------- padding
def _left_pad_2d(prompts):
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), PAD, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(p)
        mask[i, T - len(p):] = 1
    return ids, mask


def test_left_padded_batch_logits_match_tokenizer_padding(model, reference):
    """The original tokenizer's _pad: per prompt mask/positions, then pad rows/columns masked and
    position ids 0 on the left. Every real position of every row must match."""
    ids_ref, mask4d, pos = reference.tokenizer_pad(BATCH)
    ref = reference.forward(ids_ref, pos, mask4d)
    ids, mask = _left_pad_2d(BATCH)
    assert torch.equal(ids, ids_ref)
    got = model.logits(ids, attention_mask=mask)
    real = mask.bool()
    assert _max_diff(got[real], ref[real]) <= ATOL
    # and each row equals its unpadded single-prompt logits
    for i, p in enumerate(BATCH):
        single = reference.forward(torch.tensor([p]))[0]
        assert _max_diff(got[i][real[i]], single) <= ATOL


# ----------------------------------------------------------------------------- generation
@pytest.mark.parametrize("prompt", [GMASK_PROMPT, MASK_PROMPT], ids=["gmask", "mask"])
def test_greedy_generate_matches_original_loop(model, reference, prompt):
    ref_ids, _, margins = reference.greedy_generate([prompt], MAX_NEW)
    assert min(margins) > MIN_GREEDY_MARGIN, "reference greedy steps too close to a tie to compare"
    got = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW)
    assert got.tolist() == ref_ids.tolist()


def test_greedy_generate_left_padded_batch(model, reference):
    ref_ids, pad_mask, margins = reference.greedy_generate(BATCH, MAX_NEW)
    assert min(margins) > MIN_GREEDY_MARGIN, "reference greedy steps too close to a tie to compare"
    ids, mask = _left_pad_2d(BATCH)
    assert torch.equal(mask, pad_mask)
    got = model.generate(ids, max_new_tokens=MAX_NEW, attention_mask=mask)
    assert got.tolist() == ref_ids.tolist()


def test_generate_stops_at_eop(model, reference):
    """With <eop> as eos the original stops; force a stop by declaring the first greedy token eos."""
    ref_ids, _, _ = reference.greedy_generate([GMASK_PROMPT], MAX_NEW)
    first = int(ref_ids[0, len(GMASK_PROMPT)])
    ref_stop, _, _ = reference.greedy_generate([GMASK_PROMPT], MAX_NEW, eos_token_id=first)
    got = model.generate(torch.tensor([GMASK_PROMPT]), max_new_tokens=MAX_NEW, eos_token_id=first)
    assert got.tolist() == ref_stop.tolist() == [GMASK_PROMPT + [first]]


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("prompt", [TEXT_A, TEXT_A + [GMASK], TEXT_A + [SOP]], ids=["plain", "no-sop", "no-gmask"])
def test_prompts_without_gmask_and_sop_raise_input_error(model, prompt):
    with pytest.raises(InputError):
        model.logits(torch.tensor([prompt]))
    with pytest.raises(InputError):
        model.generate(torch.tensor([prompt]), max_new_tokens=2)


def test_missing_shard_raises_checkpoint_error(state_dict, tmp_path):
    d = write_checkpoint(tmp_path / "ck", state_dict, "bin-sharded")
    (d / "pytorch_model-00002-of-00003.bin").unlink()
    with pytest.raises(CheckpointError):
        glmrt.load(str(d), dtype="float32", progress=False)


def test_corrupt_bin_raises_checkpoint_error(state_dict, tmp_path):
    d = write_checkpoint(tmp_path / "ck", state_dict, "bin")
    data = (d / "pytorch_model.bin").read_bytes()
    (d / "pytorch_model.bin").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError):
        glmrt.load(str(d), dtype="float32", progress=False)


def test_missing_tensor_raises_checkpoint_error(state_dict, tmp_path):
    sd = {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
    with pytest.raises(CheckpointError):
        glmrt.load(str(write_checkpoint(tmp_path / "ck", sd)), dtype="float32", progress=False)


def test_mis_shaped_fused_qkv_raises_checkpoint_error(state_dict, tmp_path):
    """A fused QKV with the wrong number of rows (config and weights disagree) is a bad checkpoint:
    CheckpointError, like any other mis-shaped tensor -- not a RuntimeError from reshaping it."""
    sd = dict(state_dict)
    name = "transformer.layers.1.attention.query_key_value.weight"
    sd[name] = sd[name][:-HEAD_DIM].clone()
    with pytest.raises(CheckpointError):
        glmrt.load(str(write_checkpoint(tmp_path / "ck", sd)), dtype="float32", progress=False)


# ----------------------------------------------------------------------------- synthetic preset
def test_synthetic_chatglm6b_builds_and_generates():
    m = glmrt.load("synthetic:chatglm-6b", layers=1, dtype="float32", progress=False)
    prompt = [5, 6, 7, 130001, 130004]  # text + [gMASK] + <sop> with the release's ids
    out = m.generate(torch.tensor([prompt]), max_new_tokens=2)
    assert out.shape == (1, len(prompt) + 2)
    assert out[0, : len(prompt)].tolist() == prompt
    assert int(out.min()) >= 0 and int(out.max()) < 130528
    with pytest.raises(InputError):
        m.logits(torch.tensor([[5, 6, 7]]))
