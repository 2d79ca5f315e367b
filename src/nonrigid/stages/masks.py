"""A region to edit: a mask at the image's working size becomes a latent-resolution blend weight, and the latent
outside it follows a reference path (blended-latent editing).

Each latent pixel's weight is the share of its image pixels that may change (the mask averaged over the latent
pixel's footprint, 8 x 8 image pixels for SD): that is the feathering, a soft border one latent pixel wide. After
every sampling step the latent becomes ``m * x + (1 - m) * reference``, the reference being where the inversion's
own path is at that step (NTI's and NPI's reconstruction, DDIM's trajectory, Edit-friendly's noisy latents, the
input latent for DDS and FlowEdit). So where the mask is black the final latent is the reference's, exactly.

The VAE decoder's mid-block attention spreads a change anywhere in the latent a little over the whole picture, so
the decoded pictures are composited too (:func:`composite`): the same weight, upsampled bilinearly to the image,
mixes each variant with the reference's decoding. Where the mask is black the pixels are the reconstruction's; an
all-white mask changes nothing (``1 * x + 0 * r`` is ``x``); an all-black one gives the reference whatever the edit.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def latent_mask(mask: np.ndarray | torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """The mask (height, width) at image resolution as a (1, 1, h, w) weight at ``latents``' resolution, fp32."""
    values = torch.as_tensor(np.asarray(mask, dtype=np.float32))[None, None]
    weight = F.adaptive_avg_pool2d(values, tuple(latents.shape[-2:]))
    return weight.clamp(0, 1).to(latents.device)


def blend(latents: torch.Tensor, reference: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """``weight * latents + (1 - weight) * reference`` (``latents`` as they are without a weight)."""
    if weight is None:
        return latents
    return weight * latents + (1 - weight) * reference


def composite(images: list[Image.Image], reference: Image.Image, weight: torch.Tensor | None) -> list[Image.Image]:
    """Each image mixed with ``reference`` by the latent ``weight`` upsampled (bilinearly) to their size: where the
    weight is 0 the pixels are the reference's, where it is 1 the image's, exactly."""
    if weight is None:
        return images
    pixels = F.interpolate(weight.float().cpu(), size=(reference.height, reference.width), mode="bilinear",
                           align_corners=False)[0, 0].clamp(0, 1).numpy()[..., None]
    kept = np.asarray(reference.convert("RGB"), dtype=np.float32)
    mixed = []
    for image in images:
        values = pixels * np.asarray(image.convert("RGB"), dtype=np.float32) + (1 - pixels) * kept
        mixed.append(Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8)))
    return mixed
