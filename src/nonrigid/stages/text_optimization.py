"""Stage A: text optimization (Imagic; method.md Eq. 2).

Starting from ``e_tgt = tau(target)``, Adam moves the conditioning so that the frozen denoiser reconstructs noisy
versions of the input image well under the model's own training loss: ``min_e E_{t, noise} || f_theta(x_t, t, e)
- target ||^2`` (for SD 1.x the target is the noise). Only the conditioning is a leaf; every network weight is
frozen, so the backward pass computes input gradients only. Every tensor of the conditioning is optimised (SD 1.x
has one, the token embeddings).

Several seeds are optimised as one batch of independent conditionings: each seed has its own generator, its own
rows and its own loss term (the total is a sum, so no row's gradient depends on another's), so a batched run
equals the seeds run one by one. Rows need not share an image or a prompt (:func:`optimize_texts`): several
images' optimizations run as one batch the same way — Adam is elementwise, so one optimiser over independent rows
moves each row as its own would. Each row's loss is its own mean, never divided by the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from ..errors import NonFiniteError, check_finite
from ..models.family import Conditioning, ModelFamily
from ..progress import Progress, track
from .programs import Call, Loss, Program, run_program


@dataclass
class TextOptimization:
    """Result of stage A for one seed. Conditionings are fp32, batch 1, on the model's device."""

    target_prompt: str
    target: Conditioning
    optimized: Conditioning
    losses: list[float]
    seed: int
    steps: int
    lr: float

    def __post_init__(self) -> None:
        self.target, self.optimized = Conditioning.of(self.target), Conditioning.of(self.optimized)

    @property
    def target_embedding(self) -> torch.Tensor:
        """``tau(target)``'s token embeddings (1, 77, D)."""
        return self.target.tokens

    @property
    def optimized_embedding(self) -> torch.Tensor:
        """The optimized token embeddings (1, 77, D)."""
        return self.optimized.tokens

    def to_record(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {**self.target.to_record("target"), **self.optimized.to_record("optimized")}
        meta = {"target_prompt": self.target_prompt, "losses": self.losses, "seed": self.seed,
                "steps": self.steps, "lr": self.lr}
        return tensors, meta

    @classmethod
    def from_record(cls, tensors: dict[str, torch.Tensor], meta: dict) -> TextOptimization:
        return cls(
            target_prompt=meta["target_prompt"],
            target=Conditioning.from_record(tensors, "target"),
            optimized=Conditioning.from_record(tensors, "optimized"),
            losses=list(meta["losses"]),
            seed=int(meta["seed"]),
            steps=int(meta["steps"]),
            lr=float(meta["lr"]),
        )


@dataclass(frozen=True)
class TextJob:
    """One row of a text-optimization batch: an image, the prompt to optimise toward it, the row's seed."""

    image: Image.Image
    target_prompt: str
    seed: int


def optimize_texts(
    family: ModelFamily,
    jobs: Sequence[TextJob],
    steps: int = 200,
    lr: float = 1e-3,
    *,
    progress: Progress = False,
) -> list[TextOptimization]:
    """Stage A for (image, prompt, seed) rows as one model batch per step, results in ``jobs`` order (the paper:
    200 Adam steps at lr 1e-3). A row's seed fixes the latent sample drawn from the VAE posterior and every step's
    timestep and noise.

    Each row equals its run alone up to the last bits of batched convolutions (~1e-6; see tests/test_batching.py).
    """
    return run_program(family, text_optimization_program(family, jobs, steps, lr, progress=progress))


def text_optimization_program(
    family: ModelFamily,
    jobs: Sequence[TextJob],
    steps: int = 200,
    lr: float = 1e-3,
    *,
    progress: Progress = False,
) -> Program[list[TextOptimization]]:
    """:func:`optimize_texts` as a program (:mod:`.programs`): each step one call of its rows and one loss, so it
    can ride along another stage's model calls."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    device = family.device
    generators = [torch.Generator().manual_seed(int(job.seed)) for job in jobs]
    with torch.no_grad():  # the encoders are never trained: no graph, whatever their weights' requires_grad says
        targets = {p: family.encode_prompt(p) for p in dict.fromkeys(job.target_prompt for job in jobs)}
        x0 = torch.cat([family.encode_image(job.image, generator=g) for job, g in zip(jobs, generators, strict=True)])
    embedding = Conditioning.cat([targets[job.target_prompt] for job in jobs]).leaves()
    optimizer = torch.optim.Adam(embedding.parameters(), lr=lr)
    # Half-precision backward passes underflow on the tiny gradients of a mean loss; Adam is invariant to a
    # constant factor on the loss (up to its eps), so half precision back-propagates the per-element sum instead.
    loss_scale = float(x0[0].numel()) if family.dtype == torch.float16 else 1.0
    history: list[torch.Tensor] = []  # each step's per-row losses, read back once at the end (no sync per step)
    for _ in track(range(steps), "text optimization", progress):
        timesteps, noise = _draw(family, generators, x0.shape[1:])
        noisy, wanted = family.training_example(x0, noise.to(device), timesteps.to(device))
        output = yield Call(noisy, timesteps.to(device), embedding, grad=True)
        per_row = ((output - wanted) ** 2).mean(dim=(1, 2, 3))
        optimizer.zero_grad(set_to_none=True)
        yield Loss(per_row.sum() * loss_scale)
        optimizer.step()
        history.append(per_row.detach())
    losses = torch.stack(history).T.cpu() if history else torch.zeros(len(jobs), 0)
    check_finite(losses, "text optimization")
    optimized = embedding.detach()
    if not optimized.is_finite():
        raise NonFiniteError("text optimization")
    return [
        TextOptimization(job.target_prompt, targets[job.target_prompt], optimized.rows(slice(row, row + 1)).clone(),
                         losses[row].tolist(), int(job.seed), steps, lr)
        for row, job in enumerate(jobs)
    ]


def _draw(
    family: ModelFamily, generators: list[torch.Generator], shape: torch.Size
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each seed's own timestep and noise for one step, drawn on the CPU so results do not depend on the device."""
    timesteps = torch.cat([family.draw_training_timestep(g) for g in generators])
    noise = torch.stack([torch.randn(shape, generator=g) for g in generators])
    return timesteps, noise
