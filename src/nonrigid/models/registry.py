"""Which model family a loaded pipeline belongs to. A new family is one module plus one entry in FAMILIES."""

from __future__ import annotations

from typing import Any

from ..errors import UsageError
from .family import ModelFamily
from .flux import Flux
from .sd import StableDiffusion
from .sd3 import StableDiffusion3
from .sdxl import StableDiffusionXL

FAMILIES: tuple[type[ModelFamily], ...] = (StableDiffusion, StableDiffusionXL, StableDiffusion3, Flux)


def family_of(pipe: Any) -> ModelFamily:
    """The family adapter for ``pipe`` (made anew each call: adapters hold no state of their own)."""
    if isinstance(pipe, ModelFamily):
        return pipe
    for family in FAMILIES:
        if family.matches(pipe):
            return family(pipe)
    names = ", ".join(f.name for f in FAMILIES)
    raise UsageError(f"{type(pipe).__name__} belongs to no supported model family ({names})")
