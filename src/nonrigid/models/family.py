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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from PIL import Image

from ..errors import UsageError
from .capabilities import (
    ATTENTION_MAPS,
    CLASSIFIER_FREE,
    DDPM,
    FLOW,
    LEDITS,
    NO_GUIDANCE,
    TEXT_CONDITIONING,
    TRANSFORMER,
    UNET,
)


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
    """A loaded model as the stages see it: a diffusers pipeline (``self.pipe``) behind the seam, and what the
    family is and can do, declared here so that loading, the method catalogue, the methods and the page ask the
    family instead of matching names.

    One instance per loaded model: :func:`~nonrigid.models.loading.load_model` returns it, and it is the currency
    of every stage and method below the command line, the page and the public API (which resolve it once, with
    :func:`~nonrigid.models.registry.family_of`). It keeps nothing of its own but values derived from the
    pipeline. ``denoiser`` replaces the pipeline's network for :meth:`predict` (Imagic predicts with its fine-tuned
    copy, :meth:`with_denoiser`).

    Adding a family: one module with a subclass that fills in the declarations below and the seam's calls, and one
    line in ``models/registry.FAMILIES``.
    """

    # ---- what the family is (declarations)
    name: str = ""  # short id, recorded with every edit
    label: str = ""  # what the family covers, for people ("SDXL base-layout models")
    pipeline_classes: tuple[type, ...] = ()  # its diffusers pipelines: a model_index.json naming one loads here
    # diffusers' model types (``infer_diffusers_model_type``) of the family's single-file checkpoints
    single_file_types: tuple[str, ...] = ()
    # whether a single file may hold the denoiser alone, its other components read from a config (FLUX, SD3)
    file_lacks_components: bool = False
    # built-in random-weight models of this layout: name -> builder(seed) -> pipeline (no download; output noise)
    tiny_models: ClassVar[Mapping[str, Callable[[int], Any]]] = {}
    networks: tuple[str, ...] = ()  # the pipeline's networks (attribute names): frozen, moved and cast on loading
    network_name: str = "unet"  # the denoiser's attribute name (a UNet, or a transformer for flow models)
    attention_maps: bool = False  # cross-attention maps of the prompt's words can be read (LEDITS++'s mask)
    ledits: bool = False  # diffusers ships a LEDITS++ pipeline for it (:meth:`ledits_editor`)
    default_guidance: float = 7.5
    # whether ``--low-memory`` parks the text encoders on the CPU between encodings: the flow families' T5-XXL
    # alone is 4.7 B parameters (9.5 GB in half precision), next to a transformer that needs the GPU
    parks_text_encoders: bool = False
    # whether the prompt has a conditioning of its own, without the image (the stages' currency): every
    # text-to-image family; not an instruction editor whose prompt encoder reads the image (Qwen-Image-Edit)
    text_conditioning: bool = True
    # what the model is for besides the stages' calls (:mod:`~nonrigid.models.capabilities`: "kontext", ...)
    editor_capabilities: tuple[str, ...] = ()
    # the precision of the frozen networks on CUDA when none is asked for: fp16, or bf16 where the model cards
    # run the model in bf16 (the instruction editors)
    cuda_dtype: torch.dtype = torch.float16
    # whether ``--low-memory`` hands the pipeline to diffusers' model CPU offload (each network on the GPU only
    # while it runs), as the large instruction editors' users do, instead of the stages' own memory settings
    cpu_offload: bool = False
    # diffusers' single-file model types (``single_file_types`` of another family, whose keys they share) this
    # family reads when a ``config`` of this family says so: a FLUX.1 Kontext file has FLUX.1-dev's keys
    config_file_types: tuple[str, ...] = ()
    # why no single file loads into this family (one line), where diffusers cannot read one; "" when it can
    single_file_refusal: str = ""
    # whether the denoiser's and VAE's weights can take the channels-last layout (2-D convolutions; not a causal
    # 3-D VAE such as Qwen-Image's, whose 5-D kernels mixed with 4-D ones have no single such layout)
    channels_last_layout: bool = True

    def __init__(self, pipe: Any, denoiser: Any = None):
        self.pipe = pipe
        self.denoiser = denoiser  # None: the pipeline's own; Imagic predicts with a fine-tuned copy

    def with_denoiser(self, denoiser: Any) -> ModelFamily:
        """The same model predicting with ``denoiser`` (a copy of the network of the same layout)."""
        return type(self)(self.pipe, denoiser=denoiser)

    @property
    @abstractmethod
    def prediction(self) -> str:
        """What the denoiser predicts: "epsilon", "v" or "flow" (:mod:`~nonrigid.models.capabilities`)."""

    @property
    def guidance(self) -> str:
        """How guidance works: "classifier-free" (two branches), "distilled" (a value fed to the denoiser) or
        "none" (a model distilled for guidance-free sampling)."""
        return CLASSIFIER_FREE

    @property
    def classifier_free(self) -> bool:
        """Whether guidance has an unconditional branch (False: no null text for NTI or NPI; the plain inversion
        at the sampling guidance stands in for them)."""
        return self.guidance == CLASSIFIER_FREE

    @property
    def default_steps(self) -> int | None:
        """The sampling steps the model is made for, where they differ from the methods' own (None: theirs)."""
        return None

    def capabilities(self) -> frozenset[str]:
        """Everything a method may require of a model (:mod:`~nonrigid.models.capabilities`)."""
        found = {UNET if self.network_name == "unet" else TRANSFORMER, self.prediction}
        found |= {DDPM} if self.prediction != FLOW else set()
        found |= {self.guidance} if self.guidance != NO_GUIDANCE else set()
        found |= {ATTENTION_MAPS} if self.attention_maps else set()
        found |= {LEDITS} if self.ledits else set()
        found |= {TEXT_CONDITIONING} if self.text_conditioning else set()
        return frozenset(found | set(self.editor_capabilities))

    @classmethod
    def pipeline_kwargs(cls, t5: bool = True) -> dict[str, Any]:
        """Extra constructor arguments of ``from_pretrained`` / ``from_single_file`` (SD: no safety checker)."""
        return {}

    # ---- single files (families whose files may lack components, ``file_lacks_components``)

    @classmethod
    def absent_from_file(cls, shapes: Mapping[str, tuple[int, ...]]) -> tuple[str, ...]:
        """Components whose weights a single file of this family lacks (read from its config instead)."""
        return ()

    @classmethod
    def check_file(cls, path: Any, shapes: Mapping[str, tuple[int, ...]], source: str) -> None:
        """Refuse, in one line, a file whose denoiser does not match the config ``source`` (block counts)."""
        return None

    @classmethod
    def file_denoiser(cls, path: Any, shapes: Mapping[str, tuple[int, ...]], source: str) -> Any:
        """The denoiser read from the file by the project's own converter where diffusers' cannot (None: let
        diffusers read it)."""
        return None

    def ledits_editor(self, scheduler: Any) -> Any:
        """diffusers' LEDITS++ pipeline on this model's modules with ``scheduler`` (families with ``ledits``)."""
        raise UsageError(f"diffusers ships no LEDITS++ pipeline for {self.describe()}")

    @classmethod
    def matches(cls, pipe: Any) -> bool:
        """Whether ``pipe`` is a pipeline of this family (an instance of one of its pipeline classes)."""
        return isinstance(pipe, cls.pipeline_classes)

    # ---- facts

    @property
    def device(self) -> torch.device:
        """Where the denoiser runs (tensors the stages make go there): under diffusers' model CPU offload, the
        device its hooks bring each network to when it runs (the network itself waits on the CPU)."""
        if hasattr(self.network, "_hf_hook"):
            return self.pipe._execution_device
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
        parked = [(module, module.device) for module in self.text_encoders()
                  if module.device != self.device and not hasattr(module, "_hf_hook")]  # offload moves those
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

    def latent_shape(self, width: int, height: int) -> tuple[int, int, int, int]:
        """The (1, C, h, w) latent of a ``width`` x ``height`` image (the VAE's channels: FLUX packs them only
        inside :meth:`predict`)."""
        side = self.pipe.vae_scale_factor
        return (1, self.pipe.vae.config.latent_channels, height // side, width // side)

    def initial_noise(self, size: int, generator: torch.Generator) -> torch.Tensor:
        """x_T for generating a ``size`` px image: standard normal latents drawn on the CPU (the same image on any
        device), fp32, on the model's device."""
        return torch.randn(self.latent_shape(size, size), generator=generator).to(self.device)

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
