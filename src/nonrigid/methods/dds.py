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

from ..errors import UsageError, check_finite
from ..models.family import Conditioning, ModelFamily
from ..progress import Progress, track
from ..stages.masks import blend, latent_mask
from ..stages.sampling import decoded
from ..timing import Stopwatch
from .base import EditInput, EditResult, MethodContext, Variant
from .catalogue import DDS as INFO

__all__ = ["INFO", "REFERENCE_LATENT_AREA", "DDSDraw", "DDSJob", "DDSResult", "dds_delta", "dds_deltas", "dds_draws",
           "dds_loss", "dds_optimize", "expected_delta_norm", "run"]

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


@torch.no_grad()
def dds_delta(
    model: ModelFamily,
    latents: torch.Tensor,
    source_latents: torch.Tensor,
    timesteps: torch.Tensor,
    noises: torch.Tensor,
    targets: Conditioning,
    sources: Conditioning,
    uncond: Conditioning | torch.Tensor,
    guidance_scale: float,
) -> torch.Tensor:
    """``eps_cfg(z_t, t, target) - eps_cfg(x_t, t, source)`` with the same t and noise for both branches, for R
    independent DDS runs at once (each row its own latent, source latent, timestep, noise and prompts): the target
    branch of every row in one call, the source branch in another.

    The two predictions are two calls of the same shape on the same kind of inputs, so when a row's latent equals
    its source latent and the embeddings are equal the inputs are bit-identical and its delta is exactly zero.
    """
    t = timesteps.to(latents.device)
    noisy = model.add_noise(latents.detach(), noises, t)
    noisy_source = model.add_noise(source_latents, noises, t)
    target_eps = model.noise_estimate(model.predict(noisy, t, targets, uncond, guidance_scale), noisy, t)
    source_eps = model.noise_estimate(model.predict(noisy_source, t, sources, uncond, guidance_scale),
                                      noisy_source, t)
    return target_eps - source_eps


def dds_deltas(
    model: ModelFamily,
    latent: torch.Tensor,
    source_latent: torch.Tensor,
    draws: Sequence[DDSDraw],
    target: Conditioning | torch.Tensor,
    source: Conditioning | torch.Tensor,
    guidance_scale: float,
    uncond: Conditioning | torch.Tensor | None = None,
) -> torch.Tensor:
    """The delta of one ``latent`` for each of the fixed ``draws``, stacked (K, 1, 4, h, w): to compare latents
    (one DDS evaluation per draw)."""
    uncond = model.unconditional() if uncond is None else uncond
    target, source = Conditioning.of(target), Conditioning.of(source)
    return torch.stack([
        dds_delta(model, latent, source_latent, torch.tensor([d.timestep]), d.noise, target, source, uncond,
                  guidance_scale)
        for d in draws
    ])


def dds_loss(deltas: torch.Tensor) -> float:
    """The DDS loss ``mean(delta ** 2)``, averaged over the draws of :func:`dds_deltas` (the logged quantity)."""
    return deltas.pow(2).mean().item()


def expected_delta_norm(deltas: torch.Tensor) -> float:
    """``mean(E[delta] ** 2)`` with the expectation over the draws: how far ``z`` is from DDS's fixed point."""
    return deltas.mean(0).pow(2).mean().item()


@dataclass(frozen=True)
class DDSJob:
    """One DDS run of :func:`dds_optimize_many`: its input latent (1, 4, h, w), prompts and seed."""

    source_latent: torch.Tensor
    source: Conditioning
    target: Conditioning
    seed: int
    mask: torch.Tensor | None = None  # a latent-resolution weight: outside it z stays the source latent


def dds_optimize(
    model: ModelFamily,
    jobs: Sequence[DDSJob],
    iterations: Sequence[int],
    *,
    lr: float = 0.1,
    guidance_scale: float = 7.5,
    t_min: int = 50,
    t_max: int = 950,
    loss_scale: float = 2000.0,
    uncond: Conditioning | torch.Tensor | None = None,
    progress: Progress = False,
) -> list[DDSResult]:
    """Run DDS from each job's source latent (1, 4, h, w) up to ``max(iterations)``, keeping ``z`` after each listed
    count, for several runs (images, prompts, seeds) as one model batch per iteration.

    ``z`` is an fp32 leaf tensor updated by ``torch.optim.SGD`` (no momentum, as the reference) with gradient
    ``loss_scale / REFERENCE_LATENT_AREA * delta`` (see the module docstring for why this normaliser). Each run keeps
    what makes it its own: its seeded generator draws its timesteps and noise in the same order as alone, and its rows
    of ``z`` get only its own delta (SGD without momentum acts elementwise). So each result equals the run alone up to
    the last bits of batched products (bit for bit with a batch-invariant model).
    """
    if t_min > t_max:
        raise UsageError(f"t_min ({t_min}) must not be larger than t_max ({t_max})")
    uncond = model.unconditional() if uncond is None else uncond
    sources = torch.cat([job.source_latent.detach().float() for job in jobs])
    source_texts = Conditioning.cat([job.source for job in jobs])
    target_texts = Conditioning.cat([job.target for job in jobs])
    generators = [torch.Generator("cpu").manual_seed(job.seed) for job in jobs]
    latents = sources.clone().requires_grad_(True)
    optimizer = torch.optim.SGD([latents], lr=lr)
    wanted = set(int(n) for n in iterations)
    results = [DDSResult(job.seed, {0: sources[i : i + 1].clone()} if 0 in wanted else {})
               for i, job in enumerate(jobs)]
    gradient_scale = loss_scale / REFERENCE_LATENT_AREA
    weights = None if all(job.mask is None for job in jobs) else torch.cat(
        [torch.ones_like(sources[:1, :1]) if job.mask is None else job.mask for job in jobs])
    for step in track(range(1, max(wanted) + 1), "DDS", progress):
        draws = [dds_draws(g, job.source_latent.shape, t_min, t_max, 1, sources.device)[0]
                 for g, job in zip(generators, jobs, strict=True)]
        delta = dds_delta(model, latents, sources, torch.tensor([d.timestep for d in draws]),
                          torch.cat([d.noise for d in draws]), target_texts, source_texts, uncond, guidance_scale)
        check_finite(delta, "DDS")
        optimizer.zero_grad(set_to_none=True)
        latents.grad = gradient_scale * delta
        optimizer.step()
        if weights is not None:  # outside a mask, z stays the input latent
            with torch.no_grad():
                latents.copy_(blend(latents, sources, weights))
        for i, (result, draw) in enumerate(zip(results, draws, strict=True)):
            result.losses.append(delta[i : i + 1].pow(2).mean().item())
            result.timesteps.append(draw.timestep)
            if step in wanted:
                result.snapshots[step] = latents[i : i + 1].detach().clone()
    return results


def run(model: ModelFamily, edits: Sequence[EditInput], ctx: MethodContext) -> list[EditResult]:
    """For each seed, every image's DDS run in one model batch per iteration (:func:`dds_optimize`); variants
    (seed, iterations), decoded together per image. Each result equals the image's own run's up to the last bits of
    batched products (an image alone runs each seed on its own), its timings its share of the batch."""
    p = ctx.params
    if p["t_min"] > p["t_max"]:
        raise UsageError(f"t_min ({p['t_min']}) must not be larger than t_max ({p['t_max']})")
    watch = Stopwatch()
    with watch("encoding"):
        uncond = model.unconditional()
        inputs = [(model.encode_image(e.image), model.encode_prompt(e.source_prompt),
                   model.encode_prompt(e.target_prompt)) for e in edits]
    by_seed = []
    with watch("optimization"):
        for seed in ctx.seeds:
            jobs = [DDSJob(latent, source, target, seed, None if e.mask is None else latent_mask(e.mask, latent))
                    for (latent, source, target), e in zip(inputs, edits, strict=True)]
            by_seed.append(dds_optimize(model, jobs, p["iterations"], lr=p["lr"], guidance_scale=p["guidance_scale"],
                                        t_min=p["t_min"], t_max=p["t_max"], loss_scale=p["loss_scale"],
                                        uncond=uncond, progress=ctx.progress))
    variants = []
    with watch("decoding"):
        for k, (source_latent, _, _) in enumerate(inputs):
            mine = [results[k] for results in by_seed]
            weight = None if edits[k].mask is None else latent_mask(edits[k].mask, source_latent)
            variants.append(_variants(model, p["iterations"], source_latent, mine, ctx.batch_size, weight))
    timings = {name: seconds / len(edits) for name, seconds in watch.seconds.items()}
    return [ctx.result(edit, mine, timings, record=_record(p, results_of))
            for edit, (mine, results_of) in zip(edits, variants, strict=True)]


def _variants(family: ModelFamily, iterations: Sequence[int], source_latent: torch.Tensor, results: list[DDSResult],
              batch_size: int | None, weight: torch.Tensor | None = None) -> tuple[list[Variant], list[DDSResult]]:
    """One picture's variants (seed, iterations), decoded together, and its runs."""
    order = [(result, n) for result in results for n in iterations]
    images = decoded(family, torch.cat([result.snapshots[n] for result, n in order]), source_latent, weight,
                     batch_size=batch_size or 8)
    variants = [
        Variant(result.seed, {"iter": n}, image,
                      {"latent_change": float((result.snapshots[n] - source_latent).abs().mean())})
        for (result, n), image in zip(order, images, strict=True)
    ]
    return variants, results


def _record(params: dict[str, Any], results: list[DDSResult]) -> dict[str, Any]:
    return {
        "gradient_scale": params["loss_scale"] / REFERENCE_LATENT_AREA,
        "gradient_scale_note": "z <- z - lr * loss_scale / 4096 * delta (4096 = SD latent area at 512 px)",
        "unconditional_prompt": "",
        "dds_loss": {result.seed: result.losses for result in results},
        "timesteps": {result.seed: result.timesteps for result in results},
    }
