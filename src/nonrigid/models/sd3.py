"""Stable Diffusion 3 / 3.5 as a model family: a rectified-flow transformer (MMDiT) predicting velocity, three
text encoders (CLIP-L, CLIP-G, optional T5), real classifier-free guidance, a 16-channel VAE with a shift.

What each call puts behind the seam (docs/FAMILIES.md has the derivation):

- **Conditioning** has two tensors, as ``StableDiffusion3Pipeline.encode_prompt`` builds them: ``tokens``
  (1, 77 + 256, 4096), both CLIPs' penultimate states side by side, zero-padded to T5's width, followed by T5's
  states (zeros when the pipeline was loaded without T5, as diffusers does), and ``pooled`` (1, 2048), both
  CLIPs' projected end-of-text states. Text optimization optimises both, eta interpolates both, NTI optimises both.
- **Unconditional** is the empty prompt's encoding: SD3's pipeline feeds the encoded negative prompt (``""``
  unless given) to the unconditional branch, never zeros.
- **predict** is the transformer's velocity, guided by ``v_u + w (v_c - v_u)`` as the pipeline does.
- **Schedules**: sampling is Euler on the model's own shifted sigma schedule (its ``FlowMatchEulerDiscreteScheduler``
  config), inversion walks it backwards (:class:`~nonrigid.models.flow.FlowEuler`), training timesteps are
  logit-normal over the shifted training schedule and the training target is ``noise - x0``.
- **Latents**: ``(E(image) - shift) * scale`` and back, with the VAE config's ``shift_factor`` and
  ``scaling_factor``.
"""

from __future__ import annotations

import functools
from typing import ClassVar

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from PIL import Image
from transformers import CLIPTextModelWithProjection

from ..errors import UsageError
from .capabilities import FLOW
from .family import Conditioning, FamilyDefaults, ModelFamily, guided
from .flow import FlowEuler, flow_training_example, logit_normal_timestep
from .sd import vae_decode, vae_encode, warn_if_clip_truncates
from .single_file import SD3_OTHER_SIZE, absent_components, check_depth
from .tiny import build_character_tokenizer, tiny_text_config, tiny_vae


class StableDiffusion3(ModelFamily):
    """SD3 medium, SD3.5 medium and large (and fine-tunes in their layout)."""

    name = "sd3"
    label = "SD3 / SD3.5"
    pipeline_classes = (StableDiffusion3Pipeline,)
    single_file_types = ("sd3", "sd35_medium", "sd35_large", SD3_OTHER_SIZE)
    file_lacks_components = True  # SD3 files come with or without their CLIPs and T5
    tiny_models: ClassVar[dict] = {"tiny-sd3": lambda seed: build_tiny_sd3(seed),
                                   "tiny-sd35": lambda seed: build_tiny_sd3(seed, sd35=True)}
    networks = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
    network_name = "transformer"
    default_guidance = 7.0  # diffusers' StableDiffusion3Pipeline default
    parks_text_encoders = True  # with T5, 5.4 B parameters of text encoders; --low-memory parks them on the CPU
    prediction = FLOW

    @classmethod
    def pipeline_kwargs(cls, t5: bool = True) -> dict:
        """Without T5 when asked (about 4.7 B parameters; its part of the token embeddings becomes zeros)."""
        return {} if t5 else {"text_encoder_3": None, "tokenizer_3": None}

    def describe(self) -> str:
        config = self.pipe.transformer.config
        version = "SD3.5" if config.get("dual_attention_layers") or config.get("qk_norm") else "SD3"
        t5 = "with T5" if self.pipe.text_encoder_3 is not None else "without T5"
        shift = self.pipe.scheduler.config.get("shift", 1.0)
        return (f"{version} layout, {config.num_layers} transformer layers, {t5}, flow (velocity) prediction, "
                f"shift {shift:g}, {self.defaults.size} px")

    @classmethod
    def absent_from_file(cls, shapes) -> tuple[str, ...]:
        """The CLIPs, T5 or VAE an SD3 file was saved without."""
        return absent_components(False, shapes)

    @classmethod
    def check_file(cls, path, shapes, source: str) -> None:
        check_depth(path, False, shapes, source)

    @property
    def latent_multiple(self) -> int:
        """The VAE's factor times the transformer's patch size."""
        return self.pipe.vae_scale_factor * self.pipe.transformer.config.patch_size

    @property
    def defaults(self) -> FamilyDefaults:
        return FamilyDefaults(self.pipe.transformer.config.sample_size * self.pipe.vae_scale_factor,
                              self.default_guidance)

    def adopt_scheduler(self, model: str) -> None:
        """Keep the model's flow-matching schedule (its shift); refuse what the stages cannot reproduce."""
        config = self.pipe.scheduler.config
        if config.get("use_dynamic_shifting", False):
            raise UsageError(f"model {model!r} uses resolution-dependent (dynamic) shifting, which this SD3 "
                             "family does not reproduce; use a model with a fixed shift")
        if not isinstance(self.pipe.scheduler, FlowMatchEulerDiscreteScheduler):
            self.pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)

    def vae_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """fp32 for a VAE that asks for it in half precision (``force_upcast``), else ``dtype``."""
        if dtype == torch.float16 and self.pipe.vae.config.get("force_upcast", False):
            return torch.float32
        return dtype

    # ---- conditioning

    def encode_prompt(self, prompt: str) -> Conditioning:
        """``tokens`` and ``pooled`` exactly as ``StableDiffusion3Pipeline.encode_prompt`` builds them."""
        self.warn_if_truncated(prompt)
        with self.text_encoders_on_device():
            tokens, _, pooled, _ = self.pipe.encode_prompt(
                prompt, None, None, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False,
            )
        return Conditioning({"tokens": tokens.float(), "pooled": pooled.float()})

    def warn_if_truncated(self, prompt: str) -> None:
        """The CLIP encoders see at most 77 tokens (T5, when loaded, up to 256): say what CLIP never sees."""
        warn_if_clip_truncates(self.pipe.tokenizer, prompt)

    # ---- the network

    def predict(self, latents, timestep, cond, uncond=None, guidance_scale=1.0) -> torch.Tensor:
        batch = latents.shape[0]
        cond = self._check(cond).expand(batch)
        if guidance_scale == 1.0 or uncond is None:
            return self._transformer(latents, timestep, cond)
        both = Conditioning.cat([self._check(uncond).expand(batch), cond])
        out_uncond, out_cond = self._transformer(torch.cat([latents, latents]), timestep, both).chunk(2)
        return guided(out_uncond, out_cond, guidance_scale)

    def _transformer(self, latents: torch.Tensor, timestep, cond: Conditioning) -> torch.Tensor:
        network = self.denoiser or self.pipe.transformer
        dtype = network.dtype
        t = torch.as_tensor(timestep, device=latents.device, dtype=torch.float32).reshape(-1)
        t = t.expand(latents.shape[0]) if t.numel() == 1 else t
        return network(hidden_states=latents.to(dtype), timestep=t, encoder_hidden_states=cond.tokens.to(dtype),
                       pooled_projections=cond.tensors["pooled"].to(dtype), return_dict=False)[0].float()

    @staticmethod
    def _check(cond: Conditioning | torch.Tensor) -> Conditioning:
        if not isinstance(cond, Conditioning) or "pooled" not in cond.tensors:
            raise UsageError("SD3 needs a conditioning with token and pooled embeddings (family.encode_prompt), "
                             "not a bare token tensor")
        return cond

    # ---- schedules

    def _diffusers_scheduler(
        self, num_steps: int, latents: torch.Tensor | None = None
    ) -> FlowMatchEulerDiscreteScheduler:
        """A fresh copy of the model's scheduler set as the pipeline sets it (the pipeline's own stays as is)."""
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config)
        scheduler.set_timesteps(num_steps)
        return scheduler

    def sampling_scheduler(self, num_steps: int, latents: torch.Tensor | None = None) -> FlowEuler:
        """Euler on the model's shifted sigmas: the pipeline's sampler, stateless."""
        return FlowEuler.from_diffusers(self._diffusers_scheduler(num_steps, latents))

    def inversion_scheduler(self, num_steps: int, latents: torch.Tensor | None = None) -> FlowEuler:
        """The sampler's Euler steps undone in reverse order, image to noise (see :mod:`.flow`)."""
        return self.sampling_scheduler(num_steps, latents).inverse()

    @functools.cached_property
    def _training_timesteps(self) -> torch.Tensor:
        """The full training schedule (``num_train_timesteps`` shifted timesteps, noisiest first)."""
        return FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config).timesteps.float()

    def draw_training_timestep(self, generator: torch.Generator) -> torch.Tensor:
        """Logit-normal (mean 0, std 1) over the shifted training schedule, as diffusers' SD3 training scripts."""
        return logit_normal_timestep(self._training_timesteps, generator)

    def training_example(self, x0, noise, timesteps):
        """``x_s = (1 - s) x0 + s noise`` and the velocity ``noise - x0``, with ``s = t / T``."""
        sigmas = torch.as_tensor(timesteps, dtype=torch.float32) / self.pipe.scheduler.config.num_train_timesteps
        return flow_training_example(x0, noise, sigmas)

    def noise_estimate(self, output: torch.Tensor, latents: torch.Tensor, timestep) -> torch.Tensor:
        """``x_s + (1 - s) v``: the noise a velocity implies at ``x_s``."""
        s = torch.as_tensor(timestep, dtype=torch.float32, device=latents.device)
        s = (s / self.pipe.scheduler.config.num_train_timesteps).reshape(-1, *([1] * (latents.dim() - 1)))
        return latents + (1 - s) * output

    # ---- latents

    def encode_image(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(E(image) - shift) * scale``: the posterior mean, or a sample drawn with ``generator``."""
        return vae_encode(self.pipe.vae, image, generator)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = 8) -> list[Image.Image]:
        """``D(x / scale + shift)`` to PIL images, a few at a time."""
        return vae_decode(self.pipe.vae, latents, batch_size)


def build_tiny_sd3(seed: int = 0, sd35: bool = False) -> StableDiffusion3Pipeline:
    """``tiny-sd3`` / ``tiny-sd35``: SD3 medium's layout at toy width (with ``sd35``, SD3.5's query/key norms and a
    dual-attention layer); no T5 (its part of the token embeddings is zeros, as diffusers builds it for a pipeline
    loaded with ``text_encoder_3=None``)."""
    sd35_layout = {"qk_norm": "rms_norm", "dual_attention_layers": (0,)} if sd35 else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
            num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=48,
            pos_embed_max_size=32, **sd35_layout,
        )
        vae = tiny_vae(16, shift_factor=0.0609, scaling_factor=1.5305, use_quant_conv=False,
                       use_post_quant_conv=False)
        # CLIP-L and CLIP-G stand-ins: penultimate states 16 + 32 wide (padded to the 64-wide joint attention),
        # pooled projections 16 + 32 (the transformer's 48-wide pooled input)
        text_encoder = CLIPTextModelWithProjection(tiny_text_config(16, "quick_gelu", projection=16))
        text_encoder_2 = CLIPTextModelWithProjection(tiny_text_config(32, "gelu", projection=32))
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=build_character_tokenizer(), text_encoder_2=text_encoder_2,
        tokenizer_2=build_character_tokenizer(), text_encoder_3=None, tokenizer_3=None,
    )
