"""Stages A and B through the stage cache: a stage's result is loaded when one with the same inputs exists.

Cache keys hash everything a stage depends on (model fingerprint, preprocessed image pixels, dtype and device type:
:func:`cache_fields`; prompt and the stage's own parameters). The paper's method, NTI editing, MasaCtrl and Imagic
share entries: NTI editing and MasaCtrl reuse ours' inversion, Imagic reuses ours' text optimizations.
"""

from __future__ import annotations

import logging

from PIL import Image

from ..images import image_digest
from ..models.fingerprint import model_fingerprint
from ..models.registry import family_of
from ..progress import Progress
from .cache import StageCache, stage_key
from .inversion import Inversion, invert
from .text_optimization import TextOptimization, optimize_text_batch

logger = logging.getLogger("nonrigid")


def text_stage(
    pipe,
    picture: Image.Image,
    target_prompt: str,
    opt_steps: int,
    opt_lr: float,
    seeds: tuple[int, ...],
    cache: StageCache | None,
    common: dict[str, str],
    progress: Progress = False,
) -> tuple[list[TextOptimization], list[int]]:
    """Stage A for every seed: cached seeds are loaded, the rest optimised together in one batch.

    ``common`` identifies model, image, dtype and device in the cache key (see :func:`edit`). Returns the results
    in seed order and the seeds that came from the cache. Imagic calls this too, so its stage A is shared.
    """
    family = family_of(pipe)
    keys = {seed: stage_key("text", **common, prompt=target_prompt, steps=opt_steps, lr=opt_lr, seed=seed)
            for seed in seeds}
    found: dict[int, TextOptimization] = {}
    if cache is not None:
        for seed, key in keys.items():
            record = cache.load("text", key, device=family.device)
            if record is not None:
                found[seed] = TextOptimization.from_record(*record)
    missing = [s for s in dict.fromkeys(seeds) if s not in found]
    if missing:
        fresh = optimize_text_batch(pipe, picture, target_prompt, opt_steps, opt_lr, missing, progress=progress)
        for result in fresh:
            found[result.seed] = result
            if cache is not None:
                cache.save("text", keys[result.seed], *result.to_record())
    reused = [s for s in dict.fromkeys(seeds) if s not in missing]
    if reused:
        logger.info("reusing cached text optimization for seed(s) %s", ", ".join(map(str, reused)))
    return [found[s] for s in dict.fromkeys(seeds)], reused


def inversion_stage(
    pipe,
    picture: Image.Image,
    source_prompt: str,
    method: str,
    num_steps: int,
    guidance: float,
    inner_steps: int,
    early_stop: float,
    cache: StageCache | None,
    common: dict[str, str],
    progress: Progress = False,
) -> tuple[Inversion, bool]:
    """Stage B, from the cache when an inversion with the same inputs exists (NTI editing and MasaCtrl share it)."""
    key = stage_key("inversion", **common, prompt=source_prompt, method=method, steps=num_steps,
                    guidance=guidance, inner_steps=inner_steps, early_stop=early_stop)
    if cache is not None:
        record = cache.load("inversion", key, device=family_of(pipe).device)
        if record is not None:
            logger.info("reusing cached %s inversion", method)
            return Inversion.from_record(*record), True
    inversion = invert(pipe, picture, source_prompt, method, num_steps, guidance, inner_steps, early_stop,
                       progress=progress)
    if cache is not None:
        cache.save("inversion", key, *inversion.to_record())
    return inversion, False


def cache_fields(pipe, picture: Image.Image) -> dict[str, str]:
    """What identifies a stage's inputs besides its own parameters: model weights, image pixels, dtype, device."""
    family = family_of(pipe)
    return {"model": model_fingerprint(pipe), "image": image_digest(picture), "dtype": str(family.dtype),
            "device": family.device.type}
