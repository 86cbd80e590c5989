"""Tiny tokenizer files, built in the tests (no downloads), laid out as each GLM release lays them out.

- ``ice_dir``: a ChatGLM-6B-style ``ice_text.model`` whose command tokens, ``<n>``, ``<|tab|>`` and
  ``<|blank_N|>`` are pieces of the model, as in the final release.
- ``icetk_dir``: a GLM-130B-style (raw icetk) ``ice_text.model`` without command pieces.
- ``sp_dir``: a ChatGLM2/3-style ``tokenizer.model`` (dummy prefix, byte fallback, identity normalizer).
- ``tiktoken_dir``: a GLM-4-style ``tokenizer.model`` of ``base64(token) rank`` lines: the 256 bytes
  plus merges learnt here with the release's split pattern.
- ``hf_dir`` / ``hf_template_dir``: a ``tokenizer.json`` whose post-processor prepends [gMASK] <sop>,
  the second with a glm-4-9b-chat-hf-style chat template in tokenizer_config.json.
"""

from __future__ import annotations

import base64
import collections
import io
import json
from pathlib import Path

import pytest

CORPUS = [
    "Hello world, this is a tiny corpus for a tiny tokenizer.",
    "The quick brown fox jumps over the lazy dog. The dog sleeps.",
    "你好，世界！今天天气很好。我们来测试一下分词器。",
    "北京和上海今天的天气情况怎么样？请告诉我。",
    "def get_weather(city):    return {'city': city, 'temp': 22}",
    "tool_call(city=\"北京\", unit=\"celsius\") get_weather realtime_aqi",
    "[Round 1] 问：你好 答：你好！有什么可以帮你？",
    "numbers 123 456 7890 and emoji 😀 🎉 test",
    "Answer the following questions as best as you can.",
]

ICE_COMMANDS = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
ICE_WHITESPACE = ["<n>", "<|tab|>"] + [f"<|blank_{i}|>" for i in range(2, 81)]

GLM4_SPECIALS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                 "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>",
                 "<|begin_of_video|>", "<|end_of_video|>"]
GLM4_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")

HF_CHAT_TEMPLATE = (
    "[gMASK]<sop>{%- if tools -%}<|system|>\n# 可用工具\n{% for tool in tools %}"
    "{%- set function = tool.function if tool.get(\"function\") else tool %}\n\n## {{ function.name }}\n\n"
    "{{ function | tojson(indent=4, ensure_ascii=False) }}\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
    "{%- endfor %}{%- endif -%}"
    "{%- for msg in messages %}{%- if msg.role == 'system' %}<|system|>\n{{ msg.content }}{%- endif %}{%- endfor %}"
    "{%- for message in messages if message.role != 'system' %}{%- set role = message['role'] %}"
    "{%- set content = message['content'] %}{%- set meta = message.get(\"metadata\", \"\") %}"
    "{%- if role == 'user' %}<|user|>\n{{ content }}"
    "{%- elif role == 'assistant' and not meta %}<|assistant|>\n{{ content }}"
    "{%- elif role == 'assistant' and meta %}<|assistant|>{{ meta }} \n{{ content }}"
    "{%- elif role == 'observation' %}<|observation|>\n{{ content }}{%- endif %}{%- endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _train_sentencepiece(path: Path, **options) -> None:
    spm = pytest.importorskip("sentencepiece")
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 10), model_writer=model, model_type="bpe", vocab_size=500,
        hard_vocab_limit=False, byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        add_dummy_prefix=True, remove_extra_whitespaces=False, split_digits=True, minloglevel=2, num_threads=1,
        **options)
    path.write_bytes(model.getvalue())


@pytest.fixture(scope="session")
def ice_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("chatglm6b")
    _train_sentencepiece(directory / "ice_text.model", control_symbols=["<pad>"] + ICE_COMMANDS,
                         user_defined_symbols=ICE_WHITESPACE)
    return directory


@pytest.fixture(scope="session")
def icetk_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("glm130b")
    _train_sentencepiece(directory / "ice_text.model", control_symbols=["<pad>"], user_defined_symbols=["<n>"])
    return directory


@pytest.fixture(scope="session")
def sp_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("chatglm3")
    _train_sentencepiece(directory / "tokenizer.model")
    return directory


def _learn_byte_merges(texts: list[str], n_merges: int) -> list[bytes]:
    """A minimal byte-level BPE trainer: the merged tokens, in rank order."""
    regex = pytest.importorskip("regex")
    words = collections.Counter()
    for text in texts:
        for word in regex.findall(GLM4_PATTERN, text):
            words[tuple(bytes([b]) for b in word.encode("utf-8"))] += 1
    merges = []
    for _ in range(n_merges):
        pairs = collections.Counter()
        for word, count in words.items():
            for a, b in zip(word, word[1:]):
                pairs[(a, b)] += count
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda item: (item[1], item[0]))
        merges.append(a + b)
        merged = collections.Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return merges


@pytest.fixture(scope="session")
def tiktoken_ranks() -> dict[bytes, int]:
    ranks = {bytes([b]): b for b in range(256)}
    for token in _learn_byte_merges(CORPUS + ["\n\n", "  \n", "{\n    \"name\"", "\n在调用"], 200):
        ranks.setdefault(token, len(ranks))
    return ranks


@pytest.fixture(scope="session")
def tiktoken_dir(tmp_path_factory, tiktoken_ranks) -> Path:
    directory = tmp_path_factory.mktemp("glm4")
    lines = [f"{base64.b64encode(token).decode()} {rank}" for token, rank in tiktoken_ranks.items()]
    (directory / "tokenizer.model").write_text("\n".join(lines) + "\n")
    return directory


@pytest.fixture(scope="session")
def tiktoken_reference(tiktoken_ranks):
    """The release's encoder, built the way glm-4-9b's tokenization_chatglm.py builds it."""
    tiktoken = pytest.importorskip("tiktoken")
    specials = {name: len(tiktoken_ranks) + i for i, name in enumerate(GLM4_SPECIALS)}
    return tiktoken.Encoding(name="reference", pat_str=GLM4_PATTERN, mergeable_ranks=tiktoken_ranks,
                             special_tokens=specials)


def _build_hf_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=GLM4_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 10, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[gMASK] <sop> $A", pair="[gMASK] <sop> $A $B",
        special_tokens=[("[gMASK]", tok.token_to_id("[gMASK]")), ("<sop>", tok.token_to_id("<sop>"))])
    return tok


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("hf")
    _build_hf_tokenizer().save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    return directory


@pytest.fixture(scope="session")
def hf_template_dir(tmp_path_factory, hf_dir) -> Path:
    directory = tmp_path_factory.mktemp("hf_template")
    (directory / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "chat_template": HF_CHAT_TEMPLATE},
        ensure_ascii=False))
    return directory
