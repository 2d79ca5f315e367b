"""The whole edit: stage A per seed, stage B once, stage C for every (seed, K, eta) — with the stage cache.

``edit`` is what the CLI calls; it validates its arguments, reuses cached stage results where it can (and says so
in ``EditResult.cache``), times each stage, and returns everything needed to write or inspect the result.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from .cache import StageCache, stage_key
from .errors import UsageError
from .inversion import Inversion, invert
from .loading import image_digest, latent_multiple, load_image, model_fingerprint
from .options import EditSettings
from .sampling import sample, variant_grid
from .text_optimization import TextOptimization, optimize_text_batch

logger = logging.getLogger("nonrigid")

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


def edit(
    pipe: StableDiffusionPipeline,
    image: str | os.PathLike | Image.Image,
    target_prompt: str,
    *,
    size: int = 512,
    cache: StageCache | None = None,
    progress: bool = False,
    **settings,
) -> EditResult:
    """Edit ``image`` toward ``target_prompt``: text optimization per seed, one inversion, every variant.

    Keyword ``settings`` are the fields of :class:`EditSettings` (``source_prompt``, ``seeds``, ``etas``,
    ``inject`` ratios, ``num_steps``, ``opt_steps``, ``inversion``, ``guidance_scale`` …). With a ``cache``, stage
    results are read from and written to it.
    """
    config = EditSettings(target_prompt=target_prompt, **settings)
    multiple = latent_multiple(pipe)
    if size % multiple:
        raise UsageError(f"--size must be a multiple of {multiple} for this model, got {size}")
    picture = load_image(image, size)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    cache_report: dict[str, object] = {}
    common = cache_fields(pipe, picture)
    fingerprint = common["model"]

    tick = time.perf_counter()
    texts, reused = text_stage(pipe, picture, config.target_prompt, config.opt_steps, config.opt_lr, config.seeds,
                               cache, common, progress)
    timings["text_optimization"] = time.perf_counter() - tick
    cache_report["text_optimization"] = reused

    tick = time.perf_counter()
    inversion, hit = inversion_stage(pipe, picture, config.source_prompt, config.inversion, config.num_steps,
                                     config.guidance, config.inner_steps, config.early_stop, cache, common, progress)
    timings["inversion"] = time.perf_counter() - tick
    cache_report["inversion"] = hit

    tick = time.perf_counter()
    steps = config.inject_steps()
    images = sample(pipe, inversion, texts, config.etas, steps, batch_size=config.batch_size, progress=progress)
    timings["sampling"] = time.perf_counter() - tick
    timings["total"] = time.perf_counter() - started

    ratio_of = {round(r * config.num_steps): r for r in reversed(config.inject)}
    specs = variant_grid(len(texts), config.etas, steps)
    variants = [
        Variant(texts[s.text_index].seed, s.eta, s.inject_steps, ratio_of[s.inject_steps], img)
        for s, img in zip(specs, images, strict=True)
    ]
    return EditResult(picture, config, variants, texts, inversion, timings, cache_report, fingerprint)


def text_stage(
    pipe: StableDiffusionPipeline,
    picture: Image.Image,
    target_prompt: str,
    opt_steps: int,
    opt_lr: float,
    seeds: tuple[int, ...],
    cache: StageCache | None,
    common: dict[str, str],
    progress: bool = False,
) -> tuple[list[TextOptimization], list[int]]:
    """Stage A for every seed: cached seeds are loaded, the rest optimised together in one batch.

    ``common`` identifies model, image, dtype and device in the cache key (see :func:`edit`). Returns the results
    in seed order and the seeds that came from the cache. Imagic calls this too, so its stage A is shared.
    """
    keys = {seed: stage_key("text", **common, prompt=target_prompt, steps=opt_steps, lr=opt_lr, seed=seed)
            for seed in seeds}
    found: dict[int, TextOptimization] = {}
    if cache is not None:
        for seed, key in keys.items():
            record = cache.load("text", key, device=pipe.unet.device)
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
    pipe: StableDiffusionPipeline,
    picture: Image.Image,
    source_prompt: str,
    method: str,
    num_steps: int,
    guidance: float,
    inner_steps: int,
    early_stop: float,
    cache: StageCache | None,
    common: dict[str, str],
    progress: bool = False,
) -> tuple[Inversion, bool]:
    """Stage B, from the cache when an inversion with the same inputs exists (NTI editing and MasaCtrl share it)."""
    key = stage_key("inversion", **common, prompt=source_prompt, method=method, steps=num_steps,
                    guidance=guidance, inner_steps=inner_steps, early_stop=early_stop)
    if cache is not None:
        record = cache.load("inversion", key, device=pipe.unet.device)
        if record is not None:
            logger.info("reusing cached %s inversion", method)
            return Inversion.from_record(*record), True
    inversion = invert(pipe, picture, source_prompt, method, num_steps, guidance, inner_steps, early_stop,
                       progress=progress)
    if cache is not None:
        cache.save("inversion", key, *inversion.to_record())
    return inversion, False


def cache_fields(pipe: StableDiffusionPipeline, picture: Image.Image) -> dict[str, str]:
    """What identifies a stage's inputs besides its own parameters: model weights, image pixels, dtype, device."""
    return {"model": model_fingerprint(pipe), "image": image_digest(picture), "dtype": str(pipe.unet.dtype),
            "device": pipe.unet.device.type}


def describe_device(pipe: StableDiffusionPipeline) -> dict[str, str]:
    """Device and precision, for the record."""
    device = pipe.unet.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": str(device), "device_name": name, "dtype": str(pipe.unet.dtype).replace("torch.", "")}
