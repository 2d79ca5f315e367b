"""The paper's method: stage A per seed, stage B once, stage C for every (seed, K, eta), through the stage cache.

One code path serves both entry points: the library's :func:`edit` (which returns the stage results as an
:class:`EditResult`) and the method interface's :func:`run` (``nonrigid edit``, ``nonrigid bench``). Its
parameters are one table, the catalogue's ``OURS`` entry, validated once by
:func:`~nonrigid.methods.base.resolve_params`; :class:`EditSettings` is that table as a dataclass.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from ..errors import UsageError
from ..progress import Progress
from ..stages import DEFAULT_GUIDANCE
from ..stages.cache import StageCache
from ..stages.cached import TextRequest, cache_fields, inversion_stages, text_stages
from ..stages.inversion import Inversion
from ..stages.sampling import sample_many, variant_grid
from ..stages.text_optimization import TextOptimization
from ..timing import Stopwatch
from .base import MethodContext, MethodOutput, MethodVariant, resolve_params
from .catalogue import OURS as INFO
from .run import prepare_image, with_family_defaults

__all__ = ["INFO", "EditResult", "EditSettings", "EditStages", "Variant", "edit", "edit_many", "resample",
           "resample_many", "run", "run_many"]

_DEFAULTS = INFO.defaults()


@dataclass
class EditSettings:
    """Every parameter of an edit, with the paper's defaults: the ``OURS`` table plus the prompts, the seeds and
    the sampling batch size. Made, it is valid (every value checked against the table)."""

    target_prompt: str
    source_prompt: str = ""
    seeds: tuple[int, ...] = (0,)
    etas: tuple[float, ...] = _DEFAULTS["etas"]
    inject: tuple[float, ...] = _DEFAULTS["inject"]
    num_steps: int = _DEFAULTS["num_steps"]
    opt_steps: int = _DEFAULTS["opt_steps"]
    opt_lr: float = _DEFAULTS["opt_lr"]
    inversion: str = _DEFAULTS["inversion"]
    guidance_scale: float | None = _DEFAULTS["guidance_scale"]
    inner_steps: int = _DEFAULTS["inner_steps"]
    early_stop: float = _DEFAULTS["early_stop"]
    batch_size: int | None = None

    def __post_init__(self) -> None:
        for name, value in resolve_params(INFO, self.params()).items():
            setattr(self, name, value)
        self.seeds = tuple(dict.fromkeys(int(s) for s in self.seeds))
        if not self.seeds:
            raise UsageError("give at least one seed")
        if self.batch_size is not None and self.batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {self.batch_size}")

    def params(self) -> dict[str, Any]:
        """The values of the ``OURS`` table."""
        return {p.name: getattr(self, p.name) for p in INFO.params}

    @classmethod
    def from_params(cls, target_prompt: str, params: dict[str, Any], source_prompt: str = "",
                    seeds: tuple[int, ...] = (0,), batch_size: int | None = None) -> EditSettings:
        return cls(target_prompt=target_prompt, source_prompt=source_prompt, seeds=tuple(seeds),
                   batch_size=batch_size, **params)

    @property
    def guidance(self) -> float:
        """The guidance scale used: the given one, else the inversion's (7.5 for NTI and NPI, 1 for DDIM)."""
        return DEFAULT_GUIDANCE[self.inversion] if self.guidance_scale is None else float(self.guidance_scale)

    def inject_steps(self) -> tuple[int, ...]:
        """Injection ratios as step counts K = round(ratio * N), without duplicates, in the given order."""
        return tuple(dict.fromkeys(round(r * self.num_steps) for r in self.inject))


@dataclass
class Variant:
    """One edited image and the knobs that made it."""

    seed: int
    eta: float
    inject_steps: int
    inject_ratio: float
    image: Image.Image


@dataclass
class EditResult:
    """What :func:`edit` returns: the input, the variants, the stage results and how long each stage took."""

    input_image: Image.Image
    settings: EditSettings
    variants: list[Variant]
    text_optimizations: list[TextOptimization]
    inversion: Inversion
    timings: dict[str, float] = field(default_factory=dict)
    cache: dict[str, object] = field(default_factory=dict)
    model_fingerprint: str = ""


@dataclass(frozen=True)
class EditStages:
    """Stages A and B of an edit: all that another (eta, inject) variant needs. Sampling it from these costs
    (N - K) / N of one sampling run, and no text optimization or inversion."""

    text_optimizations: tuple[TextOptimization, ...]
    inversion: Inversion

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(t.seed for t in self.text_optimizations)


def resample(
    pipe,
    stages: EditStages,
    etas: tuple[float, ...],
    inject: tuple[float, ...],
    seeds: tuple[int, ...] | None = None,
    *,
    batch_size: int | None = None,
    progress: Progress = False,
) -> list[Variant]:
    """New variants of a finished edit (stage C alone): every (seed, inject ratio, eta), in grid order.

    The values are checked against the method's table as an edit's would be; ``seeds`` default to all the edit's.
    """
    return resample_many(pipe, [stages], etas, inject, None if seeds is None else [seeds], batch_size=batch_size,
                         progress=progress)[0]


def resample_many(
    pipe,
    stages: Sequence[EditStages],
    etas: tuple[float, ...],
    inject: tuple[float, ...],
    seeds: Sequence[tuple[int, ...]] | None = None,
    *,
    batch_size: int | None = None,
    progress: Progress = False,
) -> list[list[Variant]]:
    """:func:`resample` for several edits in one sampling batch (their inversions must share step count and
    guidance scale); each edit's variants in grid order, equal to its own resample's."""
    etas = INFO.param("etas").check(etas)
    inject = INFO.param("inject").check(inject)
    chosen = []
    for index, edit_stages in enumerate(stages):
        by_seed = {t.seed: t for t in edit_stages.text_optimizations}
        wanted = edit_stages.seeds if seeds is None else tuple(dict.fromkeys(int(s) for s in seeds[index]))
        unknown = [s for s in wanted if s not in by_seed]
        if unknown:
            raise UsageError(f"seed {unknown[0]} was not part of this edit (its seeds: "
                             f"{', '.join(map(str, by_seed))})")
        chosen.append([by_seed[s] for s in wanted])
    num_steps = stages[0].inversion.num_steps
    steps = tuple(dict.fromkeys(round(r * num_steps) for r in inject))
    ratio_of = {round(r * num_steps): r for r in reversed(inject)}
    images = sample_many(pipe, [s.inversion for s in stages], chosen, etas, steps, batch_size=batch_size,
                         progress=progress)
    return [
        [Variant(texts[s.text_index].seed, s.eta, s.inject_steps, ratio_of[s.inject_steps], img)
         for s, img in zip(variant_grid(len(texts), etas, steps), pictures, strict=True)]
        for texts, pictures in zip(chosen, images, strict=True)
    ]


def edit(
    pipe,
    image: str | os.PathLike | Image.Image,
    target_prompt: str,
    *,
    size: int | None = None,
    cache: StageCache | None = None,
    progress: Progress = False,
    **settings,
) -> EditResult:
    """Edit ``image`` toward ``target_prompt``: text optimization per seed, one inversion, every variant.

    Keyword ``settings`` are the fields of :class:`EditSettings` (``source_prompt``, ``seeds``, ``etas``,
    ``inject`` ratios, ``num_steps``, ``opt_steps``, ``inversion``, ``guidance_scale`` …). With a ``cache``, stage
    results are read from and written to it. ``size`` defaults to the model's native size and the guidance scale
    to its family's (with NTI or NPI inversion).
    """
    config = EditSettings(target_prompt=target_prompt, **with_family_defaults(INFO, pipe, settings))
    picture = prepare_image(pipe, image, size)
    return edit_stages(pipe, picture, config, cache, cache_fields(pipe, picture), progress)


def edit_stages(
    pipe,
    picture: Image.Image,
    config: EditSettings,
    cache: StageCache | None,
    fields: dict[str, str],
    progress: Progress = False,
) -> EditResult:
    """The method on a prepared image: A for every seed (cached), B once (cached), C for all (seed, K, eta)."""
    return edit_stages_many(pipe, [picture], [config], cache, [fields], progress)[0]


def edit_many(
    pipe,
    images: Sequence[str | os.PathLike | Image.Image],
    target_prompts: Sequence[str],
    *,
    source_prompts: Sequence[str] | None = None,
    size: int | None = None,
    cache: StageCache | None = None,
    progress: Progress = False,
    **settings,
) -> list[EditResult]:
    """:func:`edit` for several images (each with its own target and source prompt) with the same settings, as
    one model batch per step of every stage. Each result equals the image's own :func:`edit` up to the last bits
    of batched convolutions, and goes through the stage cache under the same keys; ``timings`` are each image's
    share of the batch (the batch's seconds divided by its images)."""
    source_prompts = [""] * len(images) if source_prompts is None else list(source_prompts)
    if not len(images) == len(target_prompts) == len(source_prompts):
        raise UsageError("give one target prompt and one source prompt per image")
    settings = with_family_defaults(INFO, pipe, settings)
    configs = [EditSettings(target_prompt=target, source_prompt=source, **settings)
               for target, source in zip(target_prompts, source_prompts, strict=True)]
    pictures = [prepare_image(pipe, image, size) for image in images]
    return edit_stages_many(pipe, pictures, configs, cache, [cache_fields(pipe, p) for p in pictures], progress)


def edit_stages_many(
    pipe,
    pictures: Sequence[Image.Image],
    configs: Sequence[EditSettings],
    cache: StageCache | None,
    fields: Sequence[dict[str, str]],
    progress: Progress = False,
) -> list[EditResult]:
    """:func:`edit_stages` for several prepared images whose settings agree but for prompts and seeds: each stage
    runs once for all of them (stage A over every (image, seed) the cache lacks, B over every image it lacks)."""
    if not configs:
        return []
    first = configs[0]
    if any(c.params() != first.params() or c.batch_size != first.batch_size for c in configs):
        raise UsageError("edits run together must share their settings (prompts and seeds may differ)")
    watch = Stopwatch()
    with watch("text_optimization"):
        requests = [TextRequest(p, c.target_prompt, c.seeds, f) for p, c, f in zip(pictures, configs, fields,
                                                                                    strict=True)]
        texts = text_stages(pipe, requests, first.opt_steps, first.opt_lr, cache, progress)
    with watch("inversion"):
        inversions = inversion_stages(pipe, [(p, c.source_prompt, f) for p, c, f in zip(pictures, configs, fields,
                                                                                          strict=True)],
                                      first.inversion, first.num_steps, first.guidance, first.inner_steps,
                                      first.early_stop, cache, progress)
    with watch("sampling"):
        stages = [EditStages(tuple(t), inv) for (t, _), (inv, _) in zip(texts, inversions, strict=True)]
        variants = resample_many(pipe, stages, first.etas, first.inject, [c.seeds for c in configs],
                                 batch_size=first.batch_size, progress=progress)
    timings = {name: seconds / len(configs) for name, seconds in watch.with_total().items()}
    return [
        EditResult(picture, config, mine, list(stage.text_optimizations), stage.inversion, dict(timings),
                   {"text_optimization": reused, "inversion": hit}, field_set["model"])
        for picture, config, mine, stage, (_, reused), (_, hit), field_set
        in zip(pictures, configs, variants, stages, texts, inversions, fields, strict=True)
    ]


def run(pipe, picture: Image.Image, target_prompt: str, params: dict[str, Any], ctx: MethodContext) -> MethodOutput:
    """The method interface: :func:`edit_stages`, its variants named by seed, K and eta."""
    return run_many(pipe, [picture], [target_prompt], params, [ctx])[0]


def run_many(pipe, pictures: Sequence[Image.Image], target_prompts: Sequence[str], params: dict[str, Any],
             ctxs: Sequence[MethodContext]) -> list[MethodOutput]:
    """:func:`run` for several pictures with the same parameters, as one batch (:func:`edit_stages_many`); each
    output equals the picture's own run's, its timings its share of the batch."""
    configs = [EditSettings.from_params(target, params, ctx.source_prompt, ctx.seeds, ctx.batch_size)
               for target, ctx in zip(target_prompts, ctxs, strict=True)]
    results = edit_stages_many(pipe, pictures, configs, ctxs[0].cache, [ctx.cache_fields for ctx in ctxs],
                               ctxs[0].progress)
    return [_output(config, result) for config, result in zip(configs, results, strict=True)]


def _output(config: EditSettings, result: EditResult) -> MethodOutput:
    """An edit's result as the method interface returns it."""
    variants = [
        MethodVariant(v.seed, {"K": v.inject_steps, "eta": v.eta}, v.image, {"inject_ratio": v.inject_ratio},
                      params={"etas": v.eta, "inject": v.inject_ratio})
        for v in result.variants
    ]
    record = {
        "guidance_scale_used": config.guidance,
        "inject_steps": list(config.inject_steps()),
        "text_optimization_final_loss": {t.seed: (t.losses[-1] if t.losses else None)
                                         for t in result.text_optimizations},
    }
    timings = {k: v for k, v in result.timings.items() if k != "total"}
    stages = EditStages(tuple(result.text_optimizations), result.inversion)
    return MethodOutput(variants, timings, result.cache, record, stages=stages)
