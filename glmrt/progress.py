"""A minimal progress line on stderr for work that takes more than a second (no dependency)."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, label: str, total: int, *, enabled: bool = True, delay: float = 1.0):
        self.label, self.total = label, max(int(total), 1)
        self.start = time.monotonic()
        self.delay = delay
        self.enabled = enabled and sys.stderr is not None
        self.shown = False
        self._last = 0.0

    def __call__(self, done: int, total: int | None = None) -> None:
        if total is not None:
            self.total = max(int(total), 1)
        now = time.monotonic()
        if not self.enabled or now - self.start < self.delay or (now - self._last < 0.1 and done < self.total):
            return
        self._last = now
        width = 30
        filled = int(width * done / self.total)
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} "
                         f"{now - self.start:.1f}s")
        sys.stderr.flush()
        self.shown = True

    def close(self) -> None:
        if self.shown:
            sys.stderr.write("\n")
            sys.stderr.flush()
