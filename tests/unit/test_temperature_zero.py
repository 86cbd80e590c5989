"""temperature=0 is greedy decoding: accepted with do_sample=False (as transformers accepts it),
and with do_sample=True it is the limit of sampling as the temperature goes to 0 -- greedy again,
what OpenAI's API and glmrt's server take it to mean (transformers refuses that combination)."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import TINY_GLM4, write_checkpoint

import glmrt
from glmrt import cli
from glmrt.errors import InputError

PROMPT = [[5, 6, 7, 8]]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("tiny"), TINY_GLM4, scale=20)


@pytest.fixture(scope="module")
def model(ckpt):
    return glmrt.load(ckpt, progress=False)


def test_temperature_zero_without_sampling_is_greedy(model):
    greedy = model.generate(PROMPT, 6, eos_token_id=[])
    assert torch.equal(model.generate(PROMPT, 6, temperature=0, eos_token_id=[]), greedy)
    assert torch.equal(model.generate(PROMPT, 6, temperature=0.0, do_sample=False, top_k=3, eos_token_id=[]), greedy)


def test_temperature_zero_with_sampling_is_greedy_too(model):
    greedy = model.generate(PROMPT, 6, eos_token_id=[])
    for seed in (0, 1, 2):
        out = model.generate(PROMPT, 6, do_sample=True, temperature=0, top_k=50, top_p=0.9, seed=seed,
                             eos_token_id=[])
        assert torch.equal(out, greedy)
    sampled = {tuple(model.generate(PROMPT, 6, do_sample=True, temperature=1.0, seed=s, eos_token_id=[])[0].tolist())
               for s in range(4)}
    assert len(sampled) > 1  # the model does sample at temperature 1, so the test above can tell


def test_negative_temperatures_are_still_refused(model):
    with pytest.raises(InputError, match="temperature must be >= 0"):
        model.generate(PROMPT, 2, temperature=-0.5)


def test_glmrt_run_accepts_temperature_zero(ckpt, model, capsys):
    want = model.generate(PROMPT, 4, eos_token_id=[])[0, 4:].tolist()
    argv = ["run", str(ckpt), "--prompt-ids", "5,6,7,8", "--max-new-tokens", "4", "--temperature", "0", "--json"]
    assert cli.main(argv) == 0
    new = json.loads(capsys.readouterr().out)["new_ids"]
    assert new == want[:len(new)] and new
