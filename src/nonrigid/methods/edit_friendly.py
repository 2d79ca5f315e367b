"""Edit-friendly DDPM inversion (Huberman-Spiegelglas et al., CVPR 2024) as a :mod:`nonrigid.methods` entry.

DDPM sampling (the DDIM update with eta = 1) adds fresh noise ``sigma_t z_t`` at every step. Instead of drawing the
``z_t`` at random, this method *extracts* them from the image:

1. ``x0 = s * E(image)`` (the mean). For every sampling step i, at timestep ``t_i``, draw its own noisy latent
   ``x_i = sqrt(abar_t) x0 + sqrt(1 - abar_t) n_i`` with **independent** noise ``n_i`` (a seeded generator per
   seed). Independent noise is what makes these noise maps "edit friendly": they carry the image's structure.
2. For each step, ``z_i = (x_{i+1} - mu(x_i)) / sigma_i``, where ``mu`` is the eta = 1 step's mean with the source
   prompt at ``source_guidance`` (the last step's target is x0 itself). By construction the DDPM step from
   ``x_i`` with variance noise ``z_i`` lands exactly on ``x_{i+1}``: sampling reproduces the image.
3. Edit: start at the stored ``x_skip`` and run steps ``skip .. N-1`` with the **target** prompt at
   ``target_guidance``, reusing the same ``z_i`` as variance noise.

The DDPM step is diffusers' ``DDIMScheduler.step(..., eta=1.0, variance_noise=z)`` on a private scheduler copy.
Step 2 stores, as ``x_{i+1}``, the value that the step with ``z_i`` actually computes (the reference does the same),
so the chain the sampler replays is self-consistent to the last bit, not only up to rounding of ``z``.

Index convention (as ``Inversion.reconstruction``): sampling order, i = 0 is the noisiest step; ``xs[i]`` is the
latent before step i and ``xs[N]`` is x0. ``skip`` = number of first steps not run (reference default 36 of 100).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDIMScheduler

from ..errors import UsageError, check_finite
from ..models.family import Conditioning, ModelFamily
from ..progress import Progress, track
from ..stages.masks import blend, latent_mask
from ..stages.sampling import decoded
from ..timing import Stopwatch
from .base import EditInput, EditResult, MethodContext, Variant
from .catalogue import EDIT_FRIENDLY as INFO

__all__ = ["INFO", "EditFriendlyInversion", "edit_friendly_invert", "edit_friendly_sample", "run"]


@dataclass
class EditFriendlyInversion:
    """One seed's noise maps: replaying them with the source prompt at ``guidance_scale`` gives back ``xs[N]``.

    ``xs`` (N + 1, 4, h, w): the latent before each sampling step (``xs[N]`` = x0, the image latent).
    ``zs`` (N, 4, h, w): the variance noise of each step. ``timesteps``: the N timesteps, noisiest first.
    """

    seed: int
    xs: torch.Tensor
    zs: torch.Tensor
    timesteps: torch.Tensor
    guidance_scale: float

    @property
    def num_steps(self) -> int:
        return self.zs.shape[0]


def ddpm_sigma(scheduler: DDIMScheduler, timestep: torch.Tensor | int) -> torch.Tensor:
    """Standard deviation of the noise the eta = 1 step from ``timestep`` adds (DDIM paper Eq. 16 with eta = 1).

    ``sigma^2 = (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)``; the previous timestep is the
    scheduler's own (``t - 1000 / N``; below 0 it uses ``final_alpha_cumprod``), so this matches ``step``.
    """
    prev = int(timestep) - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    abar = scheduler.alphas_cumprod[int(timestep)]
    abar_prev = scheduler.alphas_cumprod[prev] if prev >= 0 else scheduler.final_alpha_cumprod
    return ((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev)).sqrt()


def independent_noisy_latents(latent: torch.Tensor, scheduler: DDIMScheduler, seed: int) -> torch.Tensor:
    """``x_i = sqrt(abar_t_i) x0 + sqrt(1 - abar_t_i) n_i`` for every step i, each with its own noise ``n_i``.

    The noise comes from a CPU generator seeded with ``seed`` (the same draws on every device), then moves.
    Returns (N + 1, 4, h, w): the N noisy latents in sampling order, then x0.
    """
    timesteps = scheduler.timesteps
    generator = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn((len(timesteps), *latent.shape[1:]), generator=generator, dtype=torch.float32)
    noise = noise.to(latent.device)
    abar = scheduler.alphas_cumprod[timesteps].to(latent.device).view(-1, 1, 1, 1)
    noisy = abar.sqrt() * latent + (1 - abar).sqrt() * noise
    return torch.cat([noisy, latent])


@torch.no_grad()
def edit_friendly_invert(
    model: ModelFamily,
    latents: Sequence[torch.Tensor],
    sources: Sequence[Conditioning],
    seeds: Sequence[Sequence[int]],
    num_steps: int,
    guidance_scale: float,
    *,
    uncond_embedding: Conditioning | torch.Tensor | None = None,
    batch_size: int | None = None,
    progress: Progress = False,
) -> list[list[EditFriendlyInversion]]:
    """Extract the noise maps of each image's latent (1, 4, h, w) for each of its seeds, every (image, seed) as one
    batch per step (in chunks of ``batch_size`` rows): each image's inversions, each seed's from its own generator,
    depending only on its own seed (up to the last bits of batched convolutions). The unconditional embedding
    defaults to the model's (``tau("")``)."""
    if uncond_embedding is None:
        uncond_embedding = model.unconditional()
    scheduler = model.sampling_scheduler(num_steps, latents[0])
    jobs = [(k, int(s)) for k, mine in enumerate(seeds) for s in mine]
    xs = torch.stack([independent_noisy_latents(latents[k].float(), scheduler, s) for k, s in jobs])  # (R, N+1, .)
    conds = Conditioning.cat([Conditioning.of(sources[k]) for k, _ in jobs])
    zs = torch.zeros_like(xs[:, :num_steps])
    chunk = batch_size or len(jobs)
    for i, t in enumerate(track(scheduler.timesteps, "noise maps", progress)):
        sigma = ddpm_sigma(scheduler, t)
        for rows in torch.arange(len(jobs)).split(chunk):
            x = xs[rows, i]
            eps = model.predict(x, t, conds.rows(rows), uncond_embedding, guidance_scale)
            mean = scheduler.step(eps, t, x, eta=1.0, variance_noise=torch.zeros_like(x)).prev_sample
            # sigma is 0 only for a final step to alpha 1 (set_alpha_to_one): that step adds no noise to steer
            z = (xs[rows, i + 1] - mean) / sigma if sigma > 0 else torch.zeros_like(x)
            zs[rows, i] = z
            if i + 1 < num_steps:  # store what the step really computes, so replaying is exact to the last bit
                xs[rows, i + 1] = scheduler.step(eps, t, x, eta=1.0, variance_noise=z).prev_sample
    check_finite(zs, "edit-friendly inversion")
    found: list[list[EditFriendlyInversion]] = [[] for _ in latents]
    for r, (k, s) in enumerate(jobs):
        found[k].append(EditFriendlyInversion(s, xs[r], zs[r], scheduler.timesteps.clone(), float(guidance_scale)))
    return found


@torch.no_grad()
def edit_friendly_sample(
    model: ModelFamily,
    inversions: Sequence[EditFriendlyInversion],
    target_embedding: Conditioning | torch.Tensor | Sequence[Conditioning],
    guidance_scale: float,
    skips: Sequence[int],
    *,
    uncond_embedding: torch.Tensor | None = None,
    batch_size: int | None = None,
    masks: Sequence[torch.Tensor | None] | None = None,
    progress: Progress = False,
) -> torch.Tensor:
    """DDPM sampling with the stored noise maps: one row per (inversion, skip), in that order; final latents.

    Row (k, skip) starts from ``inversions[k].xs[skip]`` and runs steps ``skip .. N-1`` with variance noise
    ``inversions[k].zs[i]``. Rows join the batch at their first step, so steps shared by several skip values run
    once per step for all of them (in chunks of ``batch_size``). ``skip = N`` returns x0 itself.
    ``target_embedding``: one for every inversion, or a list with one per inversion (several images' edits).
    """
    if not inversions:
        raise ValueError("edit_friendly_sample needs at least one inversion")
    num_steps = inversions[0].num_steps
    if any(inv.num_steps != num_steps for inv in inversions):
        raise ValueError("all inversions must have the same number of steps")
    for skip in skips:
        if not 0 <= skip <= num_steps:
            raise UsageError(f"skip must be between 0 and num_steps ({num_steps}), got {skip}")
    if uncond_embedding is None:
        uncond_embedding = model.unconditional()
    targets = ([Conditioning.of(target_embedding)] * len(inversions)
               if isinstance(target_embedding, (Conditioning, torch.Tensor)) else list(target_embedding))
    scheduler = model.sampling_scheduler(num_steps)
    rows = [(k, int(skip)) for k in range(len(inversions)) for skip in skips]
    conds = Conditioning.cat([targets[k] for k, _ in rows])
    latents = torch.stack([inversions[k].xs[skip] for k, skip in rows])  # each row's start (x0 for skip = N)
    chunk = batch_size or len(rows)
    for i in track(range(min(skips), num_steps), "DDPM sampling", progress):
        t = scheduler.timesteps[i]
        active = torch.tensor([r for r, (_, skip) in enumerate(rows) if skip <= i])
        for part in active.split(chunk):
            x = latents[part]
            noise = torch.stack([inversions[rows[r][0]].zs[i] for r in part.tolist()])
            eps = model.predict(x, t, conds.rows(part), uncond_embedding, guidance_scale)
            stepped = scheduler.step(eps, t, x, eta=1.0, variance_noise=noise).prev_sample
            latents[part] = _kept(stepped, part.tolist(), rows, inversions, masks, i + 1)
    check_finite(latents, "edit-friendly sampling")
    return latents


def _kept(stepped: torch.Tensor, part: list[int], rows: list[tuple[int, int]],
          inversions: Sequence[EditFriendlyInversion], masks: Sequence[torch.Tensor | None] | None,
          step: int) -> torch.Tensor:
    """The rows ``part`` after a step, each outside its image's mask back on its inversion's own path (the noisy
    latents ``xs``: ``xs[N]`` is the image latent itself)."""
    if masks is None:
        return stepped
    kept = [blend(stepped[k : k + 1], inversions[rows[r][0]].xs[step : step + 1], masks[rows[r][0]])
            for k, r in enumerate(part)]
    return torch.cat(kept)


def run(model: ModelFamily, edits: Sequence[EditInput], ctx: MethodContext) -> list[EditResult]:
    """Every image's noise maps once per seed in one batch per step, then every (image, seed, skip) sampled
    together; variants (seed, skip). Each result equals the image's own run's up to the last bits of batched
    products, its timings its share of the batch."""
    p = ctx.params
    num_steps, skips = p["num_steps"], p["skip"]
    too_many = [s for s in skips if s > num_steps]
    if too_many:
        raise UsageError(f"skip must be at most num_steps ({num_steps}); got {', '.join(map(str, too_many))}")
    watch = Stopwatch()
    with watch("inversion"):
        latents = [model.encode_image(e.image) for e in edits]
        uncond = model.unconditional()
        sources = [model.encode_prompt(e.source_prompt) for e in edits]
        inversions = edit_friendly_invert(model, latents, sources, [ctx.seeds] * len(edits), num_steps,
                                          p["source_guidance"], uncond_embedding=uncond, batch_size=ctx.batch_size,
                                          progress=ctx.progress)
    with watch("sampling"):
        targets = [model.encode_prompt(e.target_prompt) for e in edits]
        flat = [inv for mine in inversions for inv in mine]
        masks = [None if e.mask is None else latent_mask(e.mask, latent)
                 for e, latent, mine in zip(edits, latents, inversions, strict=True) for _ in mine]
        finals = edit_friendly_sample(model, flat, [t for t, mine in zip(targets, inversions, strict=True)
                                                    for _ in mine],
                                      p["target_guidance"], skips, uncond_embedding=uncond,
                                      batch_size=ctx.batch_size, masks=masks, progress=ctx.progress)
        finals = finals.split([len(mine) * len(skips) for mine in inversions])
    outputs = []
    for mine, latents_of, latent, edit in zip(inversions, finals, latents, edits, strict=True):
        with watch("decoding"):
            weight = None if edit.mask is None else latent_mask(edit.mask, latent)
            images = decoded(model, latents_of, latent, weight, batch_size=ctx.batch_size or 8)
        variants = [
            Variant(inv.seed, {"skip": skip}, img, {"start_timestep": _start_timestep(inv, skip)})
            for (inv, skip), img in zip(((inv, s) for inv in mine for s in skips), images, strict=True)
        ]
        outputs.append((variants, mine))
    timings = {name: seconds / len(edits) for name, seconds in watch.seconds.items()}
    return [ctx.result(edit, variants, timings, record=_record(p, mine))
            for edit, (variants, mine) in zip(edits, outputs, strict=True)]


def _record(params: dict[str, Any], inversions: list[EditFriendlyInversion]) -> dict[str, Any]:
    return {
        "num_steps": params["num_steps"],
        "source_guidance": params["source_guidance"],
        "target_guidance": params["target_guidance"],
        "unconditional_prompt": "",
        # edit-friendly noise maps are not N(0, I): their spread says how much image structure they carry
        "noise_map_std": {inv.seed: float(inv.zs.std()) for inv in inversions},
    }


def _start_timestep(inversion: EditFriendlyInversion, skip: int) -> int:
    """The timestep sampling starts from (0 when every step is skipped: the input latent itself)."""
    return int(inversion.timesteps[skip]) if skip < inversion.num_steps else 0
