"""ChatGLM-6B, GLM-130B and THUDM-format models in float16 and bfloat16 against the ORIGINAL code's
formulas run in that dtype (tests/models/reference_glm_original.py), not against glmrt's own ops.

The rounding rules of the releases are what is checked: RoPE tables built in the dtype of the
model's (fp16-rounded) inv_freq buffer, attention scores in the model dtype with the -10000 fill
and the layer-scaled fp32 softmax (GLM-130B, ChatGLM-6B), RMSNorm's fp32 weight multiply with one
rounding (THUDM), the fused fp32 gelu (ChatGLM-6B); the -10000 fill only where a row is fully
masked, which glmrt's masks never make (see the batch test). The bound is a fraction of the dtype's own
rounding noise, noise = max |original(dtype) - original(fp32)| on the same input: glmrt's plain
torch plan (kernels="reference", where the rules live) must be within TIGHT x noise of the original
on single prompts (measured: bit-identical where glmrt follows the rule), the default plan (native
CPU kernels, whose fp32 internals may flip single roundings) within LOOSE x noise.
test_variants_of_each_rule_are_told_apart shows each rule's wrong variant lies beyond TIGHT x noise.

Rules that glmrt once broke keep a test of their own: GLM-130B's row-parallel bias added after the
rounded matmul (SAT's RowParallelLinear) since issue 13, the bfloat16 RoPE tables since issue 11
item 2, the THUDM attention (SDPA's flash arithmetic) since glmrt's "standard" attention computes it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ckpt_writers as cw  # noqa: E402
import reference_glm_original as original  # noqa: E402
import test_chatglm6b_parity as c6  # noqa: E402  (checkpoint writers and prompts, not its tests)
import test_glm130b_parity as g130  # noqa: E402
from reference_glm_original import ChatGLM2Reference, ChatGLM6BReference, GLM130BReference  # noqa: E402

import glmrt  # noqa: E402

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32
TIGHT = 0.1   # x noise, glmrt's reference plan on single prompts
LOOSE = 0.5   # x noise, the default (native) plan and padded batches
HALVES = [FP16, BF16]


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _cast(sd: dict, dtype: torch.dtype) -> dict:
    """The checkpoint converted to `dtype` (model.half() / .bfloat16()); the ignored inv_freq kept."""
    return {k: (v.to(dtype) if v.is_floating_point() and "inv_freq" not in k else v) for k, v in sd.items()}


class _TablesIn:
    """A RotaryEmbedding whose tables are built in `table_dtype` and then cast to the model dtype
    (a variant of the rule: the tables in the wrong precision)."""

    def __init__(self, dim: int, table_dtype: torch.dtype, model_dtype: torch.dtype):
        self.inner = original.RotaryEmbedding(dim, rope_precision=table_dtype)
        self.dtype = model_dtype

    def __call__(self, x, seq_len):
        return tuple(t.to(self.dtype) for t in self.inner(x, seq_len))


def _load(directory: Path, dtype, kernels: str, **kw):
    return glmrt.load(str(directory), dtype=dtype, kernels=kernels, progress=False, **kw)


# ----------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def chatglm6b(tmp_path_factory):
    sd = c6.make_state_dict()
    return sd, c6.write_checkpoint(tmp_path_factory.mktemp("c6_half"), sd)


def _glm130b_state_dict(row_parallel_bias: bool) -> dict:
    sd = g130.make_full_state_dict()
    if not row_parallel_bias:  # the rule's wrong variant cannot show without these biases
        for k in sd:
            if k.endswith(("attention.dense.bias", "dense_4h_to_h.bias")):
                sd[k] = torch.zeros_like(sd[k])
    return sd


@pytest.fixture(scope="module")
def glm130b(tmp_path_factory):
    """Single rank (the 8-rank original sums partial products in the model dtype: rounding that
    a merged checkpoint cannot reproduce), every bias as the release has it."""
    sd = _glm130b_state_dict(row_parallel_bias=True)
    return sd, g130.write_sat(tmp_path_factory.mktemp("g130_half"), [sd])


@pytest.fixture(scope="module")
def thudm(glm_case, tmp_path_factory):
    hf_cfg = glm_case.model.config.to_dict()
    sd = cw.hf_to_thudm({k: v.detach().clone().contiguous() for k, v in glm_case.model.state_dict().items()},
                        hf_cfg, rope_ratio=cw.ROPE_RATIO)
    cfg = cw.thudm_config_from_hf(hf_cfg, rope_ratio=cw.ROPE_RATIO)
    d = tmp_path_factory.mktemp("thudm_half")
    cw.write_config(d, cfg)
    cw.write_safetensors(d, sd)
    return sd, cfg, d


# ----------------------------------------------------------------------------- the references themselves
def test_thudm_reference_in_fp32_is_the_transformers_model(thudm, glm_case):
    """ChatGLM2Reference (THUDM's code) on the THUDM-named weights gives transformers' glm logits in
    fp32, single prompt and left-padded batch: the reference reads the weights right."""
    sd, cfg, _ = thudm
    ids, mask = cw.left_pad(cw.BATCH_PROMPTS)
    real = mask.bool()
    assert _diff(ChatGLM2Reference(sd, cfg).forward(ids, mask)[real], cw.hf_logits(glm_case.model, ids, mask)[real]) < 1e-4
    one = torch.tensor([cw.BATCH_PROMPTS[1]])
    assert _diff(ChatGLM2Reference(sd, cfg).forward(one), cw.hf_logits(glm_case.model, one)) < 1e-4


def test_variants_of_each_rule_are_told_apart(chatglm6b, glm130b, thudm, monkeypatch):
    """Each rule's wrong variant moves the half-precision logits by more than TIGHT x noise, so
    the single-prompt tests below can see it: RoPE tables in fp32 (ChatGLM-6B, GLM-130B), the
    attention scores in fp32 (GLM-130B), transformers' RMSNorm order (THUDM), the unfused fp16
    gelu (ChatGLM-6B); and a -inf fill turns the left-padded ChatGLM-6B batch into NaN."""
    sd6, _ = chatglm6b
    ids6 = torch.tensor([c6.LONG_PROMPT])
    right = ChatGLM6BReference(_cast(sd6, FP16), c6.CONFIG, rope_precision=FP16)
    want6 = right.forward(ids6)
    noise6 = _diff(want6, ChatGLM6BReference(sd6, c6.CONFIG, rope_precision="float").forward(ids6))
    tables = ChatGLM6BReference(_cast(sd6, FP16), c6.CONFIG, rope_precision=FP16)
    tables.rotary_emb = _TablesIn(tables.rotary_emb.inv_freq.numel() * 2, FP32, FP16)
    assert _diff(tables.forward(ids6), want6) > 2 * TIGHT * noise6
    fused_gelu, attention = original.gelu_impl, original.layer_scaled_attention
    with monkeypatch.context() as m:  # the reference methods look these names up at call time
        m.setattr(original, "gelu_impl",
                  lambda x: 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x))))
        unfused = ChatGLM6BReference(_cast(sd6, FP16), c6.CONFIG, rope_precision=FP16).forward(ids6)
    assert original.gelu_impl is fused_gelu
    assert _diff(unfused, want6) > 2 * TIGHT * noise6
    ids_b, mask_b, pos_b = right.tokenizer_pad(c6.BATCH)
    real_b = c6._left_pad_2d(c6.BATCH)[1].bool()
    assert torch.isfinite(right.forward(ids_b, pos_b, mask_b)[real_b]).all()
    with monkeypatch.context() as m:
        m.setattr(original, "layer_scaled_attention", lambda *a, **k: attention(*a, **{**k, "fill": float("-inf")}))
        assert torch.isnan(right.forward(ids_b, pos_b, mask_b)[real_b]).any()

    sd130, _ = glm130b
    prompt = g130.PROMPTS["long"]
    ranks = [_cast(sd130, FP16)]
    want130 = GLM130BReference(ranks, g130.LAYERS, g130.HIDDEN, g130.HEADS, rope_precision=FP16) \
        .logits_for_prompt(prompt, g130.MASK, g130.GMASK)
    noise130 = _diff(want130, GLM130BReference([sd130], g130.LAYERS, g130.HIDDEN, g130.HEADS, rope_precision="float")
                     .logits_for_prompt(prompt, g130.MASK, g130.GMASK))
    tables130 = GLM130BReference(ranks, g130.LAYERS, g130.HIDDEN, g130.HEADS, rope_precision=FP16)
    tables130.rotary_emb = _TablesIn(g130.HEAD_DIM, FP32, FP16)
    assert _diff(tables130.logits_for_prompt(prompt, g130.MASK, g130.GMASK), want130) > 2 * TIGHT * noise130
    with monkeypatch.context() as m:
        m.setattr(original, "layer_scaled_attention",
                  lambda q, k, v, *a, **kw: attention(q.float(), k.float(), v.float(), *a, **kw).to(q.dtype))
        scores32 = GLM130BReference(ranks, g130.LAYERS, g130.HIDDEN, g130.HEADS, rope_precision=FP16)
        assert _diff(scores32.logits_for_prompt(prompt, g130.MASK, g130.GMASK), want130) > 2 * TIGHT * noise130

    sd2, cfg2, _ = thudm
    ids2 = torch.tensor([cw.BATCH_PROMPTS[1]])
    want2 = ChatGLM2Reference(_cast(sd2, FP16), cfg2).forward(ids2)
    noise2 = _diff(want2, ChatGLM2Reference(sd2, cfg2).forward(ids2))

    class TransformersOrder(ChatGLM2Reference):
        weight_multiply_first = True

    assert _diff(TransformersOrder(_cast(sd2, FP16), cfg2).forward(ids2), want2) > 2 * TIGHT * noise2


# ----------------------------------------------------------------------------- ChatGLM-6B
@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("name", ["gmask", "mask", "long"])
def test_chatglm6b_single_prompts_follow_the_original(chatglm6b, name, dtype):
    """modeling_chatglm.py run on the model converted to `dtype` (model.half() / .bfloat16()):
    RoPE tables from the converted fp16-rounded inv_freq in that dtype, scores in it, -10000 fill,
    softmax(scores.float() * (layer + 1)), the fused gelu."""
    sd, directory = chatglm6b
    prompt = {"gmask": c6.GMASK_PROMPT, "mask": c6.MASK_PROMPT, "long": c6.LONG_PROMPT}[name]
    ids = torch.tensor([prompt])
    want = ChatGLM6BReference(_cast(sd, dtype), c6.CONFIG, rope_precision=dtype).forward(ids)
    noise = _diff(want, ChatGLM6BReference(sd, c6.CONFIG, rope_precision="float").forward(ids))
    assert noise > 0
    for kernels, bound in (("reference", TIGHT), ("auto", LOOSE)):
        got = _load(directory, dtype, kernels).logits(ids)
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        err = _diff(got, want)
        assert err <= bound * noise, f"kernels={kernels}: {err:.4f} from the original, rounding noise {noise:.4f}"


def test_chatglm6b_left_padded_batch_in_fp16(chatglm6b):
    """The tokenizer's left padding in fp16: every real position finite and within LOOSE x noise of
    the original. (In the original the padded query rows see no key and the -10000 fill keeps them
    finite, a -inf fill would carry NaN into the real rows through the values -- shown in
    test_variants_of_each_rule_are_told_apart; glmrt's padded rows see the prefix, so no row of
    its is fully masked and the fill value cannot change its logits.)"""
    sd, directory = chatglm6b
    ref = ChatGLM6BReference(_cast(sd, FP16), c6.CONFIG, rope_precision=FP16)
    ids_ref, mask4d, pos = ref.tokenizer_pad(c6.BATCH)
    want = ref.forward(ids_ref, pos, mask4d)
    ids, mask = c6._left_pad_2d(c6.BATCH)
    real = mask.bool()
    noise = _diff(want[real], ChatGLM6BReference(sd, c6.CONFIG, rope_precision="float").forward(ids_ref, pos, mask4d)[real])
    for kernels in ("reference", "auto"):
        got = _load(directory, FP16, kernels).logits(ids, attention_mask=mask)
        assert torch.isfinite(got[real]).all()
        assert _diff(got[real], want[real]) <= LOOSE * noise, kernels


# ----------------------------------------------------------------------------- GLM-130B
@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("name", sorted(g130.PROMPTS))
def test_glm130b_single_prompts_follow_the_original(glm130b, name, dtype):
    """SAT's GLM130B (and generate.py's masks/positions) on the model converted to `dtype`."""
    sd, directory = glm130b
    prompt = g130.PROMPTS[name]
    want = GLM130BReference([_cast(sd, dtype)], g130.LAYERS, g130.HIDDEN, g130.HEADS, rope_precision=dtype) \
        .logits_for_prompt(prompt, g130.MASK, g130.GMASK)
    noise = _diff(want, GLM130BReference([sd], g130.LAYERS, g130.HIDDEN, g130.HEADS, rope_precision="float")
                  .logits_for_prompt(prompt, g130.MASK, g130.GMASK))
    for kernels, bound in (("reference", TIGHT), ("auto", LOOSE)):
        got = _load(directory, dtype, kernels, token_ids=g130.TOKEN_IDS).logits(torch.tensor([prompt]))
        err = _diff(got, want)
        assert err <= bound * noise, f"kernels={kernels}: {err:.4f} from the original, rounding noise {noise:.4f}"


def test_glm130b_row_parallel_bias_is_added_after_the_matmul(tmp_path):
    """SAT's RowParallelLinear (attention.dense, dense_4h_to_h): matmul rounded to fp16, then + bias,
    at one rank as at eight; glmrt follows at tp 1 (glmrt.lowering's bias_after_matmul) as its
    tensor-parallel path does after the all-reduce (tests/tp/test_tp_half_precision.py)."""
    sd = _glm130b_state_dict(row_parallel_bias=True)
    directory = g130.write_sat(tmp_path / "g130", [sd])
    prompt = g130.PROMPTS["mask"]
    want = GLM130BReference([_cast(sd, FP16)], g130.LAYERS, g130.HIDDEN, g130.HEADS, rope_precision=FP16) \
        .logits_for_prompt(prompt, g130.MASK, g130.GMASK)
    noise = _diff(want, GLM130BReference([sd], g130.LAYERS, g130.HIDDEN, g130.HEADS, rope_precision="float")
                  .logits_for_prompt(prompt, g130.MASK, g130.GMASK))
    for kernels, bound in (("reference", TIGHT), ("auto", LOOSE)):
        got = _load(directory, FP16, kernels, token_ids=g130.TOKEN_IDS).logits(torch.tensor([prompt]))
        err = _diff(got, want)
        assert err <= bound * noise, f"kernels={kernels}: {err:.4f} from the original, rounding noise {noise:.4f}"
    # The wrong variant (the bias inside the matmul, one rounding) is beyond the tight bound.
    inside = GLM130BReference([_cast(sd, FP16)], g130.LAYERS, g130.HIDDEN, g130.HEADS, rope_precision=FP16,
                              bias_inside_row_parallel=True).logits_for_prompt(prompt, g130.MASK, g130.GMASK)
    assert _diff(inside, want) > TIGHT * noise


# ----------------------------------------------------------------------------- THUDM format
def _sdpa_case(dtype, keys: int, causal: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 4, keys, 32, generator=g).mul(2).to(dtype) for _ in range(3))
    mask = torch.rand(2, 1, keys, keys, generator=g) > 0.3
    mask |= torch.eye(keys, dtype=torch.bool)  # every query sees a key
    return q, k, v, None if causal else mask


@pytest.mark.parametrize("dtype", HALVES)
def test_written_out_sdpa_is_torchs_kernel(dtype):
    """The reference's `sdpa_flash` is what THUDM's call of F.scaled_dot_product_attention computes:
    bit for bit on rows of < 8 keys (where torch's CPU kernel takes std::exp), within an ulp of the
    row's largest output beyond (its vectorised exp approximation). The old rule (scores rounded to the dtype
    first) is further away on the same short rows."""
    for causal in (True, False):
        for keys, seed in ((3, 0), (5, 1), (7, 2), (7, 3)):
            q, k, v, mask = _sdpa_case(dtype, keys, causal, seed)
            torch_out = F.scaled_dot_product_attention(q, k, v, mask, is_causal=causal)
            assert torch.equal(original.sdpa_flash(q, k, v, mask, is_causal=causal), torch_out), (dtype, keys)
        q, k, v, mask = _sdpa_case(dtype, 40, causal, 4)
        torch_out = F.scaled_dot_product_attention(q, k, v, mask, is_causal=causal)
        ulp = torch.finfo(dtype).eps * torch_out.abs().float().amax(dim=-1, keepdim=True)  # of the row's largest
        assert bool(((original.sdpa_flash(q, k, v, mask, is_causal=causal).float() - torch_out.float()).abs()
                     <= ulp).all())


@pytest.mark.parametrize("dtype", HALVES)
def test_glmrt_standard_attention_is_torchs_sdpa_on_short_rows(dtype):
    """glmrt's reference attention ("standard" scaling: ChatGLM2/3, GLM-4, transformers' glm) against
    torch's own F.scaled_dot_product_attention, bit for bit where that kernel uses std::exp, through
    the model's own attention op on a causal prompt with 2 KV groups."""
    from glmrt import ops
    from glmrt.graph import Node

    for keys, seed in ((4, 0), (7, 1)):
        g = torch.Generator().manual_seed(seed)
        q = torch.randn(1, keys, 4, 32, generator=g).mul(2).to(dtype)
        k, v = (torch.randn(1, keys, 2, 32, generator=g).mul(2).to(dtype) for _ in range(2))
        node = Node("attn", "attention", ["q", "k", "v"], ["out"],
                    attrs={"num_kv_heads": 2, "scaling": "standard", "scale": 1 / 32 ** 0.5, "layer_index": 0})
        ctx = type("Ctx", (), {"cache": None, "allowed": torch.ones(keys, keys, dtype=torch.bool).tril()[None, None]})
        got = ops.attention(ctx, node, [q, k, v], {})
        kk, vv = (t.transpose(1, 2).repeat_interleave(2, dim=1) for t in (k, v))
        want = F.scaled_dot_product_attention(q.transpose(1, 2), kk, vv, is_causal=True)
        assert torch.equal(got, want.transpose(1, 2).reshape(1, keys, 4 * 32)), (dtype, keys)


@pytest.mark.parametrize("dtype", [FP16, BF16])
def test_thudm_single_prompt_follows_the_original(thudm, dtype):
    """THUDM's code (ChatGLM2/3, GLM-4-9B) on the model converted to `dtype`: fp32 RoPE cache
    rounded to the dtype, RMSNorm's fp32 weight multiply rounded once, SDPA attention."""
    sd, cfg, directory = thudm
    for prompt in cw.BATCH_PROMPTS:
        ids = torch.tensor([prompt])
        want = ChatGLM2Reference(_cast(sd, dtype), cfg).forward(ids)
        noise = _diff(want, ChatGLM2Reference(sd, cfg).forward(ids))
        got = _load(directory, dtype, "reference").logits(ids)
        assert _diff(got, want) <= TIGHT * noise


@pytest.mark.parametrize("dtype", [FP16, BF16])
def test_thudm_one_token_follows_the_original(thudm, dtype):
    """With one token attention returns its value exactly in any precision (softmax of one score is
    1), so everything else of THUDM's code is checked at TIGHT: RMSNorm's fp32 weight multiply
    rounded once (transformers' order is 2-3x TIGHT away here), the fp32 RoPE cache rounded to the
    dtype, swiglu and the residual adds in the dtype."""
    sd, cfg, directory = thudm

    class TransformersOrder(ChatGLM2Reference):
        weight_multiply_first = True

    models = {kernels: _load(directory, dtype, kernels) for kernels in ("reference", "auto")}
    for token in (5, 77, 130):
        ids = torch.tensor([[token]])
        want = ChatGLM2Reference(_cast(sd, dtype), cfg).forward(ids)
        noise = _diff(want, ChatGLM2Reference(sd, cfg).forward(ids))
        assert _diff(TransformersOrder(_cast(sd, dtype), cfg).forward(ids), want) > 2 * TIGHT * noise  # test setup
        for kernels, model in models.items():
            got = model.logits(ids)
            assert _diff(got, want) <= TIGHT * noise, (kernels, token, _diff(got, want), noise)


@pytest.mark.parametrize("dtype", [FP16, BF16])
def test_thudm_half_precision_stays_within_the_rounding_noise(thudm, dtype):
    """glmrt's THUDM model in half precision, default kernels, on the left-padded batch. The original
    code is not batch-invariant in half precision (its batched GEMMs round differently from the same
    rows run alone: measured about 1x the dtype's noise in bf16), while glmrt's rows are: so glmrt's
    batch must equal its own single prompts, and lie within 1.25x noise of the original's batch, or
    within the original's own batch-versus-single spread where that is larger."""
    sd, cfg, directory = thudm
    model = _load(directory, dtype, "auto")
    ids, mask = cw.left_pad(cw.BATCH_PROMPTS)
    real = mask.bool()
    half = ChatGLM2Reference(_cast(sd, dtype), cfg)
    want = half.forward(ids, mask)[real]
    noise = _diff(want, ChatGLM2Reference(sd, cfg).forward(ids, mask)[real])
    got = model.logits(ids, attention_mask=mask)
    singles = [model.logits(ids[b:b + 1, real[b]])[0] for b in range(ids.shape[0])]
    for b, single in enumerate(singles):
        assert _diff(got[b][real[b]], single) <= 0.5 * TIGHT * noise, f"row {b} depends on its batch"
    original_singles = torch.cat([half.forward(ids[b:b + 1, real[b]])[0] for b in range(ids.shape[0])])
    spread = _diff(want, original_singles)
    assert torch.isfinite(got).all() and _diff(got[real], want) <= max(1.25 * noise, 1.1 * spread)
