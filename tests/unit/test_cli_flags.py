"""`glmrt run` / `glmrt chat` / `glmrt info` flags do what they say: explicit values are kept,
empty ones refused, text needs checked before any weight is read, --quantize / --kernels reach
glmrt.load, the GPU backends report the quantized formats they plan kernels for, and the plan
tables line up. The commands run in-process (glmrt.cli.main) so glmrt.load can be watched."""

from __future__ import annotations

import json
import re
import shutil

import pytest
from tiny_models import TINY_GLM4, thudm_config, write_checkpoint

import glmrt
from glmrt import cli
from glmrt.errors import InputError
from glmrt.model import CHAT_MAX_NEW_TOKENS


@pytest.fixture(scope="module")
def plain_ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("no_tokenizer"), TINY_GLM4)


@pytest.fixture(scope="module")
def chat_ckpt(tiktoken_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("glm4_chat")
    shutil.copy(tiktoken_dir / "tokenizer.model", d / "tokenizer.model")
    ranks = len((d / "tokenizer.model").read_text().splitlines())
    return write_checkpoint(d, thudm_config(vocab=ranks + 14, eos=[ranks, ranks + 7, ranks + 9]))


@pytest.fixture
def loads(monkeypatch):
    """Records each glmrt.load call the CLI makes (kwargs and the model), loading for real."""
    real = glmrt.api.load
    calls = []

    def load(*args, **kwargs):
        model = real(*args, **kwargs)
        calls.append((kwargs, model))
        return model

    monkeypatch.setattr(glmrt.api, "load", load)
    return calls


@pytest.fixture
def no_load(monkeypatch):
    def load(*args, **kwargs):
        raise AssertionError("glmrt.load was called: the error should come before any weight is read")
    monkeypatch.setattr(glmrt.api, "load", load)


def chat_with(monkeypatch, argv, lines=("hello", "")):
    seen = []
    real = glmrt.model.Model.chat_stream

    def chat_stream(self, messages, **kw):
        seen.append(kw)
        return real(self, messages, **{**kw, "max_new_tokens": 2})

    monkeypatch.setattr(glmrt.model.Model, "chat_stream", chat_stream)
    feed = iter(lines)
    monkeypatch.setattr("builtins.input", lambda prompt="": next(feed))
    assert cli.main(argv) == 0
    return seen


@pytest.mark.parametrize("given", [None, 32, 256, CHAT_MAX_NEW_TOKENS])
def test_chat_keeps_an_explicit_max_new_tokens(chat_ckpt, monkeypatch, given):
    argv = ["chat", str(chat_ckpt)] + (["--max-new-tokens", str(given)] if given is not None else [])
    seen = chat_with(monkeypatch, argv)
    assert seen[0]["max_new_tokens"] == (CHAT_MAX_NEW_TOKENS if given is None else given)


def test_chat_help_states_the_chat_default(capsys):
    with pytest.raises(SystemExit):
        cli.main(["chat", "--help"])
    assert f"(default: {CHAT_MAX_NEW_TOKENS})" in " ".join(capsys.readouterr().out.split())


def test_empty_prompt_ids_are_refused_before_loading(plain_ckpt, no_load, capsys):
    for value in ("", " ", ",,"):
        assert cli.main(["run", str(plain_ckpt), "--prompt-ids", value]) == 2
        assert "--prompt-ids is empty" in capsys.readouterr().err


def test_text_without_a_tokenizer_is_refused_before_loading(plain_ckpt, no_load, capsys):
    assert cli.main(["run", str(plain_ckpt), "--prompt", "hello", "--layers", "1"]) == 2
    err = capsys.readouterr().err
    assert "no tokenizer" in err and "--prompt-ids" in err
    assert cli.main(["chat", str(plain_ckpt), "--layers", "1"]) == 2
    assert "no tokenizer" in capsys.readouterr().err


def test_the_tokenizer_check_passes_presets_and_checkpoints_that_have_one(chat_ckpt, plain_ckpt):
    assert cli._tokenizer_family_of("synthetic:chatglm3-6b") == "chatglm3"  # presets get a synthetic tokenizer
    assert cli._tokenizer_family_of(str(chat_ckpt)) == "glm4"
    assert cli._tokenizer_family_of(str(plain_ckpt)) is None
    assert cli._tokenizer_family_of("/nonexistent") == "unknown"  # glmrt.load says what is wrong with it


def test_run_passes_quantize_and_kernels_to_load(plain_ckpt, loads, capsys):
    argv = ["run", str(plain_ckpt), "--prompt-ids", "5,6,7", "--max-new-tokens", "2", "--quantize", "int8",
            "--kernels", "reference", "--json"]
    assert cli.main(argv) == 0
    kwargs, model = loads[-1]
    assert kwargs["quantize"] == "int8" and kwargs["kernels"] == "reference"
    assert all(s.kind == "reference" for s in model.plan.steps)
    assert any(s.node.attrs.get("quant") for s in model.plan.steps if s.node.op == "linear")
    assert len(json.loads(capsys.readouterr().out)["new_ids"]) >= 1


@pytest.mark.parametrize("backend", ["cuda", "rocm"])
def test_info_on_gpu_backends_lists_the_quantized_formats_it_plans(backend, capsys):
    be = glmrt.backends.get_backend(backend)
    if be.probe().available:
        pytest.skip(f"{backend} is available here: info would load the model")
    assert cli.main(["info", "--backend", backend, "synthetic:chatglm3-6b", "--layers", "1",
                     "--quantize", "int4"]) == 0
    out = capsys.readouterr().out
    assert "quantized weights: none" not in out
    assert re.search(r"quantized weights: [^;]*\bint4\b", out)
    if be.native_info().get("built"):  # a build with the GPU module: the plan puts INT4 linears on it
        assert "native.quant_gemv" in out


def table_rows(text: str, header: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header)) + 1
    rows = []
    for line in lines[start:]:
        if not line.startswith("  ") or not line.strip():
            break
        rows.append(line)
    return rows


def test_the_plan_table_lines_up_with_residual_norm(capsys):
    assert cli.main(["info", "--backend", "cpu", "synthetic:glm-4-9b", "--layers", "1"]) == 0
    rows = table_rows(capsys.readouterr().out, "plan (per op")
    assert any(r.split()[0] == "residual_norm" for r in rows)
    assert len({r.index(" x") for r in rows}) == 1, "\n".join(rows)  # the node counts in one column
    kinds = [re.match(r"\s*\S+\s+x\d+\s+", r).end() for r in rows]
    assert len(set(kinds)) == 1, "\n".join(rows)
    reasons = [r.index(r.split()[4]) if len(r.split()) > 4 else None for r in rows]
    assert len({x for x in reasons if x is not None}) == 1, "\n".join(rows)


def test_the_op_coverage_table_lines_up(capsys):
    assert cli.main(["info", "--backend", "cpu"]) == 0
    rows = [r for r in table_rows(capsys.readouterr().out, "  ops (") if r.split()[0] in glmrt.ops.REFERENCE]
    assert any(r.split()[0] == "residual_norm" for r in rows)
    assert len({r.index(r.split()[1], len(r.split()[0]) + 4) for r in rows}) == 1, "\n".join(rows)


def test_stream_checks_the_prompt_length_when_called(plain_ckpt):
    model = glmrt.load(plain_ckpt, progress=False)
    limit = model.config.max_positions
    with pytest.raises(InputError, match="positions"):
        model.stream([[5, 6, 7]], max_new_tokens=limit)  # no next(): the call itself refuses
