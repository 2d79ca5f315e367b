"""Stage C: timestep-aware text injection sampling (method.md Eq. 3 and 5).

Every variant starts from the inverted latent x_T. For sampling steps i < K it is conditioned on the source
conditioning, afterwards on ``e_eta = eta * e_tgt + (1 - eta) * e_opt`` (every tensor of the conditioning); the
unconditional conditioning at step i is the inversion's (NTI's u_i, or tau("")) and the guidance scale is the
inversion's.

Work that variants share is done once: the first K steps are the same for every variant with the same inversion
(source prompt, same x_T), so they are read from the NTI reconstruction or computed once at batch 1, and variant
(eta, K) only runs steps K..N-1. All variants of all seeds run as one batch per step (in chunks of
``batch_size`` when memory is short), each row with its own condition.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from ..errors import check_finite
from ..models.family import Conditioning, ModelFamily, mix
from ..progress import Progress, track
from .inversion import Inversion
from .masks import blend, composite
from .text_optimization import TextOptimization


@dataclass(frozen=True)
class VariantSpec:
    """One row of a sampling batch: which text optimization, how much of the target, how many source steps."""

    text_index: int
    eta: float
    inject_steps: int


def interpolate(text: TextOptimization, eta: float) -> Conditioning:
    """``e_eta = eta * e_tgt + (1 - eta) * e_opt`` (eta 0: the optimized conditioning, closest to the input)."""
    return mix(text.target, text.optimized, eta)


def variant_grid(
    num_texts: int, etas: Sequence[float], inject_steps: Sequence[int]
) -> list[VariantSpec]:
    """All (text, K, eta) combinations, in the order outputs are returned: text, then K, then eta."""
    return [VariantSpec(t, float(e), int(k)) for t in range(num_texts) for k in inject_steps for e in etas]


def sample_variants(
    family: ModelFamily,
    inversions: Sequence[Inversion],
    text_optimizations: Sequence[Sequence[TextOptimization]],
    etas: Sequence[float] = (0.0,),
    inject_steps: Sequence[int] = (10,),
    output_type: str = "pil",
    *,
    batch_size: int | None = None,
    use_reconstruction: bool = True,
    masks: Sequence[torch.Tensor | None] | None = None,
    progress: Progress = False,
) -> list[list[Image.Image]] | list[torch.Tensor]:
    """Sample every (eta, K) variant of every image's text optimizations: image b's variants come from
    ``inversions[b]`` and ``text_optimizations[b]``, all images' variants in one batch per step (in chunks of
    ``batch_size`` rows when memory is short). Returns each image's outputs in :func:`variant_grid` order (text
    optimization, then K, then eta): PIL images, or the final latents (V, C, h, w) with ``output_type="latent"``;
    each image's latents are decoded on their own. ``use_reconstruction=False`` recomputes the shared
    source-conditioned steps instead of reading them from the inversions (same result; for checking). ``masks``:
    per image a latent-resolution weight (:func:`~nonrigid.stages.masks.latent_mask`) or None; outside it the
    variants follow the inversion's own path (:func:`sample_latents`)."""
    if output_type not in ("pil", "latent"):
        raise ValueError(f"output_type must be 'pil' or 'latent', got {output_type!r}")
    conds, steps, owners, counts = [], [], [], []
    for image, texts in enumerate(text_optimizations):
        specs = variant_grid(len(texts), etas, inject_steps)
        conds += [interpolate(texts[s.text_index], s.eta) for s in specs]
        steps += [s.inject_steps for s in specs]
        owners += [image] * len(specs)
        counts.append(len(specs))
    latents = sample_latents(family, inversions, Conditioning.cat(conds), steps, owners, batch_size=batch_size,
                             use_reconstruction=use_reconstruction, masks=masks, progress=progress)
    parts = list(latents.split(counts))
    if output_type == "latent":
        return parts
    masks = masks or [None] * len(parts)
    return [decoded(family, part, None if mask is None else reference_path(inversion)[-1:], mask)
            for part, inversion, mask in zip(parts, inversions, masks, strict=True)]


def decoded(family: ModelFamily, latents: torch.Tensor, reference: torch.Tensor | None,
            weight: torch.Tensor | None, batch_size: int = 8) -> list[Image.Image]:
    """``latents`` decoded; with a mask, composited with the reference latent's decoding (:mod:`.masks`)."""
    images = family.decode(latents, batch_size=batch_size)
    if weight is None:
        return images
    return composite(images, family.decode(reference)[0], weight)


@torch.no_grad()
def sample_latents(
    family: ModelFamily,
    inversions: Sequence[Inversion],
    conds: Conditioning | torch.Tensor,
    inject_steps: Sequence[int],
    owners: Sequence[int],
    *,
    batch_size: int | None = None,
    use_reconstruction: bool = True,
    masks: Sequence[torch.Tensor | None] | None = None,
    progress: Progress = False,
) -> torch.Tensor:
    """The sampling loop: row r starts from ``inversions[owners[r]]`` (its x_T, source path, unconditional
    conditionings), follows the source path until step ``inject_steps[r]``, then ``conds[r]``. The inversions must
    share their step count and guidance scale.

    ``masks[b]`` (a (1, 1, h, w) weight, or None) keeps image b's rows on its inversion's own path outside the
    mask: after every step a row becomes ``m * x + (1 - m) * reference`` (:mod:`.masks`; the reference is the
    reconstruction, or DDIM's trajectory walked back)."""
    conds = Conditioning.of(conds)
    num_steps = inversions[0].num_steps
    scale = inversions[0].guidance_scale
    if any(inv.num_steps != num_steps or inv.guidance_scale != scale for inv in inversions):
        raise ValueError("inversions sampled together must share their step count and guidance scale")
    for k in inject_steps:
        if not 0 <= k <= num_steps:
            raise ValueError(f"inject steps must be in [0, {num_steps}], got {k}")
    scheduler = family.sampling_scheduler(num_steps, inversions[0].latent)
    source_paths = [
        _source_path(family, inv, scheduler, max(k for k, o in zip(inject_steps, owners, strict=True) if o == b),
                     use_reconstruction) if b in owners else None
        for b, inv in enumerate(inversions)
    ]
    rows = len(inject_steps)
    latents = torch.zeros((rows, *inversions[0].latent.shape[1:]), device=inversions[0].latent.device)
    chunk = batch_size or rows
    first = min(inject_steps)
    keep = _Keep(inversions, owners, masks, latents)
    for i in track(range(first, num_steps), "sampling", progress):
        t = scheduler.timesteps[i]
        for r, k in enumerate(inject_steps):
            if k == i:  # this variant leaves the source path here
                latents[r] = source_paths[owners[r]][i]
        active = [r for r, k in enumerate(inject_steps) if k <= i]
        for part in torch.tensor(active).split(chunk):
            x = latents[part]
            out = family.predict(x, t, conds.expand(rows).rows(part), _uncond(inversions, owners, part, i), scale)
            latents[part] = keep(part, i + 1, scheduler.step(out, t, x).prev_sample)
    for r, k in enumerate(inject_steps):
        if k == num_steps:  # source for all N steps: the reconstruction itself
            latents[r] = keep(torch.tensor([r]), num_steps, source_paths[owners[r]][num_steps : num_steps + 1])[0]
    check_finite(latents, "sampling")
    return latents


class _Keep:
    """The bookkeeping of masks in the sampling loop: each row's weight and reference path (rows of unmasked
    images pass through untouched)."""

    def __init__(self, inversions: Sequence[Inversion], owners: Sequence[int],
                 masks: Sequence[torch.Tensor | None] | None, latents: torch.Tensor):
        self.owners = owners
        self.masks = masks if masks is not None and any(m is not None for m in masks) else None
        if self.masks is not None:
            self.paths = [None if m is None else reference_path(inv) for inv, m in zip(inversions, self.masks,
                                                                                        strict=True)]
            self.ones = torch.ones_like(latents[:1, :1])

    def __call__(self, part: torch.Tensor, step: int, latents: torch.Tensor) -> torch.Tensor:
        """``latents`` (the rows ``part`` after sampling step ``step - 1``) blended with their references."""
        if self.masks is None:
            return latents
        owners = [self.owners[r] for r in part.tolist()]
        weight = torch.cat([self.ones if self.masks[b] is None else self.masks[b] for b in owners])
        reference = torch.cat([latents[k : k + 1] if self.paths[b] is None else self.paths[b][step : step + 1]
                               for k, b in enumerate(owners)])
        return blend(latents, reference, weight)


def reference_path(inversion: Inversion) -> torch.Tensor:
    """Where the inversion's own path is before each sampling step (index N: the end): NTI's and NPI's guided
    reconstruction, or DDIM's trajectory in sampling order."""
    return inversion.reconstruction if inversion.reconstruction is not None else inversion.trajectory.flip(0)


def _uncond(inversions: Sequence[Inversion], owners: Sequence[int], part: torch.Tensor, step: int) -> Conditioning:
    """The unconditional conditioning of the rows ``part`` at ``step``: one row when they share an inversion."""
    mine = [owners[r] for r in part.tolist()]
    if len(set(mine)) == 1:
        return inversions[mine[0]].uncond_at(step)
    return Conditioning.cat([inversions[b].uncond_at(step) for b in mine])


def _source_path(
    family: ModelFamily, inversion: Inversion, scheduler, upto: int, use_reconstruction: bool
) -> torch.Tensor:
    """Latents of the source-conditioned sampling path, indices 0..upto (index i: before step i)."""
    if use_reconstruction and inversion.reconstruction is not None:
        return inversion.reconstruction[: upto + 1]
    x = inversion.latent
    path = [x]
    for i in range(upto):
        t = scheduler.timesteps[i]
        out = family.predict(x, t, inversion.source, inversion.uncond_at(i), inversion.guidance_scale)
        x = scheduler.step(out, t, x).prev_sample
        path.append(x)
    return torch.cat(path)


@torch.no_grad()
def generate(
    family: ModelFamily,
    prompt: str,
    *,
    seed: int = 0,
    num_steps: int = 50,
    guidance_scale: float | None = None,
    size: int | None = None,
    progress: Progress = False,
) -> Image.Image:
    """Text-to-image with the model's DDIM sampler from seeded noise: inputs for the paper's experiments on
    generated images (an edit of a generated picture, with its prompt as the source).

    The same loop as the edit's sampling (the family's ``predict`` and ``step``), so that with the same x_T it
    equals the model's diffusers pipeline. ``guidance_scale`` and ``size`` default to the family's.
    """
    size = family.defaults.size if size is None else size
    scale = family.defaults.guidance_scale if guidance_scale is None else guidance_scale
    x = family.initial_noise(size, torch.Generator().manual_seed(int(seed)))
    cond, uncond = family.encode_prompt(prompt), family.unconditional()
    scheduler = family.sampling_scheduler(num_steps, x)
    for t in track(scheduler.timesteps, "generating", progress):
        x = scheduler.step(family.predict(x, t, cond, uncond, scale), t, x).prev_sample
    check_finite(x, "generating")
    return family.decode(x)[0]
