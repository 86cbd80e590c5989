"""GLM-130B in glmrt against an independent reference written from SwissArmyTransformer's
glm130B_model.py and the GLM-130B repository's generate.py (tests/models/reference_glm_original.py).

Tiny random checkpoints are written as SwissArmyTransformer directories the way the release is laid
out: `latest`, `<iter>/mp_rank_XX_model_states.pt` holding `{"module": state_dict}`, split over 1 or
8 tensor-parallel ranks exactly as SAT's parallel layers (and the GLM-130B repo's
tools/convert_tp.py) split them, plus a model-arguments script shaped like configs/model_glm_130b.sh.
The reference runs the 8 ranks as SAT would (per-rank heads, row-parallel partial sums, GEGLU on
each rank's [x1_shard; x2_shard], vocab-parallel embedding and logits) -- it never merges shards and
never calls glmrt.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reference_glm_original import GLM130BReference  # noqa: E402

import glmrt  # noqa: E402  (a broken glmrt must fail these tests, not skip them)
from glmrt.errors import CheckpointError, InputError  # noqa: E402

ATOL = 1e-4
VOCAB, HIDDEN, HEADS, LAYERS, INNER = 200, 64, 8, 2, 128
HEAD_DIM = HIDDEN // HEADS
MAX_SEQ = 256
MAX_NEW = 16
MIN_GREEDY_MARGIN = 1e-3
ITERATION = "1000"

# Small special ids for the tiny vocabulary (icetk's are 150000+).
MASK, GMASK, SMASK, SOP, EOP, EOS = 190, 191, 192, 194, 195, 196
TOKEN_IDS = {"mask": MASK, "gmask": GMASK, "smask": SMASK, "sop": SOP, "eop": EOP, "eos": EOS}
END_TOKENS = (EOP, EOS)  # generate.py: end_tokens = [eop, eos]

_g = torch.Generator().manual_seed(11)
TEXT = torch.randint(10, 180, (9,), generator=_g).tolist()
MORE = torch.randint(10, 180, (5,), generator=_g).tolist()
LONG = torch.randint(10, 180, (40,), generator=_g).tolist()
del _g

GMASK_PROMPT = TEXT + [GMASK, SOP]                    # text + [gMASK] + <sop>
MASK_PROMPT = TEXT + [MASK] + MORE + [SOP]            # text + [MASK] + more text + <sop>
MASK_EOS_PROMPT = TEXT + [MASK] + MORE + [EOS, SOP]   # what fill_blanks builds for "text [MASK] more"
LONG_PROMPT = LONG + [GMASK, SOP]
PROMPTS = {"gmask": GMASK_PROMPT, "mask": MASK_PROMPT, "mask-eos": MASK_EOS_PROMPT, "long": LONG_PROMPT}


# ----------------------------------------------------------------------------- checkpoint writing
def make_full_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """The single-rank (MP 1) state dict: per-head interleaved QKV rows, dense_h_to_4h = [x1; x2]."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return std * torch.randn(*shape, generator=g)

    sd = {"transformer.word_embeddings.weight": rnd(VOCAB, HIDDEN, std=0.3)}
    for i in range(LAYERS):
        p = f"transformer.layers.{i}"
        sd[f"{p}.input_layernorm.weight"] = 1.0 + rnd(HIDDEN, std=0.2)
        sd[f"{p}.input_layernorm.bias"] = rnd(HIDDEN, std=0.1)
        sd[f"{p}.attention.query_key_value.weight"] = rnd(3 * HIDDEN, HIDDEN, std=0.3)
        sd[f"{p}.attention.query_key_value.bias"] = rnd(3 * HIDDEN, std=0.1)
        sd[f"{p}.attention.dense.weight"] = rnd(HIDDEN, HIDDEN, std=0.2)
        sd[f"{p}.attention.dense.bias"] = rnd(HIDDEN, std=0.1)
        sd[f"{p}.post_attention_layernorm.weight"] = 1.0 + rnd(HIDDEN, std=0.2)
        sd[f"{p}.post_attention_layernorm.bias"] = rnd(HIDDEN, std=0.1)
        sd[f"{p}.mlp.dense_h_to_4h.weight"] = rnd(2 * INNER, HIDDEN, std=0.2)
        sd[f"{p}.mlp.dense_h_to_4h.bias"] = rnd(2 * INNER, std=0.1)
        sd[f"{p}.mlp.dense_4h_to_h.weight"] = rnd(HIDDEN, INNER, std=0.2)
        sd[f"{p}.mlp.dense_4h_to_h.bias"] = rnd(HIDDEN, std=0.1)
    sd["transformer.final_layernorm.weight"] = 1.0 + rnd(HIDDEN, std=0.2)
    sd["transformer.final_layernorm.bias"] = rnd(HIDDEN, std=0.1)
    return {k: v.contiguous() for k, v in sd.items()}


def split_like_sat(full: dict[str, torch.Tensor], P: int) -> list[dict[str, torch.Tensor]]:
    """Shard as SAT's parallel layers hold them (cf. GLM-130B tools/convert_tp.py): embedding rows,
    QKV rows by heads (each rank: its heads, still interleaved), attention.dense / dense_4h_to_h
    columns with replicated bias, dense_h_to_4h GLU-split ([x1_shard; x2_shard]), norms replicated."""
    ranks: list[dict[str, torch.Tensor]] = [{} for _ in range(P)]
    for name, t in full.items():
        for r in range(P):
            if name.endswith("word_embeddings.weight") or ".query_key_value." in name:
                part = t.chunk(P, dim=0)[r]
            elif ".dense_h_to_4h." in name:
                x1, x2 = t.chunk(2, dim=0)
                part = torch.cat([x1.chunk(P, dim=0)[r], x2.chunk(P, dim=0)[r]], dim=0)
            elif name.endswith("attention.dense.weight") or name.endswith("dense_4h_to_h.weight"):
                part = t.chunk(P, dim=1)[r]
            else:
                part = t
            ranks[r][name] = part.clone().contiguous()
    return ranks


def model_args_script(mp_size: int, precision_flag: str = "--fp16") -> str:
    """configs/model_glm_130b.sh with the tiny widths."""
    return (
        'MODEL_TYPE="glm-130b"\n'
        'CHECKPOINT_PATH="/path/to/glm-130b-sat"\n'
        f"MP_SIZE={mp_size}\n"
        'MODEL_ARGS="--model-parallel-size ${MP_SIZE} \\\n'
        f"            --num-layers {LAYERS} \\\n"
        f"            --hidden-size {HIDDEN} \\\n"
        f"            --inner-hidden-size {INNER} \\\n"
        f"            --vocab-size {VOCAB} \\\n"
        f"            --num-attention-heads {HEADS} \\\n"
        f"            --max-sequence-length {MAX_SEQ} \\\n"
        "            --tokenizer-type icetk-glm-130B \\\n"
        "            --layernorm-order post \\\n"
        "            --load ${CHECKPOINT_PATH} \\\n"
        "            --skip-init \\\n"
        f'            {precision_flag}"\n'
    )


def write_sat(directory: Path, ranks: list[dict[str, torch.Tensor]], mp_size: int | None = None,
              precision_flag: str = "--fp16") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "latest").write_text(ITERATION)
    (directory / ITERATION).mkdir(exist_ok=True)
    for r, sd in enumerate(ranks):
        torch.save({"module": sd}, directory / ITERATION / f"mp_rank_{r:02d}_model_states.pt")
    (directory / "model_glm_130b.sh").write_text(model_args_script(mp_size or len(ranks), precision_flag))
    return directory


def load(directory: Path):
    return glmrt.load(str(directory), dtype="float32", token_ids=TOKEN_IDS, progress=False)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def full_sd():
    return make_full_state_dict()


@pytest.fixture(scope="module")
def ranks8(full_sd):
    return split_like_sat(full_sd, 8)


@pytest.fixture(scope="module")
def reference(ranks8):
    return GLM130BReference(ranks8, LAYERS, HIDDEN, HEADS)


@pytest.fixture(scope="module")
def sat_dirs(full_sd, ranks8, tmp_path_factory):
    return {1: write_sat(tmp_path_factory.mktemp("glm130b_mp1"), [full_sd]),
            8: write_sat(tmp_path_factory.mktemp("glm130b_mp8"), ranks8)}


@pytest.fixture(scope="module")
def models(sat_dirs):
    return {mp: load(d) for mp, d in sat_dirs.items()}


@pytest.fixture(scope="module")
def model(models):
    return models[8]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b.float().cpu()).abs().max())


# ----------------------------------------------------------------------------- reference self-checks
def test_reference_tensor_parallel_equals_single_rank(full_sd, reference):
    """The sharding written here is SAT's: the 8-rank simulation equals the 1-rank model."""
    one = GLM130BReference([full_sd], LAYERS, HIDDEN, HEADS)
    for prompt in PROMPTS.values():
        assert _max_diff(one.logits_for_prompt(prompt, MASK, GMASK),
                         reference.logits_for_prompt(prompt, MASK, GMASK)) <= ATOL  # fp32 sum order only


def test_reference_masks_and_positions_follow_generate_py():
    seq = torch.tensor([[11, 12, MASK, 13, 14, SOP]])
    tokens, mask, pos = GLM130BReference.get_masks_and_position_ids(seq, 2, 3, gmask=False)
    assert pos[0].tolist() == [0, 1, 2, 3, 4, 2, 2, 2, 2]  # from <sop> on: the [MASK] index
    allowed = ~mask[0, 0]
    assert bool(allowed[:, :5].all()) and not bool(allowed[:5, 5:].any())
    _, _, pos_g = GLM130BReference.get_masks_and_position_ids(seq, 2, 3, gmask=True)
    assert pos_g[0].tolist() == list(range(9))


# ----------------------------------------------------------------------------- logits
@pytest.mark.parametrize("mp", [1, 8])
@pytest.mark.parametrize("name", list(PROMPTS))
def test_logits_match_original(models, reference, mp, name):
    prompt = PROMPTS[name]
    ref = reference.logits_for_prompt(prompt, MASK, GMASK)
    got = models[mp].logits(torch.tensor([prompt]))
    assert got.shape == (1, len(prompt), VOCAB)
    assert got.dtype == torch.float32
    assert _max_diff(got, ref) <= ATOL


def test_one_rank_and_eight_ranks_give_identical_logits(models):
    for prompt in PROMPTS.values():
        ids = torch.tensor([prompt])
        a, b = models[1].logits(ids), models[8].logits(ids)
        assert torch.equal(a, b), _max_diff(a, b)


def test_rope_tables_follow_the_model_dtype_like_the_original(model, reference, ranks8):
    """SAT's RotaryEmbedding rounds inv_freq to fp16 (a registered buffer) and builds the table in
    the buffer's dtype at run time: fp16 in the released `.half()` model, fp32 products of the
    fp16-rounded frequencies in this float32 one. A table kept in fp16 differs by more than the
    tolerance here."""
    fp16_tables = GLM130BReference(ranks8, LAYERS, HIDDEN, HEADS, rope_precision="half")
    ref = reference.logits_for_prompt(LONG_PROMPT, MASK, GMASK)
    assert _max_diff(fp16_tables.logits_for_prompt(LONG_PROMPT, MASK, GMASK), ref) > ATOL
    assert _max_diff(model.logits(torch.tensor([LONG_PROMPT])), ref) <= ATOL


def test_rope_frequencies_are_fp16_rounded_even_without_the_fp16_flag(ranks8, reference, tmp_path):
    """SwissArmyTransformer's RotaryEmbedding casts inv_freq to half unconditionally (precision only
    changes the bf16 path): a script without --fp16 still gets the fp16-rounded frequencies."""
    m = load(write_sat(tmp_path / "sat", ranks8, precision_flag="--skip-init"))
    ref = reference.logits_for_prompt(LONG_PROMPT, MASK, GMASK)
    assert _max_diff(m.logits(torch.tensor([LONG_PROMPT])), ref) <= ATOL


def test_plain_mask_takes_precedence_over_gmask(model, reference):
    """generate.py/fill_blanks: generation_mask = "[MASK]" if "[MASK]" in raw_text else "[gMASK]".
    With both in the prompt, the blank filled is the [MASK]: positions from <sop> on are the
    [MASK] index (not a plain arange)."""
    prompt = TEXT[:4] + [MASK] + TEXT[4:] + [GMASK, SOP]
    ref = reference.logits_for_prompt(prompt, MASK, GMASK)
    got = model.logits(torch.tensor([prompt]))
    assert _max_diff(got, ref) <= ATOL


def test_left_padded_batch_rows_equal_their_unpadded_prompts(model, reference):
    """Padding is invisible: every real position of a left-padded row has the logits the original
    computes for the unpadded prompt (positions counted from the first real token)."""
    batch = [GMASK_PROMPT, MASK_PROMPT, TEXT[:3] + [GMASK, SOP]]
    T = max(len(p) for p in batch)
    ids = torch.full((len(batch), T), EOS, dtype=torch.long)
    mask = torch.zeros((len(batch), T), dtype=torch.long)
    for i, p in enumerate(batch):
        ids[i, T - len(p):] = torch.tensor(p)
        mask[i, T - len(p):] = 1
    got = model.logits(ids, attention_mask=mask)
    for i, p in enumerate(batch):
        ref = reference.logits_for_prompt(p, MASK, GMASK)[0]
        assert _max_diff(got[i][mask[i].bool()], ref) <= ATOL


def test_release_layout_with_per_layer_rotary_inv_freq_loads(full_sd, reference, tmp_path):
    """The released SAT checkpoint carries `transformer.layers.N.attention.rotary_emb.inv_freq`
    in every rank: GLM-130B's tools/convert_tp.py lists "attention.rotary_emb.inv_freq" among its
    SEQUENTIAL_LAYERS (copied unchanged between ranks). SAT's RotaryEmbedding ignores it
    (_load_from_state_dict is a no-op), so a loader must too."""
    inv_freq = (1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))).half()
    ranks = split_like_sat(full_sd, 8)
    for sd in ranks:
        for i in range(LAYERS):
            sd[f"transformer.layers.{i}.attention.rotary_emb.inv_freq"] = inv_freq.clone()
    m = load(write_sat(tmp_path / "sat", ranks))
    ids = torch.tensor([GMASK_PROMPT])
    assert _max_diff(m.logits(ids), reference.logits_for_prompt(GMASK_PROMPT, MASK, GMASK)) <= ATOL


SAT_MIXIN_INV_FREQ = "mixins.rotary-embedding.rotary_emb.inv_freq"


@pytest.mark.parametrize("ranks", [8, 1])
def test_sat_0_2_12_layout_with_the_rotary_mixin_buffer_loads(full_sd, reference, tmp_path, ranks):
    """SwissArmyTransformer 0.2.12 (the version GLM-130B pins) builds GLM130B with
    add_mixin('rotary-embedding', RotaryEmbeddingMixin(...)); BaseModel keeps mixins in a ModuleDict
    `mixins`, so the RotaryEmbedding's inv_freq buffer is saved once per rank as
    `mixins.rotary-embedding.rotary_emb.inv_freq`. GLM-130B's tools/convert_tp.py does not list it
    among the replicated tensors, so merging ranks concatenates it (8 x head_dim/2 in one file). SAT
    never loads it back (RotaryEmbedding._load_from_state_dict is a no-op): any shape is ignored."""
    inv_freq = (1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))).half()
    shards = split_like_sat(full_sd, 8)
    if ranks == 1:  # what convert_tp.py --target-tp 1 writes: every tensor merged, inv_freq concatenated
        shards = [dict(full_sd, **{SAT_MIXIN_INV_FREQ: torch.cat([inv_freq] * 8)})]
    else:
        for sd in shards:
            sd[SAT_MIXIN_INV_FREQ] = inv_freq.clone()
    m = load(write_sat(tmp_path / "sat", shards))
    ids = torch.tensor([GMASK_PROMPT])
    assert _max_diff(m.logits(ids), reference.logits_for_prompt(GMASK_PROMPT, MASK, GMASK)) <= ATOL


@pytest.mark.parametrize("name", ["mixins.rotary-embedding.rotary_emb.weight", "mixins.other.rotary_emb.inv_freq",
                                  "transformer.rotary_emb.inv_freq", "transformer.layers.0.rotary_emb.inv_freq"])
def test_only_the_known_spellings_of_the_rotary_buffer_are_ignored(full_sd, tmp_path, name):
    sd = dict(full_sd, **{name: torch.ones(HEAD_DIM // 2, dtype=torch.float16)})
    with pytest.raises(CheckpointError, match="unexpected tensor.*" + name.replace(".", r"\.")):
        load(write_sat(tmp_path / "sat", [sd]))


# ----------------------------------------------------------------------------- generation
@pytest.mark.parametrize("mp", [1, 8])
@pytest.mark.parametrize("name", ["gmask", "mask", "mask-eos"])
def test_greedy_generate_matches_original_loop(models, reference, mp, name):
    prompt = PROMPTS[name]
    ref_ids, margins = reference.greedy_generate(prompt, MAX_NEW, MASK, GMASK, END_TOKENS)
    assert min(margins) > MIN_GREEDY_MARGIN, "reference greedy steps too close to a tie to compare"
    got = models[mp].generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW)
    assert got[0].tolist() == ref_ids


def test_greedy_generate_left_padded_batch_rows_equal_single_prompts(model, reference):
    batch = [GMASK_PROMPT, MASK_PROMPT, TEXT[:3] + [GMASK, SOP]]
    T = max(len(p) for p in batch)
    ids = torch.full((len(batch), T), EOS, dtype=torch.long)
    mask = torch.zeros((len(batch), T), dtype=torch.long)
    for i, p in enumerate(batch):
        ids[i, T - len(p):] = torch.tensor(p)
        mask[i, T - len(p):] = 1
    # One more end token, taken from the first row's own continuation, so that row stops early
    # while the others run on.
    first, _ = reference.greedy_generate(batch[0], MAX_NEW, MASK, GMASK, END_TOKENS)
    end_tokens = (*END_TOKENS, first[len(batch[0]) + 4])
    got = model.generate(ids, max_new_tokens=MAX_NEW, attention_mask=mask, pad_token_id=EOS,
                         eos_token_id=list(end_tokens))
    # Whole rows: each row is the reference's own greedy continuation of that prompt alone (up to
    # and including its end token), then pad ids while longer rows run on; the batch is as long as
    # its longest row. A row that stops early or runs past its end token fails.
    refs = []
    for p in batch:
        ref_ids, margins = reference.greedy_generate(p, MAX_NEW, MASK, GMASK, end_tokens)
        assert min(margins) > MIN_GREEDY_MARGIN, "reference greedy steps too close to a tie to compare"
        refs.append(ref_ids[len(p):])
    longest = max(len(r) for r in refs)
    assert min(len(r) for r in refs) < longest  # test setup: a row ends before the others
    assert got.shape == (len(batch), T + longest)
    for i, new_ref in enumerate(refs):
        assert got[i, T:].tolist() == new_ref + [EOS] * (longest - len(new_ref)), i


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("prompt", [TEXT, TEXT + [GMASK], TEXT + [SOP], TEXT + [MASK] + MORE],
                         ids=["plain", "gmask-no-sop", "sop-no-mask", "mask-no-sop"])
def test_prompts_without_mask_and_sop_raise_input_error(model, prompt):
    with pytest.raises(InputError):
        model.logits(torch.tensor([prompt]))
    with pytest.raises(InputError):
        model.generate(torch.tensor([prompt]), max_new_tokens=2)


def test_missing_rank_file_raises_checkpoint_error(ranks8, tmp_path):
    d = write_sat(tmp_path / "sat", ranks8)
    (d / ITERATION / "mp_rank_05_model_states.pt").unlink()
    with pytest.raises(CheckpointError):
        load(d)


def test_missing_last_rank_file_raises_checkpoint_error(ranks8, tmp_path):
    d = write_sat(tmp_path / "sat", ranks8)
    (d / ITERATION / "mp_rank_07_model_states.pt").unlink()
    with pytest.raises(CheckpointError):
        load(d)


def test_corrupt_rank_file_raises_checkpoint_error(ranks8, tmp_path):
    d = write_sat(tmp_path / "sat", ranks8)
    f = d / ITERATION / "mp_rank_03_model_states.pt"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load(d)


def test_garbage_rank_file_raises_checkpoint_error(ranks8, tmp_path):
    d = write_sat(tmp_path / "sat", ranks8)
    (d / ITERATION / "mp_rank_07_model_states.pt").write_bytes(b"not a torch pickle" * 100)
    with pytest.raises(CheckpointError):
        load(d)


def test_rank_file_with_more_than_tensors_is_refused_as_unsafe_not_corrupt(full_sd, tmp_path):
    import argparse
    d = write_sat(tmp_path / "sat", [full_sd])
    f = d / ITERATION / "mp_rank_00_model_states.pt"
    torch.save({"module": full_sd, "args": argparse.Namespace(fp16=True)}, f)
    with pytest.raises(CheckpointError) as e:
        load(d)
    assert "mp_rank_00_model_states.pt" in str(e.value) and "weights_only" in str(e.value)
    assert "corrupt" not in str(e.value)


def test_rank_count_disagreeing_with_script_raises_checkpoint_error(full_sd, tmp_path):
    """SAT with --model-parallel-size 8 opens mp_rank_00..07; a directory with one rank file does
    not hold that checkpoint. The script is the release's shape: MODEL_ARGS="--model-parallel-size
    ${MP_SIZE} ... (the flag is the first word inside the quotes)."""
    d = write_sat(tmp_path / "sat", [full_sd], mp_size=8)  # script says 8 ranks, one file
    with pytest.raises(CheckpointError):
        load(d)


def test_latest_naming_missing_iteration_raises_checkpoint_error(ranks8, tmp_path):
    d = write_sat(tmp_path / "sat", ranks8)
    (d / "latest").write_text("2000")
    with pytest.raises(CheckpointError):
        load(d)


# ----------------------------------------------------------------------------- synthetic preset
SLOW = os.environ.get("GLMRT_SLOW") == "1"


@pytest.mark.slow
@pytest.mark.skipif(not SLOW, reason="synthetic:glm-130b (12288 wide, ~15 GB in fp32): set GLMRT_SLOW=1")
def test_synthetic_glm130b_builds_and_generates():
    m = glmrt.load("synthetic:glm-130b", layers=1, dtype="float32", progress=False)
    prompt = [5, 6, 7, 150001, 150004]  # text + [gMASK] + <sop> with icetk's ids
    out = m.generate(torch.tensor([prompt]), max_new_tokens=2)
    assert out.shape == (1, len(prompt) + 2)
    assert out[0, : len(prompt)].tolist() == prompt
    assert int(out.min()) >= 0 and int(out.max()) < 150528
    with pytest.raises(InputError):
        m.logits(torch.tensor([[5, 6, 7]]))
