"""Generated tokens -> OpenAI-style deltas, incrementally: text that never splits a UTF-8
character, stop strings held back while a tail could still become one, and each release's reply
format (glmrt.chat) with its tool calls, decided as early as the text allows.

A ``ReplyStream`` is fed token ids one at a time and returns the deltas that became safe to send;
``finish()`` returns the rest. The non-streamed answer is the concatenation of the same deltas, so
streamed and non-streamed text are equal by construction.

Delta kinds (dicts, as OpenAI's chat deltas): ``{"content": str}``, and for tool calls
``{"tool_calls": [{"index", "id", "type": "function", "function": {"name", "arguments": ""}}]}``
followed by ``{"tool_calls": [{"index", "function": {"arguments": str}}]}``.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Sequence

from . import chat
from .tokenizer import Tokenizer

_ASSISTANT = "<|assistant|>"
# What parse_reply replaces in each release's plain text.
_TRAINING_TIME = {"chatglm-6b": "2023年", "chatglm2": "2023年", "chatglm3": "2023年", "glm4": "2024年"}
_TRAINING_MARK = "[[训练时间]]"
_CHATGLM6B_ASCII_PUNCTUATION = ",!:;?"
SEGMENT_FAMILIES = ("chatglm3", "glm4", "hf")  # replies split at <|assistant|>, a metadata line first
TOOL_FAMILIES = ("chatglm3", "glm4", "hf")


def held_tail(text: str, patterns: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of one of ``patterns`` (a
    tail that may still grow into one of them, so it must not be sent yet)."""
    best = 0
    for pattern in patterns:
        for n in range(min(len(pattern) - 1, len(text)), best, -1):
            if pattern.startswith(text[len(text) - n:]):
                best = n
                break
    return best


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> int:
    """Index of the earliest stop string in text[start:] (-1 when none)."""
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else -1


class ReplyStream:
    """Incremental text of one choice. mode "text" (completions: the decoded text, stop strings cut)
    or "chat" (the release's reply format; ``tools`` are the declared function names, parsed as
    tool calls only when given)."""

    def __init__(self, tokenizer: Tokenizer, family: str | None, mode: str = "text", stop: Sequence[str] = (),
                 tools: Sequence[str] = ()):
        if mode not in ("text", "chat"):
            raise ValueError(f"mode must be text or chat, not {mode!r}")
        self.mode = mode
        self.family = family
        self.segmented = mode == "chat" and family in SEGMENT_FAMILIES
        # <|assistant|> separates segments, so it must survive decoding (other specials too, as
        # Model.chat decodes); plain text drops the specials.
        self._decoder = chat.StreamDecoder(tokenizer, skip_special=not self.segmented)
        self._vocab_size = tokenizer.vocab_size
        self.stop = [s for s in stop if s]
        self.tools = list(tools)
        self.raw = ""  # decoded text so far (cut at a stop string)
        self.stopped = False  # a stop string was found
        self._sent_content = ""
        self._calls: list[dict] = []  # {"id", "name", "arguments_sent", "segment"}
        self._finished = False

    # ------------------------------------------------------------------ feeding
    def feed(self, token_id: int) -> list[dict]:
        """Deltas that are safe after this token (none once stopped)."""
        if self.stopped or self._finished:
            return []
        if not 0 <= token_id < self._vocab_size:
            return []  # padding rows of the embedding past the tokenizer's vocabulary: no text
        piece = self._decoder.feed(token_id)
        if not piece:
            return []
        return self._add(piece, final=False)

    def finish(self) -> list[dict]:
        """Everything still held back (call once, when generation ended)."""
        if self._finished:
            return []
        out = [] if self.stopped else self._add(self._decoder.flush(), final=True)
        if self.stopped:
            out = self._emit(final=True)
        self._finished = True
        return out

    def _add(self, piece: str, final: bool) -> list[dict]:
        start = max(0, len(self.raw) - max((len(s) for s in self.stop), default=0))
        self.raw += piece
        if self.stop:
            hit = find_stop(self.raw, self.stop, start)
            if hit >= 0:
                self.raw = self.raw[:hit]
                self.stopped = True
                final = True
        return self._emit(final)

    @property
    def tool_calls(self) -> list[dict]:
        return [{"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments_sent"]}}
                for c in self._calls]

    # ------------------------------------------------------------------ rendering
    def _emit(self, final: bool) -> list[dict]:
        if self.mode == "text":
            keep = len(self.raw) if final else len(self.raw) - held_tail(self.raw, self.stop)
            return self._content_delta(self.raw[:keep])
        if not self.segmented:
            return self._content_delta(self._plain_content(self.raw, final))
        return self._emit_segments(final)

    def _content_delta(self, content: str) -> list[dict]:
        if not content.startswith(self._sent_content):
            # Cannot happen with the hold-back rules above; never take back what was sent.
            return []
        delta = content[len(self._sent_content):]
        if not delta:
            return []
        self._sent_content = content
        return [{"content": delta}]

    def _plain_content(self, text: str, final: bool) -> str:
        """parse_reply's content of a plain reply, over the part of ``text`` that can no longer change."""
        if not final:
            patterns = list(self.stop) + [_TRAINING_MARK] + ([_ASSISTANT] if self.segmented else [])
            text = text[:len(text) - held_tail(text, patterns)]
            if self.family == "chatglm-6b" and text and text[-1] in _CHATGLM6B_ASCII_PUNCTUATION:
                text = text[:-1]  # becomes full-width if a Chinese character follows
        if self.family in ("chatglm-6b", "chatglm2"):
            content = chat.parse_reply(self.family, text)["content"]
        else:
            content = text.strip()
            if self.family in _TRAINING_TIME:
                content = content.replace(_TRAINING_MARK, _TRAINING_TIME[self.family])
        if not final:
            content = content.rstrip()  # trailing whitespace goes if nothing follows
        return content

    # ------------------------------------------------------------------ ChatGLM3 / GLM-4 segments
    def _is_call_start(self, body: str) -> bool | None:
        """Whether a segment body starts a tool call: True, False, or None (cannot tell yet)."""
        text = body.lstrip()
        if self.family == "chatglm3":
            starts = ("```", "tool_call(")
            if any(text.startswith(s) for s in starts):
                return True
            return None if any(s.startswith(text) for s in starts) else False
        if not text:
            return None
        return text.startswith("{")

    def _classify(self, segment: str, complete: bool) -> tuple[str, str, str]:
        """("content" | "call" | "undecided", name, body) of one segment."""
        if not self.tools:
            return "content", "", ""
        if "\n" not in segment:
            head = segment.strip()
            if complete or (head and not any(t.startswith(head) for t in self.tools)):
                return "content", "", ""
            return "undecided", "", ""
        metadata, body = segment.split("\n", 1)
        name = metadata.strip()
        if name not in self.tools:
            return "content", "", ""
        start = self._is_call_start(body)
        if start is None:
            return ("content", "", "") if complete else ("undecided", name, body)
        return ("call", name, body) if start else ("content", "", "")

    def _emit_segments(self, final: bool) -> list[dict]:
        segments = self.raw.split(_ASSISTANT)
        out: list[dict] = []
        contents: list[str] = []
        call_index = 0
        for i, segment in enumerate(segments):
            complete = final or i < len(segments) - 1
            kind, name, body = self._classify(segment, complete)
            if kind == "undecided":
                break
            if kind == "call" and self.family == "chatglm3":
                if not complete:
                    break  # ChatGLM3's python block becomes JSON only once it is whole
                try:
                    arguments = json.dumps(chat._chatglm3_arguments(body), ensure_ascii=False)
                except chat._MalformedToolCall:
                    kind = "content"
            if kind == "content":
                if call_index < len(self._calls) and self._calls[call_index]["segment"] == i:
                    kind = "call"  # already sent as a call (GLM-4 JSON that turned out malformed): keep it
                else:
                    text = segment if complete else segment
                    piece = self._plain_content(text, complete)
                    if piece or not complete:
                        contents.append(piece)
                    if not complete:
                        break
                    continue
            # ---- a tool call
            if call_index == len(self._calls):
                self._calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "name": name, "arguments_sent": "",
                                    "segment": i})
                out.append({"tool_calls": [{"index": call_index, "id": self._calls[-1]["id"], "type": "function",
                                            "function": {"name": name, "arguments": ""}}]})
            call = self._calls[call_index]
            if self.family == "chatglm3":
                target = arguments
            else:
                target = body.strip()
                if not complete:
                    target = body[:len(body) - held_tail(body, [_ASSISTANT] + list(self.stop))].strip()
            if target.startswith(call["arguments_sent"]) and len(target) > len(call["arguments_sent"]):
                out.append({"tool_calls": [{"index": call_index,
                                            "function": {"arguments": target[len(call["arguments_sent"]):]}}]})
                call["arguments_sent"] = target
            call_index += 1
            if not complete:
                break
        out = self._content_delta("\n".join(c for c in contents if c) if contents else self._sent_content) + out
        return out


def openai_messages_to_glmrt(messages: Sequence[dict]) -> list[dict]:
    """OpenAI chat messages -> glmrt.chat messages: system/developer -> system, tool/function ->
    observation, text content parts joined, assistant tool_calls kept (glmrt.chat reads OpenAI's
    shape). Raises ValueError with a message for anything else."""
    out = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{index}] must be an object with a role and content")
        role = message.get("role")
        mapped = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
                  "tool": "observation", "function": "observation"}.get(role)
        if mapped is None:
            raise ValueError(f"messages[{index}] has role {role!r}; expected system, developer, user, assistant or tool")
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ValueError(f"messages[{index}].content[{j}]: only text parts are supported "
                                     f"(type 'text' with a string 'text')")
                parts.append(part["text"])
            content = "".join(parts)
        elif content is not None and not isinstance(content, str):
            raise ValueError(f"messages[{index}].content must be a string or a list of text parts")
        if content is None and not (mapped == "assistant" and message.get("tool_calls")):
            if mapped != "assistant":
                raise ValueError(f"messages[{index}] ({role}) has no content")
            content = ""
        converted = {"role": mapped, "content": content or ""}
        calls = message.get("tool_calls")
        if calls:
            if mapped != "assistant":
                raise ValueError(f"messages[{index}] ({role}) has tool_calls; only assistant messages make them")
            if not isinstance(calls, list):
                raise ValueError(f"messages[{index}].tool_calls must be a list")
            converted["tool_calls"] = calls
        out.append(converted)
    return out


def tool_names(tools: Sequence[dict]) -> list[str]:
    names = []
    for index, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" \
                or not isinstance(tool.get("function"), dict) or not isinstance(tool["function"].get("name"), str) \
                or not re.fullmatch(r"[^\W\d][\w.\-]*", tool["function"]["name"]):
            raise ValueError(f"tools[{index}] must be {{'type': 'function', 'function': {{'name': ..., "
                             f"'description': ..., 'parameters': {{...}}}}}} with a name of letters, digits, _ . -")
        names.append(tool["function"]["name"])
    return names
