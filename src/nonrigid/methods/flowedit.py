"""FlowEdit (Kulikov et al., ICCV 2025): inversion-free editing on rectified-flow models, the flow baseline.

Instead of inverting the image, FlowEdit integrates an ODE directly from the source latent to the target one.
With ``x_s = (1 - s) x0 + s noise`` and sampling sigmas ``s_0 > ... > s_N = 0`` (the model's own Euler schedule),
starting at ``z = x_src`` from step ``N - n_max`` on, each step draws fresh noise and moves

    zt_src = (1 - s_i) x_src + s_i noise
    zt_tar = z + zt_src - x_src
    z     <- z + (s_{i+1} - s_i) * mean_over_n_avg( v_w_tar(zt_tar, tar) - v_w_src(zt_src, src) )

where ``v_w`` is the velocity under classifier-free guidance (scale ``target_guidance`` for the target prompt,
``source_guidance`` for the source, both against the empty prompt). The last ``n_min`` steps (0 in the reference)
switch to plain guided sampling of the target from ``z`` noised to that level. Source and target noisy latents
share the noise, so where the prompts agree the difference of velocities vanishes: with the target prompt equal to
the source and equal guidance, the image latent does not move.

It needs a flow model's velocity and sigmas, so it applies to the flow families only (SD3 and FLUX). The defaults
are the authors' SD3 settings (50 steps, n_max 33, guidance 3.5 / 13.5); on FLUX their FLUX settings (28 steps,
n_max 24, distilled guidance 1.5 / 5.5; the catalogue's ``settings_by_guidance``).

Noise: one generator per seed on the CPU, drawn for every step ``i = 0..N-1`` and average ``k`` in that order
(steps a variant skips too), so every ``n_max`` variant of a seed sees the same noise at the same step; the
variants run as one batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import UsageError, check_finite
from ..models.family import Conditioning, ModelFamily
from ..progress import Progress, track
from ..stages.masks import blend, latent_mask
from ..stages.sampling import decoded
from ..timing import Stopwatch
from .base import EditInput, EditResult, MethodContext, Variant
from .catalogue import FLOWEDIT as INFO

__all__ = ["INFO", "flowedit_latents", "run"]


def flow_noise(seed: int, num_steps: int, n_avg: int, shape: torch.Size) -> torch.Tensor:
    """The noise of every step and average, (num_steps, n_avg, *shape): CPU-drawn, the same on any device."""
    generator = torch.Generator().manual_seed(int(seed))
    return torch.stack([torch.stack([torch.randn(shape, generator=generator) for _ in range(n_avg)])
                        for _ in range(num_steps)])


@torch.no_grad()
def flowedit_latents(
    model: ModelFamily,
    x_src: torch.Tensor,
    source: Conditioning,
    target: Conditioning,
    n_maxes: tuple[int, ...],
    *,
    num_steps: int,
    n_min: int = 0,
    n_avg: int = 1,
    source_guidance: float = 3.5,
    target_guidance: float = 13.5,
    seed: int = 0,
    mask: torch.Tensor | None = None,
    progress: Progress = False,
) -> torch.Tensor:
    """The edited latents, one row per ``n_max`` (1, C, h, w each), from the source latent ``x_src`` of a flow
    model (the catalogue's ``requires``: its sampling scheduler steps between sigmas)."""
    scheduler = model.sampling_scheduler(num_steps, x_src)
    uncond = model.unconditional()
    noise = flow_noise(seed, num_steps, n_avg, x_src.shape[1:]).to(x_src.device)
    rows = len(n_maxes)
    z = x_src.repeat(rows, *([1] * (x_src.dim() - 1)))
    tail: torch.Tensor | None = None  # the plain sampling of the last n_min steps
    for i in track(range(num_steps), "FlowEdit", progress):
        t = scheduler.timesteps[i]
        s, s_next = float(scheduler.sigma_from[i]), float(scheduler.sigma_to[i])
        active = torch.tensor([num_steps - i <= n for n in n_maxes], device=z.device)
        if not active.any():
            continue
        if num_steps - i > n_min:
            delta = torch.zeros_like(z[active])
            for k in range(n_avg):
                zt_src = (1 - s) * x_src + s * noise[i, k : k + 1]
                zt_tar = z[active] + zt_src - x_src
                v_src = model.predict(zt_src, t, source, uncond, source_guidance)
                v_tar = model.predict(zt_tar, t, target, uncond, target_guidance)
                delta += (v_tar - v_src) / n_avg
            z[active] = blend(z[active] + (s_next - s) * delta, x_src, mask)  # outside a mask: the input latent
        else:
            if tail is None:  # SDEdit-style phase: z noised to this level, then sampled with the target
                tail = z + (1 - s) * x_src + s * noise[i, 0:1] - x_src
            v = model.predict(tail, t, target, uncond, target_guidance)
            tail = tail + (s_next - s) * v
    result = z if tail is None else tail
    check_finite(result, "FlowEdit")
    return result


def run(model: ModelFamily, edits: Sequence[EditInput], ctx: MethodContext) -> list[EditResult]:
    """Per image: one batch of ``n_max`` variants per seed; variants (seed, n_max), decoded together."""
    return [_edit(model, edit, ctx) for edit in edits]


def _edit(model: ModelFamily, edit: EditInput, ctx: MethodContext) -> EditResult:
    p = ctx.params
    steps = p["num_steps"]
    n_maxes = tuple(min(n, steps) for n in p["n_max"])
    if p["n_min"] > min(n_maxes):
        raise UsageError(f"n_min ({p['n_min']}) must not exceed n_max ({min(n_maxes)})")
    if edit.mask is not None and p["n_min"]:
        raise UsageError("a mask keeps the input outside it along the edit's ODE; n_min's plain sampling of the "
                         "last steps has no such path: set n_min to 0 with a mask")
    watch = Stopwatch()
    with watch("encoding"):
        x_src = model.encode_image(edit.image)
        source, target = model.encode_prompt(edit.source_prompt), model.encode_prompt(edit.target_prompt)
    with watch("editing"):
        latents = torch.cat([
            flowedit_latents(model, x_src, source, target, n_maxes, num_steps=steps, n_min=p["n_min"],
                             n_avg=p["n_avg"], source_guidance=p["source_guidance"],
                             target_guidance=p["target_guidance"], seed=seed,
                             mask=None if edit.mask is None else latent_mask(edit.mask, x_src), progress=ctx.progress)
            for seed in ctx.seeds
        ])
    with watch("decoding"):
        weight = None if edit.mask is None else latent_mask(edit.mask, x_src)
        images = decoded(model, latents, x_src, weight, batch_size=ctx.batch_size or 8)
    order = [(seed, n) for seed in ctx.seeds for n in p["n_max"]]
    variants = [
        Variant(seed, {"nmax": n}, image, {"latent_change": float((latent - x_src[0]).abs().mean())})
        for (seed, n), image, latent in zip(order, images, latents, strict=True)
    ]
    return ctx.result(edit, variants, watch.seconds, record={"unconditional_prompt": ""})
