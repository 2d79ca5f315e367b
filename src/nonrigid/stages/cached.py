"""Stages A and B through the stage cache: a stage's result is loaded when one with the same inputs exists, and what
the cache lacks of both stages is computed side by side, stage A riding along stage B's model calls
(:mod:`.programs`).

Cache keys hash everything a stage depends on (model fingerprint, preprocessed image pixels, dtype and device type:
:func:`cache_fields`; prompt and the stage's own parameters). The paper's method, NTI editing, MasaCtrl and Imagic
share entries: NTI editing and MasaCtrl reuse ours' inversion, Imagic reuses ours' text optimizations. Computing A
and B together changes neither stage's entries nor keys; when one of them is cached, the other runs alone.
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
from .inversion import Inversion, inversion_program
from .programs import run_programs
from .text_optimization import TextJob, TextOptimization, text_optimization_program

logger = logging.getLogger("nonrigid")


@dataclass(frozen=True)
class TextRequest:
    """Stage A of one image: its prompt, its seeds and its cache fields (:func:`cache_fields`)."""

    picture: Image.Image
    target_prompt: str
    seeds: tuple[int, ...]
    common: dict[str, str]


@dataclass(frozen=True)
class TextSettings:
    """Stage A's parameters: Adam steps and learning rate."""

    steps: int
    lr: float


@dataclass(frozen=True)
class InversionRequest:
    """Stage B of one image: its source prompt and its cache fields (:func:`cache_fields`)."""

    picture: Image.Image
    source_prompt: str
    common: dict[str, str]


@dataclass(frozen=True)
class InversionSettings:
    """Stage B's parameters: the method (nti, ddim, npi), steps, the guidance it is made for, NTI's inner loop."""

    method: str
    num_steps: int
    guidance: float
    inner_steps: int
    early_stop: float


def text_stages(
    family: ModelFamily, requests: Sequence[TextRequest], settings: TextSettings, cache: StageCache | None,
    progress: Progress = False,
) -> list[tuple[list[TextOptimization], list[int]]]:
    """Stage A alone (:func:`stages_a_and_b` without inversions): Imagic's text optimization, shared with ours."""
    return stages_a_and_b(family, requests, settings, [], None, cache, progress)[0]


def inversion_stages(
    family: ModelFamily, requests: Sequence[InversionRequest], settings: InversionSettings,
    cache: StageCache | None, progress: Progress = False,
) -> list[tuple[Inversion, bool]]:
    """Stage B alone (:func:`stages_a_and_b` without text optimizations): NTI editing's and MasaCtrl's inversion,
    shared with ours."""
    return stages_a_and_b(family, [], None, requests, settings, cache, progress)[1]


def stages_a_and_b(
    family: ModelFamily,
    text_requests: Sequence[TextRequest],
    text_settings: TextSettings | None,
    inversion_requests: Sequence[InversionRequest],
    inversion_settings: InversionSettings | None,
    cache: StageCache | None,
    progress: Progress = False,
) -> tuple[list[tuple[list[TextOptimization], list[int]]], list[tuple[Inversion, bool]]]:
    """Stage A for every (image, seed) of ``text_requests`` and stage B for every image of ``inversion_requests``:
    what the cache holds is loaded, the rest computed, A's rows riding along B's model calls; each entry keyed
    exactly as its own run would key it.

    Returns per text request its results in seed order and the seeds that came from the cache, and per inversion
    request the inversion and whether it came from the cache."""
    text_keys = [{seed: _text_key(request, seed, text_settings) for seed in request.seeds} for request in text_requests]
    texts = [{seed: _load(cache, "text", key, family, TextOptimization) for seed, key in keys.items()}
             for keys in text_keys]
    missing = [(index, seed) for index, found in enumerate(texts) for seed, text in found.items() if text is None]
    inversion_keys = [_inversion_key(request, inversion_settings) for request in inversion_requests]
    inversions = [_load(cache, "inversion", key, family, Inversion) for key in inversion_keys]
    todo = [index for index, inversion in enumerate(inversions) if inversion is None]

    programs = {}
    if missing:
        jobs = [TextJob(text_requests[i].picture, text_requests[i].target_prompt, seed) for i, seed in missing]
        programs["text"] = text_optimization_program(family, jobs, text_settings.steps, text_settings.lr,
                                                     progress=progress)
    if todo:
        s = inversion_settings
        programs["inversion"] = inversion_program(
            family, [inversion_requests[i].picture for i in todo], [inversion_requests[i].source_prompt for i in todo],
            s.method, s.num_steps, s.guidance, s.inner_steps, s.early_stop, progress=progress)

    def keep(program: int, results: list) -> None:  # each stage saved as it ends: a later cancel does not lose it
        if list(programs)[program] == "text":
            for (index, seed), result in zip(missing, results, strict=True):
                texts[index][seed] = result
                _save(cache, "text", text_keys[index][seed], result)
        else:
            for index, inversion in zip(todo, results, strict=True):
                inversions[index] = inversion
                _save(cache, "inversion", inversion_keys[index], inversion)

    run_programs(family, list(programs.values()), finished=keep)
    return _texts_found(text_requests, texts, missing), [(inv, i not in todo) for i, inv in enumerate(inversions)]


def _texts_found(requests, texts, missing) -> list[tuple[list[TextOptimization], list[int]]]:
    found = []
    for index, request in enumerate(requests):
        reused = [s for s in dict.fromkeys(request.seeds) if (index, s) not in missing]
        if reused:
            logger.info("reusing cached text optimization for seed(s) %s", ", ".join(map(str, reused)))
        found.append(([texts[index][s] for s in dict.fromkeys(request.seeds)], reused))
    return found


def _text_key(request: TextRequest, seed: int, settings: TextSettings) -> str:
    return stage_key("text", **request.common, prompt=request.target_prompt, steps=settings.steps, lr=settings.lr,
                     seed=seed)


def _inversion_key(request: InversionRequest, settings: InversionSettings) -> str:
    return stage_key("inversion", **request.common, prompt=request.source_prompt, method=settings.method,
                     steps=settings.num_steps, guidance=settings.guidance, inner_steps=settings.inner_steps,
                     early_stop=settings.early_stop)


def _load(cache: StageCache | None, stage: str, key: str, family: ModelFamily, kind):
    record = None if cache is None else cache.load(stage, key, device=family.device)
    if record is None:
        return None
    if stage == "inversion":
        logger.info("reusing cached %s inversion", record[1]["method"])
    return kind.from_record(*record)


def _save(cache: StageCache | None, stage: str, key: str, result) -> None:
    if cache is not None:
        cache.save(stage, key, *result.to_record())


def cache_fields(family: ModelFamily, picture: Image.Image, fingerprint: str | None = None) -> dict[str, str]:
    """What identifies a stage's inputs besides its own parameters: model weights (``fingerprint``, computed when
    not given), image pixels, dtype, device."""
    return {"model": fingerprint or model_fingerprint(family), "image": image_digest(picture),
            "dtype": str(family.dtype), "device": family.device.type}
