"""The straightforward procedure the reference follows, rebuilt from the project's blocks: the benchmark's baseline.

What makes it "straightforward" (method.md, "Reference behaviour worth knowing"; the issue's list):

- full precision (the caller passes an fp32 pipeline);
- every seed's text optimization is its own run;
- null-text inversion advances each step with a two-row classifier-free-guidance batch, the conditional row
  evaluated again although it was computed before the inner loop (the reference's final ``get_noise_pred``);
- every variant is a separate sampling run: its own text encoding, all N steps from x_T (the K source-conditioned
  steps recomputed), both guidance branches at every step even at guidance 1, its own decoding.

The arithmetic is the project's (``predict_noise`` conventions, private DDIM schedulers, fp32 leaves), so the
baseline computes the same edit as :mod:`nonrigid`; only the organisation of the work differs. A test checks that
they agree.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from PIL import Image

from nonrigid import optimize_text
from nonrigid.models.family import Conditioning
from nonrigid.models.registry import family_of
from nonrigid.stages import DEFAULT_GUIDANCE
from nonrigid.stages.inversion import Inversion, invert_latents
from nonrigid.stages.text_optimization import TextOptimization


def guided_noise_both_branches(
    unet, latents: torch.Tensor, timestep, cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float
) -> torch.Tensor:
    """``eps_u + w (eps_c - eps_u)`` from one two-row batch, evaluated even where w = 1 makes eps_u cancel."""
    dtype = unet.dtype
    both = unet(
        torch.cat([latents, latents]).to(dtype), timestep, encoder_hidden_states=torch.cat([uncond, cond]).to(dtype)
    ).sample.float()
    eps_uncond, eps_cond = both.chunk(2)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def text_optimizations(
    pipe: StableDiffusionPipeline, image: Image.Image, target_prompt: str, steps: int, lr: float, seeds: Sequence[int]
) -> list[TextOptimization]:
    """Stage A, one seed after the other (each a batch-1 run)."""
    return [optimize_text(pipe, image, target_prompt, steps=steps, lr=lr, seed=seed) for seed in seeds]


def null_text_inversion(
    pipe: StableDiffusionPipeline,
    image: Image.Image,
    source_prompt: str = "",
    num_steps: int = 50,
    guidance_scale: float | None = None,
    inner_steps: int = 10,
    early_stop: float = 1e-5,
) -> Inversion:
    """Stage B as the reference organises it: DDIM inversion, then per step the conditional prediction once, the
    inner Adam loop on the null embedding, and a two-row guided step to advance. No reconstruction is kept."""
    unet = pipe.unet
    guidance_scale = DEFAULT_GUIDANCE["nti"] if guidance_scale is None else float(guidance_scale)
    family = family_of(pipe)
    source = family.encode_prompt(source_prompt).tokens
    empty = family.encode_prompt("").tokens
    trajectory = invert_latents(family, family.encode_image(image), source, num_steps)[0]
    scheduler = family.sampling_scheduler(num_steps)
    x = trajectory[-1:]
    uncond = empty.clone()
    nulls = []
    for i, t in enumerate(scheduler.timesteps):
        target = trajectory[num_steps - 1 - i : num_steps - i]
        with torch.no_grad():
            eps_cond = unet(x, t, encoder_hidden_states=source).sample
        uncond = uncond.detach().clone().requires_grad_(True)
        optimizer = torch.optim.Adam([uncond], lr=1e-2 * (1.0 - i / 100.0))
        for _ in range(inner_steps):
            eps_uncond = unet(x, t, encoder_hidden_states=uncond).sample
            eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
            loss = F.mse_loss(scheduler.step(eps, t, x).prev_sample, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if loss.item() < early_stop + i * 2e-5:
                break
        uncond = uncond.detach()
        nulls.append(uncond)
        with torch.no_grad():
            eps = guided_noise_both_branches(unet, x, t, source, uncond, guidance_scale)
            x = scheduler.step(eps, t, x).prev_sample
    return Inversion("nti", source_prompt, num_steps, guidance_scale, trajectory[-1:].clone(), trajectory,
                     Conditioning.of(source), Conditioning.of(empty), nulls=Conditioning.of(torch.cat(nulls)))


@torch.no_grad()
def sample_variant_latent(
    pipe: StableDiffusionPipeline,
    inversion: Inversion,
    text: TextOptimization,
    eta: float,
    inject_steps: int,
) -> torch.Tensor:
    """One variant, one run: all N steps from x_T, source-conditioned before step K, both branches every step."""
    family = family_of(pipe)
    source = family.encode_prompt(inversion.source_prompt).tokens
    target = family.encode_prompt(text.target_prompt).tokens
    cond = eta * target + (1.0 - eta) * text.optimized_embedding
    scheduler = family.sampling_scheduler(inversion.num_steps)
    x = inversion.latent.clone()
    for i, t in enumerate(scheduler.timesteps):
        condition = source if i < inject_steps else cond
        eps = guided_noise_both_branches(pipe.unet, x, t, condition, inversion.uncond_at(i).tokens,
                                         inversion.guidance_scale)
        x = scheduler.step(eps, t, x).prev_sample
    return x


def sample_variants(
    pipe: StableDiffusionPipeline,
    inversion: Inversion,
    texts: Sequence[TextOptimization],
    etas: Sequence[float],
    inject_steps: Sequence[int],
) -> tuple[list[Image.Image], torch.Tensor]:
    """Stage C as separate runs, in the project's grid order (text, then K, then eta): images and final latents."""
    images, latents = [], []
    for text in texts:
        for k in inject_steps:
            for eta in etas:
                latent = sample_variant_latent(pipe, inversion, text, eta, k)
                images.extend(family_of(pipe).decode(latent))
                latents.append(latent)
    return images, torch.cat(latents)
