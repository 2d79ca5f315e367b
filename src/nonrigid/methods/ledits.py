"""LEDITS++ (Brack et al., CVPR 2024) as diffusers ships it, unchanged: ``LEditsPPPipelineStableDiffusion`` for SD
1.x / 2.x, ``LEditsPPPipelineStableDiffusionXL`` for SDXL.

The editor is built from the pipeline's own modules (VAE, text encoder, tokenizer, UNet) with a scheduler of its
own: the second-order SDE DPM-Solver++ LEDITS++ is designed for (diffusers converts any other scheduler to exactly
this one). ``invert`` extracts edit-friendly noise maps for the image with a seeded generator (once per seed);
``__call__`` then applies semantic guidance toward the target prompt, masked to where the edit belongs, once per
edit guidance scale.

The editor shares the UNet with the model and installs its own attention processors on it (plain ones while
inverting, attention-map stores while editing): the original processor objects are put back afterwards, also after
an error. The model's scheduler is never touched.

LEDITS++'s edit mask ("intersect", as in the paper) reads cross-attention maps at 1/4 of the latent resolution
(16 x 16 for SD 1.x at 512 px). A UNet with no cross-attention at that resolution (the tiny test model has
cross-attention only at full latent resolution) gives LEDITS++ no map to read; the "noise" mask (the
noise-estimate quantile alone, which the diffusers pipeline also offers) works on any UNet, and is the default
there (said in one warning line).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from diffusers import DPMSolverMultistepScheduler, UNet2DConditionModel
from PIL import Image

from ..errors import UsageError
from ..models.family import ModelFamily
from ..progress import Bar, Progress
from ..timing import Stopwatch
from .base import EditInput, EditResult, MethodContext, Variant
from .catalogue import LEDITS as INFO
from .masactrl import restored_attention_processors

__all__ = ["INFO", "build_editor", "edit_image", "invert_image", "run", "supports_attention_mask"]

logger = logging.getLogger("nonrigid")

# LEDITS++'s inversion needs image sides divisible by 32 (it refuses anything else)
_SIZE_MULTIPLE = 32

# edit mask -> (use_cross_attn_mask, use_intersect_mask) of LEditsPPPipelineStableDiffusion.__call__
_MASK_MODES = {"intersect": (True, True), "attention": (True, False), "noise": (False, False)}


def build_editor(model: ModelFamily, progress: Progress = False) -> Any:
    """diffusers' LEDITS++ pipeline for the model's family (``ModelFamily.ledits_editor``: the SD editor for SD
    1.x / 2.x, the SDXL editor for SDXL) on its modules, with its own SDE DPM-Solver++ (order 2) scheduler built
    from the model's scheduler config.

    The editor's constructor may rewrite an old UNet's config (sample_size) in place; the model's is kept as it
    was.
    """
    scheduler = DPMSolverMultistepScheduler.from_config(
        model.pipe.scheduler.config, algorithm_type="sde-dpmsolver++", solver_order=2
    )
    unet_config = model.network._internal_dict
    try:
        editor = model.ledits_editor(scheduler)
    finally:
        model.network._internal_dict = unet_config
    editor.set_progress_bar_config(disable=progress is not True, leave=False)
    return editor


def supports_attention_mask(unet: UNet2DConditionModel) -> bool:
    """Whether the UNet has down- or up-block cross-attention at 1/4 of the latent resolution.

    LEDITS++ averages the edit prompt's cross-attention maps at exactly that resolution (down and up blocks, not
    the mid block); level i of the UNet runs at 1/2^i of the latent resolution.
    """
    down, up = unet.config.down_block_types, unet.config.up_block_types
    level = 2
    if len(down) <= level:
        return False
    return "CrossAttn" in down[level] or "CrossAttn" in up[len(up) - 1 - level]


def default_mask(unet: UNet2DConditionModel) -> str:
    """LEDITS++'s own mask (intersect) where the UNet has the cross-attention maps it reads, else the noise mask."""
    if supports_attention_mask(unet):
        return "intersect"
    logger.warning("LEDITS++: this UNet has no cross-attention at 1/4 of the latent resolution, so the default "
                   "intersect mask cannot apply; using mask=noise")
    return "noise"


def check_inputs(model: ModelFamily, picture: Image.Image, mask: str) -> None:
    """Refuse, before any work, what LEDITS++ would fail on: image sides off 32, an attention mask it cannot read."""
    if picture.width % _SIZE_MULTIPLE or picture.height % _SIZE_MULTIPLE:
        raise UsageError(f"LEDITS++ needs an image size that is a multiple of {_SIZE_MULTIPLE}, got "
                         f"{picture.width}x{picture.height}: size must be a multiple of {_SIZE_MULTIPLE}")
    if mask not in _MASK_MODES:
        raise UsageError(f"mask must be one of {', '.join(_MASK_MODES)}, got {mask!r}")
    if _MASK_MODES[mask][0] and not supports_attention_mask(model.network):
        raise UsageError(f"mask={mask} reads cross-attention maps at 1/4 of the latent resolution, and this model's "
                         "UNet has no cross-attention there; use mask=noise")


def invert_image(
    editor: Any,
    picture: Image.Image,
    source_prompt: str,
    seed: int,
    *,
    num_steps: int,
    skip: float,
    source_guidance: float,
) -> None:
    """LEDITS++'s edit-friendly inversion of ``picture`` with ``seed``; the editor keeps the noise maps.

    Editing is deterministic given the inversion (DDPM sampling with the extracted noise maps), so one inversion
    serves every edit guidance scale. Installs plain attention processors on the shared UNet: call within
    :func:`~nonrigid.methods.masactrl.restored_attention_processors`.
    """
    editor.invert(image=picture, source_prompt=source_prompt, num_inversion_steps=num_steps, skip=skip,
                  source_guidance_scale=source_guidance, generator=torch.Generator().manual_seed(seed))


def edit_image(
    editor: Any,
    target_prompt: str,
    seed: int,
    edit_guidance: float,
    threshold: float,
    mask: str = "intersect",
    progress: Progress = False,
) -> Image.Image:
    """Edit the last inverted image toward ``target_prompt`` (installs attention stores on the shared UNet).

    A reporter ``progress`` hears of every step through the pipeline's step-end callback (its bar is the
    pipeline's own otherwise)."""
    use_cross_attn_mask, use_intersect_mask = _MASK_MODES[mask]
    output = editor(
        editing_prompt=[target_prompt], edit_guidance_scale=float(edit_guidance), edit_threshold=threshold,
        use_cross_attn_mask=use_cross_attn_mask, use_intersect_mask=use_intersect_mask,
        generator=torch.Generator().manual_seed(seed), output_type="pil",
        callback_on_step_end=_step_reporter(progress) if callable(progress) else None,
    )
    return output.images[0]


def _step_reporter(report):
    """A diffusers step-end callback that tells ``report`` how far the editing loop is."""

    def on_step_end(editor, step: int, timestep, tensors: dict) -> dict:
        report("LEDITS++ editing", step + 1, len(editor.scheduler.timesteps))
        return tensors

    return on_step_end


def run(model: ModelFamily, edits: Sequence[EditInput], ctx: MethodContext) -> list[EditResult]:
    """Per image: one inversion per seed, one edit per edit guidance scale; variants in seed, then scale order."""
    return [_edit(model, edit, ctx) for edit in edits]


def _edit(model: ModelFamily, edit: EditInput, ctx: MethodContext) -> EditResult:
    params = ctx.params
    mask = params["mask"] or default_mask(model.network)
    check_inputs(model, edit.image, mask)
    editor = build_editor(model, ctx.progress)
    variants: list[Variant] = []
    watch = Stopwatch()
    with restored_attention_processors(model.network):
        for seed in ctx.seeds:
            with watch("inversion"), Bar("LEDITS++ inversion", 1, ctx.progress) as bar:
                invert_image(editor, edit.image, edit.source_prompt, seed, num_steps=params["num_steps"],
                             skip=params["skip"], source_guidance=params["source_guidance"])
                bar.update(1)
            with watch("editing"):
                for scale in params["edit_guidance"]:
                    image = edit_image(editor, edit.target_prompt, seed, scale, params["threshold"], mask,
                                       ctx.progress)
                    variants.append(Variant(seed, {"edit": scale}, image))
    total_steps = int(params["num_steps"] * (1 + params["skip"]))
    record = {
        "scheduler": "DPMSolverMultistepScheduler (sde-dpmsolver++, order 2)",
        "schedule_steps": total_steps,
        "skipped_steps": total_steps - params["num_steps"],
        "source_guidance_used": params["source_guidance"] if edit.source_prompt else None,
        "mask_used": mask,
    }
    return ctx.result(edit, variants, watch.seconds, record=record, chosen={"mask": mask})
