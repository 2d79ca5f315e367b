"""Null-text inversion editing (the paper's "NTI-only" baseline): invert, then sample the target prompt.

It is the paper's method with no text optimization, no injection and eta 1: every step is conditioned on
``tau(target)`` with NTI's null embeddings. It shares the NTI inversion (and its cache entry) with ``ours``.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..models.family import Conditioning, ModelFamily
from ..stages.cached import InversionRequest, InversionSettings, inversion_stages
from ..stages.inversion import Inversion
from ..stages.masks import latent_mask
from ..stages.sampling import decoded, reference_path, sample_latents
from ..timing import Stopwatch
from .base import EditInput, EditResult, MethodContext, Variant
from .catalogue import NTI as INFO

__all__ = ["INFO", "nti_inversions", "run"]


def nti_inversions(model: ModelFamily, edits: Sequence[EditInput], ctx: MethodContext) -> list[tuple[Inversion, bool]]:
    """The NTI inversion of each image for its source prompt, from the stage cache when ``ours`` (or MasaCtrl) made
    it already, with whether it was cached."""
    p = ctx.params
    settings = InversionSettings("nti", p["num_steps"], p["guidance_scale"], p["inner_steps"], p["early_stop"])
    return inversion_stages(model, [InversionRequest(e.image, e.source_prompt, e.cache_fields) for e in edits],
                            settings, ctx.cache, ctx.progress)


def run(model: ModelFamily, edits: Sequence[EditInput], ctx: MethodContext) -> list[EditResult]:
    """Every image's inversion (one batch for those not cached), then every target sampled in one batch."""
    watch = Stopwatch()
    with watch("inversion"):
        found = nti_inversions(model, edits, ctx)
    with watch("sampling"):
        targets = Conditioning.cat([model.encode_prompt(e.target_prompt) for e in edits])
        inversions = [inv for inv, _ in found]
        masks = [None if e.mask is None else latent_mask(e.mask, inv.latent) for e, inv in zip(edits, inversions,
                                                                                               strict=True)]
        latents = sample_latents(model, inversions, targets, [0] * len(edits), list(range(len(edits))), masks=masks,
                                 progress=ctx.progress)
        images = [decoded(model, latents[i : i + 1], reference_path(inv)[-1:], mask)[0]
                  for i, (inv, mask) in enumerate(zip(inversions, masks, strict=True))]
    timings = {name: seconds / len(edits) for name, seconds in watch.seconds.items()}
    return [ctx.result(edit, [Variant(ctx.seeds[0], {}, image)], timings, cache={"inversion": hit})
            for edit, image, (_, hit) in zip(edits, images, found, strict=True)]
