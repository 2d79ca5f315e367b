"""Null-text inversion editing (the paper's "NTI-only" baseline): invert, then sample the target prompt.

It is the paper's method with no text optimization, no injection and eta 1: every step is conditioned on
``tau(target)`` with NTI's null embeddings. It shares the NTI inversion (and its cache entry) with ``ours``.
"""

from __future__ import annotations

import time
from typing import Any

from diffusers import StableDiffusionPipeline
from PIL import Image

from ..diffusion import decode_latents, encode_text
from ..editing import inversion_stage
from ..sampling import sample_latents
from . import NTI as INFO
from .base import MethodContext, MethodOutput, MethodVariant

__all__ = ["INFO", "run"]


def run(
    pipe: StableDiffusionPipeline, picture: Image.Image, target_prompt: str, params: dict[str, Any],
    ctx: MethodContext,
) -> MethodOutput:
    tick = time.perf_counter()
    inversion, hit = inversion_stage(pipe, picture, ctx.source_prompt, "nti", params["num_steps"],
                                     params["guidance_scale"], params["inner_steps"], params["early_stop"],
                                     ctx.cache, ctx.cache_fields, ctx.progress)
    timings = {"inversion": time.perf_counter() - tick}
    tick = time.perf_counter()
    target = encode_text(pipe, target_prompt)
    latents = sample_latents(pipe, inversion, target, [0], progress=ctx.progress)
    (image,) = decode_latents(pipe, latents)
    timings["sampling"] = time.perf_counter() - tick
    return MethodOutput([MethodVariant(ctx.seeds[0], {}, image)], timings, {"inversion": hit})
