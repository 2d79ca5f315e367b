"""Delta Denoising Score (Hertz et al., ICCV 2023) as a :mod:`nonrigid.methods` entry.

DDS edits by optimising the image latent ``z`` itself, starting at the input ``x_src = s * E(image)`` (the mean).
Every iteration draws one integer timestep ``t ~ U{t_min..t_max}`` and one noise ``eps`` (a seeded generator per
seed), noises both latents with them, and compares the two guided noise predictions:

    z_t   = sqrt(abar_t) z     + sqrt(1 - abar_t) eps
    x_t   = sqrt(abar_t) x_src + sqrt(1 - abar_t) eps
    delta = eps_cfg(z_t, t, tau(target)) - eps_cfg(x_t, t, tau(source))     (guidance_scale on both, uncond tau(""))

On v-prediction models each guided output is turned into its noise estimate first
(``eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t``, :meth:`~nonrigid.models.family.ModelFamily.noise_estimate`): DDS
is defined on noise predictions, and a v difference would carry an extra ``x_t`` term.

``delta`` is used as the gradient of ``z`` (no backpropagation through the UNet) and SGD takes the step. The
source branch cancels the noisy, prompt-independent part of the score-distillation gradient, so what is left
points from "the input as described by the source" to "the input as described by the target".

Gradient scale. The reference builds the surrogate loss ``sum(z * delta) / (h * w)`` (summed over channels and
positions, divided by the latent's height times width only) and back-propagates ``2000 *`` that loss, so each
latent element receives ``2000 / (h * w) * delta``: ``0.49 * delta`` for SD at 512 px (64 x 64 latents), but 31x
more at 64 px. Here the divisor is fixed at that reference latent area, :data:`REFERENCE_LATENT_AREA` = 64 * 64:

    z <- z - lr * (loss_scale / 4096) * delta

which is exactly the reference's step at 512 px and the same per-element step at every other size, so the
defaults (lr 0.1, loss_scale 2000: a step of about 0.049 * delta) stay sane at SD latent scale whatever the size.

The reported "DDS loss" of an iteration is ``mean(delta ** 2)`` (the reference's logged value). Do not expect it
to fall: DDS's fixed point is ``E[delta] = 0``, not a minimum of ``E[delta ** 2]``, and once ``z`` leaves ``x_src``
the prompt-independent parts of the two predictions stop cancelling, which adds to ``delta ** 2``; it also jumps
with t from one iteration to the next. What the optimisation drives down (on a trained model) is the squared norm
of the *expected* delta, ``mean(E[delta] ** 2)``, estimated on fixed draws by :func:`expected_delta_norm`.

Timesteps: the reference draws ``t`` from ``[t_min, t_max - 2]`` (an exclusive bound one below ``t_max``); here
both ends are included, as the parameter table says.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image

from ..errors import UsageError, check_finite
from ..models.registry import family_of
from ..progress import Progress, track
from ..timing import Stopwatch
from .base import MethodContext, MethodOutput, MethodVariant
from .catalogue import DDS as INFO

__all__ = ["INFO", "REFERENCE_LATENT_AREA", "DDSDraw", "DDSResult", "dds_delta", "dds_deltas", "dds_draws",
           "dds_loss", "dds_optimize", "expected_delta_norm", "noise_schedule", "run"]

REFERENCE_LATENT_AREA = 64 * 64  # h * w of an SD latent at 512 px: the reference's loss normaliser there


@dataclass(frozen=True)
class DDSDraw:
    """The randomness of one DDS evaluation: a timestep and the noise shared by both branches."""

    timestep: int
    noise: torch.Tensor


@dataclass
class DDSResult:
    """One seed's optimisation: ``snapshots[n]`` is ``z`` after n iterations; ``losses[i]`` = mean(delta^2)."""

    seed: int
    snapshots: dict[int, torch.Tensor]
    losses: list[float] = field(default_factory=list)
    timesteps: list[int] = field(default_factory=list)


def dds_draws(
    generator: torch.Generator, shape: Sequence[int], t_min: int, t_max: int, count: int, device: torch.device
) -> list[DDSDraw]:
    """``count`` draws of (t ~ U{t_min..t_max}, eps ~ N(0, I)) from a CPU ``generator`` (same on every device)."""
    draws = []
    for _ in range(count):
        t = int(torch.randint(t_min, t_max + 1, (1,), generator=generator))
        noise = torch.randn(tuple(shape), generator=generator, dtype=torch.float32).to(device)
        draws.append(DDSDraw(t, noise))
    return draws


def noise_schedule(pipe: StableDiffusionPipeline) -> DDIMScheduler:
    """A private scheduler with the pipeline's configuration: only its ``abar_t`` and ``add_noise`` are used."""
    return DDIMScheduler.from_config(pipe.scheduler.config)


@torch.no_grad()
def dds_delta(
    pipe: StableDiffusionPipeline,
    latent: torch.Tensor,
    source_latent: torch.Tensor,
    draw: DDSDraw,
    target_embedding: torch.Tensor,
    source_embedding: torch.Tensor,
    uncond_embedding: torch.Tensor,
    guidance_scale: float,
    scheduler: DDIMScheduler | None = None,
) -> torch.Tensor:
    """``eps_cfg(z_t, t, target) - eps_cfg(x_t, t, source)`` with the same t and noise for both branches.

    The two predictions are two calls of the same shape on the same kind of inputs, so when ``latent`` equals
    ``source_latent`` and the embeddings are equal the inputs are bit-identical and the delta is exactly zero.
    """
    scheduler = scheduler or noise_schedule(pipe)
    t = torch.tensor([draw.timestep], device=latent.device)
    noisy = scheduler.add_noise(latent.detach(), draw.noise, t)
    noisy_source = scheduler.add_noise(source_latent, draw.noise, t)
    family = family_of(pipe)
    target_eps = family.noise_estimate(
        family.predict(noisy, t, target_embedding, uncond_embedding, guidance_scale), noisy, t)
    source_eps = family.noise_estimate(
        family.predict(noisy_source, t, source_embedding, uncond_embedding, guidance_scale), noisy_source, t)
    return target_eps - source_eps


def dds_deltas(
    pipe: StableDiffusionPipeline,
    latent: torch.Tensor,
    source_latent: torch.Tensor,
    draws: Sequence[DDSDraw],
    target_embedding: torch.Tensor,
    source_embedding: torch.Tensor,
    guidance_scale: float,
    uncond_embedding: torch.Tensor | None = None,
) -> torch.Tensor:
    """The delta of ``latent`` for each of the fixed ``draws``, stacked (K, 1, 4, h, w): to compare latents."""
    if uncond_embedding is None:
        uncond_embedding = family_of(pipe).unconditional()
    scheduler = noise_schedule(pipe)
    return torch.stack([
        dds_delta(pipe, latent, source_latent, d, target_embedding, source_embedding, uncond_embedding,
                  guidance_scale, scheduler)
        for d in draws
    ])


def dds_loss(deltas: torch.Tensor) -> float:
    """The DDS loss ``mean(delta ** 2)``, averaged over the draws of :func:`dds_deltas` (the logged quantity)."""
    return deltas.pow(2).mean().item()


def expected_delta_norm(deltas: torch.Tensor) -> float:
    """``mean(E[delta] ** 2)`` with the expectation over the draws: how far ``z`` is from DDS's fixed point."""
    return deltas.mean(0).pow(2).mean().item()


def dds_optimize(
    pipe: StableDiffusionPipeline,
    source_latent: torch.Tensor,
    source_embedding: torch.Tensor,
    target_embedding: torch.Tensor,
    iterations: Sequence[int],
    *,
    seed: int = 0,
    lr: float = 0.1,
    guidance_scale: float = 7.5,
    t_min: int = 50,
    t_max: int = 950,
    loss_scale: float = 2000.0,
    uncond_embedding: torch.Tensor | None = None,
    progress: Progress = False,
) -> DDSResult:
    """Run DDS from ``source_latent`` (1, 4, h, w) up to ``max(iterations)``, keeping ``z`` after each listed count.

    ``z`` is an fp32 leaf tensor updated by ``torch.optim.SGD`` (no momentum, as the reference) with gradient
    ``loss_scale / REFERENCE_LATENT_AREA * delta`` (see the module docstring for why this normaliser).
    """
    if t_min > t_max:
        raise UsageError(f"t_min ({t_min}) must not be larger than t_max ({t_max})")
    if uncond_embedding is None:
        uncond_embedding = family_of(pipe).unconditional()
    source_latent = source_latent.detach().float()
    scheduler = noise_schedule(pipe)
    generator = torch.Generator("cpu").manual_seed(seed)
    latent = source_latent.clone().requires_grad_(True)
    optimizer = torch.optim.SGD([latent], lr=lr)
    wanted = set(int(n) for n in iterations)
    result = DDSResult(seed, {0: source_latent.clone()} if 0 in wanted else {})
    gradient_scale = loss_scale / REFERENCE_LATENT_AREA
    for step in track(range(1, max(wanted) + 1), "DDS", progress):
        (draw,) = dds_draws(generator, source_latent.shape, t_min, t_max, 1, source_latent.device)
        delta = dds_delta(pipe, latent, source_latent, draw, target_embedding, source_embedding,
                          uncond_embedding, guidance_scale, scheduler)
        check_finite(delta, "DDS")
        optimizer.zero_grad(set_to_none=True)
        latent.grad = gradient_scale * delta
        optimizer.step()
        result.losses.append(delta.pow(2).mean().item())
        result.timesteps.append(draw.timestep)
        if step in wanted:
            result.snapshots[step] = latent.detach().clone()
    return result


def run(
    pipe: StableDiffusionPipeline, picture: Image.Image, target_prompt: str, params: dict[str, Any],
    ctx: MethodContext,
) -> MethodOutput:
    """One DDS run per seed up to the largest iteration count; variants (seed, iterations), decoded together."""
    if params["t_min"] > params["t_max"]:
        raise UsageError(f"t_min ({params['t_min']}) must not be larger than t_max ({params['t_max']})")
    watch = Stopwatch()
    with watch("encoding"):
        family = family_of(pipe)
        source_latent = family.encode_image(picture)
        uncond = family.unconditional()
        source = family.encode_prompt(ctx.source_prompt)
        target = family.encode_prompt(target_prompt)
    with watch("optimization"):
        results = [
            dds_optimize(pipe, source_latent, source, target, params["iterations"], seed=seed, lr=params["lr"],
                         guidance_scale=params["guidance_scale"], t_min=params["t_min"], t_max=params["t_max"],
                         loss_scale=params["loss_scale"], uncond_embedding=uncond, progress=ctx.progress)
            for seed in ctx.seeds
        ]
    with watch("decoding"):
        order = [(result, n) for result in results for n in params["iterations"]]
        latents = torch.cat([result.snapshots[n] for result, n in order])
        images = family.decode(latents, batch_size=ctx.batch_size or 8)
    variants = [
        MethodVariant(result.seed, {"iter": n}, image,
                      {"latent_change": float((result.snapshots[n] - source_latent).abs().mean())})
        for (result, n), image in zip(order, images, strict=True)
    ]
    record = {
        "gradient_scale": params["loss_scale"] / REFERENCE_LATENT_AREA,
        "gradient_scale_note": "z <- z - lr * loss_scale / 4096 * delta (4096 = SD latent area at 512 px)",
        "unconditional_prompt": "",
        "dds_loss": {result.seed: result.losses for result in results},
        "timesteps": {result.seed: result.timesteps for result in results},
    }
    return MethodOutput(variants, watch.seconds, {}, record)
