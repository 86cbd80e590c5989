"""The serving engine: continuous batching over one preallocated KV cache.

The engine owns every request's state (DESIGN.md). It has B slots, rows of one batched KV cache
allocated once. Each :meth:`Engine.step`:

1. takes new requests and cancellations handed over by other threads;
2. admits waiting requests into free slots and prefills them, one request per forward, in fixed
   chunks of ``prefill_chunk`` tokens under a per-step budget of ``prefill_budget`` tokens, so a long
   prompt does not stall the running streams (prefix-masked generations, GLM-130B and ChatGLM-6B,
   prefill the whole prompt at once: its bidirectional context must be in one forward);
3. runs ONE batched decode over the slots that are decoding, each row at its own cache position,
   with its own positions (2-D for ChatGLM-6B) and mask; the decode plan is the model's plan with
   its attention nodes marked ``per_row_cache`` (kernels refuse it in supports() where they cannot,
   so a fallback shows in :attr:`Engine.decode_plan`'s report);
4. samples each request with its own parameters and seeded generator;
5. frees the slot of a request that hit a stop token, its length, a stop its caller asked for, or
   a cancel.

Decoding slots are kept in rows [0, n) of the cache (a finished request's slot is refilled by the
last one, one copy of its cached keys), so a decode step reads one contiguous batch.

Tensor parallelism (``glmrt serve --tensor-parallel N`` under torchrun): the engine of rank 0
schedules; before each forward it sends the other ranks a :class:`StepPlan` (the KV-cache row
copies it made since its previous forward, then the forward's inputs), and every other rank runs
:func:`follow`, which replays each plan on its own shard of the model and cache, so the forwards'
collectives match. Sampling stays on rank 0 (every rank has the gathered logits; the others drop
them). An idle rank 0 sends a keep-alive plan, and a "stop" plan when it stops; a follower that
hears nothing within the process group's timeout (rank 0 died) ends with an error that says so.

Batch invariance: chunk boundaries are fixed per request and the decode step runs with
``ForwardContext.row_invariant``, so on the CPU with float32 a request's tokens are bit for bit the
same whatever it is batched with (the native attention reads each row's own key count, the float
GEMV computes rows alike at any row count). Other backends and dtypes are exact only up to the
order of floating-point sums.
"""

from __future__ import annotations

import dataclasses
import itertools
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch

from .errors import GLMRTError, InputError
from .lowering import Plan, execute, lower
from .ops import ForwardContext, KVCache
from .sampling import SamplingParams, next_tokens

FINISH_REASONS = ("stop", "length", "cancelled", "error")


class QueueFullError(GLMRTError):
    """The engine's waiting queue is full: retry later."""


@dataclass(frozen=True)
class StepPlan:
    """One forward of the engine as rank 0 runs it, for the other tensor-parallel ranks to run
    the same (see :func:`follow`). ``copies``: the KV-cache row copies (src, dst, length) rank 0
    made since its previous plan, in order, applied first. ``kind``:

    - "prefill": prompt tokens [start, stop) of the request in ``slot`` (``prompt``: its whole
      prompt, from which a follower rebuilds the positions and mask as rank 0 did);
    - "decode": one batched decode of rows [0, len(tokens)): each row's fed token, its positions
      ((n, 1), or (n, 2, 1) for 2-D RoPE) and its cache position;
    - "idle": nothing to run (a keep-alive within the process group's timeout);
    - "stop": rank 0 stopped serving; the follower returns.
    """

    kind: str
    copies: tuple[tuple[int, int, int], ...] = ()
    slot: int = 0
    prompt: tuple[int, ...] = ()
    start: int = 0
    stop: int = 0
    tokens: tuple[int, ...] = ()
    positions: torch.Tensor | None = None
    cache_positions: tuple[int, ...] = ()


@dataclass(eq=False)
class Request:
    """One generation in the engine. Callbacks run on the engine's thread and must be quick.

    on_token(token_id) -> bool: called for every generated token (a stop token too, before the
        request finishes); returning True finishes the request with reason "stop" (stop strings).
    on_finish(reason, error): called once, with a reason of FINISH_REASONS (error: the exception).
    """

    prompt: list[int]
    max_new_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: frozenset = frozenset()
    on_token: Callable[[int], bool] | None = None
    on_finish: Callable[[str, BaseException | None], None] | None = None
    request_id: str = ""

    # ---- engine state (set by the engine)
    tokens: list[int] = field(default_factory=list)  # generated so far
    finish_reason: str | None = None
    error: BaseException | None = None
    arrival: float = 0.0
    first_token_time: float | None = None
    seq: int = 0
    slot: int | None = None
    prefilled: int = 0  # prompt tokens in the cache
    fed: int = 0  # generated tokens fed back (in the cache)
    _layout: object = None
    _generator: torch.Generator | None = None
    _logits: torch.Tensor | None = None  # (1, V) awaiting a sample
    _cancelled: bool = False
    _done: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Ask the engine to drop this request; its slot is freed at the next step."""
        self._cancelled = True

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)


class Engine:
    """Continuous batching for one :class:`glmrt.Model` (see the module docstring).

    max_batch: slots (B). max_len: positions per slot (prompt + new tokens), default the model's
    context capped at 2048. prefill_chunk / prefill_budget: prompt tokens per forward / per step.
    max_waiting: requests that may wait for a slot; :meth:`submit` raises QueueFullError beyond.
    """

    def __init__(self, model, max_batch: int = 8, max_len: int | None = None, prefill_chunk: int = 256,
                 prefill_budget: int = 512, max_waiting: int = 256):
        for name, value in (("max_batch", max_batch), ("prefill_chunk", prefill_chunk),
                            ("prefill_budget", prefill_budget), ("max_waiting", max_waiting)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"{name} must be a positive integer, got {value!r}")
        cfg = model.config
        if max_len is None:
            max_len = min(cfg.max_positions, 2048)
        if not isinstance(max_len, int) or max_len < 2:
            raise InputError(f"max_len must be an integer >= 2, got {max_len!r}")
        if max_len > cfg.max_positions:
            raise InputError(f"max_len {max_len} exceeds the model's {cfg.max_positions} positions")
        self.model = model
        self.max_batch = max_batch
        self.max_len = max_len
        self.prefill_chunk = prefill_chunk
        self.prefill_budget = prefill_budget
        self.max_waiting = max_waiting
        self.device = model.device
        self.decode_plan = per_row_plan(model.plan)
        # One scratch row past the B slots: swapping two slots goes through it.
        self.cache = KVCache(cfg.num_layers, max_batch + 1, model.kv_heads, max_len, cfg.head_dim, model.dtype,
                             model.device)
        self._slots: list[Request | None] = [None] * max_batch
        self._n_decode = 0  # slots [0, n_decode) are decoding
        self._n_prefill = 0  # slots [n_decode, n_decode + n_prefill) are prefilling
        self._waiting: deque[Request] = deque()
        self._incoming: deque[Request] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0
        self.prompt_tokens = 0
        self.generated_tokens = 0
        # Tensor parallelism: rank 0 schedules and sends a StepPlan before each forward; the other
        # ranks' engines only replay them (follow()).
        comm = model.comm
        self._comm = comm
        self.leader = comm is None or comm.rank == 0
        self._pending_copies: list[tuple[int, int, int]] = []
        self._last_sent = time.monotonic()
        self._keepalive_s = max(0.5, min(10.0, comm.timeout_s / 4)) if comm is not None else None

    # ------------------------------------------------------------------ submitting
    def submit(self, request: Request) -> Request:
        """Validate a request and queue it (any thread). Raises InputError for a bad request and
        QueueFullError when max_waiting requests already wait."""
        cfg = self.model.config
        prompt = request.prompt
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.reshape(-1).tolist()
        try:
            prompt = [int(t) for t in prompt]
        except (TypeError, ValueError) as exc:
            raise InputError(f"a prompt must be a list of token ids: {exc}") from exc
        if not prompt:
            raise InputError("the prompt is empty: give at least one token")
        bad = [t for t in prompt if not 0 <= t < cfg.vocab_size]
        if bad:
            raise InputError(f"token id {bad[0]} is outside the vocabulary [0, {cfg.vocab_size})")
        n = request.max_new_tokens
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise InputError(f"max_new_tokens must be a positive integer, got {n!r}")
        if len(prompt) + n > self.max_len:
            raise InputError(f"prompt ({len(prompt)} tokens) plus max_new_tokens ({n}) is {len(prompt) + n} tokens, "
                             f"more than the {self.max_len} positions of a slot: shorten the prompt or ask for fewer "
                             "tokens")
        if not self.leader:
            raise InputError(f"this engine is tensor-parallel rank {self._comm.rank}: requests go to rank 0, whose "
                             "engine schedules for all ranks (the others run glmrt.engine.follow)")
        request.prompt = prompt
        ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
        request._layout = self.model._layout(ids, torch.ones_like(ids))  # raises InputError for a bad prefix prompt
        if request.params.seed is not None:
            request._generator = torch.Generator(device=self.device).manual_seed(int(request.params.seed))
        request.arrival = time.perf_counter()
        with self._lock:
            if len(self._waiting) + len(self._incoming) >= self.max_waiting:
                raise QueueFullError(f"{self.max_waiting} requests are already waiting for a slot; retry later")
            request.seq = next(self._seq)
            self._incoming.append(request)
            self._wake.notify()
        return request

    def cancel(self, request: Request) -> None:
        request.cancel()
        with self._lock:
            self._wake.notify()

    # ------------------------------------------------------------------ introspection
    def snapshot(self) -> dict:
        with self._lock:
            waiting = len(self._waiting) + len(self._incoming)
        return {"running": self._n_decode + self._n_prefill, "decoding": self._n_decode,
                "prefilling": self._n_prefill, "waiting": waiting, "slots": self.max_batch,
                "slots_used": sum(s is not None for s in self._slots), "steps": self.steps,
                "prompt_tokens": self.prompt_tokens, "generated_tokens": self.generated_tokens}

    def has_work(self) -> bool:
        return bool(self._n_decode or self._n_prefill or self._waiting or self._incoming)

    # ------------------------------------------------------------------ the loop
    def start(self) -> None:
        """Run steps on a thread of the engine's own until :meth:`stop`."""
        if self._thread is not None:
            return
        if not self.leader:
            raise InputError(f"tensor-parallel rank {self._comm.rank} does not schedule: run glmrt.engine.follow(engine) "
                             "on it, and start the engine of rank 0")
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="glmrt-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        with self._lock:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self) -> None:
        while True:
            with self._lock:
                if not self._stopping and not self.has_work():
                    self._wake.wait(1.0 if self._keepalive_s is None else min(1.0, self._keepalive_s))
                if self._stopping:
                    break
                work = self.has_work()
            if work:
                self.step()
            elif self._comm is not None and time.monotonic() - self._last_sent >= self._keepalive_s:
                self._send(StepPlan("idle"))
        if self._comm is not None:
            try:
                self._send(StepPlan("stop"))
            except GLMRTError as exc:  # the followers are gone already: nothing left to tell them
                print(f"glmrt engine: could not tell the other ranks to stop: {exc}", file=sys.stderr, flush=True)
        for request in self._all_requests():
            self._finish(request, "cancelled")

    def _send(self, plan: StepPlan) -> None:
        """Rank 0: hand the other ranks the next forward (with the cache copies made before it)."""
        if self._comm is None:
            return
        if self._pending_copies:
            plan = dataclasses.replace(plan, copies=tuple(self._pending_copies))
            self._pending_copies.clear()
        self._comm.broadcast_object(plan, "the serving engine's next step (rank 0 to the others)")
        self._last_sent = time.monotonic()

    def _all_requests(self) -> list[Request]:
        with self._lock:
            pending = list(self._incoming) + list(self._waiting)
            self._incoming.clear()
            self._waiting.clear()
        return pending + [r for r in self._slots if r is not None]

    @torch.inference_mode()
    def step(self) -> None:
        """One scheduler step: admit, prefill under the budget, one batched decode, sample, free."""
        self.steps += 1
        with self._lock:
            self._waiting.extend(self._incoming)
            self._incoming.clear()
        self._drop_cancelled()
        self._admit()
        self._prefill()
        self._decode()

    def _drop_cancelled(self) -> None:
        if any(r._cancelled for r in self._waiting):
            with self._lock:
                keep = deque()
                for r in self._waiting:
                    if r._cancelled:
                        self._finish(r, "cancelled")
                    else:
                        keep.append(r)
                self._waiting = keep
        for request in [r for r in self._slots if r is not None and r._cancelled]:
            self._release(request, "cancelled")

    def _admit(self) -> None:
        while self._waiting and self._n_decode + self._n_prefill < self.max_batch:
            with self._lock:
                request = self._waiting.popleft()
            slot = self._n_decode + self._n_prefill
            self._slots[slot] = request
            request.slot = slot
            self._n_prefill += 1

    # ------------------------------------------------------------------ prefill
    def _prefill(self) -> None:
        budget = self.prefill_budget
        spent = 0
        prefix = self.model.config.mask_kind == "prefix"
        order = sorted((r for r in self._slots[self._n_decode:self._n_decode + self._n_prefill]), key=lambda r: r.seq)
        for request in order:
            while request.prefilled < len(request.prompt):
                start = request.prefilled
                stop = len(request.prompt) if prefix else min(len(request.prompt),
                                                              (start // self.prefill_chunk + 1) * self.prefill_chunk)
                if spent and spent + (stop - start) > budget:
                    return  # the next chunk waits for the next step (at least one chunk runs per step)
                try:
                    logits = self._prefill_chunk(request, start, stop)
                except Exception as exc:  # noqa: BLE001 - the request fails, the engine goes on
                    self._release(request, "error", exc)
                    break
                spent += stop - start
                request.prefilled = stop
                self.prompt_tokens += stop - start
                if stop == len(request.prompt):
                    request._logits = logits
                    self._promote(request)
                    self._sample(request)

    def _prefill_chunk(self, request: Request, start: int, stop: int) -> torch.Tensor:
        self._send(StepPlan("prefill", slot=request.slot, prompt=tuple(request.prompt), start=start, stop=stop))
        return self._run_prefill(request.slot, request.prompt, request._layout, start, stop)

    def _run_prefill(self, slot: int, prompt: list[int], layout, start: int, stop: int) -> torch.Tensor:
        model = self.model
        ids = torch.tensor([prompt[start:stop]], dtype=torch.long, device=self.device)  # (1, t)
        key_valid = torch.ones(1, stop, dtype=torch.bool, device=self.device)
        allowed = layout.allowed(model._causal_allowed(key_valid, stop - start, start), key_valid)  # (1, 1, t, stop)
        ctx = ForwardContext(positions=layout.positions[..., start:stop], allowed=allowed,
                             cache=self.cache.rows(slot, slot + 1), cache_pos=start, last_only=True)
        return execute(model.plan, ctx, ids)[:, -1]  # (1, V)

    # ------------------------------------------------------------------ decode
    def _decode(self) -> None:
        n = self._n_decode
        rows = [r for r in self._slots[:n]]
        if not rows:
            return
        fed = [r.tokens[r.fed] for r in rows]
        positions = torch.cat([r._layout.generated_positions(r.fed) for r in rows])  # (n, 1) or (n, 2, 1)
        cache_positions = [len(r.prompt) + r.fed for r in rows]
        try:
            self._send(StepPlan("decode", tokens=tuple(fed), positions=positions.cpu(),
                                cache_positions=tuple(cache_positions)))
            logits = self._run_decode(fed, positions, cache_positions)  # (n, V)
        except Exception as exc:  # noqa: BLE001 - every request in the step fails; the engine goes on
            for request in rows:
                self._release(request, "error", exc)
            return
        logits = logits.float()  # once for all rows: many small conversions cost more than one
        # Greedy rows without a penalty: one argmax over all of them (a row's argmax is its own).
        plain = [i for i, r in enumerate(rows) if r.params.greedy and r.params.repetition_penalty == 1.0]
        picks = dict(zip(plain, logits[plain].argmax(dim=-1).tolist())) if plain else {}
        for i, request in enumerate(rows):
            request.fed += 1
            request._logits = logits[i:i + 1]
        for i, request in enumerate(rows):
            self._sample(request, picks.get(i))

    def _run_decode(self, fed: Sequence[int], positions: torch.Tensor, cache_positions: Sequence[int]) -> torch.Tensor:
        """One batched decode of rows [0, n): logits (n, V)."""
        n = len(fed)
        tokens = torch.tensor([[t] for t in fed], dtype=torch.long, device=self.device)  # (n, 1)
        positions = positions.to(self.device)  # (n, 1) or (n, 2, 1)
        cache_pos = torch.tensor(list(cache_positions), dtype=torch.long, device=self.device)  # (n,)
        S = int(cache_pos.max()) + 1
        allowed = (torch.arange(S, device=self.device)[None, :] <= cache_pos[:, None])[:, None, None, :]  # (n,1,1,S)
        assert positions.shape[0] == n and (positions.dim() == 3) == (self.model.config.rope_kind == "2d")
        ctx = ForwardContext(positions=positions, allowed=allowed, cache=self.cache.rows(0, n),
                             cache_positions=cache_pos, last_only=True, row_invariant=True)
        return execute(self.decode_plan, ctx, tokens)[:, -1]  # (n, V)

    def replay(self, plan: StepPlan) -> None:
        """A follower rank: run rank 0's plan on this rank's shard (the logits are dropped: rank 0
        samples). A failure of the forward itself is rank 0's too (it fails the same requests);
        a failed collective raises."""
        for src, dst, length in plan.copies:
            self._copy_slot(src, dst, length)
        try:
            if plan.kind == "prefill":
                ids = torch.tensor([list(plan.prompt)], dtype=torch.long, device=self.device)
                layout = self.model._layout(ids, torch.ones_like(ids))
                self._run_prefill(plan.slot, list(plan.prompt), layout, plan.start, plan.stop)
            elif plan.kind == "decode":
                self._run_decode(plan.tokens, plan.positions, plan.cache_positions)
        except GLMRTError as exc:
            from .distributed import DistributedError
            if isinstance(exc, DistributedError):
                raise
        except Exception:  # noqa: BLE001 - rank 0's forward failed alike and fails its requests
            pass

    def _sample(self, request: Request, token: int | None = None) -> None:
        """Sample the next token from request._logits (unless the caller already took the greedy
        one), hand it over, finish the request if it is done."""
        if request._cancelled:
            self._release(request, "cancelled")
            return
        params = request.params
        if token is None:
            seen = None
            if params.repetition_penalty != 1.0:
                seen = torch.tensor([request.prompt + request.tokens], dtype=torch.long, device=self.device)
            token = int(next_tokens(request._logits, seen, params, request._generator)[0])
        request._logits = None
        request.tokens.append(token)
        self.generated_tokens += 1
        now = time.perf_counter()
        if request.first_token_time is None:
            request.first_token_time = now
        stop = False
        if request.on_token is not None:
            try:
                stop = bool(request.on_token(token))
            except Exception as exc:  # noqa: BLE001 - a failing consumer ends its own request only
                self._release(request, "error", exc)
                return
        if token in request.stop_ids or stop:
            self._release(request, "stop")
        elif len(request.tokens) >= request.max_new_tokens:
            self._release(request, "length")

    # ------------------------------------------------------------------ slots
    def _copy_slot(self, src: int, dst: int, length: int) -> None:
        if self._comm is not None and self.leader:  # the other ranks copy their shard's rows alike
            self._pending_copies.append((src, dst, length))
        for keys, values in zip(self.cache.k, self.cache.v):  # (B + 1, nkv, max_len, hd)
            keys[dst, :, :length].copy_(keys[src, :, :length])
            values[dst, :, :length].copy_(values[src, :, :length])

    @staticmethod
    def _cached(request: Request) -> int:
        return request.prefilled + request.fed

    def _move(self, src: int, dst: int) -> None:
        request = self._slots[src]
        self._copy_slot(src, dst, self._cached(request))
        self._slots[dst], self._slots[src] = request, None
        request.slot = dst

    def _promote(self, request: Request) -> None:
        """A prefilled request joins the decoding rows [0, n_decode)."""
        i, first = request.slot, self._n_decode
        if i != first:  # swap with the first prefilling slot, through the scratch row
            other = self._slots[first]
            scratch = self.max_batch
            self._copy_slot(first, scratch, self._cached(other))
            self._move(i, first)
            self._copy_slot(scratch, i, self._cached(other))
            self._slots[i] = other
            other.slot = i
        self._n_decode += 1
        self._n_prefill -= 1

    def _release(self, request: Request, reason: str, error: BaseException | None = None) -> None:
        i = request.slot
        if i is not None and self._slots[i] is request:
            self._slots[i] = None
            request.slot = None
            if i < self._n_decode:
                last = self._n_decode - 1
                if i != last:
                    self._move(last, i)
                self._n_decode -= 1
                if self._n_prefill:  # close the hole at the start of the prefilling block
                    self._move(self._n_decode + self._n_prefill, self._n_decode)
            else:
                last = self._n_decode + self._n_prefill - 1
                if i != last:
                    self._move(last, i)
                self._n_prefill -= 1
        self._finish(request, reason, error)

    def _finish(self, request: Request, reason: str, error: BaseException | None = None) -> None:
        if request.finish_reason is not None:
            return
        request.finish_reason = reason
        request.error = error
        request._logits = None
        if request.on_finish is not None:
            try:
                request.on_finish(reason, error)
            except Exception:  # noqa: BLE001 - a consumer's failure must not stop the engine
                pass
        request._done.set()

    # ------------------------------------------------------------------ Python entry
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32, *, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
                 seed: int | Sequence[int | None] | None = None,
                 eos_token_id: int | Iterable[int] | None = None) -> list[list[int]]:
        """The new tokens of each prompt (a stop token included, as Model.generate yields it).
        Prompts may have different lengths: no padding; each runs in its own slot, so prompts
        beyond max_batch wait for one. ``seed``: one for all (each prompt gets a generator seeded
        with it) or one per prompt. Runs the steps on the calling thread unless :meth:`start` runs them."""
        prompts = [list(p) for p in prompts]
        seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed] * len(prompts)
        if len(seeds) != len(prompts):
            raise InputError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        cfg = self.model.config
        eos = cfg.eos_token_ids if eos_token_id is None else (
            (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id))
        requests = []
        for prompt, s in zip(prompts, seeds):
            params = SamplingParams(do_sample, temperature, top_k, top_p, repetition_penalty, s)
            requests.append(Request(prompt, max_new_tokens, params, frozenset(int(t) for t in eos)))
        pending = deque(requests)
        while pending or not all(r.finished for r in requests):
            while pending and len(self._waiting) + len(self._incoming) < self.max_waiting:
                self.submit(pending.popleft())
            if self._thread is None:
                self.step()
            else:
                next(r for r in requests if not r.finished or not pending).wait(0.05)
        for request in requests:
            if request.finish_reason == "error":
                raise request.error
        return [r.tokens for r in requests]


def per_row_plan(plan: Plan) -> Plan:
    """The plan of a batched decode whose rows sit at different cache positions: the same graph
    and weights, its attention nodes marked ``per_row_cache``, lowered the way ``plan`` was (a
    kernel that cannot write per-row positions refuses the node, which then runs the reference)."""
    graph = plan.graph
    nodes = [dataclasses.replace(n, attrs={**n.attrs, "per_row_cache": True}) if n.op == "attention" else n
             for n in graph.nodes]
    weights = {}
    for step in plan.steps:
        for role, pname in step.node.params.items():
            weights[pname] = step.params[role]
    return lower(graph.replace_nodes(nodes), plan.backend, weights, strict=plan.strict, kernels=plan.kernels,
                 comm=plan.comm)


def follow(engine: Engine) -> None:
    """The loop of every tensor-parallel rank but 0 under ``glmrt serve``: receive each
    :class:`StepPlan` rank 0 sends and replay it on this rank's shard, until rank 0 sends "stop".
    Rank 0 sends at least a keep-alive within the process group's timeout, so hearing nothing for
    that long means it died or hangs: a DistributedError that says so (never a silent wait)."""
    from .distributed import DistributedError
    comm = engine._comm
    if comm is None or comm.rank == 0:
        raise InputError("follow() runs on the tensor-parallel ranks other than 0 of a sharded model")
    while True:
        try:
            plan = comm.broadcast_object(None, "the serving engine's next step (rank 0 to the others)")
        except DistributedError as exc:
            raise DistributedError(f"rank {comm.rank} of {comm.size} lost rank 0 of `glmrt serve` (it died, hangs, or "
                                   f"its process group broke; nothing came within {comm.timeout_s:g} s): {exc}") from exc
        if not isinstance(plan, StepPlan):
            raise DistributedError(f"rank {comm.rank} of {comm.size} received {type(plan).__name__} from rank 0 instead "
                                   "of an engine step: every rank must run the same `glmrt serve` command")
        if plan.kind == "stop":
            return
        with torch.inference_mode():
            engine.replay(plan)
