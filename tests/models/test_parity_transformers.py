"""Whole-model parity of glmrt against the transformers package, for `glm` and `glm4`.

The reference is transformers' own GlmForCausalLM / Glm4ForCausalLM (fp32, eager attention) on a
tiny random model saved with save_pretrained; glmrt loads that directory. Logits must agree to
1e-4, greedy generation token for token (with and without early stops at eos, single prompts and
left-padded batches), and `stream` must yield what `generate` returns.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("transformers")  # the reference implementation

from ckpt_writers import (BATCH_PROMPTS, MAX_NEW, MIN_GREEDY_MARGIN, PAD_ID, VOCAB,  # noqa: E402
                          greedy_margins, hf_generate, hf_logits, left_pad)

import glmrt  # noqa: E402  (a broken glmrt must fail these tests, not skip them)

ATOL = 1e-4


@pytest.fixture(scope="module")
def rt(hf_case):
    return glmrt.load(str(hf_case.path), dtype="float32")


def _ones(ids: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(ids)


def _single(prompt: list[int]) -> torch.Tensor:
    return torch.tensor([prompt], dtype=torch.long)


def _assert_close_logits(got: torch.Tensor, want: torch.Tensor, where: str = ""):
    assert got.dtype == torch.float32, f"logits must be returned as float32, got {got.dtype}"
    assert got.shape == want.shape, f"{where}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    diff = (got - want).abs()
    assert diff.max().item() <= ATOL, (
        f"{where}: max |glmrt - transformers| = {diff.max().item():.3e} "
        f"at index {tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))}")


def _assert_same_tokens(got: torch.Tensor, want: torch.Tensor, where: str = ""):
    assert got.dtype == torch.long, f"{where}: generate must return a LongTensor, got {got.dtype}"
    if got.shape == want.shape and torch.equal(got, want):
        return
    msg = f"{where}: glmrt {tuple(got.shape)} vs transformers {tuple(want.shape)}\nglmrt:\n{got}\ntransformers:\n{want}"
    if got.shape == want.shape:
        bad = (got != want).nonzero()
        msg += f"\nfirst mismatch at (row, col) = {tuple(bad[0].tolist())}"
    pytest.fail(msg)


# ------------------------------------------------------------------------------------------------
# the model object


def test_config_is_glmconfig_dataclass(rt, hf_case):
    assert dataclasses.is_dataclass(rt.config) and not isinstance(rt.config, type)
    assert type(rt.config).__name__ == "GLMConfig"
    assert isinstance(rt.config, glmrt.GLMConfig)


def test_saved_checkpoint_reloads_in_transformers(hf_case):
    """The writer side: what glmrt reads is a checkpoint transformers itself reloads unchanged."""
    import transformers
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(hf_case.path), attn_implementation="eager")
    ids = _single(BATCH_PROMPTS[1])
    assert torch.equal(hf_logits(reloaded.eval(), ids), hf_logits(hf_case.model, ids))
    assert reloaded.config.eos_token_id == hf_case.eos_ids


# ------------------------------------------------------------------------------------------------
# logits


def test_logits_single_prompt(rt, hf_case):
    ids = _single(BATCH_PROMPTS[1])
    got = rt.logits(ids)
    _assert_close_logits(got, hf_logits(hf_case.model, ids), f"{hf_case.kind} single prompt")


def test_logits_single_prompt_with_full_mask(rt, hf_case):
    ids = _single(BATCH_PROMPTS[0])
    got = rt.logits(ids, attention_mask=_ones(ids))
    _assert_close_logits(got, hf_logits(hf_case.model, ids), f"{hf_case.kind} single prompt, mask of ones")


def test_logits_left_padded_batch(rt, hf_case):
    ids, mask = left_pad(BATCH_PROMPTS)
    got = rt.logits(ids, attention_mask=mask)
    assert got.shape == (len(BATCH_PROMPTS), ids.shape[1], VOCAB)
    assert got.dtype == torch.float32
    want = hf_logits(hf_case.model, ids, mask)
    real = mask.bool()
    _assert_close_logits(got[real], want[real], f"{hf_case.kind} left-padded batch, non-pad positions")
    # Each row, unpadded and alone, gives the same logits: padding changes nothing.
    for r, prompt in enumerate(BATCH_PROMPTS):
        alone = hf_logits(hf_case.model, _single(prompt))[0]
        _assert_close_logits(got[r, -len(prompt):], alone, f"{hf_case.kind} batch row {r} vs the prompt alone")


def test_logits_dtype_none_keeps_checkpoint_dtype(hf_case):
    rt32 = glmrt.load(str(hf_case.path))  # dtype=None: the checkpoint's (float32 here)
    ids = _single(BATCH_PROMPTS[2])
    _assert_close_logits(rt32.logits(ids), hf_logits(hf_case.model, ids), f"{hf_case.kind} dtype=None")


def test_logits_dtype_as_torch_dtype(hf_case):
    rt32 = glmrt.load(str(hf_case.path), dtype=torch.float32)
    ids = _single(BATCH_PROMPTS[2])
    _assert_close_logits(rt32.logits(ids), hf_logits(hf_case.model, ids), f"{hf_case.kind} dtype=torch.float32")


HALF_ERROR_RATIO = 1.25  # glmrt's half-precision error may exceed transformers' own by at most this


@pytest.mark.parametrize("name,dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_logits_half_precision_are_float32_and_close(hf_case, name, dtype):
    """Loaded in bf16 / fp16 the logits still come back as float32. Reference: transformers' model run
    in the SAME dtype. glmrt must be as close to it, and to the fp32 logits, as transformers' own
    rounding error in that dtype allows: within 1.25x of |transformers(dtype) - transformers(fp32)|
    (measured here: glmrt's error is 0.8-1.1x transformers', its distance to transformers(dtype)
    0-0.9x; an extra rounding step of the model dtype shows up as 2x or more)."""
    import copy
    ref_half = copy.deepcopy(hf_case.model).to(dtype)
    rt16 = glmrt.load(str(hf_case.path), dtype=name)
    for ids, mask in ((_single(BATCH_PROMPTS[1]), None), left_pad(BATCH_PROMPTS)):
        real = mask.bool() if mask is not None else torch.ones(ids.shape, dtype=torch.bool)
        want = hf_logits(hf_case.model, ids, mask)[real]
        want_half = hf_logits(ref_half, ids, mask)[real]
        got = rt16.logits(ids, attention_mask=mask)
        assert got.dtype == torch.float32
        got = got[real]
        assert got.shape == want.shape and torch.isfinite(got).all()
        hf_err = (want_half - want).abs().max().item()
        assert hf_err > 0, "transformers' half-precision run equals its fp32 one: the test cannot bound anything"
        err = (got - want).abs().max().item()
        dist = (got - want_half).abs().max().item()
        where = f"{name}, batch of {ids.shape[0]}"
        assert err > 0, f"dtype={name!r} gave bit-exact fp32 logits: was the dtype ignored?"
        assert err <= HALF_ERROR_RATIO * hf_err, (
            f"{where}: glmrt is off the fp32 logits by {err:.3e}, transformers' {name} by {hf_err:.3e}")
        assert dist <= HALF_ERROR_RATIO * hf_err, (
            f"{where}: glmrt is {dist:.3e} from transformers' {name} logits (its own error is {hf_err:.3e})")
    same = glmrt.load(str(hf_case.path), dtype=dtype).logits(_single(BATCH_PROMPTS[1]))
    assert torch.equal(same, rt16.logits(_single(BATCH_PROMPTS[1]))), \
        f"dtype={name!r} and dtype={dtype} must load the same model"


def test_dtype_none_keeps_bfloat16_checkpoint(hf_case, tmp_path):
    """A checkpoint saved in bf16 (config.json "dtype": "bfloat16") runs in bf16 when dtype=None."""
    import copy
    d = tmp_path / "bf16"
    copy.deepcopy(hf_case.model).to(torch.bfloat16).save_pretrained(str(d), safe_serialization=True)
    ids = _single(BATCH_PROMPTS[1])
    kept = glmrt.load(str(d)).logits(ids)
    assert kept.dtype == torch.float32
    assert torch.equal(kept, glmrt.load(str(d), dtype="bfloat16").logits(ids))
    assert not torch.equal(kept, glmrt.load(str(d), dtype="float32").logits(ids))


# ------------------------------------------------------------------------------------------------
# greedy generation


def test_greedy_single_prompt_full_length(rt, hf_case):
    """An eos id that is never generated: all 32 new tokens."""
    ids = _single(BATCH_PROMPTS[1])
    want = hf_generate(hf_case.model, ids, _ones(ids), eos_token_id=hf_case.eos_never)
    assert want.shape == (1, ids.shape[1] + MAX_NEW)
    got = rt.generate(ids, MAX_NEW, eos_token_id=hf_case.eos_never)
    _assert_same_tokens(got, want, where=f"{hf_case.kind} greedy single prompt")


def test_greedy_single_prompt_stops_at_config_eos(rt, hf_case):
    """The config's eos ids (no eos_token_id argument) end generation early, like transformers."""
    ids = _single(hf_case.early_prompt)
    want = hf_generate(hf_case.model, ids, _ones(ids))
    assert want.shape[1] < ids.shape[1] + MAX_NEW and int(want[0, -1]) == hf_case.eos_hit  # test setup
    got = rt.generate(ids, MAX_NEW)
    _assert_same_tokens(got, want, where=f"{hf_case.kind} greedy single prompt, stopping at config eos")


def test_greedy_batch_left_padded_no_eos(rt, hf_case):
    ids, mask = left_pad(BATCH_PROMPTS)
    want = hf_generate(hf_case.model, ids, mask, eos_token_id=[hf_case.eos_never])
    assert torch.equal(want[:, ids.shape[1]:], hf_case.greedy_no_eos)  # test setup
    got = rt.generate(ids, MAX_NEW, attention_mask=mask, eos_token_id=[hf_case.eos_never])
    _assert_same_tokens(got, want, where=f"{hf_case.kind} greedy left-padded batch, no eos hit")


def test_greedy_batch_left_padded_config_eos(rt, hf_case):
    """Some rows hit the config's eos early and are then padded with the pad id; others run on."""
    ids, mask = left_pad(BATCH_PROMPTS)
    want = hf_generate(hf_case.model, ids, mask)
    new = want[:, ids.shape[1]:]
    assert (new == hf_case.eos_hit).any(dim=1).any() and not (new == hf_case.eos_hit).any(dim=1).all()
    assert (new == PAD_ID).any()  # test setup: a finished row was padded
    got = rt.generate(ids, MAX_NEW, attention_mask=mask)
    _assert_same_tokens(got, want, where=f"{hf_case.kind} greedy left-padded batch, config eos")


def test_greedy_batch_all_rows_stop_early(rt, hf_case):
    """When every row has finished, generation ends before max_new_tokens (shorter output)."""
    ids, mask = left_pad(BATCH_PROMPTS)
    eos = sorted({int(t) for t in hf_case.greedy_no_eos[:, 4]} - {PAD_ID})
    want = hf_generate(hf_case.model, ids, mask, eos_token_id=eos)
    assert want.shape[1] <= ids.shape[1] + 5  # test setup
    got = rt.generate(ids, MAX_NEW, attention_mask=mask, eos_token_id=eos)
    _assert_same_tokens(got, want, where=f"{hf_case.kind} greedy batch, every row stops early (eos {eos})")


def test_greedy_repetition_penalty(rt, hf_case):
    ids = _single(BATCH_PROMPTS[0])
    want = hf_generate(hf_case.model, ids, _ones(ids), eos_token_id=hf_case.eos_never, repetition_penalty=1.3)
    got = rt.generate(ids, MAX_NEW, repetition_penalty=1.3, eos_token_id=hf_case.eos_never)
    _assert_same_tokens(got, want, where=f"{hf_case.kind} greedy with repetition_penalty=1.3")


def test_generate_leaves_input_untouched(rt, hf_case):
    ids, mask = left_pad(BATCH_PROMPTS)
    ids0, mask0 = ids.clone(), mask.clone()
    out = rt.generate(ids, 4, attention_mask=mask)
    assert torch.equal(ids, ids0) and torch.equal(mask, mask0)
    assert torch.equal(out[:, :ids.shape[1]], ids)


# ------------------------------------------------------------------------------------------------
# streaming


def _collect(stream) -> torch.Tensor:
    steps = list(stream)
    assert steps, "stream yielded nothing"
    for s in steps:
        assert isinstance(s, torch.Tensor) and s.dtype == torch.long and s.dim() == 1, (type(s), getattr(s, "shape", None))
    return torch.stack(steps, dim=1)


def test_stream_single_prompt_matches_generate(rt, hf_case):
    ids = _single(hf_case.early_prompt)
    gen = rt.generate(ids, MAX_NEW)
    streamed = _collect(rt.stream(ids, MAX_NEW))
    assert streamed.shape[0] == 1
    _assert_same_tokens(streamed, gen[:, ids.shape[1]:], where=f"{hf_case.kind} stream vs generate, single")


def test_stream_batch_matches_generate(rt, hf_case):
    ids, mask = left_pad(BATCH_PROMPTS)
    gen = rt.generate(ids, MAX_NEW, attention_mask=mask)
    streamed = _collect(rt.stream(ids, MAX_NEW, attention_mask=mask))
    assert streamed.shape[0] == len(BATCH_PROMPTS)
    _assert_same_tokens(streamed, gen[:, ids.shape[1]:], where=f"{hf_case.kind} stream vs generate, batch")
    # and against transformers directly
    want = hf_generate(hf_case.model, ids, mask)[:, ids.shape[1]:]
    _assert_same_tokens(streamed, want, where=f"{hf_case.kind} stream vs transformers, batch")


# ------------------------------------------------------------------------------------------------
# sampling


def test_sampling_same_seed_reproducible(rt, hf_case):
    ids, mask = left_pad(BATCH_PROMPTS)
    kw = dict(do_sample=True, temperature=0.9, top_k=50, top_p=0.9, seed=1234, attention_mask=mask,
              eos_token_id=[hf_case.eos_never])
    a = rt.generate(ids, MAX_NEW, **kw)
    b = rt.generate(ids, MAX_NEW, **kw)
    assert a.shape[0] == len(BATCH_PROMPTS) and a.dtype == torch.long
    assert torch.equal(a[:, :ids.shape[1]], ids)
    assert ((a >= 0) & (a < VOCAB)).all()
    _assert_same_tokens(b, a, where=f"{hf_case.kind} same seed twice")
    s = _collect(rt.stream(ids, MAX_NEW, **kw))
    _assert_same_tokens(s, a[:, ids.shape[1]:], where=f"{hf_case.kind} sampled stream vs sampled generate, same seed")


def test_sampling_pure_temperature_reproducible(rt, hf_case):
    ids = _single(BATCH_PROMPTS[1])
    kw = dict(do_sample=True, temperature=1.3, seed=99, eos_token_id=hf_case.eos_never)
    a = rt.generate(ids, MAX_NEW, **kw)
    _assert_same_tokens(rt.generate(ids, MAX_NEW, **kw), a, where=f"{hf_case.kind} temperature 1.3, same seed")


def test_sampling_top_k_1_equals_greedy(rt, hf_case):
    ids, mask = left_pad(BATCH_PROMPTS)
    greedy = hf_generate(hf_case.model, ids, mask)
    for seed in (0, 1):
        got = rt.generate(ids, MAX_NEW, do_sample=True, top_k=1, temperature=0.7, seed=seed, attention_mask=mask)
        _assert_same_tokens(got, greedy, where=f"{hf_case.kind} top_k=1 sampling (seed {seed}) vs greedy")


def _hf_sampling_probs(model, prompt: list[int], temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The first sampled token's distribution as transformers computes it (temperature, then
    top-k, then top-p, the order of its logits processors)."""
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)
    ids = _single(prompt)
    scores = hf_logits(model, ids)[:, -1, :]
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(ids, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(ids, scores)
    return torch.softmax(scores, dim=-1)[0]


def _mass_bins(probs: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Token -> bin, tokens sorted by probability and cut into bins of about equal mass."""
    order = torch.argsort(probs, descending=True)
    mid = torch.cumsum(probs[order], 0) - probs[order] / 2
    bins = torch.empty_like(order)
    bins[order] = torch.clamp(mid * num_bins, max=num_bins - 1e-6).long()
    return bins


CHI2_7DOF_P001 = 24.32  # chi-square, 7 degrees of freedom, p = 0.001


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.5, 0, 1.0), (0.7, 0, 1.0), (0.8, 0, 0.7), (1.2, 12, 1.0),
                                                     (1.0, 20, 0.85)])
def test_sampling_distribution_matches_transformers(rt, hf_case, temperature, top_k, top_p):
    """2048 independent rows of one prompt, one sampled token each: every token lies in the support
    transformers allows, and the counts fit transformers' distribution (chi-square over 8 bins of
    equal probability mass; ignoring the temperature scores in the hundreds here)."""
    n, num_bins = 2048, 8
    prompt = BATCH_PROMPTS[1]
    probs = _hf_sampling_probs(hf_case.model, prompt, temperature, top_k, top_p)
    ids = _single(prompt).repeat(n, 1)
    out = rt.generate(ids, 1, do_sample=True, temperature=temperature, top_k=top_k, top_p=top_p, seed=2024,
                      eos_token_id=hf_case.eos_never)
    assert out.shape == (n, len(prompt) + 1)
    tok = out[:, -1]
    outside = sorted(set(tok[probs[tok] == 0].tolist()))
    assert not outside, f"sampled tokens {outside} that transformers filters out (support {int((probs > 0).sum())})"
    bins = _mass_bins(probs, num_bins)
    expected = torch.zeros(num_bins).index_add_(0, bins, probs) * n
    observed = torch.bincount(bins[tok], minlength=num_bins).float()
    chi2 = (((observed - expected) ** 2) / expected).sum().item()
    assert chi2 < CHI2_7DOF_P001, (
        f"sampled counts do not fit transformers' distribution: chi2 = {chi2:.1f}\n"
        f"observed {observed.tolist()}\nexpected {[round(e, 1) for e in expected.tolist()]}")


# ------------------------------------------------------------------------------------------------
# shape variants: no biases (GLM-4-32B-0414), head_dim * heads != hidden_size, MHA, single KV head

VARIANTS = {
    "glm4-no-bias": ("glm4", dict(attention_bias=False)),
    "glm-head_dim24": ("glm", dict(head_dim=24)),
    "glm-mha": ("glm", dict(num_key_value_heads=4)),
    "glm4-one-kv-head": ("glm4", dict(num_key_value_heads=1, num_attention_heads=8, head_dim=8)),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_shape_variants(variant, tmp_path):
    from ckpt_writers import build_hf_model
    kind, overrides = VARIANTS[variant]
    model = build_hf_model(kind, seed=3, **overrides)
    model.save_pretrained(str(tmp_path / variant), safe_serialization=True)
    rt = glmrt.load(str(tmp_path / variant), dtype="float32")
    ids, mask = left_pad(BATCH_PROMPTS)
    got = rt.logits(ids, attention_mask=mask)
    want = hf_logits(model, ids, mask)
    _assert_close_logits(got[mask.bool()], want[mask.bool()], f"{variant} left-padded batch")
    # an eos id that greedy decoding never produces here: nothing stops
    want = hf_generate(model, ids, mask, max_new_tokens=16, eos_token_id=VOCAB + 7)
    never = next(t for t in range(VOCAB - 1, 0, -1) if t not in set(want.flatten().tolist()))
    assert greedy_margins(model, ids, mask, never).min() >= MIN_GREEDY_MARGIN  # test setup
    gen = rt.generate(ids, 16, attention_mask=mask, eos_token_id=never)
    _assert_same_tokens(gen, want, where=f"{variant} greedy batch")


def test_logits_bool_attention_mask(rt, hf_case):
    """A bool mask means the same as a 0/1 integer mask (transformers accepts both)."""
    ids, mask = left_pad(BATCH_PROMPTS)
    a = rt.logits(ids, attention_mask=mask)
    b = rt.logits(ids, attention_mask=mask.bool())
    real = mask.bool()
    _assert_close_logits(b[real], a[real], f"{hf_case.kind} bool mask vs int mask")


def test_load_first_layers_only(hf_case):
    """layers=N keeps the first N blocks (the final norm and LM head stay): transformers' model cut
    to its first 2 layers is the reference; layer 2's tensors in the checkpoint are not an error."""
    import copy
    cut = copy.deepcopy(hf_case.model)
    cut.model.layers = cut.model.layers[:2]
    cut.config.num_hidden_layers = 2
    ids = _single(BATCH_PROMPTS[1])
    got = glmrt.load(str(hf_case.path), dtype="float32", layers=2).logits(ids)
    _assert_close_logits(got, hf_logits(cut, ids), f"{hf_case.kind} layers=2")
