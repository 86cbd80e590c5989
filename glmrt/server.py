"""`glmrt serve`: an OpenAI-compatible HTTP server over the continuous-batching engine.

FastAPI + uvicorn, one worker. The engine runs on its own thread (glmrt.engine); request handlers
only validate, submit and await per-request asyncio queues that the engine's callbacks fill through
``loop.call_soon_threadsafe``, so no model call ever blocks the event loop. Endpoints:

- ``GET /health``: 503 while the model loads, then 200.
- ``GET /v1/models``: the served model with its context length.
- ``POST /v1/chat/completions``: the release's chat format (glmrt.chat), tools for ChatGLM3 and
  GLM-4 / GLM-4-0414 as OpenAI tool_calls.
- ``POST /v1/completions``: text or token ids (the only endpoint for GLM-130B and models without
  a chat format).
- ``GET /metrics``: Prometheus text.

Errors use OpenAI's object ``{"error": {"message", "type", "param", "code"}}``: 400 for bad requests
(validation included, never 422), 404 for an unknown model, 429 with Retry-After when the waiting
queue is full, 503 with Retry-After while loading, 500 only for internal faults. What glmrt cannot
do (n > 1, response_format json, logprobs, penalties other than repetition_penalty, forced tool
choice) is refused with a 400 naming it.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
import threading
import time
import uuid
from typing import Any, Literal, Optional, Union

from .errors import GLMRTError, InputError

try:  # the serve extra: pip install glmrt[serve]
    import fastapi
    import uvicorn
    from fastapi import FastAPI, Request as HTTPRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as exc:  # pragma: no cover - reported by `glmrt serve`
    _IMPORT_ERROR: ImportError | None = exc
else:
    _IMPORT_ERROR = None

RETRY_AFTER_S = 1


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def unsupported(param: str, why: str) -> APIError:
    return APIError(400, f"{param}: {why}", "invalid_request_error", param, "unsupported_parameter")


if _IMPORT_ERROR is None:
    class _Base(BaseModel):
        model_config = ConfigDict(extra="allow")  # unknown fields (user, store, metadata...) are ignored

    class StreamOptions(BaseModel):
        include_usage: bool = False

    class _Common(_Base):
        model: str
        max_tokens: Optional[int] = Field(default=None, ge=1)
        temperature: Optional[float] = Field(default=None, ge=0, le=2, allow_inf_nan=False)
        top_p: Optional[float] = Field(default=None, gt=0, le=1, allow_inf_nan=False)
        top_k: Optional[int] = Field(default=None, ge=-1)
        repetition_penalty: Optional[float] = Field(default=None, gt=0, allow_inf_nan=False)
        stop: Optional[Union[str, list[str]]] = None
        seed: Optional[int] = None
        stream: bool = False
        stream_options: Optional[StreamOptions] = None
        n: Optional[int] = Field(default=None, ge=1)
        frequency_penalty: Optional[float] = None
        presence_penalty: Optional[float] = None
        logit_bias: Optional[dict] = None
        ignore_eos: bool = False  # vLLM's extension: generate max_tokens whatever the stop tokens (benchmarks)

    class ChatRequest(_Common):
        messages: list[dict]
        max_completion_tokens: Optional[int] = Field(default=None, ge=1)
        tools: Optional[list[dict]] = None
        tool_choice: Optional[Union[Literal["none", "auto", "required"], dict]] = None
        response_format: Optional[dict] = None
        logprobs: Optional[bool] = None
        top_logprobs: Optional[int] = None
        functions: Optional[list] = None
        function_call: Optional[Union[str, dict]] = None

    class CompletionRequest(_Common):
        prompt: Union[str, list[str], list[int], list[list[int]]]
        echo: bool = False
        suffix: Optional[str] = None
        best_of: Optional[int] = None
        logprobs: Optional[int] = None


class _Choice:
    """One generation of an HTTP request: the engine request and its ReplyStream; the callbacks
    run on the engine thread and hand events to the request's asyncio queue."""

    def __init__(self, index, prompt, stream, engine_request, put, metrics):
        self.index = index
        self.prompt = prompt
        self.reply = stream
        self.request = engine_request
        self.put = put
        self.metrics = metrics
        self.last = None
        engine_request.on_token = self.on_token
        engine_request.on_finish = self.on_finish

    def on_token(self, token: int) -> bool:
        now = time.perf_counter()
        if self.last is None:
            self.metrics.ttft.observe(now - self.request.arrival)
        else:
            self.metrics.itl.observe(now - self.last)
        self.last = now
        self.metrics.generation_tokens.inc()
        if token in self.request.stop_ids:
            return False
        deltas = self.reply.feed(token)
        if deltas:
            self.put((self.index, "deltas", deltas))
        return self.reply.stopped

    def on_finish(self, reason: str, error) -> None:
        self.metrics.e2e.observe(time.perf_counter() - self.request.arrival)
        self.metrics.finished.labels(reason).inc()
        if reason == "error":
            self.put((self.index, "error", error))
            return
        deltas = self.reply.finish()
        if deltas:
            self.put((self.index, "deltas", deltas))
        self.put((self.index, "finish", reason))


class _Metrics:
    def __init__(self, state):
        import prometheus_client as prom
        self.registry = prom.CollectorRegistry()
        r = self.registry

        def gauge(name, doc, key):
            g = prom.Gauge(name, doc, registry=r)
            g.set_function(lambda: state.engine.snapshot()[key] if state.engine is not None else 0)

        gauge("glmrt_requests_running", "Requests in a slot (prefilling or decoding)", "running")
        gauge("glmrt_requests_waiting", "Requests waiting for a slot", "waiting")
        gauge("glmrt_slots_used", "KV-cache slots in use", "slots_used")
        gauge("glmrt_slots_total", "KV-cache slots", "slots")
        gauge("glmrt_engine_steps", "Engine steps run", "steps")
        self.prompt_tokens = prom.Counter("glmrt_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generation_tokens = prom.Counter("glmrt_generation_tokens", "Tokens generated", registry=r)
        self.finished = prom.Counter("glmrt_requests_finished", "Finished generations by reason", ["finish_reason"],
                                     registry=r)
        buckets = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 60)
        self.ttft = prom.Histogram("glmrt_time_to_first_token_seconds", "Time to first token", buckets=buckets,
                                   registry=r)
        self.itl = prom.Histogram("glmrt_inter_token_latency_seconds", "Time between two tokens of a stream",
                                  buckets=buckets, registry=r)
        self.e2e = prom.Histogram("glmrt_e2e_request_latency_seconds", "Request latency, arrival to finish",
                                  buckets=buckets + (120, 300), registry=r)

    def render(self) -> bytes:
        import prometheus_client as prom
        return prom.generate_latest(self.registry)


class _State:
    def __init__(self, served_name: str):
        self.served_name = served_name
        self.engine = None
        self.model = None
        self.load_error: str | None = None


def _check_model(state: _State, name: str) -> None:
    if name != state.served_name:
        raise APIError(404, f"The model {name!r} does not exist: this server serves {state.served_name!r} "
                            "(GET /v1/models)", "invalid_request_error", "model", "model_not_found")


def _ready(state: _State):
    if state.engine is None:
        raise APIError(503, "the model is still loading; retry shortly" if state.load_error is None
                       else f"the model failed to load: {state.load_error}", "unavailable_error", None,
                       "model_loading", {"Retry-After": str(RETRY_AFTER_S)})
    return state.engine


def _refuse_unsupported(req) -> None:
    if req.n not in (None, 1):
        raise unsupported("n", "glmrt returns one choice per prompt (n > 1 is not supported); send the request n "
                          "times with different seeds")
    for name in ("frequency_penalty", "presence_penalty"):
        value = getattr(req, name)
        if value not in (None, 0, 0.0):
            raise unsupported(name, "not supported; glmrt has repetition_penalty (multiplicative, as the GLM "
                              "releases use it) instead")
    if req.logit_bias:
        raise unsupported("logit_bias", "not supported")
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options is only allowed when stream is true", "stream_options")


def _stops(req) -> list[str]:
    stop = req.stop
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > 4:
        raise bad_request(f"stop takes at most 4 sequences, got {len(stops)}", "stop")
    if any(not s for s in stops):
        raise bad_request("stop sequences must not be empty", "stop")
    return stops


def _sampling(req):
    from .sampling import SamplingParams
    temperature = 1.0 if req.temperature is None else req.temperature
    top_p = 1.0 if req.top_p is None else req.top_p
    top_k = 0 if req.top_k in (None, -1) else req.top_k
    penalty = 1.0 if req.repetition_penalty is None else req.repetition_penalty
    if temperature == 0:
        return SamplingParams(False, 1.0, 0, 1.0, penalty, None)
    # Every sampled request gets its own seeded generator, so its output never depends on the batch.
    seed = req.seed if req.seed is not None else secrets.randbits(63)
    return SamplingParams(True, temperature, top_k, top_p, penalty, seed)


def _max_tokens(req, engine, prompt_len: int, default: int | None, chat: bool) -> int:
    requested = getattr(req, "max_completion_tokens", None) if chat else None
    requested = requested if requested is not None else req.max_tokens
    room = engine.max_len - prompt_len
    if room < 1:
        raise bad_request(f"This model's maximum context length is {engine.max_len} tokens, and your prompt has "
                          f"{prompt_len} tokens: shorten the prompt", "messages" if chat else "prompt",
                          "context_length_exceeded")
    if requested is None:
        return room if default is None else min(default, room)
    if prompt_len + requested > engine.max_len:
        raise bad_request(f"This model's maximum context length is {engine.max_len} tokens. However, you requested "
                          f"{prompt_len + requested} tokens ({prompt_len} in the prompt, {requested} for the "
                          "completion). Please reduce the prompt or the completion length.",
                          "max_completion_tokens" if chat and req.max_completion_tokens else "max_tokens",
                          "context_length_exceeded")
    return requested


def create_app(served_name: str, loader, *, max_batch: int = 8, max_len: int | None = None,
               max_waiting: int = 64, prefill_chunk: int = 256, prefill_budget: int = 512) -> "FastAPI":
    """The FastAPI app. ``loader()`` returns the glmrt Model; it runs on a thread at start-up while
    /health answers 503."""
    if _IMPORT_ERROR is not None:
        raise GLMRTError(f"glmrt serve needs FastAPI and uvicorn ({_IMPORT_ERROR}); run `pip install glmrt[serve]`")
    from .engine import Engine, QueueFullError, Request
    from .reply_stream import ReplyStream, openai_messages_to_glmrt, tool_names

    state = _State(served_name)
    metrics = _Metrics(state)

    def load() -> None:
        try:
            model = loader()
            model.tokenizer  # a synthetic preset builds its tokenizer now, not in the first request
            engine = Engine(model, max_batch=max_batch, max_len=max_len, max_waiting=max_waiting,
                            prefill_chunk=prefill_chunk, prefill_budget=prefill_budget)
            engine.start()
            state.model, state.engine = model, engine
            print(f"glmrt serve: {served_name} ready ({model}, {max_batch} slots of {engine.max_len} positions)",
                  file=sys.stderr, flush=True)
        except BaseException as exc:  # noqa: BLE001 - reported by /health and the log
            state.load_error = f"{type(exc).__name__}: {exc}"
            print(f"glmrt serve: error: loading {served_name} failed: {state.load_error}", file=sys.stderr,
                  flush=True)
            app.state.load_failed.set()

    async def lifespan(app):
        thread = threading.Thread(target=load, name="glmrt-load", daemon=True)
        thread.start()
        yield
        if state.engine is not None:
            state.engine.stop()

    app = FastAPI(title="glmrt", lifespan=lifespan)
    app.state.glmrt = state
    app.state.load_failed = threading.Event()

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        message = f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid request")
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem(s))"
        return JSONResponse(bad_request(message, param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = "not_found" if exc.status_code == 404 else None
        return JSONResponse(APIError(exc.status_code, str(exc.detail), type_, None, code).body(),
                            status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error").body(),
                            status_code=500)

    @app.get("/health")
    async def health():
        if state.engine is None:
            return JSONResponse(APIError(503, "loading" if state.load_error is None else state.load_error,
                                         "unavailable_error", None, "model_loading").body(), status_code=503,
                                headers={"Retry-After": str(RETRY_AFTER_S)})
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        engine = _ready(state)
        return {"object": "list", "data": [{
            "id": served_name, "object": "model", "created": int(time.time()), "owned_by": "glmrt",
            "max_model_len": engine.max_len, "context_length": engine.max_len,
            "generation": state.model.config.generation, "chat_format": state.model.chat_family}]}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    # ------------------------------------------------------------------ shared plumbing
    def submit_all(engine, prompts, req, max_new, stop_ids, streams, queue, loop):
        choices = []
        put = lambda item: loop.call_soon_threadsafe(queue.put_nowait, item)  # noqa: E731
        params = _sampling(req)
        try:
            for index, (prompt, stream) in enumerate(zip(prompts, streams)):
                request = Request(prompt, max_new, params, frozenset(stop_ids))
                choice = _Choice(index, prompt, stream, request, put, metrics)
                engine.submit(request)
                metrics.prompt_tokens.inc(len(prompt))
                choices.append(choice)
        except QueueFullError as exc:
            for c in choices:
                engine.cancel(c.request)
            raise APIError(429, str(exc), "rate_limit_error", None, "queue_full",
                           {"Retry-After": str(RETRY_AFTER_S)}) from None
        except InputError as exc:
            for c in choices:
                engine.cancel(c.request)
            raise bad_request(str(exc), "messages" if isinstance(req, ChatRequest) else "prompt") from None
        return choices

    async def collect(http_request, choices, queue):
        """Wait for every choice to finish (non-streamed); a client that goes away cancels them."""
        async def disconnected():
            while True:
                message = await http_request.receive()
                if message["type"] == "http.disconnect":
                    return

        watcher = asyncio.ensure_future(disconnected())
        results = {c.index: {"deltas": [], "finish": None, "error": None} for c in choices}
        pending = len(choices)
        try:
            while pending:
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    raise asyncio.CancelledError
                index, kind, value = getter.result()
                if kind == "deltas":
                    results[index]["deltas"].extend(value)
                else:
                    results[index]["finish" if kind == "finish" else "error"] = value
                    pending -= 1
        finally:
            watcher.cancel()
            for c in choices:
                if not c.request.finished:
                    state.engine.cancel(c.request)
        return results

    def sse(obj) -> bytes:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n".encode()

    def usage(choices) -> dict:
        prompt = sum(len(c.prompt) for c in choices)
        completion = sum(len(c.request.tokens) for c in choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def error_object(error) -> dict:
        return APIError(500, f"generation failed: {type(error).__name__}: {error}", "server_error").body()

    def finish_reason(choice, engine_reason) -> str:
        if choice.reply.tool_calls:
            return "tool_calls"
        return "length" if engine_reason == "length" else "stop"

    # ------------------------------------------------------------------ chat
    def chat_body(c, r) -> dict:
        content = "".join(d.get("content", "") for d in r["deltas"])
        message = {"role": "assistant", "content": content or (None if c.reply.tool_calls else "")}
        if c.reply.tool_calls:
            message["tool_calls"] = c.reply.tool_calls
        return {"message": message}

    def completion_body(c, r) -> dict:
        return {"text": "".join(d.get("content", "") for d in r["deltas"]), "token_ids": list(c.request.tokens)}

    def completion_delta(deltas) -> list[dict]:
        text = "".join(d.get("content", "") for d in deltas)
        return [{"text": text}] if text else []

    async def respond(http_request, req, engine, choices, queue, *, rid: str, obj: str, stream_obj: str, body, opening,
                      delta_bodies, closing: dict):
        """The reply to a request whose choices are submitted: one JSON object (`obj`; body(choice,
        result) gives each choice's fields) or, when req.stream, SSE chunks of `stream_obj` (what
        chat and completions share): opening(choice)'s chunks per choice, delta_bodies(deltas)'s as
        tokens come, a `closing` chunk with each choice's finish reason, the usage chunk if asked,
        [DONE]; an engine failure ends the stream with an error event. Leaving the stream early
        (the client went away) cancels the choices still running."""
        created = int(time.time())
        if not req.stream:
            results = await collect(http_request, choices, queue)
            out = []
            for c in choices:
                r = results[c.index]
                if r["error"] is not None:
                    raise APIError(500, f"generation failed: {type(r['error']).__name__}: {r['error']}",
                                   "server_error")
                out.append({"index": c.index, **body(c, r), "logprobs": None,
                            "finish_reason": finish_reason(c, r["finish"])})
            return {"id": rid, "object": obj, "created": created, "model": served_name, "choices": out,
                    "usage": usage(choices)}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(fields, index, reason=None):
            return sse({"id": rid, "object": stream_obj, "created": created, "model": served_name,
                        "choices": [{"index": index, **fields, "logprobs": None, "finish_reason": reason}]})

        async def events():
            pending = len(choices)
            try:
                for c in choices:
                    for fields in opening(c):
                        yield chunk(fields, c.index)
                while pending:
                    index, kind, value = await queue.get()
                    if kind == "deltas":
                        for fields in delta_bodies(value):
                            yield chunk(fields, index)
                    elif kind == "finish":
                        pending -= 1
                        yield chunk(closing, index, finish_reason(choices[index], value))
                    else:
                        yield sse(error_object(value))
                        yield b"data: [DONE]\n\n"
                        return
                if include_usage:
                    yield sse({"id": rid, "object": stream_obj, "created": created, "model": served_name,
                               "choices": [], "usage": usage(choices)})
                yield b"data: [DONE]\n\n"
            finally:
                for c in choices:
                    if not c.request.finished:
                        engine.cancel(c.request)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, http_request: HTTPRequest):
        _check_model(state, req.model)
        engine = _ready(state)
        model = state.model
        _refuse_unsupported(req)
        if req.response_format is not None and req.response_format.get("type", "text") != "text":
            raise unsupported("response_format", f"type {req.response_format.get('type')!r} needs constrained "
                              "decoding, which glmrt does not have; only {'type': 'text'} is accepted")
        if req.logprobs or req.top_logprobs:
            raise unsupported("logprobs", "not supported by glmrt serve")
        if req.functions or req.function_call:
            raise unsupported("functions", "the legacy functions API is not supported: use tools")
        family = model.chat_family
        if model.tokenizer is None or family is None:
            raise bad_request(f"{served_name} has no tokenizer glmrt can read, so it has no chat format: use "
                              "/v1/completions with token ids", "messages")
        if family == "glm-130b":
            raise bad_request("GLM-130B is a base model without a chat format: use /v1/completions", "messages")
        if not req.messages:
            raise bad_request("messages must be a non-empty list", "messages")
        tools = req.tools or None
        choice_mode = req.tool_choice
        if choice_mode is not None and not tools:
            raise bad_request("tool_choice is set but no tools are given", "tool_choice")
        names = []
        if tools:
            try:
                names = tool_names(tools)
            except ValueError as exc:
                raise bad_request(str(exc), "tools") from None
            if isinstance(choice_mode, dict):
                wanted = (choice_mode.get("function") or {}).get("name")
                if wanted not in names:
                    raise bad_request(f"tool_choice names {wanted!r}, which is not in tools", "tool_choice")
            if choice_mode == "required" or isinstance(choice_mode, dict):
                raise unsupported("tool_choice", "forcing a tool call needs constrained decoding, which glmrt does "
                                  "not have; use 'auto' (the model decides) or 'none'")
            if family not in ("chatglm3", "glm4", "hf"):
                raise bad_request(f"this model's chat format ({family}) has no tool calling; tools work with "
                                  "ChatGLM3 and GLM-4 / GLM-4-0414 models", "tools")
            if choice_mode == "none":
                tools, names = None, []
        try:
            messages = openai_messages_to_glmrt(req.messages)
            from .chat import build_prompt, stop_ids as chat_stop_ids
            prompt = build_prompt(family, model.tokenizer, messages, tools)
        except (ValueError, InputError) as exc:
            raise bad_request(str(exc), "messages") from None
        stops = _stops(req)
        max_new = _max_tokens(req, engine, len(prompt), None, chat=True)
        stop_ids = [] if req.ignore_eos else chat_stop_ids(family, model.tokenizer)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        reply = ReplyStream(model.tokenizer, family, "chat", stops, names)
        choices = submit_all(engine, [prompt], req, max_new, stop_ids, [reply], queue, loop)
        return await respond(
            http_request, req, engine, choices, queue, rid=f"chatcmpl-{uuid.uuid4().hex}", obj="chat.completion",
            stream_obj="chat.completion.chunk", body=chat_body,
            opening=lambda c: [{"delta": {"role": "assistant", "content": ""}}],
            delta_bodies=lambda deltas: [{"delta": d} for d in deltas], closing={"delta": {}})

    # ------------------------------------------------------------------ completions
    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, http_request: HTTPRequest):
        _check_model(state, req.model)
        engine = _ready(state)
        model = state.model
        _refuse_unsupported(req)
        if req.echo:
            raise unsupported("echo", "not supported by glmrt serve")
        if req.suffix:
            raise unsupported("suffix", "GLM models have no fill-in-the-middle format in glmrt serve")
        if req.best_of not in (None, 1):
            raise unsupported("best_of", "glmrt returns one completion per prompt")
        if req.logprobs is not None:
            raise unsupported("logprobs", "not supported by glmrt serve")
        raw = req.prompt
        if isinstance(raw, str) or (isinstance(raw, list) and raw and isinstance(raw[0], int)):
            raw = [raw]
        if not raw:
            raise bad_request("prompt is empty", "prompt")
        if len(raw) > engine.max_batch * 4:
            raise bad_request(f"at most {engine.max_batch * 4} prompts per request", "prompt")
        tokenizer = model.tokenizer
        prompts = []
        for item in raw:
            if isinstance(item, str):
                if tokenizer is None:
                    raise bad_request(f"{served_name} has no tokenizer: give the prompt as token ids", "prompt")
                if not item:
                    raise bad_request("prompt text is empty", "prompt")
                try:
                    ids = completion_prompt(model, item)
                except InputError as exc:
                    raise bad_request(str(exc), "prompt") from None
            else:
                if not item:
                    raise bad_request("a token-id prompt is empty", "prompt")
                ids = list(item)
            prompts.append(ids)
        stops = _stops(req)
        if stops and tokenizer is None:
            raise bad_request("stop strings need a tokenizer; this model has none", "stop")
        max_new = min(_max_tokens(req, engine, len(p), 16, chat=False) for p in prompts)
        stop_ids = [] if req.ignore_eos else list(model.config.eos_token_ids)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        streams = [ReplyStream(tokenizer, model.chat_family, "text", stops) if tokenizer is not None
                   else _NoText() for _ in prompts]
        choices = submit_all(engine, prompts, req, max_new, stop_ids, streams, queue, loop)
        return await respond(
            http_request, req, engine, choices, queue, rid=f"cmpl-{uuid.uuid4().hex}", obj="text_completion",
            stream_obj="text_completion", body=completion_body, opening=lambda c: [],
            delta_bodies=completion_delta, closing={"text": ""})

    return app


def completion_prompt(model, text: str) -> list[int]:
    """Input ids of a text completion, with the release's special tokens where it puts them (the
    tokenizer's own ids): GLM-130B's blank filling (glmrt.chat), ``text [gMASK] <sop>`` for
    ChatGLM-6B, ``[gMASK] <sop> text`` for ChatGLM2 and later, an HF tokenizer's own prefix."""
    from .chat import build_prompt
    tokenizer, family = model.tokenizer, model.chat_family
    if family == "glm-130b":
        return build_prompt("glm-130b", tokenizer, [{"role": "user", "content": text}])
    ids = tokenizer.encode(text)
    if family == "hf":
        return list(getattr(tokenizer, "prefix_ids", [])) + ids
    specials = [tokenizer.special["[gMASK]"], tokenizer.special["<sop>"]]
    return ids + specials if family == "chatglm-6b" else specials + ids


class _NoText:
    """The ReplyStream of a model without a tokenizer: tokens only (token_ids in the response)."""

    stopped = False
    tool_calls: list = []

    def feed(self, token):
        return []

    def finish(self):
        return []


def _follow_rank_zero(loader, max_batch: int, max_len: int | None) -> int:
    """A tensor-parallel rank other than 0: load this rank's shard, build the same engine (the same
    slots and cache shape as rank 0's) and replay rank 0's steps until it stops."""
    from .engine import Engine, follow
    model = loader()
    engine = Engine(model, max_batch=max_batch, max_len=max_len)
    comm = model.comm
    print(f"glmrt serve: rank {comm.rank} of {comm.size} ready, following rank 0's engine over {comm.transport}",
          file=sys.stderr, flush=True)
    follow(engine)
    print(f"glmrt serve: rank {comm.rank} of {comm.size}: rank 0 stopped serving; exiting", file=sys.stderr, flush=True)
    # Rank 0 has gone: tearing the gloo group down in the interpreter's exit (its threads still
    # joinable, the peer's sockets closed) can abort the process ("terminate called without an
    # active exception", seen 1 run in 3 in CI). Nothing is left to flush, so leave at once.
    sys.stdout.flush()
    os._exit(0)


def serve(model_spec: str, *, backend: str = "auto", dtype=None, quantize=None, layers=None, host: str = "127.0.0.1",
          port: int = 8000, max_batch: int = 8, max_len: int | None = None, max_waiting: int = 64,
          served_model_name: str | None = None, strict: bool = False, log_level: str = "warning",
          tensor_parallel: int | None = None, distributed_timeout: float = 300.0) -> int:
    """Load ``model_spec`` (on a thread, while /health says 503) and serve it until interrupted.

    ``tensor_parallel``: N under torchrun. Rank 0 serves HTTP and its engine schedules; every
    other rank loads its shard and replays rank 0's engine steps (glmrt.engine.follow) until
    rank 0 stops (or dies: then within ``distributed_timeout`` seconds, with an error)."""
    if _IMPORT_ERROR is not None:
        raise GLMRTError(f"glmrt serve needs FastAPI and uvicorn ({_IMPORT_ERROR}); run `pip install glmrt[serve]`")
    from .api import load

    def loader():
        return load(model_spec, backend=backend, dtype=dtype, quantize=quantize, layers=layers, strict=strict,
                    progress=False, tensor_parallel=tensor_parallel, distributed_timeout=distributed_timeout)

    if tensor_parallel is not None and int(os.environ.get("RANK", "0") or 0) != 0:
        return _follow_rank_zero(loader, max_batch, max_len)

    app = create_app(served_model_name or model_spec, loader, max_batch=max_batch, max_len=max_len,
                     max_waiting=max_waiting)
    config = uvicorn.Config(app, host=host, port=port, workers=1, log_level=log_level, lifespan="on")
    server = uvicorn.Server(config)

    def watch_load():
        app.state.load_failed.wait()
        server.should_exit = True

    threading.Thread(target=watch_load, daemon=True).start()
    print(f"glmrt serve: listening on http://{host}:{port} (loading {model_spec})", file=sys.stderr, flush=True)
    server.run()
    return 2 if app.state.load_failed.is_set() else 0
