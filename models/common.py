"""Helpers the generation modules share: explicit checkpoint name maps."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch

from ..errors import ConfigError


@dataclass(frozen=True)
class Source:
    """Where one canonical parameter comes from: one or more checkpoint tensors and how to
    combine them (default: the single tensor as it is)."""

    names: tuple[str, ...]
    combine: Callable[[list[torch.Tensor]], torch.Tensor] | None = None
    # For row concatenations: the row count each source tensor must have, so that a mis-shaped
    # part is reported with its own expected shape.
    part_rows: tuple[int, ...] | None = None

    def expected_part_shapes(self, want: tuple[int, ...]) -> list[tuple[int, ...]] | None:
        if self.part_rows is None:
            return None
        return [(rows, *want[1:]) for rows in self.part_rows]

    def build(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        if self.combine is None:
            return tensors[0]
        return self.combine(tensors)


def concat_rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(tensors, dim=0)


@dataclass
class WeightMap:
    """canonical parameter name -> Source, plus the checkpoint names that are read and dropped."""

    sources: dict[str, Source] = field(default_factory=dict)
    ignore: tuple[str, ...] = ()  # regular expressions of checkpoint tensors that carry nothing we need

    def add(self, canonical: str, *names: str, combine=None, part_rows: tuple[int, ...] | None = None) -> None:
        self.sources[canonical] = Source(tuple(names), combine, part_rows)

    def is_ignored(self, name: str) -> bool:
        return any(re.fullmatch(p, name) for p in self.ignore)

    def add_quant_scales(self, canonical_weights: Iterable[str]) -> None:
        """Map the scales of weight-only quantized linears: the releases store them next to each
        weight as `<key>_scale` (ChatGLM's `<name>.weight_scale` and GLM-130B's `<key>_scale` are the
        same rule), combined exactly as the weight rows are (per-head de-interleaving, row
        concatenation), since a scale belongs to its weight row."""
        for canonical in canonical_weights:
            src = self.sources[canonical]
            self.sources[canonical.removesuffix(".weight") + ".weight_scale"] = Source(
                tuple(n + "_scale" for n in src.names), src.combine,
                src.part_rows)


def quantization_bit(raw: dict, key: str, what: str) -> int | None:
    """The bit width a release's config declares for its weight-only quantized linears (None: not
    quantized)."""
    bits = raw.get(key)
    if bits in (None, 0, False):
        return None
    if bits not in (4, 8):
        raise ConfigError(f"{what} config declares {key}={bits!r}: the releases use 4 or 8 (0 for none); "
                          "use the config.json shipped with the checkpoint")
    return int(bits)


def require(raw: dict, keys: Iterable[str], what: str) -> None:
    missing = [k for k in keys if k not in raw]
    if missing:
        raise ConfigError(f"{what} config.json lacks {', '.join(missing)}: the file is incomplete or is not a {what} "
                          "config; use the config.json shipped with the checkpoint")


def eos_list(value) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)
