"""Qwen-Image-Edit, -2509 and -2511 (Qwen team, arXiv 2508.02324) on their own models: instruction editing as
diffusers' ``QwenImageEditPipeline`` / ``QwenImageEditPlusPipeline`` compute it (:mod:`nonrigid.models.edit_models`).

Per image: Qwen2.5-VL encodes the instruction (``--instruction``, a benchmark's own, or the catalogue's template of
the target prompt) together with the picture, and the negative prompt (the model cards' " ") with the same
picture; the picture's latents (VAE at about 1 MP, as the pipelines always encode references) are appended to the
noisy tokens. From each seed's noise, Euler steps over the pipeline's schedule (dynamic shift, stretched to end at
0.02) with true CFG, each token's guided velocity rescaled to the conditional one's norm; one variant per true CFG
value (the grid's columns; 1 skips the negative branch, as the pipelines do).

- **Sizes.** The output is the working picture's size (about ``size`` x ``size`` pixels at its aspect ratio; 1 MP
  at the family's default 1024), passed to the pipeline as ``height`` / ``width``: the pipelines' own default is
  the reference's 1 MP size, which is the same picture at the default size. The reference is the working picture.
- **The VL encoder's positions.** diffusers 0.42's pipelines do not pass the processor's ``mm_token_type_ids``, so
  with transformers 5 the picture's tokens get sequential rope positions instead of Qwen2.5-VL's 3D ones
  (diffusers issue 14194). This method reproduces the pipelines by default, so that its output is what a diffusers
  user gets (and the oracle test holds); ``positions_3d=true`` encodes as the model was trained.

``tests/test_editors.py`` checks the result against the pipeline with ``generator=torch.Generator().manual_seed(s)``,
``negative_prompt=" "``, ``true_cfg_scale`` and the working size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import check_finite
from ..models import edit_models as em
from ..models.family import ModelFamily
from ..progress import Progress, track
from ..timing import Stopwatch
from .base import EditInput, EditResult, MethodContext, Variant
from .catalogue import QWEN_EDIT_METHOD as INFO
from .editors import Row, batches, initial_latents, instruction_record, variant_rows

__all__ = ["INFO", "qwen_edit_latents", "run"]


def run(model: ModelFamily, edits: Sequence[EditInput], ctx: MethodContext) -> list[EditResult]:
    """Per image: every (seed, true CFG) variant from one encoding of the instruction, the negative prompt and
    the reference."""
    return [_edit(model, edit, ctx) for edit in edits]


def _rows_of(prompt: em.QwenPrompt, count: int) -> em.QwenPrompt:
    mask = None if prompt.mask is None else prompt.mask.expand(count, -1)
    return em.QwenPrompt(prompt.embeds.expand(count, -1, -1), mask)


@torch.no_grad()
def qwen_edit_latents(model: ModelFamily, cond: em.QwenEditConditioning, rows: Sequence[Row], height: int,
                      width: int, num_steps: int, batch_size: int | None = None, progress: Progress = False
                      ) -> torch.Tensor:
    """The final latents (one (1, 16, h, w) row per (seed, true CFG) of ``rows``) of a ``height`` x ``width``
    image under ``cond`` (one row), ``batch_size`` rows at a time. Rows of one true CFG value are combined with
    that value as a number, as the pipeline combines them; rows at 1 (or without a negative prompt) take the
    conditional velocity alone."""
    pipe = model.pipe
    transformer = model.denoiser or pipe.transformer
    side = pipe.vae_scale_factor
    shape = (1, pipe.vae.config.z_dim, height // side, width // side)
    schedule = em.flow_schedule(pipe.scheduler.config, num_steps, (shape[2] // 2) * (shape[3] // 2))
    finished = []
    for chunk in batches(rows, batch_size):
        count = len(chunk)
        x = torch.cat([initial_latents(seed, shape) for seed, _ in chunk]).to(model.device, cond.prompt.embeds.dtype)
        reference = em.QwenReference(cond.reference.latents.expand(count, -1, -1), cond.reference.shapes)
        prompt = _rows_of(cond.prompt, count)
        scales = [value for _, value in chunk]
        guided = [i for i, s in enumerate(scales) if s > 1] if cond.negative is not None else []
        negative = None if not guided else _rows_of(cond.negative, len(guided))
        negative_reference = em.QwenReference(reference.latents[: len(guided)], reference.shapes)
        for i, t in enumerate(track(schedule.timesteps, "Qwen-Image-Edit", progress)):
            velocity = em.qwen_velocity(transformer, x, t, prompt, reference)
            if negative is not None:
                uncond = em.qwen_velocity(transformer, x[guided], t, negative, negative_reference)
                velocity = _combined(velocity, uncond, guided, scales)
            x = em.euler_step(x, velocity, schedule, i)
        finished.append(x)
    latents = torch.cat(finished)
    check_finite(latents, "Qwen-Image-Edit")
    return latents


def _combined(velocity: torch.Tensor, uncond: torch.Tensor, guided: list[int], scales: list[float]) -> torch.Tensor:
    """``velocity`` with each guided row replaced by its true-CFG combination, one scale value at a time."""
    velocity = velocity.clone()
    for scale in dict.fromkeys(scales[i] for i in guided):
        rows = [i for i in guided if scales[i] == scale]
        picked = [guided.index(i) for i in rows]
        velocity[rows] = em.qwen_true_cfg(velocity[rows], uncond[picked], scale)
    return velocity


def _edit(model: ModelFamily, edit: EditInput, ctx: MethodContext) -> EditResult:
    p = ctx.params
    instruction, record = instruction_record(edit)
    width, height = edit.image.size
    rows = variant_rows(ctx.seeds, p["true_cfg"])
    negative = p["negative_prompt"] if any(value > 1 for _, value in rows) else None
    watch = Stopwatch()
    with watch("encoding"), torch.no_grad():
        cond = em.qwen_edit_conditioning(model.pipe, instruction, edit.image, negative_prompt=negative,
                                         with_3d_positions=p["positions_3d"])
    with watch("sampling"):
        latents = qwen_edit_latents(model, cond, rows, height, width, p["num_steps"], ctx.batch_size, ctx.progress)
    with watch("decoding"):
        images = model.decode(latents, ctx.batch_size or 8)
    variants = [Variant(seed, {"cfg": cfg}, image) for (seed, cfg), image in zip(rows, images, strict=True)]
    sizes = em.qwen_edit_sizes([edit.image.size], model.plus, height, width)
    record |= {"output_size": [width, height], "reference_vae_size": list(sizes.vae[0]),
               "reference_encoder_size": list(sizes.condition[0]), "pipeline": type(model.pipe).__name__}
    return ctx.result(edit, variants, watch.seconds, record=record)
