"""Stages as programs that share model calls: stage A (text optimization) rides along stage B (inversion).

What a user waits for is the number of *sequential* denoiser calls, not the rows in each: on a GPU a call of one
row costs about what a call of twelve does. Stages A and B are independent, so each is written as a *program*, a
generator that states its loop as usual and, where it needs the denoiser, yields a :class:`Call` (its rows) and
receives the raw outputs; where it has a loss, it yields a :class:`Loss` and resumes once the backward pass is done.
:func:`run_programs` runs several programs side by side: each round it evaluates every waiting program's rows in
one model call, hands each program its own rows, sums the losses of the programs that produced one and runs one
backward pass. A program alone makes exactly the calls its plain loop would.

Why results do not change: a program's rows are its own (no row of one program enters another's loss), each
program keeps its own optimiser, generators and early stops, and the loss is a sum, so each leaf's gradient is its
own program's. With a denoiser that evaluates rows one at a time the shared calls give bit-identical results; with
the real batched denoiser they differ in the last bits of batched products (tests/test_programs.py measures it).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from ..models.family import Conditioning, ModelFamily

T = TypeVar("T")


@dataclass
class Call:
    """Rows a program asks the denoiser for: latents (R, C, h, w), one timestep for all rows or one per row, and a
    conditioning with R rows. The raw model output comes back (guidance is the program's business, with
    :func:`~nonrigid.models.family.guided`; a distilled model is given the value 1). ``grad``: the program will
    back-propagate through these rows (a :class:`Loss` follows)."""

    latents: torch.Tensor
    timesteps: torch.Tensor | int | float
    cond: Conditioning
    grad: bool = False

    @property
    def rows(self) -> int:
        return self.latents.shape[0]


@dataclass
class Loss:
    """A program's loss for its last call's rows; the program resumes (receiving None) after the backward pass."""

    value: torch.Tensor


Program = Generator[Call | Loss, torch.Tensor | None, T]


def run_program(model: ModelFamily, program: Program[T]) -> T:
    """One program alone: exactly the model calls and backward passes of its plain loop."""
    return run_programs(model, [program])[0]


def run_programs(
    model: ModelFamily, programs: Sequence[Program[Any]], finished: Callable[[int, Any], None] | None = None,
) -> list[Any]:
    """Run ``programs`` side by side, each round one model call with every waiting program's rows; their results
    in order. The number of sequential model calls is the longest program's, not the sum.

    ``finished(index, result)`` is called as each program ends, before the others go on: a caller saves a finished
    stage there, so an interruption later (a cancel during stage B) does not lose it."""
    results: dict[int, Any] = {}

    def finish(index: int, result: Any) -> None:
        results[index] = result
        if finished is not None:
            finished(index, result)

    waiting: dict[int, Call] = {}
    for index, program in enumerate(programs):
        _advance(index, program, None, waiting, finish)
    while waiting:
        order = list(waiting)
        calls = [waiting.pop(i) for i in order]
        outputs = _evaluate(model, calls)
        losses: dict[int, torch.Tensor] = {}
        for index, call, output in zip(order, calls, outputs, strict=True):
            reply = _send(programs[index], output if call.grad else output.detach(), index, finish)
            if isinstance(reply, Loss):
                losses[index] = reply.value
            elif isinstance(reply, Call):
                waiting[index] = reply
        if losses:
            total = None
            for value in losses.values():  # a program alone back-propagates its own loss tensor, unchanged
                total = value if total is None else total + value
            total.backward()
            for index in losses:
                _advance(index, programs[index], None, waiting, finish)
    return [results[i] for i in range(len(programs))]


def _advance(
    index: int, program: Program[Any], value: Any, waiting: dict[int, Call], finish: Callable[[int, Any], None],
) -> None:
    """Resume a program that yielded nothing to evaluate (or a loss now back-propagated) up to its next call."""
    reply = _send(program, value, index, finish)
    if isinstance(reply, Loss):
        raise TypeError("a program yields a loss only after the call whose rows it is computed from")
    if isinstance(reply, Call):
        waiting[index] = reply


def _send(program: Program[Any], value: Any, index: int, finish: Callable[[int, Any], None]) -> Call | Loss | None:
    try:
        return program.send(value)
    except StopIteration as ended:
        finish(index, ended.value)
        return None


def _evaluate(model: ModelFamily, calls: list[Call]) -> list[torch.Tensor]:
    """One model call for every program's rows, split back per program. A single call goes to the denoiser as the
    program made it; several are concatenated (timesteps as one per row)."""
    with torch.set_grad_enabled(any(call.grad for call in calls)):
        if len(calls) == 1:
            (call,) = calls
            return [model.predict(call.latents, call.timesteps, call.cond)]
        # A call without gradients joins a batch that has them: its inputs are cut from any graph, so the batch's
        # backward pass reaches only the rows that asked for it.
        latents = torch.cat([call.latents if call.grad else call.latents.detach() for call in calls])
        timesteps = torch.cat([_per_row(call.timesteps, call.rows, latents.device) for call in calls])
        cond = Conditioning.cat([(call.cond if call.grad else call.cond.detach()).expand(call.rows) for call in calls])
        output = model.predict(latents, timesteps, cond)
    return list(output.split([call.rows for call in calls]))


def _per_row(timesteps: torch.Tensor | int | float, rows: int, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(timesteps, device=device, dtype=torch.float32).reshape(-1)
    return t.expand(rows) if t.numel() == 1 else t
