"""What the two instruction editors' methods (``kontext``, ``qwen-edit``) share: their variants' rows, the seeded
initial noise, batching and the instruction's record.

Each variant is one (seed, guidance value) row; rows are denoised together, ``batch_size`` at a time, from the
seed's standard-normal latents drawn on the CPU exactly as diffusers' pipelines draw them from
``generator=torch.Generator().manual_seed(seed)`` (so a pipeline call with that generator is the oracle).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .base import EditInput
from .catalogue import instruction_of

Row = tuple[int, float]  # (seed, the grid column's value: guidance or true CFG)


def variant_rows(seeds: Sequence[int], values: Sequence[float]) -> list[Row]:
    """Every (seed, value), in grid order: seed by seed, each seed's values as the grid's columns."""
    return [(int(seed), float(value)) for seed in seeds for value in values]


def batches(rows: Sequence[Row], batch_size: int | None) -> Iterator[list[Row]]:
    """``rows`` ``batch_size`` at a time (all at once for None)."""
    size = batch_size if batch_size else len(rows)
    for start in range(0, len(rows), size):
        yield list(rows[start:start + size])


def initial_latents(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The (1, C, h, w) standard-normal latents of ``seed``, fp32 on the CPU: what the pipelines draw from a CPU
    generator seeded so (their packed or five-dimensional shapes hold the same values in the same order)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(int(seed)))


def instruction_record(edit: EditInput) -> tuple[str, dict[str, str]]:
    """The instruction the editor follows and what ``edit.json`` says of it (``instruction``,
    ``instruction_source``: "given", "template" or "benchmark")."""
    instruction, source = instruction_of(edit)
    return instruction, {"instruction": instruction, "instruction_source": source}
