"""Stable Diffusion XL as a model family: two CLIP text encoders, a pooled embedding, size conditioning.

What each call puts behind the seam (docs/FAMILIES.md has the equations):

- **Conditioning** has two tensors: ``tokens`` (1, 77, 2048), both encoders' penultimate hidden states side by
  side, and ``pooled`` (1, 1280), the second encoder's projected end-of-text state. Text optimization optimises
  both (the pooled embedding reaches every UNet block through the timestep embedding, so leaving it at the target
  prompt's would keep pulling the image towards the target's global look), eta interpolates both, NTI optimises
  both per step.
- **Unconditional** is what SDXL's pipeline feeds the unconditional branch when no negative prompt is given: zero
  token and pooled embeddings (``force_zeros_for_empty_prompt``), else the empty prompt's encoding.
- **Size conditioning** (``time_ids``) is ``(h, w, 0, 0, h, w)``: original size = target size = the latents' size
  in pixels (the input as edited), no crop, as the pipeline's defaults give. It is not part of the conditioning:
  nothing optimises or interpolates it.
- Prediction type, schedules, latents and training examples are SD's (:class:`~nonrigid.models.sd.StableDiffusion`),
  read from the model's own configs. The VAE runs in fp32 when its config asks for it (``force_upcast``: SDXL's
  VAE overflows in fp16).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from diffusers import (
    EulerDiscreteScheduler,
    LEditsPPPipelineStableDiffusionXL,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from ..errors import UsageError
from .family import Conditioning, doubled, guided
from .sd import StableDiffusion
from .tiny import build_character_tokenizer, tiny_text_config, tiny_vae


class StableDiffusionXL(StableDiffusion):
    """SDXL base and SDXL-layout fine-tunes (no refiner)."""

    name = "sdxl"
    label = "SDXL base-layout"
    pipeline_classes = (StableDiffusionXLPipeline,)
    single_file_types = ("xl_base",)
    tiny_models: ClassVar[dict] = {"tiny-sdxl": lambda seed: build_tiny_sdxl(seed)}
    networks = ("unet", "vae", "text_encoder", "text_encoder_2")
    default_guidance = 5.0  # diffusers' StableDiffusionXLPipeline default

    @classmethod
    def pipeline_kwargs(cls, t5: bool = True) -> dict:
        return {}  # SDXL's pipeline has no safety checker

    def ledits_editor(self, scheduler) -> LEditsPPPipelineStableDiffusionXL:
        """diffusers' LEDITS++ pipeline for SDXL on this model's modules (zeros for an empty negative prompt, as
        SDXL's pipeline; no watermark)."""
        pipe = self.pipe
        return LEditsPPPipelineStableDiffusionXL(
            vae=pipe.vae, text_encoder=pipe.text_encoder, text_encoder_2=pipe.text_encoder_2,
            tokenizer=pipe.tokenizer, tokenizer_2=pipe.tokenizer_2, unet=pipe.unet, scheduler=scheduler,
            force_zeros_for_empty_prompt=pipe.config.get("force_zeros_for_empty_prompt", True),
            add_watermarker=False,
        )

    def describe(self) -> str:
        widths = [self.pipe.text_encoder.config.hidden_size, self.pipe.text_encoder_2.config.hidden_size]
        return (f"SDXL layout, text encoders {widths[0]} + {widths[1]} wide, {self.prediction_type} prediction, "
                f"{self.defaults.size} px")

    # ---- conditioning

    def encode_prompt(self, prompt: str) -> Conditioning:
        """``tokens`` (1, 77, D1 + D2) and ``pooled`` (1, P), as ``StableDiffusionXLPipeline.encode_prompt``."""
        self.warn_if_truncated(prompt)
        pipe = self.pipe
        tokens, _, pooled, _ = pipe.encode_prompt(
            prompt, device=pipe.text_encoder_2.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return Conditioning({"tokens": tokens.float(), "pooled": pooled.float()})

    def unconditional(self) -> Conditioning:
        """Zeros where the pipeline zeroes the empty negative prompt (SDXL base does), else tau("")."""
        empty = self.encode_prompt("")
        if self.pipe.config.get("force_zeros_for_empty_prompt", False):
            return empty.map(torch.zeros_like)
        return empty

    def time_ids(self, latents: torch.Tensor) -> torch.Tensor:
        """``(h, w, 0, 0, h, w)`` per row: the size conditioning of an uncropped image of the latents' size."""
        height, width = (side * self.pipe.vae_scale_factor for side in latents.shape[-2:])
        ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32, device=latents.device)
        return ids.expand(latents.shape[0], -1)

    # ---- the network

    def predict(self, latents, timestep, cond, uncond=None, guidance_scale=1.0) -> torch.Tensor:
        batch = latents.shape[0]
        cond = self._check(cond).expand(batch)
        if guidance_scale == 1.0 or uncond is None:
            return self._unet(latents, timestep, cond)
        both = Conditioning.cat([self._check(uncond).expand(batch), cond])
        out_uncond, out_cond = self._unet(torch.cat([latents, latents]), doubled(timestep, batch), both).chunk(2)
        return guided(out_uncond, out_cond, guidance_scale)

    def _unet(self, latents: torch.Tensor, timestep, cond: Conditioning) -> torch.Tensor:
        unet = self.denoiser or self.pipe.unet
        dtype = unet.dtype
        added = {"text_embeds": cond.tensors["pooled"].to(dtype), "time_ids": self.time_ids(latents).to(dtype)}
        return unet(latents.to(dtype), timestep, encoder_hidden_states=cond.tokens.to(dtype),
                    added_cond_kwargs=added).sample.float()

    @staticmethod
    def _check(cond: Conditioning | torch.Tensor) -> Conditioning:
        if not isinstance(cond, Conditioning) or "pooled" not in cond.tensors:
            raise UsageError("SDXL needs a conditioning with token and pooled embeddings (family.encode_prompt), "
                             "not a bare token tensor")
        return cond

    def vae_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """fp32 for a VAE that overflows in half precision (``force_upcast``), else ``dtype``."""
        if dtype == torch.float16 and self.pipe.vae.config.get("force_upcast", False):
            return torch.float32
        return dtype


def build_tiny_sdxl(seed: int = 0) -> StableDiffusionXLPipeline:
    """``tiny-sdxl``: SDXL's layout (two text encoders, a pooled embedding, size conditioning, two transformer
    layers in the inner attention blocks, Euler scheduler config), random weights: output is noise."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
            cross_attention_dim=48, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8,
            addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
        )
        vae = tiny_vae()
        # Like SDXL's (768 + 1280 wide, the second with 32 layers), the encoders differ in width and the second
        # has a tenth layer: diffusers' single-file loader tells them apart by width and recognises SDXL by it.
        text_encoder = CLIPTextModel(tiny_text_config(16, "quick_gelu"))
        text_encoder_2 = CLIPTextModelWithProjection(tiny_text_config(32, "gelu", projection=32, layers=10))
    scheduler = EulerDiscreteScheduler(  # SDXL base 1.0's scheduler config
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        timestep_spacing="leading", interpolation_type="linear",
    )
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=build_character_tokenizer(),
        tokenizer_2=build_character_tokenizer(), unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
    )
