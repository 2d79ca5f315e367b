"""Qwen-Image-Edit, -2509 and -2511 as a model family: ``QwenImageEditPipeline`` (one reference image) and
``QwenImageEditPlusPipeline`` (2509 / 2511: a list of references), instruction editors whose prompt encoder,
Qwen2.5-VL, reads the image together with the text (:mod:`.edit_models` has their computation).

What this family is *not*: a text-to-image model behind the stages' seam. Its prompt has no conditioning of its own
(the encoder's states for the instruction are made with the image in the same sequence), so there is nothing for
text optimization to optimise, for eta to interpolate or for an inversion to be conditioned on without the image;
the family declares no "text-conditioning" capability, so every method built on the stages refuses it in one line,
and the stages' calls (``encode_prompt``, ``predict``, the schedulers, the training loss) raise a one-line error
saying so instead of computing something else. What it gives: what the ``qwen-edit`` method needs (the pipeline,
its VAE both ways) and what every family gives (description, defaults, modules, dtype, device, fingerprint,
loading).

- **Loading.** A diffusers folder or hub id whose ``model_index.json`` names either pipeline class; the Plus
  pipeline (2509, 2511) is told from its class, 2511 from its transformer's ``zero_cond_t``. No single files:
  diffusers 0.42 has no single-file loader for these pipelines nor for their VAE.
- **Defaults.** 1024 px (the pipelines' ``default_sample_size`` x 8: the output is about 1 MP), true CFG 4.0; 50
  steps for Edit, 40 for 2509 / 2511 (the model cards').
- **Memory.** bf16 on CUDA by default (the model cards'); ``low_memory`` hands the pipeline to diffusers' model CPU
  offload (``text_encoder -> transformer -> vae``): in bf16 the three networks are about 58 GB.
"""

from __future__ import annotations

from typing import ClassVar, NoReturn

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline, QwenImageEditPlusPipeline
from PIL import Image

from ..errors import UsageError
from . import edit_models as em
from .capabilities import CLASSIFIER_FREE, FLOW, NO_SINGLE_FILE, QWEN_EDIT
from .family import FamilyDefaults, ModelFamily
from .tiny_edit import build_tiny_qwen_edit, build_tiny_qwen_edit_plus

QWEN_EDIT_HUB_IDS = ("Qwen/Qwen-Image-Edit", "Qwen/Qwen-Image-Edit-2509", "Qwen/Qwen-Image-Edit-2511")
NO_TEXT_ONLY = ("Qwen-Image-Edit's prompt encoder reads the input image with the text, so a prompt has no "
                "conditioning of its own for the stages; its own method is qwen-edit")


class QwenImageEdit(ModelFamily):
    """Qwen-Image-Edit (one reference) and Qwen-Image-Edit-2509 / 2511 (the Plus pipeline)."""

    name = "qwen-image-edit"
    label = "Qwen-Image-Edit (-2509, -2511)"
    pipeline_classes = (QwenImageEditPipeline, QwenImageEditPlusPipeline)
    tiny_models: ClassVar[dict] = {
        "tiny-qwen-edit": lambda seed: _small(build_tiny_qwen_edit(seed)),
        "tiny-qwen-edit-plus": lambda seed: _small(build_tiny_qwen_edit_plus(seed)),
    }
    networks = ("transformer", "vae", "text_encoder")
    network_name = "transformer"
    default_guidance = em.QWEN_TRUE_CFG_SCALE
    text_conditioning = False
    editor_capabilities = (QWEN_EDIT,)
    cuda_dtype = torch.bfloat16
    cpu_offload = True
    single_file_refusal = NO_SINGLE_FILE[QWEN_EDIT]
    channels_last_layout = False  # its VAE is causal 3-D

    @property
    def prediction(self) -> str:
        return FLOW

    @property
    def guidance(self) -> str:
        """True classifier-free guidance against a negative prompt (the pipelines' ``true_cfg_scale``)."""
        return CLASSIFIER_FREE

    @property
    def plus(self) -> bool:
        """Whether this is the Plus pipeline (2509, 2511: several references, smaller copies for the encoder)."""
        return isinstance(self.pipe, QwenImageEditPlusPipeline)

    @property
    def version(self) -> str:
        """"Edit", "2509" (Plus without ``zero_cond_t``) or "2511" (Plus with it)."""
        if not self.plus:
            return "Edit"
        return "2511" if self.pipe.transformer.config.get("zero_cond_t", False) else "2509"

    @property
    def default_steps(self) -> int:
        """The model cards' steps: 50 for Qwen-Image-Edit, 40 for 2509 and 2511."""
        return 40 if self.plus else 50

    @property
    def latent_multiple(self) -> int:
        """The VAE's factor times the 2x2 packing."""
        return self.pipe.vae_scale_factor * 2

    @property
    def defaults(self) -> FamilyDefaults:
        """The pipelines' default size (``default_sample_size`` latents: 1024 px, about the 1 MP they work at) and
        true CFG scale."""
        return FamilyDefaults(self.pipe.default_sample_size * self.pipe.vae_scale_factor, self.default_guidance)

    def describe(self) -> str:
        config = self.pipe.transformer.config
        return (f"Qwen-Image-Edit layout ({self.version}, {type(self.pipe).__name__}), {config.num_layers} "
                f"transformer layers, true CFG, flow (velocity) prediction, {self.defaults.size} px")

    def adopt_scheduler(self, model: str) -> None:
        """Keep the model's flow-matching schedule (dynamic shift, ``shift_terminal``)."""
        if not isinstance(self.pipe.scheduler, FlowMatchEulerDiscreteScheduler):
            self.pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config)

    def latent_shape(self, width: int, height: int) -> tuple[int, int, int, int]:
        side = self.pipe.vae_scale_factor
        return (1, self.pipe.vae.config.z_dim, height // side, width // side)

    # ---- latents: the VAE both ways, as the pipelines use it

    @torch.no_grad()
    def encode_image(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        """The image's normalised latent (1, 16, h, w), fp32: the posterior's mode (the pipelines' choice; a
        ``generator`` is not used)."""
        processor = self.pipe.image_processor
        pixels = processor.preprocess(image, image.height, image.width)
        return em.qwen_encode_image(self.pipe.vae, pixels).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = 8) -> list[Image.Image]:
        """Normalised latents to PIL images as the pipelines decode them, ``batch_size`` at a time."""
        images: list[Image.Image] = []
        for chunk in latents.split(max(1, batch_size)):
            images.extend(self.pipe.image_processor.postprocess(em.qwen_decode(self.pipe.vae, chunk),
                                                                output_type="pil"))
        return images

    # ---- the stages' calls, which this model cannot honour

    def encode_prompt(self, prompt: str) -> NoReturn:
        raise UsageError(NO_TEXT_ONLY)

    def unconditional(self) -> NoReturn:
        raise UsageError(NO_TEXT_ONLY)

    def predict(self, latents, timestep, cond, uncond=None, guidance_scale=1.0) -> NoReturn:
        raise UsageError(NO_TEXT_ONLY)

    def sampling_scheduler(self, num_steps: int, latents: torch.Tensor | None = None) -> NoReturn:
        raise UsageError(NO_TEXT_ONLY)

    def inversion_scheduler(self, num_steps: int, latents: torch.Tensor | None = None) -> NoReturn:
        raise UsageError(NO_TEXT_ONLY)

    def draw_training_timestep(self, generator: torch.Generator) -> NoReturn:
        raise UsageError(NO_TEXT_ONLY)

    def training_example(self, x0, noise, timesteps) -> NoReturn:
        raise UsageError(NO_TEXT_ONLY)


def _small(pipe):
    """A tiny Qwen pipeline with a native size of 64 px (its references still go through the VAE at about 1 MP,
    as the pipelines do)."""
    pipe.default_sample_size = 8
    return pipe
