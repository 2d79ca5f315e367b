"""The paper's method as a :mod:`nonrigid.methods` entry: :func:`nonrigid.editing.edit`'s stages, same cache."""

from __future__ import annotations

import time
from typing import Any

from diffusers import StableDiffusionPipeline
from PIL import Image

from ..editing import inversion_stage, text_stage
from ..options import EditSettings
from ..sampling import sample, variant_grid
from . import OURS as INFO
from .base import MethodContext, MethodOutput, MethodVariant

__all__ = ["INFO", "run"]


def settings_from_params(
    target_prompt: str, params: dict[str, Any], source_prompt: str, seeds, batch_size: int | None
) -> EditSettings:
    """The method's parameters as :class:`EditSettings` (which validates them the way ``edit`` does)."""
    return EditSettings(
        target_prompt=target_prompt, source_prompt=source_prompt, seeds=tuple(seeds), etas=params["etas"],
        inject=params["inject"], num_steps=params["num_steps"], opt_steps=params["opt_steps"],
        opt_lr=params["opt_lr"], inversion=params["inversion"], guidance_scale=params["guidance_scale"],
        inner_steps=params["inner_steps"], early_stop=params["early_stop"], batch_size=batch_size,
    )


def run(
    pipe: StableDiffusionPipeline, picture: Image.Image, target_prompt: str, params: dict[str, Any],
    ctx: MethodContext,
) -> MethodOutput:
    """Stage A per seed, stage B once, stage C for every (seed, K, eta); variants in that order."""
    config = settings_from_params(target_prompt, params, ctx.source_prompt, ctx.seeds, ctx.batch_size)
    timings: dict[str, float] = {}
    tick = time.perf_counter()
    texts, reused = text_stage(pipe, picture, target_prompt, config.opt_steps, config.opt_lr, config.seeds,
                               ctx.cache, ctx.cache_fields, ctx.progress)
    timings["text_optimization"] = time.perf_counter() - tick
    tick = time.perf_counter()
    inversion, hit = inversion_stage(pipe, picture, config.source_prompt, config.inversion, config.num_steps,
                                     config.guidance, config.inner_steps, config.early_stop, ctx.cache,
                                     ctx.cache_fields, ctx.progress)
    timings["inversion"] = time.perf_counter() - tick
    tick = time.perf_counter()
    steps = config.inject_steps()
    images = sample(pipe, inversion, texts, config.etas, steps, batch_size=ctx.batch_size, progress=ctx.progress)
    timings["sampling"] = time.perf_counter() - tick
    ratio_of = {round(r * config.num_steps): r for r in reversed(config.inject)}
    variants = [
        MethodVariant(texts[s.text_index].seed, {"K": s.inject_steps, "eta": s.eta}, img,
                      {"inject_ratio": ratio_of[s.inject_steps]})
        for s, img in zip(variant_grid(len(texts), config.etas, steps), images, strict=True)
    ]
    record = {
        "guidance_scale_used": config.guidance,
        "inject_steps": list(steps),
        "text_optimization_final_loss": {t.seed: (t.losses[-1] if t.losses else None) for t in texts},
    }
    cache = {"text_optimization": reused, "inversion": hit}
    return MethodOutput(variants, timings, cache, record)
