"""Small building blocks shared by the stages: text and image encoding, one guided noise prediction, decoding.

Precision rule (method.md, issue "Precision"): the frozen networks may run in half precision, but everything the
stages optimise or accumulate — embeddings, losses, latents and the DDIM arithmetic — is fp32. These helpers are
where the casts happen, so the stages never think about dtypes.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler, StableDiffusionPipeline
from PIL import Image

from .errors import NonFiniteError

logger = logging.getLogger("nonrigid")


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor in [-1, 1], shape (1, 3, H, W)."""
    array = np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)



def encode_text(pipe: StableDiffusionPipeline, prompt: str) -> torch.Tensor:
    """``tau(prompt)``: the text encoder's output (1, 77, D) as fp32, warning when the prompt is cut at 77 tokens."""
    warn_if_truncated(pipe, prompt)
    embedding, _ = pipe.encode_prompt(prompt, pipe.text_encoder.device, 1, do_classifier_free_guidance=False)
    return embedding.float()


def warn_if_truncated(pipe: StableDiffusionPipeline, prompt: str) -> None:
    """CLIP sees at most 77 tokens; say which words it will never see."""
    tokenizer = pipe.tokenizer
    ids = tokenizer(prompt, truncation=False, add_special_tokens=True).input_ids
    limit = tokenizer.model_max_length
    if len(ids) > limit:
        dropped = tokenizer.decode(ids[limit - 1 : -1])
        logger.warning("prompt is longer than %d tokens; this part is ignored: %r", limit, dropped)


@torch.no_grad()
def encode_image(
    pipe: StableDiffusionPipeline, image: Image.Image, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``s * E(image)`` as fp32 (1, 4, H/8, W/8): the distribution's mean, or a sample drawn with ``generator``.

    Inversion uses the mean; text optimization draws a sample, as the reference does.
    """
    vae = pipe.vae
    pixels = image_to_tensor(image).to(device=vae.device, dtype=vae.dtype)
    dist = vae.encode(pixels).latent_dist
    latent = dist.mean.float()
    if generator is not None:
        noise = torch.randn(latent.shape, generator=generator, dtype=torch.float32).to(latent.device)
        latent = latent + dist.std.float() * noise
    return latent * vae.config.scaling_factor


def predict_noise(
    unet,
    latents: torch.Tensor,
    timestep: torch.Tensor | int,
    cond: torch.Tensor,
    uncond: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """One classifier-free-guided noise prediction ``eps_u + w (eps_c - eps_u)``, returned as fp32.

    At guidance 1 the unconditional branch cancels out, so it is not evaluated. ``cond`` and ``uncond`` are
    broadcast to the batch when they hold a single embedding.
    """
    batch = latents.shape[0]
    cond = cond.expand(batch, -1, -1) if cond.shape[0] == 1 else cond
    dtype = unet.dtype
    if guidance_scale == 1.0 or uncond is None:
        return unet(latents.to(dtype), timestep, encoder_hidden_states=cond.to(dtype)).sample.float()
    uncond = uncond.expand(batch, -1, -1) if uncond.shape[0] == 1 else uncond
    both = unet(
        torch.cat([latents, latents]).to(dtype),
        timestep,
        encoder_hidden_states=torch.cat([uncond, cond]).to(dtype),
    ).sample.float()
    eps_uncond, eps_cond = both.chunk(2)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def sampling_scheduler(pipe: StableDiffusionPipeline, num_steps: int) -> DDIMScheduler:
    """A private DDIM scheduler with the pipeline's configuration, set to ``num_steps`` (descending timesteps).

    A copy, so that stages never change the state of ``pipe.scheduler``.
    """
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(num_steps)
    return scheduler


def inversion_scheduler(pipe: StableDiffusionPipeline, num_steps: int) -> DDIMInverseScheduler:
    """diffusers' inverse DDIM with the pipeline's configuration: ascending timesteps, the UNet queried at the
    timestep being stepped to, ``alpha`` of step 0 from ``set_alpha_to_one`` (off for SD: ``abar_0``)."""
    scheduler = DDIMInverseScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(num_steps)
    return scheduler


@torch.no_grad()
def decode_latents(pipe: StableDiffusionPipeline, latents: torch.Tensor, batch_size: int = 8) -> list[Image.Image]:
    """``D(x_0 / s)`` to PIL images, a few at a time to bound the VAE decoder's memory."""
    vae = pipe.vae
    images: list[Image.Image] = []
    for chunk in latents.split(batch_size):
        pixels = vae.decode((chunk / vae.config.scaling_factor).to(vae.dtype)).sample.float()
        check_finite(pixels, "decoding")
        array = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        images.extend(Image.fromarray(a) for a in array)
    return images


def check_finite(tensor: torch.Tensor, stage: str) -> None:
    """Refuse NaN/inf rather than let it become a black image three stages later."""
    if not torch.isfinite(tensor).all():
        raise NonFiniteError(stage)
