"""The paper's method: stage A per (image, seed), stage B per image, stage C for every (seed, K, eta), through the
stage cache, for a batch of images as one model batch per step of every stage.

Its parameters are one table, the catalogue's ``OURS`` entry, resolved once by the front door
(:func:`~nonrigid.methods.run.run_edits`). :func:`resample` samples more (eta, inject) variants from an edit's
:class:`EditStages` (stage C alone): the page's sliders.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import UsageError
from ..models.family import ModelFamily
from ..progress import Progress
from ..stages import DEFAULT_GUIDANCE
from ..stages.cached import InversionRequest, InversionSettings, TextRequest, TextSettings, stages_a_and_b
from ..stages.inversion import Inversion
from ..stages.masks import latent_mask
from ..stages.sampling import sample_variants, variant_grid
from ..stages.text_optimization import TextOptimization
from ..timing import Stopwatch
from .base import EditInput, EditResult, MethodContext, Variant
from .catalogue import OURS as INFO

__all__ = ["INFO", "EditStages", "guidance_of", "inject_steps_of", "resample", "run"]


@dataclass(frozen=True)
class EditStages:
    """Stages A and B of an edit: all that another (eta, inject) variant needs. Sampling it from these costs
    (N - K) / N of one sampling run, and no text optimization or inversion."""

    text_optimizations: tuple[TextOptimization, ...]
    inversion: Inversion
    mask: Any = None  # the edit's mask at the working size (None: the whole picture may change)

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(t.seed for t in self.text_optimizations)


def guidance_of(params: Mapping[str, Any]) -> float:
    """The guidance scale used: the given one, else the inversion's (7.5 for NTI and NPI, 1 for DDIM)."""
    given = params["guidance_scale"]
    return DEFAULT_GUIDANCE[params["inversion"]] if given is None else float(given)


def text_settings(params: Mapping[str, Any]) -> TextSettings:
    return TextSettings(params["opt_steps"], params["opt_lr"])


def inversion_settings(params: Mapping[str, Any]) -> InversionSettings:
    return InversionSettings(params["inversion"], params["num_steps"], guidance_of(params), params["inner_steps"],
                             params["early_stop"])


def inject_steps_of(params: Mapping[str, Any]) -> tuple[int, ...]:
    """Injection ratios as step counts K = round(ratio * N), without duplicates, in the given order."""
    return tuple(dict.fromkeys(round(r * params["num_steps"]) for r in params["inject"]))


def run(model: ModelFamily, edits: Sequence[EditInput], ctx: MethodContext) -> list[EditResult]:
    """A for every (image, seed) the cache lacks, B for every image it lacks, C for all (image, seed, K, eta): one
    model batch per step of each; each result equals the image's own edit up to the last bits of batched products,
    its timings its share of the batch."""
    p = ctx.params
    watch = Stopwatch()
    with watch("text_optimization_and_inversion"):  # A rides along B's model calls: one time for both
        texts, inversions = stages_a_and_b(
            model, [TextRequest(e.image, e.target_prompt, ctx.seeds, e.cache_fields) for e in edits],
            text_settings(p), [InversionRequest(e.image, e.source_prompt, e.cache_fields) for e in edits],
            inversion_settings(p), ctx.cache, ctx.progress)
    with watch("sampling"):
        stages = [EditStages(tuple(t), inv, e.mask) for (t, _), (inv, _), e in zip(texts, inversions, edits,
                                                                                     strict=True)]
        variants = resample(model, stages, p["etas"], p["inject"], batch_size=ctx.batch_size, progress=ctx.progress)
    timings = {name: seconds / len(edits) for name, seconds in watch.seconds.items()}
    record = {"guidance_scale_used": guidance_of(p), "inject_steps": list(inject_steps_of(p))}
    return [
        ctx.result(edit, mine, timings, cache={"text_optimization": reused, "inversion": hit}, stages=stage,
                   record={**record, "text_optimization_final_loss": {t.seed: (t.losses[-1] if t.losses else None)
                                                                      for t in stage.text_optimizations}})
        for edit, mine, stage, (_, reused), (_, hit) in zip(edits, variants, stages, texts, inversions, strict=True)
    ]


def resample(
    model: ModelFamily,
    stages: Sequence[EditStages],
    etas: Sequence[float],
    inject: Sequence[float],
    seeds: Sequence[Sequence[int]] | None = None,
    *,
    batch_size: int | None = None,
    progress: Progress = False,
) -> list[list[Variant]]:
    """New variants of finished edits (stage C alone) in one sampling batch: every (seed, inject ratio, eta) of
    each edit, in grid order (their inversions must share step count and guidance scale).

    The values are checked against the method's table as an edit's would be; ``seeds`` (one tuple per edit)
    default to all each edit's seeds. Variants are named by seed, K and eta (``knobs``) and carry the parameters'
    own values (``params``: ``etas``, ``inject``)."""
    etas = INFO.param("etas").check(etas)
    inject = INFO.param("inject").check(inject)
    chosen = [_texts(edit_stages, None if seeds is None else seeds[index]) for index, edit_stages in enumerate(stages)]
    num_steps = stages[0].inversion.num_steps
    steps = tuple(dict.fromkeys(round(r * num_steps) for r in inject))
    ratio_of = {round(r * num_steps): r for r in reversed(inject)}
    masks = [None if s.mask is None else latent_mask(s.mask, s.inversion.latent) for s in stages]
    images = sample_variants(model, [s.inversion for s in stages], chosen, etas, steps, batch_size=batch_size,
                             masks=masks, progress=progress)
    return [
        [Variant(texts[s.text_index].seed, {"K": s.inject_steps, "eta": s.eta}, img,
                 {"inject_ratio": ratio_of[s.inject_steps]}, params={"etas": s.eta, "inject": ratio_of[s.inject_steps]})
         for s, img in zip(variant_grid(len(texts), etas, steps), pictures, strict=True)]
        for texts, pictures in zip(chosen, images, strict=True)
    ]


def _texts(edit_stages: EditStages, seeds: Sequence[int] | None) -> list[TextOptimization]:
    """The edit's text optimizations of ``seeds`` (all, when None), refusing a seed the edit did not make."""
    by_seed = {t.seed: t for t in edit_stages.text_optimizations}
    wanted = edit_stages.seeds if seeds is None else tuple(dict.fromkeys(int(s) for s in seeds))
    unknown = [s for s in wanted if s not in by_seed]
    if unknown:
        raise UsageError(f"seed {unknown[0]} was not part of this edit (its seeds: {', '.join(map(str, by_seed))})")
    return [by_seed[s] for s in wanted]
