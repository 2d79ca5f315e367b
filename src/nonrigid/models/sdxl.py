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

import torch
from diffusers import StableDiffusionXLPipeline

from ..errors import UsageError
from .family import Conditioning, doubled, guided
from .sd import StableDiffusion


class StableDiffusionXL(StableDiffusion):
    """SDXL base and SDXL-layout fine-tunes (no refiner)."""

    name = "sdxl"
    networks = ("unet", "vae", "text_encoder", "text_encoder_2")
    default_guidance = 5.0  # diffusers' StableDiffusionXLPipeline default

    @classmethod
    def matches(cls, pipe) -> bool:
        return isinstance(pipe, StableDiffusionXLPipeline)

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
