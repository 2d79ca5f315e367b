"""What the three metrics share: their precision, and scoring one item or a sequence in batches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ...errors import UsageError
from ...models.loading import resolve_dtype


def metrics_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """fp32 unless asked otherwise (``resolve_dtype``'s default would be fp16 on CUDA)."""
    return torch.float32 if dtype is None or dtype == "auto" else resolve_dtype(dtype, device)


def as_list(items: Any, single_type: type) -> tuple[list, bool]:
    """``(items as a list, whether a single item was given)``."""
    if isinstance(items, single_type):
        return [items], True
    return list(items), False


def check_same_length(first: Sequence, second: Sequence, first_name: str, second_name: str) -> None:
    if len(first) != len(second):
        raise UsageError(f"got {len(first)} {first_name} but {len(second)} {second_name}; give one per edit")


def chunks(indices: Sequence[int] | range, size: int) -> Iterator[list[int]]:
    indices = list(indices)
    for start in range(0, len(indices), size):
        yield indices[start : start + size]
