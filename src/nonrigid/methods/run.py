"""Run any method by name: validate its parameters, prepare the image and cache keys, time it, wrap the result."""

from __future__ import annotations

import importlib
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from diffusers import StableDiffusionPipeline
from PIL import Image

from ..cache import StageCache
from ..editing import cache_fields
from ..errors import UsageError
from ..loading import latent_multiple, load_image
from . import MODULES, method_info
from .base import MethodContext, MethodResult, resolve_params


def run_method(
    pipe: StableDiffusionPipeline,
    image: str | os.PathLike | Image.Image,
    target_prompt: str,
    method: str = "ours",
    params: Mapping[str, Any] | None = None,
    *,
    seeds: Sequence[int] = (0,),
    source_prompt: str = "",
    size: int = 512,
    cache: StageCache | None = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> MethodResult:
    """Edit ``image`` toward ``target_prompt`` with ``method``; ``params`` override the method's defaults.

    Every method gets the same inputs and returns the same kind of result (variants in grid order, every
    parameter resolved, timings, cache hits), so results can be saved, scored and compared alike. A method whose
    result does not depend on the seed (``MethodInfo.seeded`` false) runs once, for the first seed.
    """
    info = method_info(method)
    resolved = resolve_params(info, params)
    seeds = tuple(dict.fromkeys(int(s) for s in seeds))
    if not seeds:
        raise UsageError("give at least one seed")
    if batch_size is not None and batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {batch_size}")
    multiple = latent_multiple(pipe)
    if size % multiple:
        raise UsageError(f"--size must be a multiple of {multiple} for this model, got {size}")
    picture = load_image(image, size)
    fields = cache_fields(pipe, picture)
    ctx = MethodContext(
        seeds=seeds if info.seeded else seeds[:1],
        source_prompt=source_prompt,
        cache=cache,
        cache_fields=fields,
        progress=progress,
        batch_size=batch_size,
    )
    module = importlib.import_module(f".{MODULES[method]}", __package__)
    started = time.perf_counter()
    output = module.run(pipe, picture, target_prompt, resolved, ctx)
    timings = {**output.timings, "total": time.perf_counter() - started}
    return MethodResult(
        method=method, input_image=picture, target_prompt=target_prompt, source_prompt=source_prompt,
        seeds=ctx.seeds, params=resolved, variants=output.variants,
        knob_labels=tuple(p.label for p in info.sweeps), timings=timings, cache=output.cache,
        record=output.record, model_fingerprint=fields["model"],
    )
