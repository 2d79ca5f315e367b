"""Stages A and B through the stage cache: a stage's result is loaded when one with the same inputs exists.

Cache keys hash everything a stage depends on (model fingerprint, preprocessed image pixels, dtype and device type:
:func:`cache_fields`; prompt and the stage's own parameters). The paper's method, NTI editing, MasaCtrl and Imagic
share entries: NTI editing and MasaCtrl reuse ours' inversion, Imagic reuses ours' text optimizations.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from ..images import image_digest
from ..models.fingerprint import model_fingerprint
from ..models.registry import family_of
from ..progress import Progress
from .cache import StageCache, stage_key
from .inversion import Inversion, invert_many
from .text_optimization import TextJob, TextOptimization, optimize_texts

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
    return text_stages(pipe, [TextRequest(picture, target_prompt, seeds, common)], opt_steps, opt_lr, cache,
                       progress)[0]


@dataclass(frozen=True)
class TextRequest:
    """Stage A of one image: its prompt, its seeds and its cache fields (:func:`cache_fields`)."""

    picture: Image.Image
    target_prompt: str
    seeds: tuple[int, ...]
    common: dict[str, str]


def text_stages(
    pipe,
    requests: Sequence[TextRequest],
    opt_steps: int,
    opt_lr: float,
    cache: StageCache | None,
    progress: Progress = False,
) -> list[tuple[list[TextOptimization], list[int]]]:
    """:func:`text_stage` for several images: every (image, seed) not in the cache optimised in one batch; each
    image's entries keyed exactly as its own run would key them."""
    family = family_of(pipe)
    found: list[dict[int, TextOptimization]] = []
    missing: list[tuple[int, int]] = []  # (request, seed)
    keys: list[dict[int, str]] = []
    for index, request in enumerate(requests):
        keys.append({seed: stage_key("text", **request.common, prompt=request.target_prompt, steps=opt_steps,
                                     lr=opt_lr, seed=seed) for seed in request.seeds})
        found.append({})
        for seed in dict.fromkeys(request.seeds):
            record = None if cache is None else cache.load("text", keys[index][seed], device=family.device)
            if record is not None:
                found[index][seed] = TextOptimization.from_record(*record)
            else:
                missing.append((index, seed))
    if missing:
        jobs = [TextJob(requests[i].picture, requests[i].target_prompt, seed) for i, seed in missing]
        fresh = optimize_texts(pipe, jobs, opt_steps, opt_lr, progress=progress)
        for (index, seed), result in zip(missing, fresh, strict=True):
            found[index][seed] = result
            if cache is not None:
                cache.save("text", keys[index][seed], *result.to_record())
    results = []
    for index, request in enumerate(requests):
        reused = [s for s in dict.fromkeys(request.seeds) if (index, s) not in missing]
        if reused:
            logger.info("reusing cached text optimization for seed(s) %s", ", ".join(map(str, reused)))
        results.append(([found[index][s] for s in dict.fromkeys(request.seeds)], reused))
    return results


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
    return inversion_stages(pipe, [(picture, source_prompt, common)], method, num_steps, guidance, inner_steps,
                            early_stop, cache, progress)[0]


def inversion_stages(
    pipe,
    requests: Sequence[tuple[Image.Image, str, dict[str, str]]],
    method: str,
    num_steps: int,
    guidance: float,
    inner_steps: int,
    early_stop: float,
    cache: StageCache | None,
    progress: Progress = False,
) -> list[tuple[Inversion, bool]]:
    """:func:`inversion_stage` for several (picture, source prompt, cache fields): the images not in the cache
    inverted in one batch, each keyed as its own run would key it."""
    results: list[tuple[Inversion, bool] | None] = []
    keys = []
    for _picture, source_prompt, common in requests:
        key = stage_key("inversion", **common, prompt=source_prompt, method=method, steps=num_steps,
                        guidance=guidance, inner_steps=inner_steps, early_stop=early_stop)
        keys.append(key)
        record = None if cache is None else cache.load("inversion", key, device=family_of(pipe).device)
        if record is not None:
            logger.info("reusing cached %s inversion", method)
        results.append(None if record is None else (Inversion.from_record(*record), True))
    todo = [i for i, result in enumerate(results) if result is None]
    if todo:
        fresh = invert_many(pipe, [requests[i][0] for i in todo], [requests[i][1] for i in todo], method, num_steps,
                            guidance, inner_steps, early_stop, progress=progress)
        for i, inversion in zip(todo, fresh, strict=True):
            if cache is not None:
                cache.save("inversion", keys[i], *inversion.to_record())
            results[i] = (inversion, False)
    return results  # type: ignore[return-value]


def cache_fields(pipe, picture: Image.Image) -> dict[str, str]:
    """What identifies a stage's inputs besides its own parameters: model weights, image pixels, dtype, device."""
    family = family_of(pipe)
    return {"model": model_fingerprint(pipe), "image": image_digest(picture), "dtype": str(family.dtype),
            "device": family.device.type}
