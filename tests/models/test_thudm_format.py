"""THUDM-format checkpoints (ChatGLM2/3, GLM-4-9B: `model_type: "chatglm"`) against transformers.

The tiny transformers `glm` model's weights are re-saved under THUDM's tensor names (fused
`query_key_value` = cat(q, k, v) rows, `dense_h_to_4h` = gate_up_proj, plus the
`transformer.rotary_pos_emb.inv_freq` buffer that loaders must ignore) with a THUDM config.json
(RoPE base = 10000 * rope_ratio), in the three file layouts the releases use. Every layout must
give transformers' logits.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")  # the reference implementation

import ckpt_writers as cw  # noqa: E402
from ckpt_writers import BATCH_PROMPTS, MAX_NEW, ROPE_RATIO, hf_generate, hf_logits, left_pad  # noqa: E402

import glmrt  # noqa: E402  (a broken glmrt must fail these tests, not skip them)

ATOL = 1e-4
LAYOUTS = ["safetensors", "safetensors-sharded", "bin-sharded"]


def _hf_state_dict(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _thudm_config(case, **overrides) -> dict:
    hf = case.model.config.to_dict()
    cfg = cw.thudm_config_from_hf(hf, rope_ratio=ROPE_RATIO)
    assert cfg["eos_token_id"] == case.eos_ids
    cfg.update(overrides)
    return cfg


def _write(directory, case, layout: str, **config_overrides):
    hf_cfg = case.model.config.to_dict()
    sd = cw.hf_to_thudm(_hf_state_dict(case.model), hf_cfg, rope_ratio=ROPE_RATIO)
    cw.write_config(directory, _thudm_config(case, **config_overrides))
    if layout == "safetensors":
        cw.write_safetensors(directory, sd, num_shards=1)
    elif layout == "safetensors-sharded":
        cw.write_safetensors(directory, sd, num_shards=3)
    elif layout == "bin-sharded":
        cw.write_torch_bin(directory, sd, num_shards=2)
    else:
        raise ValueError(layout)
    return directory


@pytest.fixture(scope="module")
def thudm_dirs(glm_case, tmp_path_factory):
    return {layout: _write(tmp_path_factory.mktemp(f"thudm_{layout}"), glm_case, layout) for layout in LAYOUTS}


@pytest.fixture(scope="module")
def thudm_models(thudm_dirs):
    return {layout: glmrt.load(str(d), dtype="float32") for layout, d in thudm_dirs.items()}


def _assert_close(got, want, where):
    assert got.dtype == torch.float32, got.dtype
    assert got.shape == want.shape, (tuple(got.shape), tuple(want.shape))
    err = (got - want).abs().max().item()
    assert err <= ATOL, f"{where}: max |glmrt - transformers| = {err:.3e}"


# ------------------------------------------------------------------------------------------------
# the writers themselves


def test_writer_layouts_are_as_released(thudm_dirs):
    names = {layout: sorted(p.name for p in d.iterdir()) for layout, d in thudm_dirs.items()}
    assert names["safetensors"] == ["config.json", "model.safetensors"]
    assert names["safetensors-sharded"] == [
        "config.json", "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors", "model.safetensors.index.json"]
    assert names["bin-sharded"] == [
        "config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
        "pytorch_model.bin.index.json"]
    cfg = json.loads((thudm_dirs["safetensors"] / "config.json").read_text())
    assert cfg["model_type"] == "chatglm" and cfg["architectures"] == ["ChatGLMModel"]


def test_writer_roundtrip(glm_case, thudm_dirs):
    """Every layout holds exactly the THUDM names, with shapes as in the released files, and
    splitting query_key_value back gives the transformers weights."""
    cfg = _thudm_config(glm_case)
    h, nh, nkv, hd, f = (cfg["hidden_size"], cfg["num_attention_heads"], cfg["multi_query_group_num"],
                         cfg["kv_channels"], cfg["ffn_hidden_size"])
    want = _hf_state_dict(glm_case.model)
    for layout, d in thudm_dirs.items():
        sd = cw.read_any(d)
        assert sd["transformer.encoder.layers.0.self_attention.query_key_value.weight"].shape == ((nh + 2 * nkv) * hd, h)
        assert sd["transformer.encoder.layers.0.self_attention.query_key_value.bias"].shape == ((nh + 2 * nkv) * hd,)
        assert sd["transformer.encoder.layers.0.mlp.dense_h_to_4h.weight"].shape == (2 * f, h)
        assert sd["transformer.encoder.layers.0.mlp.dense_4h_to_h.weight"].shape == (h, f)
        assert sd["transformer.rotary_pos_emb.inv_freq"].shape == (hd // 4,)
        assert not any(k.startswith("model.") or k == "lm_head.weight" for k in sd), layout
        back = cw.thudm_to_hf(sd, cfg)
        assert set(back) == set(want), layout
        for k in want:
            assert torch.equal(back[k], want[k]), (layout, k)


# ------------------------------------------------------------------------------------------------
# parity


@pytest.mark.parametrize("layout", LAYOUTS)
def test_thudm_logits_single_prompt(thudm_models, glm_case, layout):
    ids = torch.tensor([BATCH_PROMPTS[1]])
    _assert_close(thudm_models[layout].logits(ids), hf_logits(glm_case.model, ids), f"THUDM {layout}")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_thudm_logits_left_padded_batch(thudm_models, glm_case, layout):
    ids, mask = left_pad(BATCH_PROMPTS)
    got = thudm_models[layout].logits(ids, attention_mask=mask)
    want = hf_logits(glm_case.model, ids, mask)
    real = mask.bool()
    _assert_close(got[real], want[real], f"THUDM {layout}, left-padded batch")


def test_thudm_dtype_none_keeps_float32(thudm_dirs, glm_case):
    rt = glmrt.load(str(thudm_dirs["safetensors"]))
    ids = torch.tensor([BATCH_PROMPTS[0]])
    _assert_close(rt.logits(ids), hf_logits(glm_case.model, ids), "THUDM, dtype=None")


def test_thudm_greedy_batch_matches_transformers(thudm_models, glm_case):
    ids, mask = left_pad(BATCH_PROMPTS)
    want = hf_generate(glm_case.model, ids, mask)  # the config's eos ids: one row stops early
    got = thudm_models["bin-sharded"].generate(ids, MAX_NEW, attention_mask=mask)
    assert got.dtype == torch.long
    assert got.shape == want.shape and torch.equal(got, want), f"glmrt:\n{got}\ntransformers:\n{want}"


def test_thudm_scalar_eos_token_id(glm_case, tmp_path):
    """ChatGLM2/3 configs carry a single int eos_token_id."""
    d = _write(tmp_path / "int_eos", glm_case, "safetensors", eos_token_id=glm_case.eos_hit)
    rt = glmrt.load(str(d), dtype="float32")
    ids = torch.tensor([glm_case.early_prompt])
    want = hf_generate(glm_case.model, ids, torch.ones_like(ids), eos_token_id=glm_case.eos_hit)
    assert want.shape[1] < ids.shape[1] + MAX_NEW  # test setup: stops early
    got = rt.generate(ids, MAX_NEW)
    assert got.shape == want.shape and torch.equal(got, want), f"glmrt:\n{got}\ntransformers:\n{want}"


def test_thudm_rope_ratio_is_used(glm_case, tmp_path):
    """rope_ratio 1 (base 10000) is a different model: the logits must move (guards against a
    loader that ignores rope_ratio and happens to use the transformers default)."""
    d = _write(tmp_path / "ratio1", glm_case, "safetensors", rope_ratio=1.0)
    ids = torch.tensor([BATCH_PROMPTS[1]])
    err = (glmrt.load(str(d), dtype="float32").logits(ids) - hf_logits(glm_case.model, ids)).abs().max().item()
    assert err > 1e-2, f"changing rope_ratio 2.5 -> 1 changed the logits by only {err:.2e}"


def test_thudm_dtype_none_keeps_bfloat16_checkpoint(glm_case, tmp_path):
    """GLM-4-9B is released in bf16 ("torch_dtype": "bfloat16"): dtype=None runs it in bf16."""
    hf_cfg = glm_case.model.config.to_dict()
    sd = {k: v.to(torch.bfloat16) for k, v in _hf_state_dict(glm_case.model).items()}
    d = tmp_path / "bf16"
    cw.write_config(d, _thudm_config(glm_case, torch_dtype="bfloat16"))
    cw.write_torch_bin(d, cw.hf_to_thudm(sd, hf_cfg, rope_ratio=ROPE_RATIO), num_shards=2)
    ids = torch.tensor([BATCH_PROMPTS[1]])
    kept = glmrt.load(str(d)).logits(ids)
    assert kept.dtype == torch.float32
    assert torch.equal(kept, glmrt.load(str(d), dtype="bfloat16").logits(ids))
    as32 = glmrt.load(str(d), dtype="float32").logits(ids)
    assert not torch.equal(kept, as32)
    # the bf16 weights upcast to fp32 are still the transformers model, up to bf16 weight rounding
    assert (as32 - hf_logits(glm_case.model, ids)).abs().max().item() < 0.25


def test_thudm_without_qkv_bias(tmp_path):
    """add_qkv_bias: false (no query_key_value.bias tensors) against a bias-free transformers model."""
    from ckpt_writers import build_hf_model
    model = build_hf_model("glm", seed=5, attention_bias=False)
    hf_cfg = model.config.to_dict()
    sd = cw.hf_to_thudm(_hf_state_dict(model), hf_cfg, rope_ratio=ROPE_RATIO)
    assert not any(k.endswith("query_key_value.bias") for k in sd)
    cfg = cw.thudm_config_from_hf(hf_cfg, rope_ratio=ROPE_RATIO)
    assert cfg["add_qkv_bias"] is False
    cw.write_config(tmp_path, cfg)
    cw.write_safetensors(tmp_path, sd, num_shards=2)
    ids, mask = left_pad(BATCH_PROMPTS)
    got = glmrt.load(str(tmp_path), dtype="float32").logits(ids, attention_mask=mask)
    want = hf_logits(model, ids, mask)
    _assert_close(got[mask.bool()], want[mask.bool()], "THUDM add_qkv_bias=false")
