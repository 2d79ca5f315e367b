"""Rectified-flow schedules for the stages: Euler sampling on a model's own sigma schedule, its inverse, and the
training-time timestep distribution (SD3, FLUX).

With ``x_s = (1 - s) x0 + s noise`` a flow model predicts the velocity ``v = noise - x0`` (``dx/ds``). Sampling
walks the sigmas ``s_0 > s_1 > ... > s_N = 0`` (the scheduler's shifted schedule) with Euler steps
``x_{i+1} = x_i + (s_{i+1} - s_i) v(x_i, s_i)``: exactly diffusers' ``FlowMatchEulerDiscreteScheduler.step``.

That scheduler keeps a step counter and so cannot take the same step twice, which null-text inversion does in
its inner loop; :class:`FlowEuler` is the same arithmetic, stateless: a step is found from its timestep. Its
:meth:`FlowEuler.inverse` walks the sampler's steps backwards, image to noise, as DDIM inversion does: step i is
undone from ``x_{i+1}`` with the velocity the sampler would use there, evaluated at the point at hand,
``x_i = x_{i+1} - (s_{i+1} - s_i) v(x_{i+1}, s_i)`` (the same first-order approximation
``v(x_i, s_i) ~ v(x_{i+1}, s_i)``; the model is only ever queried at the sampler's own timesteps).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class FlowStep:
    """What a scheduler step returns, named as diffusers names it."""

    prev_sample: torch.Tensor


class FlowEuler:
    """Euler steps of a flow ODE between given sigmas, addressed by timestep (``timesteps[i]`` moves the latent
    from ``sigma_from[i]`` to ``sigma_to[i]``); the same ``timesteps`` / ``step(out, t, x).prev_sample`` interface
    as diffusers' schedulers, without their step counter."""

    init_noise_sigma = 1.0  # flow sampling starts from plain standard-normal latents
    order = 1

    def __init__(self, timesteps: torch.Tensor, sigma_from: torch.Tensor, sigma_to: torch.Tensor):
        self.timesteps = timesteps
        self.sigma_from = sigma_from
        self.sigma_to = sigma_to

    @classmethod
    def from_diffusers(cls, scheduler) -> FlowEuler:
        """The sampling walk of a ``FlowMatchEulerDiscreteScheduler`` whose timesteps are set."""
        sigmas = scheduler.sigmas.float().cpu()
        return cls(scheduler.timesteps.float().cpu(), sigmas[:-1], sigmas[1:])

    def inverse(self) -> FlowEuler:
        """The walk from the image to noise: the sampler's steps in reverse order, each one undone."""
        return FlowEuler(self.timesteps.flip(0), self.sigma_to.flip(0), self.sigma_from.flip(0))

    def index(self, timestep) -> int:
        """Which step ``timestep`` (one of :attr:`timesteps`, any device) names."""
        t = torch.as_tensor(timestep, dtype=torch.float32).detach().cpu().reshape(-1)[0]
        return int(torch.argmin((self.timesteps - t).abs()))

    def sigma(self, timestep) -> float:
        """The sigma the step named ``timestep`` starts from."""
        return float(self.sigma_from[self.index(timestep)])

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor) -> FlowStep:
        """``x + (sigma_to - sigma_from) v`` in fp32 (diffusers upcasts the sample likewise)."""
        i = self.index(timestep)
        dt = self.sigma_to[i] - self.sigma_from[i]
        return FlowStep(sample.float() + dt.to(sample.device) * model_output.float())


def logit_normal_timestep(
    training_timesteps: torch.Tensor, generator: torch.Generator, mean: float = 0.0, std: float = 1.0
) -> torch.Tensor:
    """One training timestep as SD3 was trained (diffusers' SD3 training scripts, ``weighting_scheme
    logit_normal``): ``u = sigmoid(N(mean, std))`` picks index ``floor(u * T)`` of the full, shifted training
    schedule (``training_timesteps``, noisiest first, as a fresh scheduler holds them). Shape (1,), CPU."""
    u = torch.sigmoid(torch.normal(mean, std, size=(1,), generator=generator))
    index = (u * len(training_timesteps)).long().clamp(max=len(training_timesteps) - 1)
    return training_timesteps.float().cpu()[index]


def flow_training_example(
    x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``((1 - s) x0 + s noise, noise - x0)``: the flow-matching loss's input and target at sigmas ``s`` (B,)."""
    s = sigmas.to(x0.device, torch.float32).reshape(-1, *([1] * (x0.dim() - 1)))
    return (1 - s) * x0 + s * noise, noise - x0
