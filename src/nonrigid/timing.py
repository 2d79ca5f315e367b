"""One small timing helper for the stages, methods and the benchmark (instead of hand-made perf_counter pairs)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class Stopwatch:
    """Seconds per named part: ``with watch("inversion"): ...`` adds the block's wall time to
    ``watch.seconds["inversion"]``; :meth:`total` is the time since the stopwatch was made."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._started = time.perf_counter()

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        tick = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - tick

    def total(self) -> float:
        return time.perf_counter() - self._started

    def with_total(self) -> dict[str, float]:
        """The parts and ``total``: what results record as their timings."""
        return {**self.seconds, "total": self.total()}
