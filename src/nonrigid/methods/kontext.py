"""FLUX.1 Kontext [dev] (Black Forest Labs, arXiv 2506.15742) on its own model: instruction editing with the input
picture in context, as diffusers' ``FluxKontextPipeline`` computes it (:mod:`nonrigid.models.edit_models`).

Per image: the instruction (``--instruction``, a benchmark's own, or the catalogue's template of the target
prompt) is encoded as FLUX encodes a prompt (T5 tokens, CLIP pooled); the picture is the reference: VAE-encoded
(mode, shifted and scaled), packed into 2x2 patches with position ids (1, row, col), and appended to the noisy
tokens at every step. From each seed's noise, Euler steps over the pipeline's shifted sigmas with the transformer's
distilled guidance (one variant per guidance value, the grid's columns), then the VAE decodes.

**Sizes.** The output is the working picture's size: the picture at about ``size`` x ``size`` pixels (the family's
1024 by default) at its own aspect ratio, sides multiples of 16, and the reference is that same picture, not
resized again. The pipeline's defaults differ on purpose: it generates 1024x1024 whatever the reference's shape
(a portrait input would come back square and stretched) and snaps the reference to the nearest of Kontext's 17
preferred resolutions. Keeping the input's aspect is what BFL's reference CLI does (its output defaults to the
conditioning image's size), and the edit must have the input's size for the grid and for the benchmark's metrics,
which compare the two pixel for pixel. At the default size the picture is about 1 MP, the area Kontext was trained
at. ``tests/test_editors.py`` checks the result against ``FluxKontextPipeline(image, height, width,
max_area=height * width, _auto_resize=False, generator=...)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch
from PIL import Image

from ..errors import check_finite
from ..models import edit_models as em
from ..models.family import ModelFamily
from ..progress import Progress, track
from ..timing import Stopwatch
from .base import EditInput, EditResult, MethodContext, Variant
from .catalogue import KONTEXT_METHOD as INFO
from .editors import Row, batches, initial_latents, instruction_record, variant_rows

__all__ = ["INFO", "kontext_images", "kontext_latents", "run"]


def run(model: ModelFamily, edits: Sequence[EditInput], ctx: MethodContext) -> list[EditResult]:
    """Per image: every (seed, guidance) variant from one encoding of the instruction and the reference."""
    return [_edit(model, edit, ctx) for edit in edits]


@torch.no_grad()
def kontext_latents(model: ModelFamily, cond: em.KontextConditioning, rows: Sequence[Row], height: int, width: int,
                    num_steps: int, batch_size: int | None = None, progress: Progress = False) -> torch.Tensor:
    """The final latents (one (1, 16, h, w) row per (seed, guidance) of ``rows``) of a ``height`` x ``width``
    image under ``cond`` (one row: the instruction and the reference), denoised ``batch_size`` rows at a time."""
    pipe = model.pipe
    transformer = model.denoiser or pipe.transformer
    side = pipe.vae_scale_factor
    shape = (1, pipe.vae.config.latent_channels, height // side, width // side)
    schedule = em.flow_schedule(pipe.scheduler.config, num_steps, (shape[2] // 2) * (shape[3] // 2))
    finished = []
    for chunk in batches(rows, batch_size):
        count = len(chunk)
        x = torch.cat([initial_latents(seed, shape) for seed, _ in chunk]).to(model.device, cond.tokens.dtype)
        guidance = torch.tensor([value for _, value in chunk])
        batched = replace(cond, tokens=cond.tokens.expand(count, -1, -1), pooled=cond.pooled.expand(count, -1),
                          reference=None if cond.reference is None else cond.reference.expand(count, -1, -1))
        for i, t in enumerate(track(schedule.timesteps, "Kontext", progress)):
            x = em.euler_step(x, em.kontext_velocity(transformer, x, t, batched, guidance), schedule, i)
        finished.append(x)
    latents = torch.cat(finished)
    check_finite(latents, "Kontext")
    return latents


@torch.no_grad()
def kontext_images(model: ModelFamily, latents: torch.Tensor, batch_size: int = 8) -> list[Image.Image]:
    """Latents to pictures as the pipeline decodes them (inverse scaling and shift, the VAE, its postprocessing),
    ``batch_size`` at a time."""
    pipe, images = model.pipe, []
    for chunk in latents.split(max(1, batch_size)):
        images.extend(pipe.image_processor.postprocess(em.kontext_decode(pipe.vae, chunk), output_type="pil"))
    return images


def _edit(model: ModelFamily, edit: EditInput, ctx: MethodContext) -> EditResult:
    p = ctx.params
    instruction, record = instruction_record(edit)
    width, height = edit.image.size
    rows = variant_rows(ctx.seeds, p["guidances"])
    watch = Stopwatch()
    with watch("encoding"), torch.no_grad(), model.text_encoders_on_device():
        cond = em.kontext_conditioning(model.pipe, instruction, edit.image, auto_resize=False)
    with watch("sampling"):
        latents = kontext_latents(model, cond, rows, height, width, p["num_steps"], ctx.batch_size, ctx.progress)
    with watch("decoding"):
        images = kontext_images(model, latents, ctx.batch_size or 8)
    variants = [Variant(seed, {"guidance": guidance}, image) for (seed, guidance), image in zip(rows, images,
                                                                                                 strict=True)]
    record |= {"output_size": [width, height], "reference_size": [width, height]}
    return ctx.result(edit, variants, watch.seconds, record=record)
