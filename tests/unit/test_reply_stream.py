"""glmrt.reply_stream against glmrt.chat.parse_reply (the non-incremental parser of each release's
reply): fed one token at a time, the deltas reassemble to what parse_reply makes of the whole text."""

import json

import pytest

from glmrt.chat import parse_reply
from glmrt.reply_stream import ReplyStream, held_tail
from glmrt.tokenizer import load_tokenizer


def run(stream: ReplyStream, ids):
    deltas, per_token = [], []
    for token in ids:
        got = stream.feed(token)
        per_token.append(got)
        deltas += got
    deltas += stream.finish()
    content = "".join(d.get("content", "") for d in deltas)
    return content, stream.tool_calls, per_token


def test_held_tail():
    assert held_tail("abc<|ass", ["<|assistant|>"]) == 5
    assert held_tail("abc", ["<|assistant|>"]) == 0
    assert held_tail("xxSTO", ["STOP", "OPEN"]) == 3


@pytest.mark.parametrize("text", ["你好,世界!  答：[[训练时间]]的数据,ok?", "  hello \n world ,你好 ", "中;"])
def test_chatglm6b_text_equals_parse_reply(ice_dir, text):
    tok = load_tokenizer(ice_dir, "chatglm-6b")
    content, calls, _ = run(ReplyStream(tok, "chatglm-6b", "chat"), tok.encode(text))
    assert content == parse_reply("chatglm-6b", tok.decode(tok.encode(text)))["content"] and calls == []


@pytest.mark.parametrize("family", ["chatglm2", "chatglm3"])
def test_sentencepiece_replies_equal_parse_reply(sp_dir, family):
    tok = load_tokenizer(sp_dir, family)
    text = "\n 你好！ how are you? [[训练时间]]  "
    ids = tok.encode(text)
    content, calls, per_token = run(ReplyStream(tok, family, "chat"), ids)
    assert content == parse_reply(family, tok.decode(ids, skip_special=False))["content"] and calls == []
    assert sum(1 for d in per_token if d) > 3  # streamed as it came, not at the end


def test_glm4_tool_call_then_text_equals_parse_reply(tiktoken_dir):
    tok = load_tokenizer(tiktoken_dir, "glm4")
    text = 'get_weather\n{"city": "北京", "unit": "celsius"}<|assistant|>\nDone, 你好.'
    ids = tok.encode(text, allow_special=True)
    content, calls, per_token = run(ReplyStream(tok, "glm4", "chat", tools=["get_weather"]), ids)
    expected = parse_reply("glm4", tok.decode(ids, skip_special=False))
    assert content == expected["content"] == "Done, 你好."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
        [(c["name"], c["arguments"]) for c in expected["tool_calls"]]
    name_deltas = [d for got in per_token for d in got if "tool_calls" in d and "id" in d["tool_calls"][0]]
    assert len(name_deltas) == 1
    first_arguments = next(i for i, got in enumerate(per_token) if any(
        "tool_calls" in d and d["tool_calls"][0]["function"].get("arguments") for d in got))
    assert first_arguments < len(ids) - 8  # arguments stream while they are written


def test_tool_names_are_held_only_while_they_could_still_match(tiktoken_dir):
    tok = load_tokenizer(tiktoken_dir, "glm4")
    stream = ReplyStream(tok, "glm4", "chat", tools=["get_weather"])
    ids = tok.encode("\nThe weather is fine today.")
    got = [stream.feed(t) for t in ids]
    assert any(got[:3])  # a first line that is not a tool name: the text starts at once
    stream = ReplyStream(tok, "glm4", "chat", tools=["get_weather"])
    ids = tok.encode("get_weather is a function name, not a call")
    content, calls, _ = run(stream, ids)
    assert calls == [] and content == "get_weather is a function name, not a call"


def test_chatglm3_call_becomes_json_arguments(sp_dir):
    tok = load_tokenizer(sp_dir, "chatglm3")
    text = 'get_weather\n```python\ntool_call(city="北京", days=3)\n```'
    ids = tok.encode(text)
    content, calls, _ = run(ReplyStream(tok, "chatglm3", "chat", tools=["get_weather"]), ids)
    assert content == "" and [c["function"]["name"] for c in calls] == ["get_weather"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "北京", "days": 3}
    bad = 'get_weather\n```python\ntool_call(city=__import__("os"))\n```'  # never evaluated: plain text
    content, calls, _ = run(ReplyStream(tok, "chatglm3", "chat", tools=["get_weather"]), tok.encode(bad))
    assert calls == [] and "tool_call" in content


def test_stop_strings_across_tokens_in_text_mode(tiktoken_dir):
    tok = load_tokenizer(tiktoken_dir, "glm4")
    ids = tok.encode("The quick brown fox jumps over the lazy dog.")
    stream = ReplyStream(tok, "glm4", "text", stop=["fox jumps"])
    sent = ""
    for token in ids:
        sent += "".join(d["content"] for d in stream.feed(token))
        assert "fox" not in sent
        if stream.stopped:
            break
    sent += "".join(d["content"] for d in stream.finish())
    assert sent == "The quick brown " and stream.stopped
