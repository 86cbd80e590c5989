"""Bad input gets a glmrt error that names the problem: never a raw traceback from torch or the
standard library, never a silent coercion (a float mask of 0.5 read as padding, 1.5 read as token
1, an eos id no step can produce, an int32 weight cast to float)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import TINY_GLM4, thudm_config, write_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
import ckpt_writers as cw  # noqa: E402

import glmrt  # noqa: E402
from glmrt.errors import CheckpointError, ConfigError, InputError  # noqa: E402

V = TINY_GLM4["vocab_size"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return glmrt.load(write_checkpoint(tmp_path_factory.mktemp("tiny"), TINY_GLM4, scale=20), progress=False)


# ----------------------------------------------------------------------------- config.json
@pytest.mark.parametrize("key,value", [("hidden_size", None), ("num_attention_heads", None),
                                       ("vocab_size", "many"), ("intermediate_size", [96])])
def test_unreadable_config_values_are_named(tmp_path, key, value):
    raw = dict(TINY_GLM4, **{key: value})
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=re.escape(f"'{key}' is {json.dumps(value)}")):
        glmrt.load(tmp_path, progress=False)


def test_unreadable_thudm_config_values_are_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(thudm_config(300, 2), num_layers=None)))
    with pytest.raises(ConfigError, match="'num_layers' is null"):
        glmrt.load(tmp_path, progress=False)


# ----------------------------------------------------------------------------- sampling arguments
@pytest.mark.parametrize("kwargs,match", [
    (dict(do_sample=True, temperature=float("nan")), "temperature must be a finite number"),
    (dict(do_sample=True, temperature=float("inf")), "temperature must be a finite number"),
    (dict(temperature="hot"), "temperature must be a number"),
    (dict(do_sample=True, top_k=1.5), "top_k must be an integer"),
    (dict(do_sample=True, top_p=float("nan")), "top_p"),
    (dict(repetition_penalty=float("nan")), "repetition_penalty must be a finite number"),
    (dict(do_sample=True, seed="abc"), "seed must be an integer"),
    (dict(do_sample=True, seed=2 ** 70), r"seed must be an integer in \[-2\*\*63, 2\*\*64\)"),
    (dict(do_sample=True, seed=1.0), "seed must be an integer"),
    (dict(do_sample="yes"), "do_sample must be True or False"),
    (dict(max_new_tokens=2.0), "max_new_tokens must be a non-negative integer"),
    (dict(max_new_tokens=True), "max_new_tokens must be a non-negative integer"),
    (dict(eos_token_id="a"), "eos_token_id must be a token id"),
    (dict(eos_token_id=[2, "a"]), "eos_token_id entries must be an integer"),
    (dict(eos_token_id=V), rf"eos_token_id {V} is outside the vocabulary \[0, {V}\)"),
    (dict(eos_token_id=[3, -1]), "eos_token_id -1 is outside the vocabulary"),
    (dict(pad_token_id=V + 5), rf"pad_token_id {V + 5} is outside the vocabulary"),
    (dict(pad_token_id="x"), "pad_token_id must be an integer"),
])
def test_bad_generation_arguments_are_input_errors(model, kwargs, match):
    with pytest.raises(InputError, match=match):
        model.generate([[5, 6, 7]], **{"max_new_tokens": 2, **kwargs})
    with pytest.raises(InputError, match=match):
        model.stream([[5, 6, 7]], **{"max_new_tokens": 2, **kwargs})  # at the call, not the first next()


def test_seeds_at_the_ends_of_torchs_range_work(model):
    for seed in (0, 2 ** 64 - 1, -(2 ** 63)):
        assert model.generate([[5, 6, 7]], 2, do_sample=True, seed=seed).shape == (1, 5)


def test_a_pad_id_outside_the_vocabulary_is_refused_before_a_row_finishes(model):
    """The row that finishes first is fed the pad id: before, that was an IndexError from the
    embedding in the middle of the generation."""
    prompts = torch.tensor([[5, 6, 7], [40, 41, 42]])
    first = model.generate(prompts, 1, eos_token_id=[])[:, -1].tolist()
    with pytest.raises(InputError, match="pad_token_id"):
        model.generate(prompts, 4, eos_token_id=[first[0]], pad_token_id=10 ** 6)
    out = model.generate(prompts, 4, eos_token_id=[first[0]], pad_token_id=1)
    assert out[0, 4:].tolist() == [1, 1, 1]  # finished row padded, with a valid pad id


def test_eos_ids_may_come_as_any_integer_container(model):
    ref = model.generate([[5, 6, 7]], 3, eos_token_id=[])
    for eos in ([], (), np.array([], dtype=np.int64), torch.tensor([], dtype=torch.long)):
        assert torch.equal(model.generate([[5, 6, 7]], 3, eos_token_id=eos), ref)
    stop = int(ref[0, 3])
    for eos in (stop, np.int64(stop), [stop], torch.tensor(stop), np.array([stop])):
        assert model.generate([[5, 6, 7]], 3, eos_token_id=eos).shape[1] == 4


# ----------------------------------------------------------------------------- input ids and masks
def test_float_input_ids_are_refused_not_truncated(model):
    for ids in ([[1.5, 2.0]], [1.5, 2.0], [[1, 2.0]], [True, 2], [torch.tensor(1.5), torch.tensor(2)]):
        with pytest.raises(InputError, match="integer"):
            model.logits(ids)
    with pytest.raises(InputError, match="integer"):
        model.logits(np.array([[1.5, 2.0]]))
    with pytest.raises(InputError, match="token ids"):
        model.logits("hello")


def test_numpy_input_ids_and_masks_just_work(model):
    ids = [[5, 6, 7, 8]]
    want = model.logits(ids)
    for np_ids in (np.array(ids), np.array(ids, dtype=np.int32), np.array(ids[0]), [np.array(ids[0])],
                   [[np.int64(i) for i in ids[0]]], [np.int64(i) for i in ids[0]], torch.tensor(ids[0]),
                   [torch.tensor(ids[0])], [torch.tensor(i) for i in ids[0]]):
        assert torch.equal(model.logits(np_ids), want)
    mask = np.array([[0, 1, 1, 1]])
    assert torch.equal(model.logits(np.array(ids), attention_mask=mask), model.logits(ids, attention_mask=mask.tolist()))
    assert torch.equal(model.generate(np.array(ids), 3), model.generate(ids, 3))


def test_a_fractional_attention_mask_is_refused_not_read_as_padding(model):
    for mask in ([[0.5, 1.0, 1.0]], torch.tensor([[0.5, 1, 1]]), np.array([[1, 1, 0.99]])):
        with pytest.raises(InputError, match="only 0 .padding. and 1"):
            model.logits([[5, 6, 7]], attention_mask=mask)
    # float and bool masks of exact 0/1 are fine
    want = model.logits([[5, 6, 7]], attention_mask=[[0, 1, 1]])
    assert torch.equal(model.logits([[5, 6, 7]], attention_mask=torch.tensor([[0.0, 1.0, 1.0]])), want)
    assert torch.equal(model.logits([[5, 6, 7]], attention_mask=torch.tensor([[False, True, True]])), want)


# ----------------------------------------------------------------------------- chat arguments
@pytest.fixture(scope="module")
def chat_model(tiktoken_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("glm4_chat")
    shutil.copy(tiktoken_dir / "tokenizer.model", d / "tokenizer.model")
    ranks = len((d / "tokenizer.model").read_text().splitlines())
    write_checkpoint(d, thudm_config(vocab=ranks + 14, eos=[ranks, ranks + 7, ranks + 9]), scale=20)
    return glmrt.load(d, progress=False)


def test_chat_takes_eos_token_id_as_extra_stop_ids(chat_model):
    messages = [{"role": "user", "content": "hello world"}]
    full = chat_model.chat(messages, max_new_tokens=6)["token_ids"]
    assert len(full) >= 3
    stop = full[1]
    reply = chat_model.chat(messages, max_new_tokens=6, eos_token_id=stop)
    assert reply["token_ids"] == full[:1]  # stopped at the extra id, which is stripped like the release's
    assert "".join(chat_model.chat_stream(messages, max_new_tokens=6, eos_token_id=[stop])) == \
        chat_model.tokenizer.decode(full[:1])


@pytest.mark.parametrize("kwargs,match", [(dict(input_ids=[1, 2]), "input_ids cannot be given"),
                                          (dict(max_tokens=5), "unknown generation argument.*max_tokens")])
def test_chat_says_which_argument_it_cannot_take(chat_model, kwargs, match):
    with pytest.raises(InputError, match=match):
        chat_model.chat([{"role": "user", "content": "hi"}], **kwargs)
    with pytest.raises(InputError, match=match):
        list(chat_model.chat_stream([{"role": "user", "content": "hi"}], **kwargs))


# ----------------------------------------------------------------------------- weights and CLI
def test_an_integer_weight_is_refused_not_cast_to_float(tmp_path):
    cfg = cw.hf_glm_config(num_hidden_layers=1, max_position_embeddings=16)
    sd = cw.random_hf_glm_state_dict(cfg, seed=0)
    name = "model.layers.0.mlp.down_proj.weight"
    sd[name] = (sd[name] * 100).to(torch.int32)
    path = cw.write_hf_checkpoint(tmp_path, cfg, sd)
    with pytest.raises(CheckpointError, match=rf"{name} \(int32\) is not floating point"):
        glmrt.load(path, dtype="float32", progress=False)


def test_a_closed_pipe_ends_the_command_quietly():
    """`glmrt presets --json | head`: the reader may go away before everything is written."""
    proc = subprocess.Popen([sys.executable, "-m", "glmrt", "presets", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the command writes
    try:
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert b"Traceback" not in err and b"BrokenPipeError" not in err, err.decode()
    assert proc.returncode == 141

