"""The model-family seam: everything the stages ask of a text-to-image model, in one small interface.

The stages (text optimization, latent inversion, timestep-aware sampling) and the methods built on them never
call a UNet, a text encoder, a VAE or a scheduler themselves. They ask a :class:`ModelFamily` to

- turn a prompt into a :class:`Conditioning` (what text optimization optimises and eta interpolates) and give the
  unconditional conditioning (what null-text inversion optimises per step),
- predict the model output for a batch of latents under classifier-free guidance (:meth:`ModelFamily.predict`),
- step a latent along the sampling schedule and back along the inversion schedule for the model's prediction
  type (:meth:`ModelFamily.sampling_scheduler`, :meth:`ModelFamily.inversion_scheduler`),
- give a training example of the model's own loss (:meth:`ModelFamily.training_example`),
- encode an image into latents and decode latents into images.

A family is one module (``models/sd.py`` is the first: Stable Diffusion 1.x) registered in
``models/registry.py``; :func:`nonrigid.models.registry.family_of` picks the one that matches a loaded pipeline.
Adding a model family means adding one module, not editing the stages.

Precision rule: the frozen networks may run in half precision, but everything the stages optimise or accumulate
(conditionings, losses, latents, scheduler arithmetic) is fp32. A family casts at its boundary: what it returns is
fp32, what it is given may be anything.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image


@dataclass(frozen=True)
class Conditioning:
    """A prompt as the denoiser sees it: named tensors that share their first (batch) dimension.

    SD 1.x and 2.x use one tensor, ``tokens`` (B, 77, D); SDXL would add its pooled embedding, SD3 and FLUX their
    pooled CLIP embedding. Text optimization optimises every tensor of it, eta interpolates every tensor, null-text
    inversion optimises every tensor of the unconditional one. Arithmetic is per tensor, in the given order.
    """

    tensors: dict[str, torch.Tensor]

    @classmethod
    def of(cls, value: Conditioning | torch.Tensor) -> Conditioning:
        """A conditioning as is, or a bare tensor as the ``tokens`` of a single-tensor conditioning."""
        return value if isinstance(value, Conditioning) else cls({"tokens": value})

    @property
    def tokens(self) -> torch.Tensor:
        """The token embeddings (B, L, D): the tensor every family has."""
        return self.tensors["tokens"]

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Conditioning:
        return Conditioning({name: fn(t) for name, t in self.tensors.items()})

    def rows(self, index: slice | torch.Tensor | Sequence[int]) -> Conditioning:
        """The rows ``index`` of every tensor (a slice keeps views; a list or tensor of indices copies)."""
        return self.map(lambda t: t[index])

    def expand(self, batch: int) -> Conditioning:
        """A single-row conditioning broadcast to ``batch`` rows (others are returned unchanged)."""
        if self.batch != 1 or batch == 1:
            return self
        return self.map(lambda t: t.expand(batch, *t.shape[1:]))

    def repeat(self, count: int) -> Conditioning:
        return self.map(lambda t: t.repeat(count, *([1] * (t.dim() - 1))))

    def leaves(self) -> Conditioning:
        """An fp32 copy whose tensors are leaves that require gradients (what an optimizer moves)."""
        return self.map(lambda t: t.detach().float().clone().requires_grad_(True))

    def parameters(self) -> list[torch.Tensor]:
        return list(self.tensors.values())

    def detach(self) -> Conditioning:
        return self.map(torch.Tensor.detach)

    def clone(self) -> Conditioning:
        return self.map(torch.Tensor.clone)

    def to(self, *args: Any, **kwargs: Any) -> Conditioning:
        return self.map(lambda t: t.to(*args, **kwargs))

    def is_finite(self) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in self.tensors.values())

    @staticmethod
    def cat(items: Iterable[Conditioning]) -> Conditioning:
        items = list(items)
        return Conditioning({name: torch.cat([c.tensors[name] for c in items]) for name in items[0].tensors})

    def to_record(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors named ``prefix.name``, for a cache entry."""
        return {f"{prefix}.{name}": t for name, t in self.tensors.items()}

    @classmethod
    def from_record(cls, tensors: dict[str, torch.Tensor], prefix: str) -> Conditioning | None:
        found = {name.removeprefix(f"{prefix}."): t for name, t in tensors.items() if name.startswith(f"{prefix}.")}
        return cls(found) if found else None


def mix(target: Conditioning, optimized: Conditioning, eta: float) -> Conditioning:
    """``eta * target + (1 - eta) * optimized``, tensor by tensor (method.md Eq. 3: eta 0 is the optimized one)."""
    return Conditioning({name: eta * target.tensors[name] + (1.0 - eta) * optimized.tensors[name]
                         for name in target.tensors})


def doubled(timestep: torch.Tensor | int, batch: int) -> torch.Tensor | int:
    """The timestep for a classifier-free guidance call of ``2 * batch`` rows (unconditional rows first): one
    timestep per row given (a batch of latents at different noise levels, as DDS across images) is repeated for
    both halves; a single timestep serves every row as it is."""
    if torch.is_tensor(timestep) and timestep.dim() == 1 and timestep.numel() == batch > 1:
        return torch.cat([timestep, timestep])
    return timestep


def guided(uncond_output: torch.Tensor, cond_output: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``out_u + w (out_c - out_u)``."""
    return uncond_output + guidance_scale * (cond_output - uncond_output)


@dataclass(frozen=True)
class FamilyDefaults:
    """What ``nonrigid edit --model X`` uses unless told otherwise: the model's native image side and its
    pipeline's classifier-free guidance scale (steps stay each method's own, 50 for the paper's method)."""

    size: int
    guidance_scale: float


class ModelFamily(ABC):
    """What the stages need of a model family, wrapped around a loaded diffusers pipeline (``self.pipe``).

    Implementations are thin: they translate these calls into the pipeline's own components and keep nothing of
    their own but values derived from it (a noise schedule), so making one per call
    (:func:`~nonrigid.models.registry.family_of`) costs nothing. ``denoiser`` replaces the pipeline's network for
    :meth:`predict` (Imagic predicts with its fine-tuned copy).
    """

    name: str = ""
    networks: tuple[str, ...] = ()  # the pipeline's networks (attribute names): frozen, moved and cast on loading
    network_name: str = "unet"  # the denoiser's attribute name (a UNet, or a transformer for flow models)
    default_guidance: float = 7.5
    # whether guidance combines a conditional and an unconditional branch (False: FLUX's distilled guidance, where
    # there is no null text for NTI or NPI and the plain inversion at the sampling guidance stands in for them)
    classifier_free: bool = True
    # the sampling steps a model is made for, where they differ from the methods' own defaults (None: theirs; FLUX
    # schnell, distilled for few steps: 4)
    default_steps: int | None = None
    # whether ``--low-memory`` parks the text encoders on the CPU between encodings: the flow families' T5-XXL
    # alone is 4.7 B parameters (9.5 GB in half precision), next to a transformer that needs the GPU
    parks_text_encoders: bool = False

    def __init__(self, pipe: Any, denoiser: Any = None):
        self.pipe = pipe
        self.denoiser = denoiser  # None: the pipeline's own; Imagic predicts with a fine-tuned copy

    @classmethod
    @abstractmethod
    def matches(cls, pipe: Any) -> bool:
        """Whether ``pipe`` is a pipeline of this family."""

    # ---- facts

    @property
    def device(self) -> torch.device:
        """Where the denoiser runs (tensors the stages make go there)."""
        return self.network.device

    @property
    def dtype(self) -> torch.dtype:
        """The denoiser's precision (half precision scales the stages' backward passes)."""
        return self.network.dtype

    @property
    @abstractmethod
    def latent_multiple(self) -> int:
        """Image sides must be a multiple of this."""

    @property
    def network(self) -> Any:
        """The pipeline's own denoiser (``pipe.unet``, ``pipe.transformer``): what is moved, cast, compiled."""
        return getattr(self.pipe, self.network_name)

    def modules(self) -> dict[str, Any]:
        """The pipeline's networks by attribute name, leaving out optional ones it was loaded without (SD3's T5)."""
        found = {name: getattr(self.pipe, name, None) for name in self.networks}
        return {name: module for name, module in found.items() if module is not None}

    def text_encoders(self) -> list[Any]:
        """The pipeline's text encoders that are loaded (``text_encoder``, ``text_encoder_2``, ...)."""
        return [module for name, module in self.modules().items() if name.startswith("text_encoder")]

    @contextmanager
    def text_encoders_on_device(self) -> Iterator[None]:
        """Text encoders parked off the denoiser's device (``--low-memory``: on the CPU) come onto it for one
        encoding and go back after it, so the prompt is encoded at the GPU's speed and the encoders hold no GPU
        memory while the denoiser works. Encoders already on the denoiser's device stay where they are."""
        parked = [(module, module.device) for module in self.text_encoders() if module.device != self.device]
        for module, _ in parked:
            module.to(self.device)
        try:
            yield
        finally:
            for module, home in parked:
                module.to(home)

    def adopt_scheduler(self, model: str) -> None:
        """Give the pipeline the scheduler configuration the stages expect, or refuse the model in one line
        (``model`` names it in the message). Called once on loading; the default keeps the model's own."""
        return None

    @property
    def defaults(self) -> FamilyDefaults:
        """The model's native size (its UNet's sample size in pixels) and its pipeline's guidance scale."""
        return FamilyDefaults(self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor, self.default_guidance)

    def initial_noise(self, size: int, generator: torch.Generator) -> torch.Tensor:
        """x_T for generating a ``size`` px image: standard normal latents drawn on the CPU (the same image on any
        device), fp32, on the model's device."""
        vae = self.pipe.vae
        side = size // self.pipe.vae_scale_factor
        return torch.randn((1, vae.config.latent_channels, side, side), generator=generator).to(self.device)

    def describe(self) -> str:
        """One line on what was detected (layout, prediction type, native size), for logs and records."""
        return f"{self.name}, {self.defaults.size} px"

    def noise_estimate(self, output: torch.Tensor, latents: torch.Tensor, timestep) -> torch.Tensor:
        """The noise estimate of a model output at ``latents`` (the output itself for noise predictors)."""
        return output

    def vae_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The precision the VAE is loaded in when the other networks use ``dtype``."""
        return dtype

    # ---- conditioning

    @abstractmethod
    def encode_prompt(self, prompt: str) -> Conditioning:
        """The prompt's conditioning (batch 1, fp32), warning when the encoder cuts the prompt."""

    def unconditional(self) -> Conditioning:
        """The conditioning of classifier-free guidance's unconditional branch (NTI's starting point)."""
        return self.encode_prompt("")

    # ---- the network

    @abstractmethod
    def predict(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor | int,
        cond: Conditioning | torch.Tensor,
        uncond: Conditioning | torch.Tensor | None = None,
        guidance_scale: float = 1.0,
    ) -> torch.Tensor:
        """The model output (noise, v or velocity, as the scheduler expects) for a batch of latents, fp32.

        ``cond`` has one row per latent or one row for all; with ``uncond`` and a scale other than 1, guided by
        :func:`guided` (at guidance 1 the unconditional branch cancels and is not evaluated).
        """

    # ---- schedules

    @abstractmethod
    def sampling_scheduler(self, num_steps: int, latents: torch.Tensor | None = None) -> Any:
        """A fresh scheduler set to ``num_steps`` sampling steps: ``timesteps`` (noisiest first) and
        ``step(model_output, t, x).prev_sample``. Never the pipeline's own object, which stays untouched.
        ``latents``: what it will step (FLUX shifts its schedule by the image's size); None: the native size."""

    @abstractmethod
    def inversion_scheduler(self, num_steps: int, latents: torch.Tensor | None = None) -> Any:
        """A fresh scheduler that walks the sampler's update backwards (image to noise), same interface."""

    @abstractmethod
    def draw_training_timestep(self, generator: torch.Generator) -> torch.Tensor:
        """One timestep (shape (1,), on the CPU) drawn as the model was trained."""

    @abstractmethod
    def training_example(
        self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(noisy latents, regression target)`` of the model's own training loss at ``timesteps``."""

    # ---- latents

    @abstractmethod
    def encode_image(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        """The image's latent (1, C, h, w), fp32: the posterior mean, or a sample drawn with ``generator``."""

    @abstractmethod
    def decode(self, latents: torch.Tensor, batch_size: int = 8) -> list[Image.Image]:
        """Latents to RGB images, a few at a time."""
