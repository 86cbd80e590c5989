"""Next-token selection: greedy, or sampling with repetition penalty, temperature, top-k, top-p,
applied in that order (the order transformers applies its logits processors)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from .errors import InputError

# torch.Generator.manual_seed takes this range.
SEED_RANGE = (-(2 ** 63), 2 ** 64)


def _real(name: str, value) -> float:
    """A finite real number (int or float, numpy scalars included; not bool, not a string)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value}")
    return value


def as_int(name: str, value) -> int:
    """An integer (numpy integers included; not bool, not a float even if integral)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    return int(value)


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. temperature=0 means greedy decoding whatever do_sample says
    (the limit of sampling as the temperature goes to 0, and what OpenAI's API and glmrt's server
    take it to mean; transformers refuses do_sample=True with temperature 0 instead). With
    do_sample=False the temperature, top_k and top_p are not used, as in transformers."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.do_sample, str) or self.do_sample not in (True, False):
            raise InputError(f"do_sample must be True or False, got {self.do_sample!r}")
        if _real("temperature", self.temperature) < 0:
            raise InputError(f"temperature must be >= 0 (0: greedy decoding), got {self.temperature}")
        if as_int("top_k", self.top_k) < 0:
            raise InputError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < _real("top_p", self.top_p) <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if _real("repetition_penalty", self.repetition_penalty) <= 0:
            raise InputError(f"repetition_penalty must be > 0 (1.0 disables it), got {self.repetition_penalty}")
        if self.seed is not None and not SEED_RANGE[0] <= as_int("seed", self.seed) < SEED_RANGE[1]:
            raise InputError(f"seed must be an integer in [-2**63, 2**64), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (B, V) fp32; seen (B, S) token ids. Seen tokens' logits are divided by the penalty
    when positive and multiplied when negative (CTRL's rule, as transformers applies it)."""
    if penalty == 1.0:
        return logits
    score = torch.gather(logits, 1, seen)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(1, seen, score)


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability mass reaches p (at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - p)
    remove_sorted[..., -1] = False  # the most likely token always stays
    remove = remove_sorted.scatter(1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def next_tokens(logits: torch.Tensor, seen: torch.Tensor, params: SamplingParams,
                generator: torch.Generator | None, vocab_limit: int | None = None) -> torch.Tensor:
    """logits (B, V) -> token ids (B,). With vocab_limit, ids >= vocab_limit are never chosen (a
    model's padded output rows, which its tokenizer has no text for)."""
    logits = logits.float()
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits = logits.clone()
        logits[:, vocab_limit:] = float("-inf")
    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    logits = filter_top_k(logits, params.top_k)
    logits = filter_top_p(logits, params.top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
