"""Stage B: latent inversion — DDIM inversion, and Null-text (NTI) or negative-prompt (NPI) inversion on top of it.

DDIM inversion walks the deterministic DDIM update backwards from ``x0 = s * E(image)`` (the posterior mean) with
the source condition at guidance 1, giving the pivot trajectory ``x*_0 .. x*_N``. Sampled back at guidance 1 it
returns close to the input, but classifier-free guidance (needed to edit) amplifies its small errors. NTI fixes
that: sampling back from ``x*_N`` at guidance w, it optimises one unconditional embedding ``u_i`` per step so
that each guided DDIM step lands on the pivot ``x*_{i-1}``. The guided sampling path it leaves behind (the
"reconstruction") is stored: an edit injecting the source for K steps starts from its step K.

Negative-prompt inversion (NPI, Miyake et al. 2023) is the optimisation-free shortcut: the source embedding stands
in for every null embedding. Guided sampling with ``u = c`` predicts ``eps_c + w (eps_c - eps_c) = eps_c`` for any
w, so NPI's reconstruction is plain DDIM sampling with the source prompt, as close to the input as the DDIM round
trip — at the cost of N conditional UNet passes instead of NTI's inner loops. That reconstruction is computed once
at inversion time and stored (like NTI's), so injection sweeps start from its step K; after step K the variants
are sampled at guidance w with the source prompt as the negative prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import NonFiniteError, UsageError, check_finite
from ..models.family import Conditioning, ModelFamily, guided
from ..progress import Bar, Progress, track
from . import DEFAULT_GUIDANCE
from . import INVERSION_METHODS as METHODS


@dataclass
class Inversion:
    """Result of stage B. Latents are fp32 (…, C, h, w); conditionings fp32.

    - ``latent``: x_T = x*_N, where sampling starts.
    - ``trajectory``: the DDIM inversion path x*_0 (the image) .. x*_N, shape (N + 1, C, h, w).
    - ``source``: the source prompt's conditioning (batch 1).
    - ``unconditional``: the unconditional conditioning at every step for DDIM and NPI: tau("") for DDIM, the
      source itself for NPI; NTI's starting point.
    - ``nulls``: NTI's u_i for sampling step i = 0..N-1 (noisiest first), batch N; None for DDIM and NPI.
    - ``reconstruction``: for NTI and NPI, the guided sampling path from x_T with the source prompt and the
      unconditional conditionings, in sampling order (index i = the latent before sampling step i; index N = the
      final x_0), shape (N + 1, C, h, w). None for DDIM, whose sampling path is not computed by the inversion.
    - ``losses``: NTI's last inner-loop loss per step.
    """

    method: str
    source_prompt: str
    num_steps: int
    guidance_scale: float
    latent: torch.Tensor
    trajectory: torch.Tensor
    source: Conditioning
    unconditional: Conditioning
    nulls: Conditioning | None = None
    reconstruction: torch.Tensor | None = None
    losses: list[float] | None = None

    def uncond_at(self, step: int) -> Conditioning:
        """The unconditional conditioning for sampling step ``step`` (0 = noisiest), batch 1."""
        if self.nulls is None:
            return self.unconditional
        return self.nulls.rows(slice(step, step + 1))

    @property
    def source_embedding(self) -> torch.Tensor:
        """The source conditioning's token embeddings (1, 77, D)."""
        return self.source.tokens

    @property
    def unconditional_embedding(self) -> torch.Tensor:
        return self.unconditional.tokens

    @property
    def null_embeddings(self) -> torch.Tensor | None:
        """NTI's per-step token embeddings (N, 77, D), or None."""
        return None if self.nulls is None else self.nulls.tokens

    def to_record(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {"latent": self.latent, "trajectory": self.trajectory, **self.source.to_record("source")}
        if self.unconditional is not None:  # None on FLUX: no unconditional branch (read back as None)
            tensors.update(self.unconditional.to_record("unconditional"))
        if self.nulls is not None:
            tensors.update(self.nulls.to_record("nulls"))
        if self.reconstruction is not None:
            tensors["reconstruction"] = self.reconstruction
        meta = {"method": self.method, "source_prompt": self.source_prompt, "num_steps": self.num_steps,
                "guidance_scale": self.guidance_scale, "losses": self.losses}
        return tensors, meta

    @classmethod
    def from_record(cls, tensors: dict[str, torch.Tensor], meta: dict) -> Inversion:
        return cls(
            method=meta["method"],
            source_prompt=meta["source_prompt"],
            num_steps=int(meta["num_steps"]),
            guidance_scale=float(meta["guidance_scale"]),
            latent=tensors["latent"],
            trajectory=tensors["trajectory"],
            source=Conditioning.from_record(tensors, "source"),
            unconditional=Conditioning.from_record(tensors, "unconditional"),
            nulls=Conditioning.from_record(tensors, "nulls"),
            reconstruction=tensors.get("reconstruction"),
            losses=meta.get("losses"),
        )


def invert_images(
    family: ModelFamily,
    images: Sequence[Image.Image],
    source_prompts: Sequence[str],
    method: str = "nti",
    num_steps: int = 50,
    guidance_scale: float | None = None,
    inner_steps: int = 10,
    early_stop: float = 1e-5,
    *,
    progress: Progress = False,
) -> list[Inversion]:
    """Invert ``images`` (each with its own source prompt) with ``method`` ("nti", "ddim" or "npi") over
    ``num_steps`` DDIM steps, as one model batch per step.

    ``guidance_scale`` is the scale the result is meant to be sampled at (default 7.5 for NTI and NPI, 1 for
    DDIM). NTI's inner loop runs at most ``inner_steps`` Adam steps per sampling step and stops early once the loss
    is below ``early_stop + i * 2e-5`` (the reference's rule), per image; NPI ignores both (it optimises nothing).
    Each image's result equals its run alone up to the last bits of batched convolutions.

    Model cost at batch 1: DDIM N; NPI 2N (inversion + its reconstruction), no backward pass; NTI N + N * (2 + 2 *
    inner iterations), counting a forward and backward pass as 2.
    """
    if method not in METHODS:
        raise ValueError(f"unknown inversion method {method!r}; choose one of {', '.join(METHODS)}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if len(images) != len(source_prompts):
        raise ValueError("give one source prompt per image")
    if method in ("nti", "npi") and family.unconditional() is None:
        raise UsageError(f"{method} inversion works on the unconditional branch of classifier-free guidance, which "
                         f"this model has none of ({family.describe()}); use ddim inversion")
    guidance_scale = DEFAULT_GUIDANCE[method] if guidance_scale is None else float(guidance_scale)
    encoded = {p: family.encode_prompt(p) for p in dict.fromkeys(source_prompts)}
    sources = [encoded[p] for p in source_prompts]
    # the unconditional conditioning (NTI's starting point, DDIM's negative): the family's (SD: tau(""); SDXL:
    # zeros, as its pipeline does without a negative prompt), or the source for NPI
    empties = sources if method == "npi" else [family.unconditional()] * len(images)
    x0 = torch.cat([family.encode_image(image) for image in images])
    walks = _walk(family, family.inversion_scheduler(num_steps, x0), x0, Conditioning.cat(sources), "DDIM inversion",
                  progress)
    results = [Inversion(method, prompt, num_steps, guidance_scale, walk[-1:].clone(), walk.clone(), source,
                         empty)
               for prompt, walk, source, empty in zip(source_prompts, walks, sources, empties, strict=True)]
    if method == "nti":
        optimized = null_text_optimization(family, list(walks), sources, empties, guidance_scale, inner_steps,
                                                early_stop, progress=progress)
        for result, (nulls, reconstruction, losses) in zip(results, optimized, strict=True):
            result.nulls, result.reconstruction, result.losses = nulls, reconstruction, losses
    elif method == "npi":
        latents = torch.cat([result.latent for result in results])
        paths = _walk(family, family.sampling_scheduler(num_steps, latents), latents, Conditioning.cat(sources),
                      "negative-prompt inversion", progress)
        for result, path in zip(results, paths, strict=True):
            result.reconstruction = path.clone()
    return results


def invert_latents(
    family: ModelFamily, x0: torch.Tensor, cond: Conditioning | torch.Tensor, num_steps: int, *,
    progress: Progress = False,
) -> torch.Tensor:
    """The DDIM inversion paths x*_0 .. x*_N of the latents ``x0`` (B, C, h, w) at guidance 1 with ``cond`` (one
    row per latent, or one for all): shape (B, N + 1, C, h, w)."""
    return _walk(family, family.inversion_scheduler(num_steps, x0), x0, cond, "DDIM inversion", progress)


@torch.no_grad()
def _walk(
    family: ModelFamily, scheduler, x: torch.Tensor, cond: Conditioning | torch.Tensor, stage: str, progress: bool
) -> torch.Tensor:
    """Every latent of a walk along ``scheduler``'s timesteps at guidance 1 with ``cond`` (one row per latent of
    ``x``, or one for all), the start included: shape (B, N + 1, C, h, w)."""
    path = [x]
    for t in track(scheduler.timesteps, stage, progress):
        x = scheduler.step(family.predict(x, t, cond), t, x).prev_sample
        path.append(x)
    latents = torch.stack(path, dim=1)
    check_finite(latents, stage)
    return latents


def null_text_optimization(
    family: ModelFamily,
    trajectories: Sequence[torch.Tensor],
    conds: Sequence[Conditioning],
    empties: Sequence[Conditioning],
    guidance_scale: float,
    inner_steps: int = 10,
    early_stop: float = 1e-5,
    *,
    progress: Progress = False,
) -> list[tuple[Conditioning, torch.Tensor, list[float]]]:
    """Optimise one unconditional conditioning per sampling step and image so that guided sampling retraces each
    image's ``trajectories`` (its DDIM inversion path), as one model batch per inner step.

    Returns, per image, the conditionings (batch N), the guided reconstruction path in sampling order
    (N + 1, C, h, w) and the last inner loss of each step. ``u`` starts at ``empties`` (tau("")) and each step
    starts from the previous step's result; Adam's learning rate decays as 1e-2 * (1 - i / 100); the conditional
    prediction is computed once per step.

    Each image has its own leaves (one per tensor of its conditioning) in one Adam optimiser, and its own loss
    term (its own mean, summed). The early stop is per image: an image whose loss is low enough leaves the batch
    for the rest of that sampling step, so it gets no gradient and Adam skips it (its moments untouched), exactly
    as its run alone breaks out of the inner loop. Results in input order.
    """
    count = len(trajectories)
    cond = Conditioning.cat([Conditioning.of(c) for c in conds])
    unconds = [Conditioning.of(e).clone() for e in empties]
    num_steps = trajectories[0].shape[0] - 1
    scheduler = family.sampling_scheduler(num_steps, trajectories[0])
    loss_scale = float(trajectories[0][0].numel()) if family.dtype == torch.float16 else 1.0  # text_optimization
    x = torch.cat([trajectory[-1:] for trajectory in trajectories])
    nulls: list[list[Conditioning]] = [[] for _ in range(count)]
    path, losses = [x], [[] for _ in range(count)]
    bar = Bar("null-text inversion", num_steps * inner_steps * count, progress)
    for i, t in enumerate(scheduler.timesteps):
        target = torch.cat([trajectory[num_steps - 1 - i : num_steps - i] for trajectory in trajectories])
        with torch.no_grad():
            out_cond = family.predict(x, t, cond)
        leaves = [u.leaves() for u in unconds]  # nulls[i - 1] must not move with them
        optimizer = torch.optim.Adam([p for u in leaves for p in u.parameters()], lr=1e-2 * (1.0 - i / 100.0))
        values = [float("nan")] * count
        active = list(range(count))
        for j in range(inner_steps):
            if not active:
                break
            rows = _rows(active, count)
            out = guided(family.predict(x[rows], t, Conditioning.cat([leaves[r] for r in active])), out_cond[rows],
                         guidance_scale)
            stepped = scheduler.step(out, t, x[rows]).prev_sample
            per_image = [F.mse_loss(stepped[k : k + 1], target[r : r + 1]) for k, r in enumerate(active)]
            optimizer.zero_grad(set_to_none=True)
            (torch.stack(per_image).sum() * loss_scale).backward()
            optimizer.step()
            bar.update(len(active))
            for k, r in enumerate(list(active)):
                values[r] = per_image[k].item()
                if values[r] < early_stop + i * 2e-5:
                    bar.update(inner_steps - j - 1)
                    active.remove(r)
        unconds = [u.detach() for u in leaves]
        with torch.no_grad():
            out = guided(family.predict(x, t, Conditioning.cat(unconds)), out_cond, guidance_scale)
            x = scheduler.step(out, t, x).prev_sample
        for r in range(count):
            nulls[r].append(unconds[r])
            losses[r].append(values[r])
        path.append(x)
    bar.close()
    results = []
    for r in range(count):
        null_conditionings = Conditioning.cat(nulls[r])
        reconstruction = torch.cat([latents[r : r + 1] for latents in path])
        if not null_conditionings.is_finite():
            raise NonFiniteError("null-text inversion")
        check_finite(reconstruction, "null-text inversion")
        results.append((null_conditionings, reconstruction, losses[r]))
    return results


def _rows(active: list[int], count: int) -> slice | list[int]:
    """The batch rows of the images still optimising: every row as a slice (no copy) when none has stopped."""
    return slice(None) if len(active) == count else active
