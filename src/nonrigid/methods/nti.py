"""Null-text inversion editing (the paper's "NTI-only" baseline): invert, then sample the target prompt.

It is the paper's method with no text optimization, no injection and eta 1: every step is conditioned on
``tau(target)`` with NTI's null embeddings. It shares the NTI inversion (and its cache entry) with ``ours``.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from ..models.registry import family_of
from ..stages.cached import inversion_stage
from ..stages.inversion import Inversion
from ..stages.sampling import sample_latents
from ..timing import Stopwatch
from .base import MethodContext, MethodOutput, MethodVariant
from .catalogue import NTI as INFO

__all__ = ["INFO", "run"]


def nti_inversion(pipe, picture: Image.Image, params: dict[str, Any], ctx: MethodContext) -> tuple[Inversion, bool]:
    """The NTI inversion of ``picture`` for the source prompt, from the stage cache when ``ours`` (or MasaCtrl) made
    it already; returns it and whether it was cached."""
    return inversion_stage(pipe, picture, ctx.source_prompt, "nti", params["num_steps"], params["guidance_scale"],
                           params["inner_steps"], params["early_stop"], ctx.cache, ctx.cache_fields, ctx.progress)


def run(pipe, picture: Image.Image, target_prompt: str, params: dict[str, Any], ctx: MethodContext) -> MethodOutput:
    family = family_of(pipe)
    watch = Stopwatch()
    with watch("inversion"):
        inversion, hit = nti_inversion(pipe, picture, params, ctx)
    with watch("sampling"):
        latents = sample_latents(family, inversion, family.encode_prompt(target_prompt), [0], progress=ctx.progress)
        (image,) = family.decode(latents)
    return MethodOutput([MethodVariant(ctx.seeds[0], {}, image)], watch.seconds, {"inversion": hit})
