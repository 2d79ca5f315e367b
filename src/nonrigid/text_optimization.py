"""Stage A: text optimization (Imagic; method.md Eq. 2).

Starting from ``e_tgt = tau(target)``, Adam moves the embedding so that the frozen UNet denoises noisy versions
of the input image well: ``min_e E_{t, noise} || eps_theta(x_t, t, e) - noise ||^2``. Only the embedding is a
leaf; every network weight is frozen, so the backward pass computes input gradients only.

Several seeds are optimised as one batch of independent embeddings: each seed has its own generator, its own
embedding row and its own loss term (the total is a sum, so no row's gradient depends on another's), so a batched
run equals the seeds run one by one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from tqdm.auto import tqdm

from .diffusion import check_finite, encode_image, encode_text, sampling_scheduler


@dataclass
class TextOptimization:
    """Result of stage A for one seed. Embeddings are fp32, shape (1, 77, D), on the pipeline's device."""

    target_prompt: str
    target_embedding: torch.Tensor
    optimized_embedding: torch.Tensor
    losses: list[float]
    seed: int
    steps: int
    lr: float
    extra: dict = field(default_factory=dict)

    def to_record(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {"target_embedding": self.target_embedding, "optimized_embedding": self.optimized_embedding}
        meta = {"target_prompt": self.target_prompt, "losses": self.losses, "seed": self.seed,
                "steps": self.steps, "lr": self.lr}
        return tensors, meta

    @classmethod
    def from_record(cls, tensors: dict[str, torch.Tensor], meta: dict) -> TextOptimization:
        return cls(
            target_prompt=meta["target_prompt"],
            target_embedding=tensors["target_embedding"],
            optimized_embedding=tensors["optimized_embedding"],
            losses=list(meta["losses"]),
            seed=int(meta["seed"]),
            steps=int(meta["steps"]),
            lr=float(meta["lr"]),
        )


def optimize_text(
    pipe: StableDiffusionPipeline,
    image: Image.Image,
    target_prompt: str,
    steps: int = 200,
    lr: float = 1e-3,
    seed: int = 0,
    *,
    progress: bool = False,
) -> TextOptimization:
    """Optimise ``tau(target_prompt)`` toward ``image`` for ``steps`` Adam steps (the paper: 200, lr 1e-3)."""
    return optimize_text_batch(pipe, image, target_prompt, steps=steps, lr=lr, seeds=[seed], progress=progress)[0]


def optimize_text_batch(
    pipe: StableDiffusionPipeline,
    image: Image.Image,
    target_prompt: str,
    steps: int = 200,
    lr: float = 1e-3,
    seeds: Sequence[int] = (0,),
    *,
    progress: bool = False,
) -> list[TextOptimization]:
    """:func:`optimize_text` for several seeds at once, one UNet batch per step; same results as one by one.

    A seed fixes the latent sample drawn from the VAE posterior and every step's timestep and noise.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    unet = pipe.unet
    device = unet.device
    target = encode_text(pipe, target_prompt)
    generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
    x0 = torch.cat([encode_image(pipe, image, generator=g) for g in generators])
    embedding = target.repeat(len(seeds), 1, 1).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([embedding], lr=lr)
    scheduler = sampling_scheduler(pipe, 1)  # only its add_noise and training schedule are used
    num_train = scheduler.config.num_train_timesteps
    # Half-precision backward passes underflow on the tiny gradients of a mean loss; Adam is invariant to a
    # constant factor on the loss (up to its eps), so half precision back-propagates the per-element sum instead.
    loss_scale = float(x0[0].numel()) if unet.dtype == torch.float16 else 1.0
    losses: list[list[float]] = [[] for _ in seeds]
    for _ in tqdm(range(steps), desc="text optimization", disable=not progress, leave=False):
        timesteps, noise = _draw(generators, x0.shape[1:], num_train)
        timesteps, noise = timesteps.to(device), noise.to(device)
        noisy = scheduler.add_noise(x0, noise, timesteps)
        eps = unet(noisy.to(unet.dtype), timesteps, encoder_hidden_states=embedding.to(unet.dtype)).sample.float()
        per_seed = ((eps - noise) ** 2).mean(dim=(1, 2, 3))
        check_finite(per_seed.detach(), "text optimization")
        optimizer.zero_grad(set_to_none=True)
        (per_seed.sum() * loss_scale).backward()
        optimizer.step()
        for row, value in enumerate(per_seed.detach().cpu().tolist()):
            losses[row].append(value)
    optimized = embedding.detach()
    check_finite(optimized, "text optimization")
    return [
        TextOptimization(target_prompt, target, optimized[row : row + 1].clone(), losses[row], int(seed), steps, lr)
        for row, seed in enumerate(seeds)
    ]


def _draw(generators: list[torch.Generator], shape: torch.Size, num_train: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each seed's own timestep and noise for one step, drawn on the CPU so results do not depend on the device."""
    timesteps = torch.cat([torch.randint(0, num_train, (1,), generator=g) for g in generators])
    noise = torch.stack([torch.randn(shape, generator=g) for g in generators])
    return timesteps, noise
