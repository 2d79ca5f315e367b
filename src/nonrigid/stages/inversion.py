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
from .programs import Call, Loss, Program, run_program


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

    Sequential model calls: DDIM N; NPI 2N (inversion + its reconstruction), no backward pass; NTI N + N * (1 +
    inner iterations) (the step's conditional prediction rides along its first call), each inner iteration a forward
    and a backward pass.
    """
    return run_program(family, inversion_program(family, images, source_prompts, method, num_steps, guidance_scale,
                                                 inner_steps, early_stop, progress=progress))


def inversion_program(
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
) -> Program[list[Inversion]]:
    """:func:`invert_images` as a program (:mod:`.programs`), so that stage A can ride along its model calls."""
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
    with torch.no_grad():  # the encoders are never trained: no graph, whatever their weights' requires_grad says
        encoded = {p: family.encode_prompt(p) for p in dict.fromkeys(source_prompts)}
        sources = [encoded[p] for p in source_prompts]
        # the unconditional conditioning (NTI's starting point, DDIM's negative): the family's (SD: tau(""); SDXL:
        # zeros, as its pipeline does without a negative prompt), or the source for NPI
        empties = sources if method == "npi" else [family.unconditional()] * len(images)
        x0 = torch.cat([family.encode_image(image) for image in images])
    walks = yield from walk_program(family, family.inversion_scheduler(num_steps, x0), x0, Conditioning.cat(sources),
                                    "DDIM inversion", progress)
    results = [Inversion(method, prompt, num_steps, guidance_scale, walk[-1:].clone(), walk.clone(), source,
                         empty)
               for prompt, walk, source, empty in zip(source_prompts, walks, sources, empties, strict=True)]
    if method == "nti":
        optimized = yield from null_text_program(family, list(walks), sources, empties, guidance_scale, inner_steps,
                                                 early_stop, progress=progress)
        for result, (nulls, reconstruction, losses) in zip(results, optimized, strict=True):
            result.nulls, result.reconstruction, result.losses = nulls, reconstruction, losses
    elif method == "npi":
        latents = torch.cat([result.latent for result in results])
        paths = yield from walk_program(family, family.sampling_scheduler(num_steps, latents), latents,
                                        Conditioning.cat(sources), "negative-prompt inversion", progress)
        for result, path in zip(results, paths, strict=True):
            result.reconstruction = path.clone()
    return results


def invert_latents(
    family: ModelFamily, x0: torch.Tensor, cond: Conditioning | torch.Tensor, num_steps: int, *,
    progress: Progress = False,
) -> torch.Tensor:
    """The DDIM inversion paths x*_0 .. x*_N of the latents ``x0`` (B, C, h, w) at guidance 1 with ``cond`` (one
    row per latent, or one for all): shape (B, N + 1, C, h, w)."""
    return run_program(family, walk_program(family, family.inversion_scheduler(num_steps, x0), x0,
                                            Conditioning.of(cond), "DDIM inversion", progress))


def walk_program(
    family: ModelFamily, scheduler, x: torch.Tensor, cond: Conditioning, stage: str, progress: Progress
) -> Program[torch.Tensor]:
    """Every latent of a walk along ``scheduler``'s timesteps at guidance 1 with ``cond`` (one row per latent of
    ``x``, or one for all), the start included: shape (B, N + 1, C, h, w)."""
    path = [x]
    for t in track(scheduler.timesteps, stage, progress):
        output = yield Call(x, t, cond)
        with torch.no_grad():
            x = scheduler.step(output, t, x).prev_sample
        path.append(x)
    latents = torch.stack(path, dim=1)
    check_finite(latents, stage)
    return latents


def null_text_program(
    family: ModelFamily,
    trajectories: Sequence[torch.Tensor],
    conds: Sequence[Conditioning],
    empties: Sequence[Conditioning],
    guidance_scale: float,
    inner_steps: int = 10,
    early_stop: float = 1e-5,
    *,
    progress: Progress = False,
) -> Program[list[tuple[Conditioning, torch.Tensor, list[float]]]]:
    """Optimise one unconditional conditioning per sampling step and image so that guided sampling retraces each
    image's ``trajectories`` (its DDIM inversion path), as one model batch per inner step (a program,
    :mod:`.programs`).

    Returns, per image, the conditionings (batch N), the guided reconstruction path in sampling order
    (N + 1, C, h, w) and the last inner loss of each step. ``u`` starts at ``empties`` (tau("")) and each step
    starts from the previous step's result; Adam's learning rate decays as 1e-2 * (1 - i / 100).

    Each image has its own leaves (one per tensor of its conditioning) in one Adam optimiser, and its own loss
    term (its own mean, summed). The early stop is per image: an image whose loss is low enough leaves the batch
    for the rest of that sampling step, so it gets no gradient and Adam skips it (its moments untouched), exactly
    as its run alone breaks out of the inner loop. Results in input order.

    The conditional prediction of step i does not get a call of its own: it rides along the step's first call as
    rows after the unconditional ones (the first inner iteration's, or with no inner iteration the call that
    advances x), as classifier-free guidance batches its two branches."""
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
        leaves = [u.leaves() for u in unconds]  # nulls[i - 1] must not move with them
        optimizer = torch.optim.Adam([p for u in leaves for p in u.parameters()], lr=1e-2 * (1.0 - i / 100.0))
        values = [float("nan")] * count
        active = list(range(count))
        out_cond = None
        for j in range(inner_steps):
            if not active:
                break
            rows = _rows(active, count)
            out_uncond, out_cond = yield from _unconditional_and_conditional(
                x[rows], t, Conditioning.cat([leaves[r] for r in active]), x, cond, out_cond, grad=True)
            out = guided(out_uncond, out_cond[rows], guidance_scale)
            stepped = scheduler.step(out, t, x[rows]).prev_sample
            per_image = torch.stack([F.mse_loss(stepped[k : k + 1], target[r : r + 1]) for k, r in enumerate(active)])
            optimizer.zero_grad(set_to_none=True)
            yield Loss(per_image.sum() * loss_scale)
            optimizer.step()
            bar.update(len(active))
            for r, value in zip(list(active), per_image.detach().cpu().tolist(), strict=True):  # one read per call
                values[r] = value
                if value < early_stop + i * 2e-5:
                    bar.update(inner_steps - j - 1)
                    active.remove(r)
        unconds = [u.detach() for u in leaves]
        out_uncond, out_cond = yield from _unconditional_and_conditional(x, t, Conditioning.cat(unconds), x, cond,
                                                                          out_cond)
        with torch.no_grad():
            x = scheduler.step(guided(out_uncond, out_cond, guidance_scale), t, x).prev_sample
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


def _unconditional_and_conditional(
    x_uncond: torch.Tensor, t, uncond: Conditioning, x: torch.Tensor, cond: Conditioning,
    out_cond: torch.Tensor | None, grad: bool = False,
) -> Program[tuple[torch.Tensor, torch.Tensor]]:
    """The unconditional prediction for ``x_uncond`` and the step's conditional one for ``x``: one call, the
    conditional rows after the unconditional ones when the step has not computed them yet (``out_cond`` None)."""
    if out_cond is not None:
        return (yield Call(x_uncond, t, uncond, grad=grad)), out_cond
    both = yield Call(torch.cat([x_uncond, x]), t, Conditioning.cat([uncond.expand(x_uncond.shape[0]),
                                                                     cond.expand(x.shape[0])]), grad=grad)
    return both[: x_uncond.shape[0]], both[x_uncond.shape[0] :].detach()


def _rows(active: list[int], count: int) -> slice | list[int]:
    """The batch rows of the images still optimising: every row as a slice (no copy) when none has stopped."""
    return slice(None) if len(active) == count else active
