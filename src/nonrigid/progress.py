"""Progress of the long loops, reported one way for every stage and method.

A loop takes ``progress``: ``False`` (silent), ``True`` (a terminal bar, what the CLI shows) or a *reporter*, a
function ``report(stage, done, total)`` called before the first step and after every step. The web UI's reporter
moves its progress bar and, when the user presses Cancel, raises :class:`~nonrigid.errors.Cancelled`: the loop then
stops between two steps, and since stage results are only cached once a stage is complete, nothing half-done is
kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar, Union

from tqdm.auto import tqdm

Reporter = Callable[[str, int, int], None]
Progress = Union[bool, Reporter]  # noqa: UP007 (a runtime alias: `bool | Callable` is not a type at runtime)

T = TypeVar("T")


class Bar:
    """One loop's progress: a tqdm bar when ``progress`` is true, calls to the reporter when it is one."""

    def __init__(self, stage: str, total: int, progress: Progress, initial: int = 0, leave: bool = False) -> None:
        self.stage, self.total, self.done = stage, int(total), int(initial)
        self._report = progress if callable(progress) else None
        self._bar = tqdm(total=total, initial=initial, desc=stage, disable=not progress or self._report is not None,
                         leave=leave)
        if self._report is not None:
            self._report(stage, self.done, self.total)

    def update(self, steps: int = 1) -> None:
        self.done += steps
        self._bar.update(steps)
        if self._report is not None:
            self._report(self.stage, self.done, self.total)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def track(items: Iterable[T], stage: str, progress: Progress, total: int | None = None) -> Iterator[T]:
    """``items``, reporting each one as done when the loop asks for the next (``total`` for unsized iterables)."""
    count = len(items) if total is None else total  # type: ignore[arg-type]
    with Bar(stage, count, progress) as bar:
        for item in items:
            yield item
            bar.update(1)

