"""glmrt.tokenizer against the rules of each release's tokenizer code, on tiny in-test models.

Expected ids are built here from the underlying library (sentencepiece, tiktoken, tokenizers) and
the release's rules, never by calling the code under test twice.
"""

from __future__ import annotations

import sys

import pytest

from glmrt.errors import CheckpointError, ConfigError, InputError
from glmrt.tokenizer import MissingDependencyError, load_tokenizer

spm = pytest.importorskip("sentencepiece")

# The releases' command-token lists (ChatGLM-6B's SPTokenizer, glm-4-9b's tokenization_chatglm.py).
ICE_COMMANDS = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
GLM4_SPECIALS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                 "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>",
                 "<|begin_of_video|>", "<|end_of_video|>"]

ROUND_TRIP_TEXTS = [
    "Hello world",
    "你好，世界！今天天气很好。",
    "emoji 😀 and 🎉 mixed with 中文",
    "line one\nline two\n\nafter a blank line",
    "tabs\tand  two spaces, then     five",
    "def f(x):\n    return x + 1\n",
]


def _sp(path):
    return spm.SentencePieceProcessor(model_file=str(path))


# ------------------------------------------------------------------------------------------------
# ChatGLM-6B: ice_text.model, command tokens are pieces, newline/tab/blank rewriting
# ------------------------------------------------------------------------------------------------

def test_chatglm6b_special_ids_are_the_models_pieces(ice_dir):
    sp = _sp(ice_dir / "ice_text.model")
    tok = load_tokenizer(ice_dir, "chatglm-6b")
    for name in ICE_COMMANDS:
        assert tok.special[name] == sp.piece_to_id(name)
    assert tok.eos_id == sp.piece_to_id("<eop>")  # config.json eos_token_id 130005 = <eop>
    assert tok.pad_id == sp.piece_to_id("<pad>") == 3  # pad 3, as in the release
    assert tok.token_to_id("<sop>") == sp.piece_to_id("<sop>")
    assert tok.vocab_size == sp.get_piece_size()


def test_chatglm6b_rewrites_newlines_tabs_and_space_runs(ice_dir):
    sp = _sp(ice_dir / "ice_text.model")
    tok = load_tokenizer(ice_dir, "chatglm-6b")
    assert tok.encode("a\nb\tc    d e") == sp.encode("a<n>b<|tab|>c<|blank_4|>d e")
    # Runs longer than 80: whole <|blank_80|> first, a single space left over stays a space.
    assert tok.encode("x" + " " * 85 + "y") == sp.encode("x<|blank_80|><|blank_5|>y")
    assert tok.encode("x" + " " * 81 + "y") == sp.encode("x<|blank_80|> y")
    assert tok.encode("x" + " " * 160 + "y") == sp.encode("x<|blank_80|><|blank_80|>y")


def _ice_preprocess(text: str, max_blank: int = 80) -> str:
    """ChatGLM-6B's SPTokenizer._preprocess: newline -> <n>, then tab -> <|tab|> and runs of
    max_blank..2 spaces -> <|blank_N|> (longest first), what sentencepiece then encodes."""
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    for n in range(max_blank, 1, -1):
        text = text.replace(" " * n, f"<|blank_{n}|>")
    return text


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS + ["x" + " " * 85 + "y"])
def test_chatglm6b_decode_round_trips(ice_dir, text):
    """Reference: sentencepiece on the release's preprocessed text; then decode gives the text back."""
    tok = load_tokenizer(ice_dir, "chatglm-6b")
    ids = tok.encode(text)
    assert ids == _sp(ice_dir / "ice_text.model").encode(_ice_preprocess(text))
    assert tok.decode(ids) == text


def test_chatglm6b_image_offset_from_tokenizer_config(ice_dir, tmp_path):
    (tmp_path / "ice_text.model").write_bytes((ice_dir / "ice_text.model").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text('{"num_image_tokens": 20000}')
    sp = _sp(ice_dir / "ice_text.model")
    tok = load_tokenizer(tmp_path, "chatglm-6b")
    assert tok.encode("hello") == [i + 20000 for i in sp.encode("hello")]
    assert tok.special["[gMASK]"] == sp.piece_to_id("[gMASK]") + 20000
    assert tok.decode(tok.encode("hello 你好")) == "hello 你好"
    assert load_tokenizer(tmp_path, "chatglm-6b", image_offset=0).encode("hello") == sp.encode("hello")


def test_chatglm6b_special_override(ice_dir):
    tok = load_tokenizer(ice_dir, "chatglm-6b", special={"[gMASK]": 130001, "<sop>": 130004})
    assert tok.special["[gMASK]"] == 130001 and tok.token_to_id("<sop>") == 130004
    assert tok.decode([130001, 130004], skip_special=False) == "[gMASK]<sop>"


def test_chatglm6b_needs_whitespace_pieces(icetk_dir):
    with pytest.raises(CheckpointError, match=r"<\|tab\|>"):
        load_tokenizer(icetk_dir, "chatglm-6b", image_offset=0)


# ------------------------------------------------------------------------------------------------
# GLM-130B: icetk, 20000 image ids in front, SwissArmyTransformer's command ids
# ------------------------------------------------------------------------------------------------

def test_glm130b_offsets_and_command_ids(icetk_dir):
    sp = _sp(icetk_dir / "ice_text.model")
    n = sp.get_piece_size()
    tok = load_tokenizer(icetk_dir, "glm-130b")
    assert tok.encode("hello world") == [i + 20000 for i in sp.encode("hello world")]
    # SAT: num_tokens = 150000 (= 20000 + 130000 text pieces), commands counted on from there.
    order = ["[MASK]", "[gMASK]", "[sMASK]", "eod", "sop", "eop", "ENC", "dBLOCK"]
    assert [tok.special[name] for name in order] == [20000 + n + i for i in range(8)]
    assert tok.special["<sop>"] == tok.special["sop"] and tok.special["<eop>"] == tok.special["eop"]
    assert tok.eos_id == 20000 + sp.piece_to_id("</s>") == 20002


def test_glm130b_offset_and_specials_overridable(icetk_dir):
    sp = _sp(icetk_dir / "ice_text.model")
    tok = load_tokenizer(icetk_dir, "glm-130b", image_offset=7,
                         special={"[MASK]": 150000, "[gMASK]": 150001, "sop": 150004, "eop": 150005})
    assert tok.encode("hi") == [i + 7 for i in sp.encode("hi")]
    assert (tok.special["[gMASK]"], tok.special["<sop>"], tok.special["<eop>"]) == (150001, 150004, 150005)
    assert tok.vocab_size > 150005


def test_glm130b_newlines_as_icetk_encode(icetk_dir):
    sp = _sp(icetk_dir / "ice_text.model")
    plain = load_tokenizer(icetk_dir, "glm-130b")  # icetk's encode(): ignore_linebreak=True
    assert plain.encode("a\nb") == [i + 20000 for i in sp.encode("a\nb")]
    rewriting = load_tokenizer(icetk_dir, "glm-130b", linebreak=True)
    assert rewriting.encode("a\nb") == [i + 20000 for i in sp.encode("a<n>b")]
    assert rewriting.decode(rewriting.encode("a\nb 你好")) == "a\nb 你好"  # icetk decode maps <n> back


# ------------------------------------------------------------------------------------------------
# ChatGLM2 / ChatGLM3: SentencePiece with commands appended after the pieces
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["chatglm2", "chatglm3"])
def test_chatglm2_3_commands_follow_the_pieces(sp_dir, family):
    sp = _sp(sp_dir / "tokenizer.model")
    n = sp.get_piece_size()  # 64789 in the release
    tok = load_tokenizer(sp_dir, family)
    names = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]
    if family == "chatglm3":
        names += ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
    assert [tok.special[name] for name in names] == list(range(n, n + len(names)))
    assert tok.vocab_size == n + len(names)
    assert tok.token_to_id("<sop>") == tok.token_to_id("sop") == n + 3
    assert (tok.eos_id, tok.bos_id, tok.pad_id) == (2, 1, 0)
    if family == "chatglm2":
        assert "<|user|>" not in tok.special


def test_chatglm3_newline_is_dummy_prefix_then_newline(sp_dir):
    """The release's encode("\\n") == [30910, 13]: the dummy-prefix piece, then <0x0A>."""
    sp = _sp(sp_dir / "tokenizer.model")
    tok = load_tokenizer(sp_dir, "chatglm3")
    assert tok.encode("\n") == [sp.piece_to_id("▁"), sp.piece_to_id("<0x0A>")]
    assert sp.piece_to_id("<0x0A>") == 13  # the same id as in the release


def test_chatglm3_special_text_is_never_a_special_token(sp_dir):
    tok = load_tokenizer(sp_dir, "chatglm3")
    sp = _sp(sp_dir / "tokenizer.model")
    text = "hi <|user|> [gMASK] there"
    ids = tok.encode(text)
    assert ids == sp.encode(text)
    assert not set(ids) & set(tok.special.values())
    # Opting in (ChatGLM3's encode_special_tokens=True) splits on them and keeps each one token.
    assert tok.encode(text, allow_special=True) == (sp.encode("hi ") + [tok.special["<|user|>"]] + sp.encode(" ")
                                                    + [tok.special["[gMASK]"]] + sp.encode(" there"))


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_chatglm3_decode_round_trips(sp_dir, text):
    """Reference: sentencepiece itself (ChatGLM3 encodes the text as it is); decode gives it back."""
    tok = load_tokenizer(sp_dir, "chatglm3")
    ids = tok.encode(text)
    sp = _sp(sp_dir / "tokenizer.model")
    assert ids == sp.encode(text)
    assert tok.decode(ids) == text == sp.decode(ids)


def test_chatglm3_decode_specials(sp_dir):
    tok = load_tokenizer(sp_dir, "chatglm3")
    ids = [tok.special["<|assistant|>"]] + tok.encode("get_weather\n") + [tok.eos_id]
    assert tok.decode(ids, skip_special=False) == "<|assistant|>get_weather\n"
    assert tok.decode(ids) == "get_weather\n"


# ------------------------------------------------------------------------------------------------
# GLM-4: tiktoken rank file
# ------------------------------------------------------------------------------------------------

def test_glm4_specials_follow_the_ranks(tiktoken_dir, tiktoken_ranks):
    tok = load_tokenizer(tiktoken_dir, "glm4")
    start = len(tiktoken_ranks)  # 151329 in the release
    assert [tok.special[name] for name in GLM4_SPECIALS] == list(range(start, start + len(GLM4_SPECIALS)))
    assert tok.eos_id == start
    assert tok.vocab_size == start + 14


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS + ["it's 12345 o'clock!!\r\n\r\n  x", "<|user|> [gMASK]"])
def test_glm4_encode_matches_the_release_encoder(tiktoken_dir, tiktoken_reference, text):
    tok = load_tokenizer(tiktoken_dir, "glm4")
    ids = tok.encode(text)
    assert ids == tiktoken_reference.encode(text, disallowed_special=())
    assert tok.decode(ids) == text


def test_glm4_special_text_stays_text(tiktoken_dir, tiktoken_reference):
    tok = load_tokenizer(tiktoken_dir, "glm4")
    ids = tok.encode("<|user|>")
    assert tok.special["<|user|>"] not in ids and len(ids) > 1
    assert tok.encode("a<|user|>b", allow_special=True) == tiktoken_reference.encode("a<|user|>b",
                                                                                     allowed_special="all")
    assert tok.decode([tok.special["<|assistant|>"]] + tok.encode("x"), skip_special=False) == "<|assistant|>x"
    assert tok.decode([tok.special["<|assistant|>"]] + tok.encode("x")) == "x"


def test_glm4_partial_character_decodes_to_replacement(tiktoken_dir, tiktoken_reference):
    tok = load_tokenizer(tiktoken_dir, "glm4")
    ids = [tiktoken_reference.encode_single_token(bytes([b])) for b in "😀".encode()]
    assert tok.decode(ids[:2]).endswith("\ufffd")
    assert tok.decode(ids) == "😀"


# ------------------------------------------------------------------------------------------------
# HF tokenizer.json
# ------------------------------------------------------------------------------------------------

def test_hf_prefix_comes_from_the_post_processor(hf_dir):
    tokenizers = pytest.importorskip("tokenizers")
    reference = tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    tok = load_tokenizer(hf_dir, "hf")
    assert tok.prefix_ids == [reference.token_to_id("[gMASK]"), reference.token_to_id("<sop>")]
    assert tok.suffix_ids == []
    assert tok.encode("hello 你好") == reference.encode("hello 你好", add_special_tokens=False).ids
    assert tok.eos_id == reference.token_to_id("<|endoftext|>") == tok.pad_id
    assert tok.special["<|user|>"] == reference.token_to_id("<|user|>")


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_hf_decode_round_trips(hf_dir, text):
    """Reference: the tokenizers library on the same tokenizer.json (no specials added)."""
    tokenizers = pytest.importorskip("tokenizers")
    reference = tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    tok = load_tokenizer(hf_dir, "hf")
    ids = tok.encode(text)
    assert ids == reference.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text


def test_hf_special_text_stays_text_unless_allowed(hf_dir):
    tok = load_tokenizer(hf_dir, "hf")
    assert tok.special["<|user|>"] not in tok.encode("a <|user|> b")
    assert tok.special["<|user|>"] in tok.encode("a <|user|> b", allow_special=True)


# ------------------------------------------------------------------------------------------------
# Loading errors
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family, filename", [("chatglm-6b", "ice_text.model"), ("glm-130b", "ice_text.model"),
                                              ("chatglm3", "tokenizer.model"), ("glm4", "tokenizer.model"),
                                              ("hf", "tokenizer.json")])
def test_missing_file_names_the_file(tmp_path, family, filename):
    with pytest.raises(CheckpointError, match=filename):
        load_tokenizer(tmp_path, family)


@pytest.mark.parametrize("family, filename", [("chatglm-6b", "ice_text.model"), ("chatglm2", "tokenizer.model"),
                                              ("glm4", "tokenizer.model"), ("hf", "tokenizer.json")])
def test_corrupt_file_names_the_file(tmp_path, family, filename):
    (tmp_path / filename).write_bytes(b"\x00\x01 this is not a tokenizer \xff\xfe\n")
    with pytest.raises(CheckpointError, match=filename):
        load_tokenizer(tmp_path, family)


def test_sentencepiece_file_given_as_glm4_is_reported(sp_dir):
    with pytest.raises(CheckpointError, match="family"):
        load_tokenizer(sp_dir, "glm4")


def test_bad_family_and_overrides(sp_dir, tmp_path):
    with pytest.raises(ConfigError, match="chatglm3"):
        load_tokenizer(sp_dir, "chatglm4")
    with pytest.raises(ConfigError, match="image_offset"):
        load_tokenizer(sp_dir, "chatglm3", image_offset=1)
    with pytest.raises(CheckpointError, match="not a directory"):
        load_tokenizer(tmp_path / "nope", "chatglm3")


def test_unknown_token_raises(sp_dir):
    tok = load_tokenizer(sp_dir, "chatglm3")
    with pytest.raises(InputError, match="not in the chatglm3"):
        tok.token_to_id("<definitely-not-a-piece>")


def test_missing_package_says_what_to_install(tiktoken_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # makes `import tiktoken` fail
    with pytest.raises(MissingDependencyError, match=r"glmrt\[tokenizers\]"):
        load_tokenizer(tiktoken_dir, "glm4")


def test_allow_special_needs_the_bracketed_spelling(sp_dir):
    """ChatGLM3's own expression matched bare "sop"; a word containing it must stay text."""
    tok = load_tokenizer(sp_dir, "chatglm3")
    assert tok.encode("isopropyl eop", allow_special=True) == tok.encode("isopropyl eop")
    assert tok.encode("<sop>", allow_special=True) == [tok.special["sop"]]
