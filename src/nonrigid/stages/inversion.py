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

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import NonFiniteError, check_finite
from ..models.family import Conditioning, ModelFamily, guided
from ..models.registry import family_of
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
        tensors = {"latent": self.latent, "trajectory": self.trajectory, **self.source.to_record("source"),
                   **self.unconditional.to_record("unconditional")}
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


def invert(
    pipe,
    image: Image.Image,
    source_prompt: str = "",
    method: str = "nti",
    num_steps: int = 50,
    guidance_scale: float | None = None,
    inner_steps: int = 10,
    early_stop: float = 1e-5,
    *,
    progress: Progress = False,
) -> Inversion:
    """Invert ``image`` with ``method`` ("nti", "ddim" or "npi") over ``num_steps`` DDIM steps.

    ``pipe`` is a loaded pipeline (or its model family). ``guidance_scale`` is the scale the result is meant to be
    sampled at (default 7.5 for NTI and NPI, 1 for DDIM). NTI's inner loop runs at most ``inner_steps`` Adam steps
    per sampling step and stops early once the loss is below ``early_stop + i * 2e-5`` (the reference's rule);
    NPI ignores both (it optimises nothing).

    Model cost at batch 1: DDIM N; NPI 2N (inversion + its reconstruction), no backward pass; NTI N + N * (2 + 2 *
    inner iterations), counting a forward and backward pass as 2.
    """
    if method not in METHODS:
        raise ValueError(f"unknown inversion method {method!r}; choose one of {', '.join(METHODS)}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    family = family_of(pipe)
    guidance_scale = DEFAULT_GUIDANCE[method] if guidance_scale is None else float(guidance_scale)
    source = family.encode_prompt(source_prompt)
    # the unconditional conditioning (NTI's starting point, DDIM's negative): the family's (SD: tau(""); SDXL:
    # zeros, as its pipeline does without a negative prompt), or the source for NPI
    empty = source if method == "npi" else family.unconditional()
    x0 = family.encode_image(image)
    trajectory = ddim_invert(family, x0, source, num_steps, progress=progress)
    result = Inversion(method, source_prompt, num_steps, guidance_scale, trajectory[-1:].clone(), trajectory,
                       source, empty)
    if method == "nti":
        nulls, reconstruction, losses = null_text_optimization(
            family, trajectory, source, empty, guidance_scale, inner_steps, early_stop, progress=progress
        )
        result.nulls, result.reconstruction, result.losses = nulls, reconstruction, losses
    elif method == "npi":
        result.reconstruction = conditional_sampling_path(family, result.latent, source, num_steps,
                                                          progress=progress)
    return result


def ddim_invert(
    pipe, x0: torch.Tensor, cond: Conditioning | torch.Tensor, num_steps: int, *, progress: Progress = False
) -> torch.Tensor:
    """The DDIM inversion path x*_0 .. x*_N at guidance 1, shape (N + 1, C, h, w)."""
    family = family_of(pipe)
    return _path(family, family.inversion_scheduler(num_steps), x0, cond, "DDIM inversion", progress)


def conditional_sampling_path(
    pipe, latent: torch.Tensor, cond: Conditioning | torch.Tensor, num_steps: int, *, progress: Progress = False
) -> torch.Tensor:
    """DDIM sampling from ``latent`` with ``cond`` at guidance 1, every latent kept: shape (N + 1, C, h, w).

    It is NPI's guided reconstruction path: with the source as the unconditional conditioning the guided
    prediction equals the conditional one at any scale, so one branch is evaluated instead of two.
    """
    family = family_of(pipe)
    return _path(family, family.sampling_scheduler(num_steps), latent, cond, "negative-prompt inversion", progress)


@torch.no_grad()
def _path(
    family: ModelFamily, scheduler, x: torch.Tensor, cond: Conditioning | torch.Tensor, stage: str, progress: bool
) -> torch.Tensor:
    """Every latent of a walk along ``scheduler``'s timesteps at guidance 1 with ``cond``, the start included."""
    path = [x]
    for t in track(scheduler.timesteps, stage, progress):
        x = scheduler.step(family.predict(x, t, cond), t, x).prev_sample
        path.append(x)
    latents = torch.cat(path)
    check_finite(latents, stage)
    return latents


def null_text_optimization(
    pipe,
    trajectory: torch.Tensor,
    cond: Conditioning | torch.Tensor,
    empty: Conditioning | torch.Tensor,
    guidance_scale: float,
    inner_steps: int = 10,
    early_stop: float = 1e-5,
    *,
    progress: Progress = False,
) -> tuple[Conditioning, torch.Tensor, list[float]]:
    """Optimise one unconditional conditioning per sampling step so guided sampling retraces ``trajectory``.

    Returns the conditionings (batch N), the guided reconstruction path in sampling order (N + 1, C, h, w) and the
    last inner loss of each step. ``u`` starts at tau("") and each step starts from the previous step's result;
    Adam's learning rate decays as 1e-2 * (1 - i / 100); the conditional prediction is computed once per step.
    """
    family: ModelFamily = family_of(pipe)
    cond, uncond = Conditioning.of(cond), Conditioning.of(empty).clone()
    num_steps = trajectory.shape[0] - 1
    scheduler = family.sampling_scheduler(num_steps)
    loss_scale = float(trajectory[0].numel()) if family.dtype == torch.float16 else 1.0  # see text_optimization
    x = trajectory[-1:]
    nulls, path, losses = [], [x], []
    bar = Bar("null-text inversion", num_steps * inner_steps, progress)
    for i, t in enumerate(scheduler.timesteps):
        target = trajectory[num_steps - 1 - i : num_steps - i]
        with torch.no_grad():
            out_cond = family.predict(x, t, cond)
        uncond = uncond.leaves()  # nulls[i - 1] must not move with it
        optimizer = torch.optim.Adam(uncond.parameters(), lr=1e-2 * (1.0 - i / 100.0))
        loss_value = float("nan")
        for j in range(inner_steps):
            out = guided(family.predict(x, t, uncond), out_cond, guidance_scale)
            loss = F.mse_loss(scheduler.step(out, t, x).prev_sample, target)
            optimizer.zero_grad(set_to_none=True)
            (loss * loss_scale).backward()
            optimizer.step()
            loss_value = loss.item()
            bar.update(1)
            if loss_value < early_stop + i * 2e-5:
                bar.update(inner_steps - j - 1)
                break
        uncond = uncond.detach()
        with torch.no_grad():
            out = guided(family.predict(x, t, uncond), out_cond, guidance_scale)
            x = scheduler.step(out, t, x).prev_sample
        nulls.append(uncond)
        path.append(x)
        losses.append(loss_value)
    bar.close()
    null_conditionings, reconstruction = Conditioning.cat(nulls), torch.cat(path)
    if not null_conditionings.is_finite():
        raise NonFiniteError("null-text inversion")
    check_finite(reconstruction, "null-text inversion")
    return null_conditionings, reconstruction, losses
