"""Chat prompts, stop tokens, reply parsing and streaming detokenization for each GLM release.

Every format reproduces the release's own code id for id (the chat()/build_chat_input of THUDM's
model-hub code, the glm-4-9b-chat template), because a model answers well only to the prompt shape
it was tuned on. Messages are ``{"role": "system" | "user" | "assistant" | "observation",
"content": str, "metadata": str (optional), "tool_calls": [...] (optional, assistant)}``; a tool's
result goes back as an ``observation`` message (see ``observation_message``).
"""

from __future__ import annotations

import ast
import importlib
import json
import re
from datetime import datetime
from typing import Any, Iterable, Mapping, Sequence

from .errors import ConfigError, InputError
from .tokenizer import FAMILIES, MissingDependencyError, Tokenizer

__all__ = ["build_prompt", "stop_ids", "parse_reply", "observation_message", "StreamDecoder", "ROLES",
           "glm4_tool_system_text", "CHATGLM3_TOOL_SYSTEM_PROMPT", "GLM4_TOOL_SYSTEM_INTRO"]

ROLES = ("system", "user", "assistant", "observation")

# ChatGLM3's tool demos open the system message with this line; the tools follow as JSON.
CHATGLM3_TOOL_SYSTEM_PROMPT = ("Answer the following questions as best as you can. "
                               "You have access to the following tools:")
# glm-4-9b-chat's chat template writes this system message whenever tools are given.
GLM4_TOOL_SYSTEM_INTRO = ("你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
                          "你的任务是针对用户的问题和要求提供适当的答复和支持。")
GLM4_TOOL_HEADING = "# 可用工具"
GLM4_FUNCTION_FOOTER = "在调用上述函数时，请使用 Json 格式表示调用的参数。"

_ASSISTANT_TAG = "<|assistant|>"
_TOOL_NAME = re.compile(r"[^\W\d][\w.\-]*")


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ConfigError(f"unknown chat family {family!r}; expected one of {', '.join(FAMILIES)}")


def observation_message(result: Any) -> dict:
    """The message that hands a tool's result back to the model: text as is, anything else as JSON
    (the GLM-4 and ChatGLM3 demos send json.dumps(result, ensure_ascii=False))."""
    return {"role": "observation", "content": result if isinstance(result, str) else
            json.dumps(result, ensure_ascii=False)}


# ----------------------------------------------------------------------------------------------
# Messages and tools
# ----------------------------------------------------------------------------------------------

def _normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict]:
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise InputError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InputError(f"messages[{index}] is a {type(message).__name__}, not a dict")
        role = message.get("role")
        if role not in ROLES:
            raise InputError(f"messages[{index}] has role {role!r}; expected one of {', '.join(ROLES)}")
        content = message.get("content")
        if content is None:
            content = ""
        elif not isinstance(content, str):
            if role != "observation":
                raise InputError(f"messages[{index}] ({role}) content must be a string, got {type(content).__name__}")
            content = json.dumps(content, ensure_ascii=False)
        metadata = message.get("metadata") or ""
        if not isinstance(metadata, str):
            raise InputError(f"messages[{index}] metadata must be a string, got {type(metadata).__name__}")
        tool_calls = message.get("tool_calls") or []
        if tool_calls and role != "assistant":
            raise InputError(f"messages[{index}] ({role}) has tool_calls; only assistant messages make tool calls")
        out.append({"role": role, "content": content, "metadata": metadata,
                    "tool_calls": [_normalize_tool_call(call, index) for call in tool_calls]})
    return out


def _normalize_tool_call(call: Any, index: int) -> dict:
    """Accepts {"name", "arguments"} and OpenAI's {"type": "function", "function": {...}}."""
    if isinstance(call, Mapping) and isinstance(call.get("function"), Mapping):
        call = call["function"]
    if not isinstance(call, Mapping) or not isinstance(call.get("name"), str) or not call["name"]:
        raise InputError(f"messages[{index}] has a tool call without a name: {call!r}")
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError as exc:
            raise InputError(f"messages[{index}] tool call {call['name']!r} has arguments that are not JSON: "
                             f"{exc}") from exc
    if not isinstance(arguments, Mapping):
        raise InputError(f"messages[{index}] tool call {call['name']!r} arguments must be an object, "
                         f"got {type(arguments).__name__}")
    return {"name": call["name"], "arguments": dict(arguments)}


def _functions(tools: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Tool descriptions as bare function dicts ({"name", "description", "parameters"})."""
    if isinstance(tools, (str, bytes)) or not isinstance(tools, Sequence):
        raise InputError("tools must be a list of function descriptions")
    out = []
    for index, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise InputError(f"tools[{index}] is a {type(tool).__name__}, not a dict")
        if "function" in tool or "type" in tool:
            if tool.get("type", "function") != "function" or not isinstance(tool.get("function"), Mapping):
                raise InputError(f"tools[{index}] has type {tool.get('type')!r}; only function tools are supported "
                                 f"(GLM-4's built-in python / simple_browser / cogview tools are not)")
            tool = tool["function"]
        if not isinstance(tool.get("name"), str) or not tool["name"]:
            raise InputError(f"tools[{index}] has no function name")
        out.append(dict(tool))
    return out


def _python_literal(value: Any) -> str:
    # ChatGLM3 writes string arguments in double quotes (PROMPT.md: tool_call(location="beijing")).
    return json.dumps(value, ensure_ascii=False) if isinstance(value, str) else repr(value)


def _role_blocks(message: dict, render_call) -> list[tuple[str, str, str]]:
    """(role, metadata, content) blocks of one message: its text, then one assistant block per tool
    call, the way the releases keep a tool call in history."""
    blocks = []
    if message["content"] or not message["tool_calls"]:
        blocks.append((message["role"], message["metadata"], message["content"]))
    for call in message["tool_calls"]:
        blocks.append(("assistant", call["name"], render_call(call)))
    return blocks


def _command_id(tokenizer: Tokenizer, name: str) -> int:
    if name not in tokenizer.special:
        raise InputError(f"the {tokenizer.family} tokenizer has no {name} token, so it cannot build this chat "
                         f"format; is the family right?")
    return tokenizer.special[name]


def _role_id(tokenizer: Tokenizer, role: str) -> int:
    return _command_id(tokenizer, f"<|{role}|>")


# ----------------------------------------------------------------------------------------------
# Prompt builders, one per release
# ----------------------------------------------------------------------------------------------

def _rounds(family: str, messages: list[dict]) -> tuple[list[tuple[str, str]], str]:
    """(history pairs, query) for the round-based formats, which know only users and assistants."""
    for index, message in enumerate(messages):
        if message["role"] not in ("user", "assistant"):
            raise InputError(f"{family} chats are user/assistant rounds only; messages[{index}] is a "
                             f"{message['role']} message (put instructions in the first user message)")
        if message["tool_calls"] or message["metadata"]:
            raise InputError(f"{family} has no tool calls or message metadata; messages[{index}] has them")
        expected = "user" if index % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise InputError(f"{family} chats alternate user, assistant, ...; messages[{index}] should be {expected}")
    if messages[-1]["role"] != "user":
        raise InputError(f"the last message must be the user's query for {family}")
    pairs = [(messages[i]["content"], messages[i + 1]["content"]) for i in range(0, len(messages) - 1, 2)]
    return pairs, messages[-1]["content"]


def _prompt_chatglm6b(tokenizer: Tokenizer, messages: list[dict]) -> list[int]:
    """ChatGLM-6B's chat(): rounds from 0, a lone query unadorned; [gMASK] <sop> AFTER the text."""
    history, query = _rounds("chatglm-6b", messages)
    if not history:
        prompt = query
    else:
        prompt = "".join(f"[Round {i}]\n问：{q}\n答：{r}\n" for i, (q, r) in enumerate(history))
        prompt += f"[Round {len(history)}]\n问：{query}\n答："
    return tokenizer.encode(prompt) + [_command_id(tokenizer, "[gMASK]"), _command_id(tokenizer, "<sop>")]


def _prompt_chatglm2(tokenizer: Tokenizer, messages: list[dict]) -> list[int]:
    """ChatGLM2-6B's build_prompt(): rounds from 1, blank lines around 问/答; [gMASK] sop FIRST."""
    history, query = _rounds("chatglm2", messages)
    prompt = "".join(f"[Round {i}]\n\n问：{q}\n\n答：{r}\n\n" for i, (q, r) in enumerate(history, 1))
    prompt += f"[Round {len(history) + 1}]\n\n问：{query}\n\n答："
    return [_command_id(tokenizer, "[gMASK]"), _command_id(tokenizer, "<sop>")] + tokenizer.encode(prompt)


_GLM130B_MASK = re.compile(r"\[g?MASK\]")


def _prompt_glm130b(tokenizer: Tokenizer, messages: list[dict]) -> list[int]:
    """GLM-130B has no chat format: the users' text, blank-filled as its generate.py does.

    A [MASK] or [gMASK] written in the text marks where to generate (the ids go in place); without
    one, [gMASK] is appended. The end-of-text token follows unless the text ends with a mask; <sop>
    always closes the prompt."""
    texts = [m["content"] for m in messages if m["role"] == "user"]
    if not texts or any(m["tool_calls"] for m in messages):
        raise InputError("glm-130b prompts are user text only (no chat template, no tools)")
    raw = "\n".join(texts)
    ids: list[int] = []
    last = 0
    for match in _GLM130B_MASK.finditer(raw):
        ids += tokenizer.encode(raw[last:match.start()]) + [_command_id(tokenizer, match.group())]
        last = match.end()
    ids += tokenizer.encode(raw[last:])
    if "MASK]" not in raw:  # the release's test, so "[sMASK]" in the text also suppresses the [gMASK]
        ids.append(_command_id(tokenizer, "[gMASK]"))
        raw += " [gMASK]"
    if not raw.endswith("MASK]"):
        ids.append(tokenizer.eos_id)
    return ids + [_command_id(tokenizer, "<sop>")]


def _render_chatglm3_call(call: dict) -> str:
    arguments = ", ".join(f"{key}={_python_literal(value)}" for key, value in call["arguments"].items())
    return f"```python\ntool_call({arguments})\n```"


def _prompt_chatglm3(tokenizer: Tokenizer, messages: list[dict], tools: Sequence[Mapping] | None) -> list[int]:
    """ChatGLM3's build_chat_input(): per message ``<|role|>`` + encode(metadata + "\\n") +
    encode(content) (two encodes, each with SentencePiece's dummy prefix), closed by <|assistant|>.
    Tools are appended to the first system message as indented JSON (one is opened if none)."""
    if tools:
        tool_json = json.dumps(_functions(tools), indent=4, ensure_ascii=False)
        if messages[0]["role"] == "system":
            messages = [dict(messages[0], content=messages[0]["content"] + "\n" + tool_json)] + messages[1:]
        else:
            system = {"role": "system", "content": CHATGLM3_TOOL_SYSTEM_PROMPT + "\n" + tool_json, "metadata": "",
                      "tool_calls": []}
            messages = [system] + messages
    ids = [_command_id(tokenizer, "[gMASK]"), _command_id(tokenizer, "<sop>")]
    for message in messages:
        for role, metadata, content in _role_blocks(message, _render_chatglm3_call):
            ids += [_role_id(tokenizer, role)] + tokenizer.encode(metadata + "\n") + tokenizer.encode(content)
    return ids + [_role_id(tokenizer, "assistant")]


def _render_glm4_call(call: dict) -> str:
    return json.dumps(call["arguments"], ensure_ascii=False)


def glm4_tool_system_text(tools: Sequence[Mapping[str, Any]]) -> str:
    """The system message glm-4-9b-chat's template writes for function tools (the text after
    ``<|system|>``), each function as ``tojson(indent=4)`` with non-ASCII kept."""
    text = "\n" + GLM4_TOOL_SYSTEM_INTRO + "\n\n" + GLM4_TOOL_HEADING
    for function in _functions(tools):
        text += (f"\n\n## {function['name']}\n\n{json.dumps(function, ensure_ascii=False, indent=4)}"
                 f"\n{GLM4_FUNCTION_FOOTER}")
    return text


def _prompt_glm4(tokenizer: Tokenizer, messages: list[dict], tools: Sequence[Mapping] | None,
                 prefix: list[int]) -> list[int]:
    """glm-4-9b-chat's template: ``[gMASK]<sop>``, then per message ``<|role|>{metadata}\\n{content}``
    (messages with empty content are skipped, as the template does), then ``<|assistant|>``.

    The text between two special tokens is encoded as one piece, as the release tokenizes the
    rendered template; the tool system message comes first."""
    ids = list(prefix)
    if tools:
        ids += [_role_id(tokenizer, "system")] + tokenizer.encode(glm4_tool_system_text(tools))
    for message in messages:
        for role, metadata, content in _role_blocks(message, _render_glm4_call):
            if content:
                ids += [_role_id(tokenizer, role)] + tokenizer.encode(f"{metadata}\n{content}")
    return ids + [_role_id(tokenizer, "assistant")]


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, separators=None,
            sort_keys: bool = False) -> str:
    # transformers' tojson, not Jinja's: no HTML escaping, no key sorting, non-ASCII kept.
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)


def _render_chat_template(template: str, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping] | None,
                          variables: Mapping[str, Any]) -> str:
    """Render a checkpoint's Jinja chat template the way transformers' apply_chat_template does."""
    try:
        jinja2 = importlib.import_module("jinja2")
        sandbox = importlib.import_module("jinja2.sandbox")
        importlib.import_module("jinja2.ext")
    except ImportError as exc:
        raise MissingDependencyError("the 'jinja2' package is needed to render this checkpoint's chat template; "
                                     "run `pip install jinja2`") from exc

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    env = sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template).render(messages=[dict(m) for m in messages], tools=tools,
                                                add_generation_prompt=True, **variables)
    except jinja2.exceptions.TemplateError as exc:
        raise InputError(f"the checkpoint's chat template rejected these messages: {exc}") from exc


# Supplementary Private Use Area-A: where stand-ins for special-token text in messages are drawn.
_STAND_IN_BASE = 0xF0000


def _strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def _replace_strings(value: Any, fn) -> Any:
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, Mapping):
        return {_replace_strings(k, fn): _replace_strings(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_replace_strings(v, fn) for v in value]
    return value


def _templated_prompt(tokenizer: Tokenizer, messages, tools) -> list[int]:
    """The checkpoint's Jinja template rendered as transformers renders it, tokenized so that only
    the special tokens the TEMPLATE writes are special: special-token text inside messages or tools
    (``<|assistant|>`` typed by a user) is encoded as the plain text it is, the promise every glmrt
    chat format keeps (transformers' apply_chat_template would make it a real role token).

    Before rendering, each special-token spelling inside the messages and tools is swapped for a
    private-use character found nowhere in them; the rendered text is cut at the specials left (the
    template's own), and each piece between two of them gets its spellings back and is encoded as
    plain text -- the way the tokenizers library itself splits a text at special tokens first, so
    a conversation without such text gets exactly transformers' ids."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise InputError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, Mapping) else None
        if not isinstance(role, str) or not re.fullmatch(r"\w+", role):
            # The template writes the role into the text (`'<|' + role + '|>'`): only a plain word may go there.
            raise InputError(f"messages[{index}] has role {role!r}; a role is a plain word such as "
                             f"{', '.join(ROLES)}")
    names = sorted((n for n in tokenizer.special if n), key=len, reverse=True)
    seen = set("".join(_strings([messages, tools])))
    base = _STAND_IN_BASE
    while any(chr(base + i) in seen for i in range(len(names))):
        base += len(names)  # a stand-in must never be confused with the caller's own text
    stand_in = {name: chr(base + i) for i, name in enumerate(names)}
    pattern = re.compile("|".join(re.escape(n) for n in names)) if names else None

    def hide(text: str) -> str:
        return pattern.sub(lambda m: stand_in[m.group()], text) if pattern else text

    restore = {c: name for name, c in stand_in.items()}
    rendered = _render_chat_template(tokenizer.chat_template, _replace_strings(list(messages), hide),
                                     _replace_strings(list(tools), hide) if tools else tools,
                                     getattr(tokenizer, "template_variables", {}))
    ids: list[int] = []
    last = 0
    matches = list(pattern.finditer(rendered)) if pattern else []
    for piece_end, match in [(m.start(), m) for m in matches] + [(len(rendered), None)]:
        piece = rendered[last:piece_end]
        if piece:
            ids += tokenizer.encode("".join(restore.get(c, c) for c in piece))
        if match is not None:
            ids.append(tokenizer.special[match.group()])
            last = match.end()
    return ids


def build_prompt(family: str, tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]],
                 tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
    """Input ids that ask the model for the next assistant reply, command tokens included.

    ``tools`` are function descriptions ({"name", "description", "parameters"}, or OpenAI's
    {"type": "function", "function": {...}}); only chatglm3, glm4 and hf take them. For
    ``family="hf"`` the checkpoint's own chat template is rendered when it has one (the special
    tokens the template writes are special, as in transformers; special-token text in the messages
    stays text, see _templated_prompt); otherwise the GLM-4 format is used with the prefix the
    tokenizer's post-processor adds. In every format, text in messages can never forge a role or
    mask token.
    """
    _check_family(family)
    if family == "hf" and getattr(tokenizer, "chat_template", None):
        return _templated_prompt(tokenizer, messages, tools)
    normalized = _normalize_messages(messages)
    if tools and family in ("glm-130b", "chatglm-6b", "chatglm2"):
        raise InputError(f"{family} has no tool-calling format; use chatglm3, glm4 or an hf checkpoint")
    if family == "glm-130b":
        return _prompt_glm130b(tokenizer, normalized)
    if family == "chatglm-6b":
        return _prompt_chatglm6b(tokenizer, normalized)
    if family == "chatglm2":
        return _prompt_chatglm2(tokenizer, normalized)
    if family == "chatglm3":
        return _prompt_chatglm3(tokenizer, normalized, tools)
    if family == "glm4":
        prefix = [_command_id(tokenizer, "[gMASK]"), _command_id(tokenizer, "<sop>")]
    else:
        prefix = list(getattr(tokenizer, "prefix_ids", []))
    return _prompt_glm4(tokenizer, normalized, tools, prefix)


def stop_ids(family: str, tokenizer: Tokenizer) -> list[int]:
    """Token ids that end the assistant's turn, as each release's generation stops.

    GLM-130B: <eop>, eos. ChatGLM-6B: <eop>. ChatGLM2: eos. ChatGLM3 and GLM-4: eos, <|user|>,
    <|observation|> (a tool call ends at <|observation|>). hf: eos plus those role tokens when present.
    """
    _check_family(family)
    if family == "glm-130b":
        ids = [_command_id(tokenizer, "<eop>"), tokenizer.eos_id]
    elif family == "chatglm-6b":
        ids = [_command_id(tokenizer, "<eop>")]
    elif family == "chatglm2":
        ids = [tokenizer.eos_id]
    elif family in ("chatglm3", "glm4"):
        ids = [tokenizer.eos_id, _role_id(tokenizer, "user"), _role_id(tokenizer, "observation")]
    else:
        ids = [tokenizer.eos_id] + [tokenizer.special[t] for t in ("<|user|>", "<|observation|>")
                                    if t in tokenizer.special]
    return list(dict.fromkeys(ids))


# ----------------------------------------------------------------------------------------------
# Replies
# ----------------------------------------------------------------------------------------------

class _MalformedToolCall(ValueError):
    pass


def _chatglm3_arguments(body: str) -> dict:
    """``tool_call(k=v, ...)`` in a python fence -> {k: v}. Values are read with ast.literal_eval
    only: the model's text is never executed."""
    code = body.strip()
    if code.startswith("```"):
        if not code.endswith("```") or "\n" not in code:
            raise _MalformedToolCall("unterminated code fence")
        code = code[code.index("\n") + 1:-3]
    try:
        tree = ast.parse(code.strip(), mode="eval")
        call = tree.body
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "tool_call"):
            raise _MalformedToolCall("not a tool_call(...) expression")
        if call.args or any(kw.arg is None for kw in call.keywords):
            raise _MalformedToolCall("tool_call takes keyword arguments only")
        return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError) as exc:
        raise _MalformedToolCall(str(exc)) from exc


def _glm4_arguments(body: str) -> dict:
    try:
        arguments = json.loads(body.strip())
    except ValueError as exc:
        raise _MalformedToolCall(str(exc)) from exc
    if not isinstance(arguments, dict):
        raise _MalformedToolCall("arguments are not a JSON object")
    return arguments


def _is_chatglm3_call(body: str) -> bool:
    body = body.lstrip()
    return body.startswith("```") or body.startswith("tool_call(")


def _is_glm4_call(body: str) -> bool:
    return body.lstrip().startswith("{")


def _parse_role_segments(text: str, is_call, parse_arguments, training_time: str | None) -> dict:
    """ChatGLM3 / GLM-4 replies: segments split at <|assistant|>; each starts with a metadata line.
    An empty metadata line means plain text; a function name followed by a call body is a tool call."""
    contents, calls = [], []
    try:
        for segment in text.split(_ASSISTANT_TAG):
            metadata, body = segment.split("\n", 1) if "\n" in segment else ("", segment)
            name = metadata.strip()
            if name and _TOOL_NAME.fullmatch(name) and is_call(body):
                calls.append({"name": name, "arguments": parse_arguments(body)})
                continue
            content = (segment if name else body).strip()
            if training_time is not None:
                content = content.replace("[[训练时间]]", training_time)
            if content:
                contents.append(content)
    except _MalformedToolCall:
        return _reply(text.strip(), [], malformed=True)
    return _reply("\n".join(contents), calls)


def _reply(content: str, tool_calls: list[dict], malformed: bool = False) -> dict:
    return {"role": "assistant", "content": content, "tool_calls": tool_calls, "malformed_tool_call": malformed}


_CHATGLM6B_PUNCTUATION = ((",", "，"), ("!", "！"), (":", "："), (";", "；"), (r"\?", "？"))


def parse_reply(family: str, text: str) -> dict:
    """The assistant message in a decoded reply (the ids after the prompt, stop token excluded,
    decoded with ``skip_special=False`` so that ChatGLM3 / GLM-4 <|assistant|> markers survive).

    Returns ``{"role": "assistant", "content", "tool_calls": [{"name", "arguments"}],
    "malformed_tool_call"}``. Plain text gets the release's post-processing (ChatGLM-6B also turns
    ASCII punctuation next to Chinese characters into full-width). A tool call that cannot be parsed
    never raises: the text comes back as content with ``malformed_tool_call`` True.
    """
    _check_family(family)
    if not isinstance(text, str):
        raise InputError(f"parse_reply expects the decoded text, got {type(text).__name__}")
    if family == "glm-130b":
        return _reply(text, [])
    if family == "chatglm-6b":
        content = text.strip().replace("[[训练时间]]", "2023年")
        for ascii_mark, full_width in _CHATGLM6B_PUNCTUATION:
            content = re.sub(r"([\u4e00-\u9fff])%s" % ascii_mark, r"\1%s" % full_width, content)
            content = re.sub(r"%s([\u4e00-\u9fff])" % ascii_mark, r"%s\1" % full_width, content)
        return _reply(content, [])
    if family == "chatglm2":
        return _reply(text.strip().replace("[[训练时间]]", "2023年"), [])
    if family == "chatglm3":
        return _parse_role_segments(text, _is_chatglm3_call, _chatglm3_arguments, "2023年")
    return _parse_role_segments(text, _is_glm4_call, _glm4_arguments, "2024年" if family == "glm4" else None)


class StreamDecoder:
    """Turns generated ids, fed one at a time, into text as soon as it is complete.

    Each step decodes a short window that starts one emitted token back, so SentencePiece's
    dropped leading space and byte-fallback pieces decode as they would in the whole reply; text
    that ends in U+FFFD (a character whose bytes have not all arrived) is held back.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True):
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._ids: list[int] = []
        self._prefix = 0  # window start: the last token already turned into text
        self._read = 0    # ids before this are emitted

    def feed(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        before = self._tokenizer.decode_generated(self._ids[self._prefix:self._read], self._skip_special)
        after = self._tokenizer.decode_generated(self._ids[self._prefix:], self._skip_special)
        if after.endswith("\ufffd") or len(after) < len(before):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return after[len(before):]

    def feed_many(self, token_ids: Iterable[int]) -> str:
        return "".join(self.feed(t) for t in token_ids)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character comes out as U+FFFD)."""
        before = self._tokenizer.decode_generated(self._ids[self._prefix:self._read], self._skip_special)
        after = self._tokenizer.decode_generated(self._ids[self._prefix:], self._skip_special)
        self._prefix = self._read = len(self._ids)
        return after[len(before):]
