"""Model: the loaded, lowered model and the public methods (logits, generate, stream)."""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import numbers
import threading
from typing import Iterator, Sequence

import torch

from .config import GLMConfig, dtype_name
from .errors import InputError
from .graph import Graph
from .lowering import Plan, execute
from .ops import ForwardContext, KVCache
from .sampling import SamplingParams, as_int, next_tokens

# max_new_tokens of chat() and chat_stream() (and `glmrt chat`) when not given.
CHAT_MAX_NEW_TOKENS = 512


def _scalar(x):
    """A 0-d tensor or array as the Python number it holds (anything else as it is)."""
    if isinstance(x, torch.Tensor) and x.dim() == 0:
        return x.item()
    if hasattr(x, "__array__") and not isinstance(x, numbers.Number) and getattr(x, "ndim", None) == 0:
        return torch.as_tensor(x).item()
    return x


class Model:
    """A GLM-family model lowered onto one backend. Build it with :func:`glmrt.load`."""

    def __init__(self, config: GLMConfig, graph: Graph, plan: Plan, weights: dict[str, torch.Tensor],
                 source: str):
        self.config = config
        self.graph = graph
        self.plan = plan
        self.weights = weights
        self.source = source
        self.backend = plan.backend
        self.device = plan.device
        self.dtype = graph.dtype
        from .shard import local_kv_heads
        self.kv_heads = local_kv_heads(graph)  # KV groups this process caches (its rank's under TP)
        # Tensor parallelism (glmrt.shard, glmrt.distributed): (size, rank) and the communicator,
        # or None / None for a single-process model.
        self.tensor_parallel = graph.tensor_parallel
        self.comm = plan.comm
        self._tokenizer = None  # set by load() when the checkpoint ships one
        # A synthetic preset's tokenizer is built on first use (glmrt.synthetic_tokenizer).
        self._tokenizer_factory = None
        self._tokenizer_error: str | None = None
        self.chat_family: str | None = None  # the glmrt.chat format of that tokenizer
        # How decode steps run: "eager" (cache slices grow each step), "static" (fixed shapes, the
        # cache position on the device), "graph" (static, captured once as a CUDA graph), or
        # "auto" (graph on CUDA backends that declare graph capture, else eager).
        self.decode_mode = "auto"
        # Concurrency: every generation leases its own decoder (KV cache and input buffers) for as
        # long as it runs, so two generations in flight never share mutable state; finished
        # generations hand theirs back, and one idle static/graph decoder is kept for the next
        # call of the same shape (a captured graph is expensive to build). Forward steps of all
        # threads are serialized by one lock (kernels and graph replays may share scratch state);
        # whole generations are not, so threads interleave step by step.
        self._forward_lock = threading.Lock()
        # Under tensor parallelism step-by-step interleaving would pair one thread's collectives with
        # another's on the other ranks: a whole call (logits, a generation) holds this lock, and the
        # ranks check that they start the same call (_tensor_parallel_call).
        self._call_lock = threading.RLock()
        self._pool_lock = threading.Lock()
        self._idle_decoder: tuple | None = None  # (key, decoder) kept for reuse, or None

    @property
    def tokenizer(self):
        factory, self._tokenizer_factory = self._tokenizer_factory, None
        if factory is not None:
            from .tokenizer import MissingDependencyError
            try:
                self._tokenizer = factory()
            except MissingDependencyError as exc:  # token ids still work; text needs the package
                self._tokenizer_error = str(exc)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, value) -> None:
        self._tokenizer, self._tokenizer_factory = value, None

    def __repr__(self) -> str:
        c = self.config
        tp = (f", tensor_parallel={self.tensor_parallel[0]} (rank {self.tensor_parallel[1]})"
              if self.tensor_parallel else "")
        return (f"Model({self.source!r}, generation={c.generation}, layers={c.num_layers}, hidden={c.hidden_size}, "
                f"dtype={dtype_name(self.dtype)}, backend={self.backend.name}{tp})")

    # ------------------------------------------------------------------ inputs
    def _as_batch(self, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(input_ids, torch.Tensor) and hasattr(input_ids, "__array__") \
                and not isinstance(input_ids, (list, tuple)):
            input_ids = torch.as_tensor(input_ids)  # numpy arrays (and other array-likes)
        if isinstance(input_ids, torch.Tensor):
            ids = input_ids
        else:
            if isinstance(input_ids, (str, bytes)) or not hasattr(input_ids, "__iter__"):
                raise InputError(f"input_ids must be token ids (a list, a list of lists, a tensor or an array), got "
                                 f"{type(input_ids).__name__}: encode text with the tokenizer first")
            seq = list(input_ids)

            def is_row(x) -> bool:  # a list, or a tensor / array of at least one dimension (not a numpy scalar)
                return isinstance(x, (list, tuple)) or (hasattr(x, "__array__") and getattr(x, "ndim", 0) >= 1)

            if seq and not is_row(seq[0]):
                seq = [seq]
            rows = []
            for row in seq:
                if not isinstance(row, (list, tuple)) and is_row(row):
                    row = torch.as_tensor(row)
                    if row.is_floating_point() or row.is_complex() or row.dtype == torch.bool:
                        raise InputError(f"input_ids must be integers, got a {row.dtype} row")
                    row = row.tolist()
                if not isinstance(row, (list, tuple)):
                    raise InputError(f"input_ids rows must be lists of token ids, got {type(row).__name__}")
                rows.append([as_int("a token id in input_ids", _scalar(i)) for i in row])
            lengths = {len(r) for r in rows}
            if len(lengths) > 1:
                raise InputError("prompts of different lengths: left-pad them to one length and pass attention_mask "
                                 "(0 on padding), as with transformers")
            ids = torch.tensor(rows, dtype=torch.long)
            if not rows:
                ids = ids.reshape(0, 0)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2:
            raise InputError(f"input_ids must have shape (T,) or (B, T), got {tuple(ids.shape)}")
        if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise InputError(f"input_ids must be an integer tensor, got {ids.dtype}")
        if ids.shape[1] == 0 or ids.shape[0] == 0:
            raise InputError("input_ids is empty: give at least one token per prompt")
        ids = ids.to(torch.long)
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise InputError(f"token id {lo if lo < 0 else hi} is outside the vocabulary [0, {self.config.vocab_size})")
        if attention_mask is None:
            mask = torch.ones_like(ids)
        else:
            mask = torch.as_tensor(attention_mask)
            if mask.dim() == 1:
                mask = mask[None]
            if tuple(mask.shape) != tuple(ids.shape):
                raise InputError(f"attention_mask shape {tuple(mask.shape)} differs from input_ids {tuple(ids.shape)}")
            # Checked before any conversion: a float 0.5 would otherwise truncate to 0 (padding).
            if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
                raise InputError("attention_mask must hold only 0 (padding) and 1 (token)")
            mask = mask.to(torch.long)
            if bool((mask[:, 1:] < mask[:, :-1]).any()):
                raise InputError("attention_mask has padding after a token: glmrt expects LEFT padding "
                                 "(pad tokens first), like transformers' generate for decoder-only models")
            if bool((mask.sum(-1) == 0).any()):
                raise InputError("a prompt in the batch is all padding")
        return ids.to(self.device), mask.to(self.device)

    def _token_ids(self, name: str, value, allow_empty: bool = True) -> tuple[int, ...]:
        """An id or a sequence of ids, each inside the vocabulary (an id beyond it could never be
        generated, so an eos there would never stop anything)."""
        if not isinstance(value, numbers.Integral) and (isinstance(value, torch.Tensor) or hasattr(value, "__array__")):
            value = torch.as_tensor(value).reshape(-1).tolist()  # a tensor or array of ids
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            out = (int(value),)
        elif isinstance(value, (list, tuple, set, frozenset)):
            out = tuple(as_int(f"{name} entries", v) for v in value)
        else:
            raise InputError(f"{name} must be a token id or a list of token ids, got {value!r}")
        if not out and not allow_empty:
            raise InputError(f"{name} is empty")
        V = self.config.vocab_size
        bad = [i for i in out if not 0 <= i < V]
        if bad:
            raise InputError(f"{name} {bad[0]} is outside the vocabulary [0, {V}) of this model")
        return out

    def _check_length(self, total: int) -> None:
        if total > self.config.max_positions:
            raise InputError(f"prompt plus new tokens is {total} tokens but this model handles at most "
                             f"{self.config.max_positions} positions: shorten the prompt or max_new_tokens")

    @staticmethod
    def _causal_allowed(key_valid: torch.Tensor, q_len: int, start: int) -> torch.Tensor:
        """(B, 1, q_len, start + q_len): key s visible to query t iff s <= start + t and s is a token."""
        S = start + q_len
        q_pos = torch.arange(start, S, device=key_valid.device)[:, None]
        k_pos = torch.arange(S, device=key_valid.device)[None, :]
        causal = k_pos <= q_pos  # (T, S)
        return causal[None, None] & key_valid[:, None, None, :S].bool()

    def _layout(self, ids: torch.Tensor, mask: torch.Tensor) -> "_Layout":
        if self.config.mask_kind == "prefix":
            return _PrefixLayout(self.config, ids, mask)
        return _CausalLayout(mask)

    # ------------------------------------------------------------------ public API
    @torch.inference_mode()
    def logits(self, input_ids, attention_mask=None) -> torch.Tensor:
        """Full forward without a cache: float32 logits of shape (B, T, vocab)."""
        ids, mask = self._as_batch(input_ids, attention_mask)
        self._check_length(ids.shape[1])
        layout = self._layout(ids, mask)
        ctx = ForwardContext(positions=layout.positions, allowed=layout.allowed(self._causal_allowed(mask, ids.shape[1], 0), mask))
        with self._tensor_parallel_call("logits", ids, mask), self._forward_lock:
            return execute(self.plan, ctx, ids).float()

    @contextlib.contextmanager
    def _tensor_parallel_call(self, what: str, *key):
        """Under tensor parallelism: hold the model for a whole call (one call at a time per rank),
        and check with the other ranks that they start the same call (``key``: its inputs), so two
        threads that share the model either run in the same order on every rank or fail with an
        error, never pair one call's collectives with another's. A no-op in one process."""
        comm = self.comm
        if comm is None:
            yield
            return
        from .distributed import DistributedError
        if not self._call_lock.acquire(timeout=comm.timeout_s):
            raise DistributedError(f"tensor-parallel rank {comm.rank}: {what} waited {comm.timeout_s:g} s for another "
                                   "call on this model (a tensor-parallel model runs one call at a time): finish or "
                                   "close the other generation first")
        try:
            digest = hashlib.blake2b(repr((what,) + tuple(
                k.cpu().numpy().tobytes() if isinstance(k, torch.Tensor) else k for k in key)).encode(),
                digest_size=8).digest()
            mine = int.from_bytes(digest, "little", signed=True)
            seen = comm.agree(mine, f"the start of {what}")
            if any(v != mine for v in seen):
                raise DistributedError(
                    f"tensor-parallel rank {comm.rank}: the ranks started different calls ({what} here; fingerprints "
                    f"{seen}): every rank must make the same calls in the same order. Threads that share a "
                    "tensor-parallel model run one call at a time on each rank in the order they take its lock, "
                    "which must then be the same on every rank; use one thread, or glmrt serve (rank 0 orders "
                    "the requests)")
            yield
        finally:
            self._call_lock.release()

    @torch.inference_mode()
    def stream(self, input_ids, max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
               top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
               attention_mask=None, eos_token_id: int | Sequence[int] | None = None,
               pad_token_id: int | None = None, *, vocab_limit: int | None = None) -> Iterator[torch.Tensor]:
        """Yield the next token of every prompt, a LongTensor of shape (B,), one step at a time.

        Rows that reached an eos id get the pad id from then on; the iterator ends when every row
        has finished or after max_new_tokens steps. ``vocab_limit``: only ids below it are
        generated (text generation passes the tokenizer's vocabulary size: GLM-4's 151552
        outputs, for instance, end in 209 padded ids that no text has)."""
        params = SamplingParams(do_sample, temperature, top_k, top_p, repetition_penalty, seed)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
        max_new_tokens = int(max_new_tokens)
        if vocab_limit is not None and (not isinstance(vocab_limit, int) or isinstance(vocab_limit, bool)
                                        or not 0 < vocab_limit <= self.config.vocab_size):
            raise InputError(f"vocab_limit must be an integer in [1, {self.config.vocab_size}] (the model's "
                             f"vocabulary), got {vocab_limit!r}")
        ids, mask = self._as_batch(input_ids, attention_mask)
        self._check_length(ids.shape[1] + max_new_tokens)  # now, not at the first next()
        eos = self.config.eos_token_ids if eos_token_id is None else self._token_ids("eos_token_id", eos_token_id)
        if pad_token_id is None:
            pad = self.config.pad_token_id
            V = self.config.vocab_size
            can_finish = ids.shape[0] > 1 and any(0 <= e < V for e in eos)  # a row can finish and be padded
            if not 0 <= pad < V and can_finish:
                raise InputError(f"the config's pad_token_id {pad} is outside the vocabulary [0, "
                                 f"{self.config.vocab_size}): pass pad_token_id= for rows that finish early")
        else:
            (pad,) = self._token_ids("pad_token_id", as_int("pad_token_id", pad_token_id))
        return self._stream(ids, mask, max_new_tokens, params, eos, pad, vocab_limit)

    def _stream(self, ids, mask, max_new_tokens, params, eos, pad, vocab_limit):
        if max_new_tokens == 0:
            return
        with self._tensor_parallel_call("a generation", ids, mask, max_new_tokens, params, eos, pad, vocab_limit):
            if self.comm is not None and params.do_sample and params.seed is None:
                # Every rank must draw the same token: rank 0 picks the seed for all of them.
                import dataclasses
                params = dataclasses.replace(params, seed=self.comm.shared_seed())
            yield from self._generate_steps(ids, mask, max_new_tokens, params, eos, pad, vocab_limit)

    def _generate_steps(self, ids, mask, max_new_tokens, params, eos, pad, vocab_limit):
        B, T = ids.shape
        total = T + max_new_tokens
        eos_t = torch.tensor(eos if eos else [-1], device=self.device)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(int(params.seed))

        decoder = self._lease_decoder(B, total)
        reusable = False
        try:
            with torch.inference_mode():
                cache, key_valid = decoder.cache, decoder.key_valid
                key_valid.fill_(True)
                key_valid[:, :T] = mask.bool()
                layout = self._layout(ids, mask)
                ctx = ForwardContext(positions=layout.positions,
                                     allowed=layout.allowed(self._causal_allowed(key_valid, T, 0), key_valid),
                                     cache=cache, cache_pos=0, last_only=True)
                with self._forward_lock:
                    logits = execute(self.plan, ctx, ids)[:, -1]  # (B, V)
                seen = ids
                finished = torch.zeros(B, dtype=torch.bool, device=self.device)
            for step in range(max_new_tokens):
                with torch.inference_mode():
                    token = next_tokens(logits, seen, params, generator, vocab_limit)
                    token = torch.where(finished, torch.full_like(token, pad), token)
                    finished = finished | torch.isin(token, eos_t)
                try:
                    yield token.clone()
                except GeneratorExit:  # closed or garbage-collected between steps: the decoder is intact
                    reusable = True
                    raise
                if step == max_new_tokens - 1 or bool(finished.all()):
                    break
                with torch.inference_mode():
                    seen = torch.cat((seen, token[:, None]), dim=1)
                    with self._forward_lock:
                        logits = decoder.step(token[:, None], layout.generated_positions(step), T + step)
            reusable = True
        finally:
            # A step that raised may have left the decoder half-written (or a capture half-done):
            # such a decoder is dropped, never handed to the next generation.
            self._return_decoder(decoder, reusable)

    def _decode_mode(self) -> str:
        mode = self.decode_mode
        if mode == "auto":
            # Not under tensor parallelism: the collectives would have to be captured too, which
            # gloo cannot and nccl only with care that has not been tried here.
            mode = ("graph" if self.device.type == "cuda" and self.backend.capabilities().graph_capture
                    and self.comm is None else "eager")
        if mode == "graph" and self.comm is not None:
            raise InputError("decode_mode='graph' is not available under tensor parallelism (the step's collectives "
                             "are not captured): use decode_mode='eager' or 'static'")
        if mode not in ("eager", "static", "graph"):
            raise InputError(f"decode_mode must be auto, eager, static or graph, not {mode!r}")
        return mode

    def _lease_decoder(self, batch: int, total: int) -> "_Decoder":
        """A decode-step runner for this batch size and cache length that belongs to the caller
        until _return_decoder: the idle one kept from an earlier generation of the same shape, or
        a new one (eager decoders are always new: their cache is allocated per call anyway)."""
        mode = self._decode_mode()
        if mode == "eager":
            return _EagerDecoder(self, batch, total)
        key = (mode, batch, total)
        with self._pool_lock:
            idle, self._idle_decoder = self._idle_decoder, None
        if idle is not None and idle[0] == key:
            return idle[1]
        del idle  # one cache at a time: they can be large, so drop the other shape's before allocating
        return (_GraphDecoder if mode == "graph" else _StaticDecoder)(self, batch, total)

    def _return_decoder(self, decoder: "_Decoder", reusable: bool) -> None:
        """Hand a leased decoder back; the most recently returned reusable one is kept."""
        if not reusable or isinstance(decoder, _EagerDecoder):
            return
        with self._pool_lock:
            self._idle_decoder = (decoder.key, decoder)

    def generate(self, input_ids, max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
                 attention_mask=None, eos_token_id: int | Sequence[int] | None = None,
                 pad_token_id: int | None = None, *, vocab_limit: int | None = None) -> torch.Tensor:
        """Prompt + new tokens, (B, T + n), like transformers' generate (n <= max_new_tokens).
        ``vocab_limit`` as in stream()."""
        ids, _ = self._as_batch(input_ids, attention_mask)
        new = list(self.stream(input_ids, max_new_tokens, do_sample, temperature, top_k, top_p,
                               repetition_penalty, seed, attention_mask, eos_token_id, pad_token_id,
                               vocab_limit=vocab_limit))
        if not new:
            return ids
        return torch.cat((ids, torch.stack(new, dim=1)), dim=1)

    # ------------------------------------------------------------------ text and chat
    def build_inputs(self, ids: Sequence[int]) -> list[int]:
        """Raw token ids -> the model's input with its special tokens where the release puts
        them: `ids + [gMASK] <sop>` (GLM-130B, ChatGLM-6B), `[gMASK] <sop> + ids` (later)."""
        cfg = self.config
        if cfg.gmask_token_id is None or cfg.sop_token_id is None:
            raise InputError(f"{cfg.generation} has no [gMASK]/<sop> ids in its config; pass full input ids")
        specials = [cfg.gmask_token_id, cfg.sop_token_id]
        ids = [int(i) for i in ids]
        return ids + specials if cfg.mask_kind == "prefix" else specials + ids

    def _require_tokenizer(self):
        if self.tokenizer is None or self.chat_family is None:
            if self._tokenizer_error:
                raise InputError(f"{self.source}: {self._tokenizer_error}")
            raise InputError(f"{self.source} has no tokenizer glmrt can read: load a checkpoint directory that ships "
                             "its tokenizer files, or work with token ids")
        return self.tokenizer

    def text_vocab_limit(self) -> int | None:
        """The vocab_limit text generation passes: the tokenizer's vocabulary when the model has
        more outputs than the tokenizer has ids (padded embedding rows), else None."""
        tokenizer = self.tokenizer
        if tokenizer is None or tokenizer.vocab_size >= self.config.vocab_size:
            return None
        return tokenizer.vocab_size

    def _chat_generation(self, stops: list[int], generation: dict) -> tuple[list[int], dict]:
        """The stop ids and generate() arguments of a chat turn. ``eos_token_id`` given to chat
        adds stop ids to the release's; the prompt comes from the messages."""
        for key in ("input_ids", "attention_mask"):
            if key in generation:
                raise InputError(f"chat builds input_ids from the messages: {key} cannot be given")
        known = set(inspect.signature(Model.stream).parameters) - {"self", "input_ids", "attention_mask"}
        unknown = sorted(set(generation) - known)
        if unknown:
            raise InputError(f"unknown generation argument(s) {', '.join(unknown)}: chat takes those of generate() "
                             f"({', '.join(sorted(known))})")
        extra = generation.pop("eos_token_id", None)
        if extra is not None:
            stops = list(dict.fromkeys(list(stops) + list(self._token_ids("eos_token_id", extra))))
        generation.setdefault("max_new_tokens", CHAT_MAX_NEW_TOKENS)
        generation.setdefault("vocab_limit", self.text_vocab_limit())
        return stops, generation

    def chat_stream(self, messages, tools=None, **generation) -> Iterator[str]:
        """Stream the assistant's reply as text; a multi-byte character is never split.
        ``generation``: generate()'s arguments (``eos_token_id`` adds stop ids to the release's)."""
        from .chat import StreamDecoder, build_prompt, stop_ids
        tokenizer = self._require_tokenizer()
        prompt = build_prompt(self.chat_family, tokenizer, messages, tools)
        stops, generation = self._chat_generation(stop_ids(self.chat_family, tokenizer), generation)
        decoder = StreamDecoder(tokenizer)
        for step in self.stream([prompt], eos_token_id=stops, **generation):
            token = int(step[0])
            if token in stops:
                break
            text = decoder.feed(token)
            if text:
                yield text
        rest = decoder.flush()
        if rest:
            yield rest

    def chat(self, messages, tools=None, **generation) -> dict:
        """The next assistant turn: {"role", "content", "tool_calls", "malformed_tool_call",
        "token_ids"}. Tool calls are parsed per release (ChatGLM3, GLM-4); malformed tool-call
        text comes back as plain content with malformed_tool_call=True."""
        from .chat import build_prompt, parse_reply, stop_ids
        tokenizer = self._require_tokenizer()
        prompt = build_prompt(self.chat_family, tokenizer, messages, tools)
        stops, generation = self._chat_generation(stop_ids(self.chat_family, tokenizer), generation)
        out = self.generate([prompt], eos_token_id=stops, **generation)[0, len(prompt):].tolist()
        while out and out[-1] in stops:
            out.pop()
        reply = parse_reply(self.chat_family, tokenizer.decode_generated(out, skip_special=False))
        reply["token_ids"] = out
        return reply

    # ------------------------------------------------------------------ introspection
    def weight_bytes(self) -> int:
        seen, total = set(), 0
        for t in self.weights.values():
            if t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
        return total

    def info(self) -> dict:
        return {"source": self.source, "config": self.config.to_dict(), "dtype": dtype_name(self.dtype),
                "backend": self.backend.name, "device": str(self.device), "weight_bytes": self.weight_bytes(),
                "tensor_parallel": list(self.tensor_parallel) if self.tensor_parallel else None,
                "plan": self.plan.summary()}


class _CausalLayout:
    """ChatGLM2 and later: positions count real tokens only (left padding gets position 0), so a
    padded prompt sees the same positions as the unpadded one; the mask is causal."""

    def __init__(self, mask: torch.Tensor):
        self.positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
        self._last = self.positions[:, -1:]

    def allowed(self, causal: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        return causal

    def generated_positions(self, step: int) -> torch.Tensor:
        """Positions of the token generated at `step` (0-based), fed back as input: (B, 1)."""
        return self._last + 1 + step


class _PrefixLayout:
    """GLM-130B and ChatGLM-6B: everything before `<sop>` sees everything before `<sop>`; from
    `<sop>` on attention is causal. Positions follow where [gMASK] (or [MASK]) and `<sop>` stand:

    - 2-D (ChatGLM-6B): position ids 0, 1, ... up to the mask token; `<sop>` and every generated
      token take the mask token's index. Block ids are 0 over the context, 1 at `<sop>`, then 2, 3...
    - 1-D (GLM-130B): plain 0..n-1 with [gMASK]; with [MASK], `<sop>` and the generated tokens
      take the mask token's index.
    Indices count from the first real token of each (left-padded) row."""

    def __init__(self, cfg: GLMConfig, ids: torch.Tensor, mask: torch.Tensor):
        B, T = ids.shape
        device = ids.device
        pad = (T - mask.sum(-1)).long()  # (B,)
        idx = torch.arange(T, device=device)[None, :].expand(B, T)
        real = mask.bool()

        def first(token_id):
            hit = (ids == token_id) & real
            found = hit.any(-1)
            return torch.where(found, hit.float().argmax(-1), torch.full_like(pad, -1)), found

        sop, has_sop = first(cfg.sop_token_id)
        gmask, has_gmask = first(cfg.gmask_token_id)
        plain_mask, has_mask = first(cfg.mask_token_id) if cfg.mask_token_id is not None else (sop, has_sop & False)
        if not bool(has_sop.all()) or not bool((has_gmask | has_mask).all()):
            raise InputError(
                f"{cfg.generation} prompts must hold [gMASK] (id {cfg.gmask_token_id}) or [MASK] "
                f"(id {cfg.mask_token_id}) followed by <sop> (id {cfg.sop_token_id}), as the release's tokenizer builds "
                "them (text + [gMASK] + <sop>); use Model.build_inputs(ids) or the chat API")
        # Which mask token fixes the positions when a prompt holds both: ChatGLM-6B's model code
        # prefers [gMASK]; GLM-130B's generate.py prefers [MASK].
        if cfg.rope_kind == "2d":
            mask_pos = torch.where(has_gmask, gmask, plain_mask)  # (B,)
            has_gmask_used = has_gmask
        else:
            mask_pos = torch.where(has_mask, plain_mask, gmask)
            has_gmask_used = has_gmask & ~has_mask
        if bool((mask_pos > sop).any()):
            raise InputError("the mask token must come before <sop> in every prompt")
        self.context = sop  # keys before <sop> are visible to every query
        rel = (idx - pad[:, None]).clamp(min=0)
        after = idx >= sop[:, None]
        self.two_d = cfg.rope_kind == "2d"
        self._pad, self._sop, self._mask_pos, self._T = pad, sop, mask_pos, T
        self._use_gmask = has_gmask_used
        if self.two_d:
            pos = torch.where(after, (mask_pos - pad)[:, None].expand(B, T), rel)
            block = torch.where(after, idx - sop[:, None] + 1, torch.zeros_like(idx))
            self.positions = torch.stack((pos, block), dim=1)  # (B, 2, T)
        else:
            frozen = after & ~has_gmask_used[:, None]
            self.positions = torch.where(frozen, (mask_pos - pad)[:, None].expand(B, T), rel)  # (B, T)

    def allowed(self, causal: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        S = causal.shape[-1]
        k = torch.arange(S, device=causal.device)[None, :]
        prefix = (k < self.context[:, None]) & key_valid[:, :S].bool()  # (B, S)
        return causal | prefix[:, None, None, :]

    def generated_positions(self, step: int) -> torch.Tensor:
        absolute = self._T + step  # index of the token fed back at this step
        if self.two_d:
            pos = (self._mask_pos - self._pad)[:, None]
            block = (absolute - self._sop + 1)[:, None]
            return torch.stack((pos, block), dim=1)  # (B, 2, 1)
        plain = (absolute - self._pad)[:, None]
        return torch.where(self._use_gmask[:, None], plain, (self._mask_pos - self._pad)[:, None])


class _Decoder:
    """Owns the KV cache and the key-validity row of one generation shape; leased to one
    generation at a time (Model._lease_decoder)."""

    mode = "eager"

    def __init__(self, model: Model, batch: int, total: int):
        cfg = model.config
        self.model = model
        self.key = (self.mode, batch, total)
        self.cache = KVCache(cfg.num_layers, batch, model.kv_heads, total, cfg.head_dim, model.dtype, model.device)
        self.key_valid = torch.ones(batch, total, dtype=torch.bool, device=model.device)

    def step(self, token: torch.Tensor, positions: torch.Tensor, pos: int) -> torch.Tensor:
        raise NotImplementedError("need step()")


class _EagerDecoder(_Decoder):
    def step(self, token, positions, pos):
        ctx = ForwardContext(positions=positions, allowed=self.key_valid[:, None, None, :pos + 1], cache=self.cache,
                             cache_pos=pos, last_only=True)
        return execute(self.model.plan, ctx, token)[:, -1]


class _StaticDecoder(_Decoder):
    """Every step has the same shapes and reads its inputs from fixed buffers, so it can be
    captured as a graph: attention covers the whole cache under a mask built on the device."""

    mode = "static"

    def __init__(self, model: Model, batch: int, total: int):
        super().__init__(model, batch, total)
        device = model.device
        two_d = model.config.rope_kind == "2d"
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros((batch, 2, 1) if two_d else (batch, 1), dtype=torch.long, device=device)
        self.pos = torch.zeros((), dtype=torch.long, device=device)
        self.key_index = torch.arange(total, device=device)

    def run(self) -> torch.Tensor:
        allowed = (self.key_valid & (self.key_index <= self.pos))[:, None, None, :]  # (B, 1, 1, max_len)
        ctx = ForwardContext(positions=self.positions, allowed=allowed, cache=self.cache, cache_pos_t=self.pos,
                             last_only=True)
        return execute(self.model.plan, ctx, self.token)[:, -1]

    def load(self, token, positions, pos) -> None:
        self.token.copy_(token)
        self.positions.copy_(positions)
        self.pos.fill_(pos)

    def step(self, token, positions, pos):
        self.load(token, positions, pos)
        return self.run()


class _GraphDecoder(_StaticDecoder):
    """The static step captured once as a CUDA graph and replayed for every token."""

    mode = "graph"

    def __init__(self, model: Model, batch: int, total: int):
        super().__init__(model, batch, total)
        self.graph = None
        self.logits = None

    def _capture(self) -> None:
        # torch.cuda (CUDA and ROCm torch) or torch.npu (torch_npu mirrors the API: NPUGraph,
        # torch.npu.graph, streams). NPUGraph capture has not run on Ascend hardware; "auto"
        # therefore captures on CUDA only, and an NPU user opts in with decode_mode="graph".
        dev = getattr(torch, self.model.device.type, None)
        graph_cls = getattr(dev, "CUDAGraph", None) or getattr(dev, "NPUGraph", None)
        if graph_cls is None:
            raise InputError(f"decode_mode='graph' needs a device with graph capture (CUDA, or Ascend through "
                             f"torch_npu); {self.model.device.type!r} has none: use decode_mode='static' or 'eager'")
        side = dev.Stream()
        side.wait_stream(dev.current_stream())
        with dev.stream(side):  # warm up (allocator, lazy kernels) outside the graph
            for _ in range(2):
                self.run()
        dev.current_stream().wait_stream(side)
        self.graph = graph_cls()
        with dev.graph(self.graph):
            self.logits = self.run()

    def step(self, token, positions, pos):
        self.load(token, positions, pos)
        if self.graph is None:
            self._capture()  # the warm-up wrote at `pos`; the replay below rewrites it
        self.graph.replay()
        return self.logits
