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
from ..models.family import ModelFamily
from ..models.fingerprint import model_fingerprint
from ..progress import Progress
from .cache import StageCache, stage_key
from .inversion import Inversion, invert_images
from .text_optimization import TextJob, TextOptimization, optimize_texts

logger = logging.getLogger("nonrigid")


@dataclass(frozen=True)
class TextRequest:
    """Stage A of one image: its prompt, its seeds and its cache fields (:func:`cache_fields`)."""

    picture: Image.Image
    target_prompt: str
    seeds: tuple[int, ...]
    common: dict[str, str]


def text_stages(
    family: ModelFamily,
    requests: Sequence[TextRequest],
    opt_steps: int,
    opt_lr: float,
    cache: StageCache | None,
    progress: Progress = False,
) -> list[tuple[list[TextOptimization], list[int]]]:
    """Stage A for every (image, seed) of ``requests``: cached ones loaded, the rest optimised together in one
    batch, each keyed exactly as its own run would key it. Returns per request the results in seed order and the
    seeds that came from the cache. Imagic calls this too, so its stage A is shared with ours."""
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
        fresh = optimize_texts(family, jobs, opt_steps, opt_lr, progress=progress)
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


@dataclass(frozen=True)
class InversionRequest:
    """Stage B of one image: its source prompt and its cache fields (:func:`cache_fields`)."""

    picture: Image.Image
    source_prompt: str
    common: dict[str, str]


def inversion_stages(
    family: ModelFamily,
    requests: Sequence[InversionRequest],
    method: str,
    num_steps: int,
    guidance: float,
    inner_steps: int,
    early_stop: float,
    cache: StageCache | None,
    progress: Progress = False,
) -> list[tuple[Inversion, bool]]:
    """Stage B of every request, from the cache when an inversion with the same inputs exists (NTI editing and
    MasaCtrl share ours'): the images not in the cache inverted in one batch, each keyed as its own run would key
    it. Returns per request the inversion and whether it came from the cache."""
    results: list[tuple[Inversion, bool] | None] = []
    keys = []
    for request in requests:
        key = stage_key("inversion", **request.common, prompt=request.source_prompt, method=method, steps=num_steps,
                        guidance=guidance, inner_steps=inner_steps, early_stop=early_stop)
        keys.append(key)
        record = None if cache is None else cache.load("inversion", key, device=family.device)
        if record is not None:
            logger.info("reusing cached %s inversion", method)
        results.append(None if record is None else (Inversion.from_record(*record), True))
    todo = [i for i, result in enumerate(results) if result is None]
    if todo:
        fresh = invert_images(family, [requests[i].picture for i in todo], [requests[i].source_prompt for i in todo],
                              method, num_steps, guidance, inner_steps, early_stop, progress=progress)
        for i, inversion in zip(todo, fresh, strict=True):
            if cache is not None:
                cache.save("inversion", keys[i], *inversion.to_record())
            results[i] = (inversion, False)
    return results  # type: ignore[return-value]


def cache_fields(family: ModelFamily, picture: Image.Image, fingerprint: str | None = None) -> dict[str, str]:
    """What identifies a stage's inputs besides its own parameters: model weights (``fingerprint``, computed when
    not given), image pixels, dtype, device."""
    return {"model": fingerprint or model_fingerprint(family), "image": image_digest(picture),
            "dtype": str(family.dtype), "device": family.device.type}
