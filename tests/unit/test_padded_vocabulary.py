"""Models whose output layer is wider than their tokenizer (GLM-4: 151552 outputs, 151343 ids;
ChatGLM2/3: 65024 and 64798) never generate the padded ids when they generate text: chat,
chat_stream, `glmrt run --prompt` and `glmrt chat` would otherwise fail to decode the reply.

The tiny checkpoints have 16 ids more than their tokenizers, and the LM head is wrapped so that
the first padded id always has the highest logit (what an untrained padded row can do)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tiny_models import thudm_config, write_checkpoint

import glmrt
from glmrt.sampling import SamplingParams, next_tokens

EXTRA = 16  # model outputs beyond the tokenizer's ids, as in the releases' padded vocabularies


@pytest.fixture(scope="module")
def glm4_dir(tiktoken_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("glm4_padded")
    shutil.copy(tiktoken_dir / "tokenizer.model", d / "tokenizer.model")
    ranks = len((d / "tokenizer.model").read_text().splitlines())
    write_checkpoint(d, thudm_config(vocab=ranks + 14 + EXTRA, eos=[ranks, ranks + 7, ranks + 9]))
    return d


@pytest.fixture(scope="module")
def chatglm3_dir(sp_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("chatglm3_padded")
    shutil.copy(sp_dir / "tokenizer.model", d / "tokenizer.model")
    (d / "tokenizer_config.json").write_text(json.dumps({"added_tokens": ["<|observation|>"]}))
    import sentencepiece
    n = sentencepiece.SentencePieceProcessor(model_file=str(d / "tokenizer.model")).vocab_size()
    write_checkpoint(d, thudm_config(vocab=n + 9 + EXTRA, eos=2))
    return d


def favour_padding(model, monkeypatch):
    """Wrap the LM head so the first padded id wins every step; returns that id."""
    padded = model.tokenizer.vocab_size
    assert model.config.vocab_size == padded + EXTRA
    step = next(s for s in model.plan.steps if s.node.op == "lm_head")
    real = step.fn

    def lm_head(ctx, node, inputs, params):
        out = real(ctx, node, inputs, params).clone()
        out[..., padded] += 1000.0
        out[..., padded + 1:] += 500.0
        return out

    monkeypatch.setattr(step, "fn", lm_head)
    return padded


@pytest.fixture(params=["glm4_dir", "chatglm3_dir"])
def model(request, monkeypatch):
    m = glmrt.load(request.getfixturevalue(request.param), progress=False)
    # The tiny tokenizers number their specials differently from the releases' configs.
    m.config = m.config.replace(gmask_token_id=m.tokenizer.special["[gMASK]"], sop_token_id=m.tokenizer.special["<sop>"])
    favour_padding(m, monkeypatch)
    return m


MESSAGES = [{"role": "user", "content": "hello world"}]


def test_the_wrapped_head_does_pick_a_padded_id(model):
    prompt = model.tokenizer.encode("hello")
    out = model.generate([prompt], 3, eos_token_id=[])[0, len(prompt):]
    assert (out >= model.tokenizer.vocab_size).all()  # what ids-level generate (no tokenizer involved) gives


@pytest.mark.parametrize("sample", [False, True])
def test_chat_never_generates_padded_ids(model, sample):
    kw = dict(do_sample=True, seed=1) if sample else {}
    reply = model.chat(MESSAGES, max_new_tokens=6, **kw)
    assert reply["token_ids"] and all(t < model.tokenizer.vocab_size for t in reply["token_ids"])
    text = "".join(model.chat_stream(MESSAGES, max_new_tokens=6, **kw))
    assert text == model.tokenizer.decode(reply["token_ids"])  # a strict decode: every id has text


def test_an_explicit_vocab_limit_wins_over_the_default(model):
    limit = model.tokenizer.vocab_size - 3
    reply = model.chat(MESSAGES, max_new_tokens=4, vocab_limit=limit)
    assert all(t < limit for t in reply["token_ids"])


def test_decode_generated_never_raises_for_ids_beyond_the_tokenizer(model):
    tok = model.tokenizer
    ids = tok.encode("hello world")
    assert tok.decode_generated(ids) == tok.decode(ids)
    assert tok.decode_generated(ids + [tok.vocab_size + 3] + ids) == tok.decode(ids) + "\ufffd" + tok.decode(ids)
    with pytest.raises(glmrt.errors.InputError, match="outside"):
        tok.decode(ids + [tok.vocab_size + 3])  # plain decode still says what is wrong


def test_cli_run_prompt_and_chat_reply_with_text(model, monkeypatch, capsys):
    from glmrt import cli

    monkeypatch.setattr(glmrt.api, "load", lambda *a, **k: model)
    assert cli.main(["run", "ignored", "--prompt", "hello", "--max-new-tokens", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["new_ids"] and all(t < model.tokenizer.vocab_size for t in result["new_ids"])
    lines = iter(["hello world", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert cli.main(["chat", "ignored", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr()
    assert "assistant> " in out.out and "Traceback" not in out.err and "error" not in out.err


def test_next_tokens_masks_ids_at_and_beyond_the_limit():
    logits = torch.zeros(3, 10)
    logits[:, 8] = 50.0  # the best ids are past the limit
    logits[:, 9] = 40.0
    seen = torch.zeros(3, 1, dtype=torch.long)
    greedy = next_tokens(logits, seen, SamplingParams(), None, vocab_limit=8)
    assert (greedy < 8).all()
    g = torch.Generator().manual_seed(0)
    sampled = torch.stack([next_tokens(logits, seen, SamplingParams(do_sample=True), g, vocab_limit=8)
                           for _ in range(50)])
    assert (sampled < 8).all()
    assert (next_tokens(logits, seen, SamplingParams(), None) == 8).all()  # no limit: unchanged


def test_vocab_limit_out_of_range_is_an_input_error(model):
    for bad in (0, model.config.vocab_size + 1, 2.5, True):
        with pytest.raises(glmrt.errors.InputError, match="vocab_limit"):
            model.stream([[5, 6]], 2, vocab_limit=bad)
