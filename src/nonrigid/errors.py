"""Errors a user can act on.

Every failure that a user can cause or fix (a missing file, a bad flag, a model that will not load, a stage that
produced NaN) is raised as a :class:`NonrigidError` with a one-line message that says what to do. The CLI prints
that line and exits with the error's ``exit_code``; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class NonrigidError(Exception):
    """Base class: a problem described in one line, with the exit code the CLI should use."""

    exit_code = 1


class UsageError(NonrigidError):
    """The input was wrong (a path, a flag, a value out of range): exit code 2."""

    exit_code = 2


class Cancelled(NonrigidError):
    """The user stopped the work (the web UI's Cancel): raised between two steps, so nothing half-done is cached."""

    exit_code = 130

    def __init__(self, message: str = "cancelled") -> None:
        super().__init__(message)


class NonFiniteError(NonrigidError):
    """A stage produced NaN or inf; names the stage and suggests full precision."""

    def __init__(self, stage: str):
        super().__init__(
            f"{stage} produced NaN or inf values; half precision can overflow here, try again with dtype=fp32"
        )
        self.stage = stage


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (libraries' errors can be pages long)."""
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:300]


def check_finite(tensor, stage: str) -> None:
    """Refuse NaN/inf rather than let it become a black image three stages later."""
    if not tensor.isfinite().all():
        raise NonFiniteError(stage)
