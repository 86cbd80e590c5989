"""The tokenizer glmrt builds from a GGUF's own vocabulary, against the release tokenizers it was
written from (conftest's tiny models, through sentencepiece and tiktoken).

The GGUF vocabularies are written as llama.cpp's converter writes them (glmrt.gguf_writer):
ChatGLM3's SentencePiece pieces, scores and types plus the command tokens (``llama``,
``chatglm-spm``), GLM-4's byte-level tokens with merges derived from the ranks plus its specials
(``gpt2``, ``chatglm-bpe``). Nothing of the original tokenizer files reaches the loader.
"""

from __future__ import annotations

import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("sentencepiece")
pytest.importorskip("tokenizers")

import glmrt  # noqa: E402
from glmrt.chat import build_prompt, stop_ids  # noqa: E402
from glmrt.gguf_writer import write_gguf  # noqa: E402
from glmrt.tokenizer import load_tokenizer  # noqa: E402

TEXTS = [
    "Hello world",
    "你好，世界！今天天气很好。",
    "emoji 😀 and 🎉 mixed with 中文",
    "line one\nline two\n\nafter a blank line",
    "tabs\tand  two spaces, then     five",
    "def f(x):\n    return x + 1\n",
    "it's 12345 o'clock!!\r\n\r\n  x",
    "I'm sure they'll say we'd DON'T",
    "  leading spaces and trailing  ",
    "tool_call(city=\"北京\", unit=\"celsius\")",
    "<|user|> [gMASK] sop written as text",
    "",
]
MESSAGES = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "你好 there"},
            {"role": "assistant", "content": "Hi!\n有什么可以帮你？"},
            {"role": "user", "content": "天气 in 北京?"}]
TOOLS = [{"name": "get_weather", "description": "天气", "parameters": {"type": "object",
                                                                       "properties": {"city": {"type": "string"}}}}]


def _config(model_type: str, vocab: int) -> dict:
    cfg = {"architectures": ["X"], "model_type": model_type, "vocab_size": vocab, "hidden_size": 32,
           "intermediate_size": 48, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
           "head_dim": 16, "partial_rotary_factor": 0.5, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
           "max_position_embeddings": 64, "attention_bias": True, "tie_word_embeddings": False}
    if model_type == "chatglm":  # THUDM layout: llama.cpp arch chatglm
        return {"model_type": "chatglm", "padded_vocab_size": vocab, "hidden_size": 32, "ffn_hidden_size": 48,
                "num_layers": 1, "num_attention_heads": 2, "multi_query_attention": True,
                "multi_query_group_num": 1, "kv_channels": 16, "layernorm_epsilon": 1e-5, "seq_length": 64,
                "add_qkv_bias": True}
    return cfg


@pytest.fixture(scope="module")
def chatglm3_gguf(sp_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf_chatglm3") / "chatglm3.gguf"
    return write_gguf(path, _config("chatglm", 640), qtype="F32", tokenizer=sp_dir / "tokenizer.model")


@pytest.fixture(scope="module", params=["chatglm", "glm4"])  # GLM-4-9B (arch chatglm) and GLM-4-0414 (arch glm4)
def glm4_gguf(request, tiktoken_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp(f"gguf_glm4_{request.param}") / "glm4.gguf"
    return write_gguf(path, _config(request.param, 512), qtype="F32", tokenizer=tiktoken_dir / "tokenizer.model")


@pytest.fixture(scope="module")
def chatglm3_model(chatglm3_gguf):
    return glmrt.load(str(chatglm3_gguf), progress=False)


@pytest.fixture(scope="module")
def glm4_model(glm4_gguf):
    return glmrt.load(str(glm4_gguf), progress=False)


# ------------------------------------------------------------------------------------------------
# ChatGLM3: SentencePiece pieces + command tokens


def test_chatglm3_file_holds_the_converters_vocabulary(chatglm3_gguf, sp_dir):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    fields = gguf.GGUFReader(str(chatglm3_gguf)).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    assert fields["tokenizer.ggml.pre"].contents() == "chatglm-spm"
    assert len(tokens) == 640 and tokens[:3] == ["<unk>", "<bos>", "<eos>"]
    n = sp.get_piece_size()
    assert tokens[3:n] == [sp.id_to_piece(i) for i in range(3, n)]
    assert tokens[n:n + 9] == ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>",
                               "<|assistant|>", "<|observation|>"]
    assert tokens[-1] == "[PAD639]"


@pytest.mark.parametrize("text", TEXTS)
def test_chatglm3_encodes_as_the_release(chatglm3_model, sp_dir, text):
    ref = load_tokenizer(sp_dir, "chatglm3")
    tok = chatglm3_model.tokenizer
    assert tok.encode(text) == ref.encode(text)
    assert tok.encode(text, allow_special=True) == ref.encode(text, allow_special=True)
    assert tok.decode(tok.encode(text)) == ref.decode(ref.encode(text))


def test_chatglm3_special_ids_chat_and_config(chatglm3_model, sp_dir):
    ref = load_tokenizer(sp_dir, "chatglm3")
    tok, cfg = chatglm3_model.tokenizer, chatglm3_model.config
    assert chatglm3_model.chat_family == "chatglm3" and cfg.generation == "chatglm3"
    assert tok.special == ref.special and (tok.eos_id, tok.pad_id) == (ref.eos_id, ref.pad_id) == (2, 0)
    assert (cfg.gmask_token_id, cfg.sop_token_id) == (ref.special["[gMASK]"], ref.special["sop"])
    assert set(stop_ids("chatglm3", ref)) <= set(cfg.eos_token_ids)
    assert build_prompt("chatglm3", tok, MESSAGES, TOOLS) == build_prompt("chatglm3", ref, MESSAGES, TOOLS)
    reply = chatglm3_model.chat(MESSAGES, max_new_tokens=3)
    assert reply["role"] == "assistant" and len(reply["token_ids"]) <= 3


# ------------------------------------------------------------------------------------------------
# GLM-4: byte-level BPE + specials


def test_glm4_file_holds_the_converters_vocabulary(glm4_gguf, tiktoken_ranks):
    fields = gguf.GGUFReader(str(glm4_gguf)).fields
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.pre"].contents() == "chatglm-bpe"
    tokens = fields["tokenizer.ggml.tokens"].contents()
    merges = fields["tokenizer.ggml.merges"].contents()
    assert len(tokens) == 512 and tokens[ord("a")] == "a" and tokens[ord(" ")] == "Ġ"
    assert len(merges) == len(tiktoken_ranks) - 256
    assert tokens[len(tiktoken_ranks)] == "<|endoftext|>"


@pytest.mark.parametrize("text", TEXTS)
def test_glm4_encodes_as_the_release(glm4_model, tiktoken_reference, text):
    tok = glm4_model.tokenizer
    assert tok.encode(text) == tiktoken_reference.encode_ordinary(text)
    assert tok.encode(text, allow_special=True) == tiktoken_reference.encode(text, allowed_special="all")
    assert tok.decode(tok.encode(text)) == text


def test_glm4_special_ids_chat_and_config(glm4_model, tiktoken_dir, tiktoken_ranks):
    ref = load_tokenizer(tiktoken_dir, "glm4")
    tok, cfg = glm4_model.tokenizer, glm4_model.config
    assert glm4_model.chat_family == "glm4"
    for name in ("<|endoftext|>", "[gMASK]", "<sop>", "<|user|>", "<|assistant|>", "<|observation|>"):
        assert tok.special[name] == ref.special[name], name
    assert tok.eos_id == ref.eos_id == len(tiktoken_ranks)
    assert (cfg.gmask_token_id, cfg.sop_token_id) == (ref.special["[gMASK]"], ref.special["<sop>"])
    assert set(stop_ids("glm4", ref)) == set(cfg.eos_token_ids)
    assert build_prompt("glm4", tok, MESSAGES, TOOLS) == build_prompt("glm4", ref, MESSAGES, TOOLS)
    assert tok.decode([ref.special["<|user|>"]] + ref.encode("hi"), skip_special=False) == "<|user|>hi"
    reply = glm4_model.chat(MESSAGES, max_new_tokens=3)
    assert reply["role"] == "assistant"


# ------------------------------------------------------------------------------------------------
# other vocabularies


def test_synthetic_byte_vocabulary(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", _config("glm4", 300), qtype="F32")  # tokenizer=None
    fields = gguf.GGUFReader(str(path)).fields
    assert fields["tokenizer.ggml.merges"].contents()  # llama.cpp requires merges for a gpt2 vocabulary
    model = glmrt.load(str(path), progress=False)
    assert model.chat_family is None and model.tokenizer is not None
    ids = model.tokenizer.encode("the cat")
    assert model.tokenizer.decode(ids) == "the cat" and len(ids) <= 7
    with pytest.raises(glmrt.InputError, match="no tokenizer"):
        model.chat([{"role": "user", "content": "hi"}])


def test_unknown_pre_tokenizer_loads_without_tokenizer(tmp_path, tiktoken_dir):
    path = write_gguf(tmp_path / "m.gguf", _config("glm4", 512), qtype="F32",
                      tokenizer=tiktoken_dir / "tokenizer.model", metadata={"tokenizer.ggml.pre": "qwen2"})
    with pytest.warns(UserWarning, match="'qwen2' is not one llama.cpp writes for GLM"):
        model = glmrt.load(str(path), progress=False)
    assert model.tokenizer is None


def test_no_vocabulary(tmp_path):
    model = glmrt.load(str(write_gguf(tmp_path / "m.gguf", _config("glm4", 64), tokenizer=False)), progress=False)
    assert model.tokenizer is None and model.config.vocab_size == 64 and model.config.gmask_token_id is None
