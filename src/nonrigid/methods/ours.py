"""The paper's method: stage A per seed, stage B once, stage C for every (seed, K, eta), through the stage cache.

One code path serves both entry points: the library's :func:`edit` (which returns the stage results as an
:class:`EditResult`) and the method interface's :func:`run` (``nonrigid edit``, ``nonrigid bench``). Its
parameters are one table, the catalogue's ``OURS`` entry, validated once by
:func:`~nonrigid.methods.base.resolve_params`; :class:`EditSettings` is that table as a dataclass.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from ..errors import UsageError
from ..progress import Progress
from ..stages import DEFAULT_GUIDANCE
from ..stages.cache import StageCache
from ..stages.cached import cache_fields, inversion_stage, text_stage
from ..stages.inversion import Inversion
from ..stages.sampling import sample, variant_grid
from ..stages.text_optimization import TextOptimization
from ..timing import Stopwatch
from .base import MethodContext, MethodOutput, MethodVariant, resolve_params
from .catalogue import OURS as INFO
from .run import prepare_image, with_family_defaults

__all__ = ["INFO", "EditResult", "EditSettings", "EditStages", "Variant", "edit", "resample", "run"]

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
    etas = INFO.param("etas").check(etas)
    inject = INFO.param("inject").check(inject)
    by_seed = {t.seed: t for t in stages.text_optimizations}
    seeds = stages.seeds if seeds is None else tuple(dict.fromkeys(int(s) for s in seeds))
    unknown = [s for s in seeds if s not in by_seed]
    if unknown:
        raise UsageError(f"seed {unknown[0]} was not part of this edit (its seeds: {', '.join(map(str, by_seed))})")
    texts = [by_seed[s] for s in seeds]
    num_steps = stages.inversion.num_steps
    steps = tuple(dict.fromkeys(round(r * num_steps) for r in inject))
    ratio_of = {round(r * num_steps): r for r in reversed(inject)}
    images = sample(pipe, stages.inversion, texts, etas, steps, batch_size=batch_size, progress=progress)
    return [
        Variant(texts[s.text_index].seed, s.eta, s.inject_steps, ratio_of[s.inject_steps], img)
        for s, img in zip(variant_grid(len(texts), etas, steps), images, strict=True)
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
    watch = Stopwatch()
    with watch("text_optimization"):
        texts, reused = text_stage(pipe, picture, config.target_prompt, config.opt_steps, config.opt_lr,
                                   config.seeds, cache, fields, progress)
    with watch("inversion"):
        inversion, hit = inversion_stage(pipe, picture, config.source_prompt, config.inversion, config.num_steps,
                                         config.guidance, config.inner_steps, config.early_stop, cache, fields,
                                         progress)
    with watch("sampling"):
        variants = resample(pipe, EditStages(tuple(texts), inversion), config.etas, config.inject, config.seeds,
                            batch_size=config.batch_size, progress=progress)
    return EditResult(picture, config, variants, texts, inversion, watch.with_total(),
                      {"text_optimization": reused, "inversion": hit}, fields["model"])


def run(pipe, picture: Image.Image, target_prompt: str, params: dict[str, Any], ctx: MethodContext) -> MethodOutput:
    """The method interface: :func:`edit_stages`, its variants named by seed, K and eta."""
    config = EditSettings.from_params(target_prompt, params, ctx.source_prompt, ctx.seeds, ctx.batch_size)
    result = edit_stages(pipe, picture, config, ctx.cache, ctx.cache_fields, ctx.progress)
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
