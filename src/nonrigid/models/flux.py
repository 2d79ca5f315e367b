"""FLUX.1 (dev, schnell) as a model family: a rectified-flow transformer over packed 2x2 latent patches, a CLIP
pooled embedding and T5 tokens, *distilled* guidance (dev) or none (schnell), FLUX's resolution-dependent shift.

What each call puts behind the seam (docs/FAMILIES.md has the reasoning):

- **Latents** stay (B, 16, h, w) at the seam, as every other family's; :meth:`Flux.predict` packs them into 2x2
  patches (``FluxPipeline._pack_latents``) for the transformer and unpacks its velocity. The Euler step is
  elementwise, so stepping packed or unpacked latents is the same arithmetic.
- **Conditioning**: ``tokens`` are T5's states (1, 512, 4096 for the real model), ``pooled`` CLIP's pooled output,
  as ``FluxPipeline.encode_prompt`` builds them; ``txt_ids`` (zeros) and ``img_ids`` (row, column of each patch)
  are rebuilt per call as the pipeline builds them.
- **Guidance**: FLUX.1-dev embeds the guidance value in the transformer (``config.guidance_embeds``); there is no
  unconditional branch, so :meth:`Flux.unconditional` is ``None`` and :meth:`Flux.predict` ignores ``uncond`` and
  feeds ``guidance_scale`` to the transformer as the pipeline feeds its ``guidance_scale``. Schnell has no guidance
  input: the value is ignored.
- **Schedules**: the pipeline's sigmas ``linspace(1, 1/N, N)`` shifted by ``mu = calculate_shift(seq_len)`` (the
  scheduler's ``use_dynamic_shifting``), where ``seq_len`` is the packed length of the latents the scheduler is
  for (the seam's ``sampling_scheduler(num_steps, latents)``), else of the native size.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from transformers import CLIPTextModel, T5Config, T5EncoderModel

from ..errors import UsageError
from .capabilities import DISTILLED, NO_GUIDANCE
from .family import Conditioning, FamilyDefaults
from .sd import warn_if_clip_truncates
from .sd3 import StableDiffusion3
from .single_file import FLUX_FILE_ABSENT, FLUX_WIDTH, check_depth, flux_to_diffusers, flux_width
from .tiny import build_character_tokenizer, build_t5_tokenizer, tiny_text_config, tiny_vae


def packed_length(latent_shape: torch.Size | tuple[int, ...]) -> int:
    """The transformer's image sequence length for a (B, C, h, w) latent: one token per 2x2 patch."""
    return (int(latent_shape[-2]) // 2) * (int(latent_shape[-1]) // 2)


class Flux(StableDiffusion3):
    """FLUX.1-dev and FLUX.1-schnell (and fine-tunes in their layout). The VAE, the training loss and the noise
    estimate are SD3's (same latent scaling with a shift, same flow-matching target)."""

    name = "flux"
    label = "FLUX.1 (dev, schnell)"
    pipeline_classes = (FluxPipeline,)
    single_file_types = ("flux-dev", "flux-schnell")
    tiny_models: ClassVar[dict] = {"tiny-flux": lambda seed: build_tiny_flux(seed),
                   "tiny-flux-schnell": lambda seed: build_tiny_flux(seed, guidance_embeds=False)}
    networks = ("transformer", "vae", "text_encoder", "text_encoder_2")
    network_name = "transformer"
    default_guidance = 3.5  # FluxPipeline's default guidance_scale (the distilled value for dev)
    max_sequence_length = 512  # FluxPipeline's default T5 length

    @classmethod
    def pipeline_kwargs(cls, t5: bool = True) -> dict:
        return {}  # FLUX's T5 carries the prompt: it is never left out

    @property
    def guidance(self) -> str:
        """Distilled guidance (dev: the value is fed to the transformer), or none (schnell)."""
        return DISTILLED if self.guidance_embedded else NO_GUIDANCE

    @classmethod
    def absent_from_file(cls, shapes) -> tuple[str, ...]:
        """A FLUX.1 file (Black Forest Labs' layout) holds the transformer only."""
        return FLUX_FILE_ABSENT

    @classmethod
    def check_file(cls, path, shapes, source: str) -> None:
        check_depth(path, True, shapes, source)

    @classmethod
    def file_denoiser(cls, path, shapes, source: str) -> FluxTransformer2DModel | None:
        """A transformer of another width than FLUX.1's, converted by :func:`~.single_file.flux_to_diffusers`
        (diffusers' converter assumes 3072); None at FLUX.1's width."""
        if flux_width(shapes) == FLUX_WIDTH:
            return None
        from safetensors.torch import load_file

        return FluxTransformer2DModel.from_single_file(flux_to_diffusers(load_file(str(path))), config=source,
                                                       subfolder="transformer")

    @property
    def guidance_embedded(self) -> bool:
        """Whether the transformer takes a guidance value (dev) or not (schnell)."""
        return bool(self.pipe.transformer.config.get("guidance_embeds", False))

    @property
    def default_steps(self) -> int | None:
        """Schnell is distilled for 4 steps (its model card's setting); dev takes the methods' own step counts."""
        return None if self.guidance_embedded else 4

    def describe(self) -> str:
        config = self.pipe.transformer.config
        kind = "distilled guidance (dev)" if self.guidance_embedded else "no guidance (schnell)"
        return (f"FLUX layout, {config.num_layers} + {config.num_single_layers} transformer layers, {kind}, "
                f"flow (velocity) prediction, dynamic shift, {self.defaults.size} px")

    @property
    def latent_multiple(self) -> int:
        """The VAE's factor times the 2x2 packing."""
        return self.pipe.vae_scale_factor * 2

    @property
    def defaults(self) -> FamilyDefaults:
        """FluxPipeline's default size (``default_sample_size`` latents) and guidance."""
        return FamilyDefaults(self.pipe.default_sample_size * self.pipe.vae_scale_factor, self.default_guidance)

    def adopt_scheduler(self, model: str) -> None:
        """Keep the model's flow-matching schedule, dynamic shift included (computed per latent size)."""
        if not isinstance(self.pipe.scheduler, FlowMatchEulerDiscreteScheduler):
            self.pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config)

    # ---- conditioning

    def encode_prompt(self, prompt: str) -> Conditioning:
        """``tokens`` (T5) and ``pooled`` (CLIP) exactly as ``FluxPipeline.encode_prompt`` builds them."""
        warn_if_clip_truncates(self.pipe.tokenizer, prompt)
        with self.text_encoders_on_device():
            tokens, pooled, _ = self.pipe.encode_prompt(prompt, prompt, device=self.device,
                                                        max_sequence_length=self.max_sequence_length)
        return Conditioning({"tokens": tokens.float(), "pooled": pooled.float()})

    def unconditional(self) -> None:  # type: ignore[override]
        """None: FLUX has no unconditional branch (dev's guidance is distilled into the transformer)."""
        return None

    # ---- the network

    def predict(self, latents, timestep, cond, uncond=None, guidance_scale=1.0) -> torch.Tensor:
        """The velocity for (B, C, h, w) latents; ``uncond`` is ignored, ``guidance_scale`` is dev's embedded
        guidance value."""
        batch, channels, height, width = latents.shape
        cond = self._check(cond).expand(batch)
        network = self.denoiser or self.pipe.transformer
        dtype = network.dtype
        packed = FluxPipeline._pack_latents(latents.to(dtype), batch, channels, height, width)
        t = torch.as_tensor(timestep, device=latents.device, dtype=torch.float32).reshape(-1)
        t = (t.expand(batch) if t.numel() == 1 else t).to(dtype)
        guidance = None
        if self.guidance_embedded:
            guidance = torch.full([batch], float(guidance_scale), device=latents.device, dtype=torch.float32)
        tokens = cond.tokens.to(dtype)
        txt_ids = torch.zeros(tokens.shape[1], 3, device=latents.device, dtype=dtype)
        img_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, latents.device, dtype)
        out = network(hidden_states=packed, timestep=t / 1000, guidance=guidance,
                      pooled_projections=cond.tensors["pooled"].to(dtype), encoder_hidden_states=tokens,
                      txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        side = self.pipe.vae_scale_factor
        return FluxPipeline._unpack_latents(out, height * side, width * side, side).float()

    @staticmethod
    def _check(cond: Conditioning | torch.Tensor) -> Conditioning:
        if not isinstance(cond, Conditioning) or "pooled" not in cond.tensors:
            raise UsageError("FLUX needs a conditioning with token and pooled embeddings (family.encode_prompt), "
                             "not a bare token tensor")
        return cond

    # ---- schedules

    def _seq_len(self, latents: torch.Tensor | None) -> int:
        if latents is not None:
            return packed_length(latents.shape)
        native = self.defaults.size // self.pipe.vae_scale_factor
        return packed_length((native, native))

    def diffusers_scheduler(self, num_steps: int, seq_len: int | None = None) -> FlowMatchEulerDiscreteScheduler:
        """A fresh copy of the model's scheduler set as ``FluxPipeline.__call__`` sets it for ``seq_len`` image
        tokens (default: the native size's)."""
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config)
        config = scheduler.config
        sigmas = None if config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / num_steps, num_steps)
        mu = calculate_shift(self._seq_len(None) if seq_len is None else seq_len, config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))
        if sigmas is None:
            scheduler.set_timesteps(num_steps, mu=mu)
        else:
            scheduler.set_timesteps(sigmas=sigmas, mu=mu)
        return scheduler

    def _diffusers_scheduler(
        self, num_steps: int, latents: torch.Tensor | None = None
    ) -> FlowMatchEulerDiscreteScheduler:
        return self.diffusers_scheduler(num_steps, self._seq_len(latents))


def build_tiny_flux(seed: int = 0, guidance_embeds: bool = True) -> FluxPipeline:
    """``tiny-flux`` / ``tiny-flux-schnell``: FLUX.1's layout at toy width (as diffusers' own FluxPipeline tests build
    theirs): CLIP 32 wide (its pooled output is the transformer's pooled input), T5 32 wide (the joint attention width),
    rope axes 4 + 4 + 8 = the head size. ``default_sample_size`` is set to 8 latents (64 px) instead of FluxPipeline's
    128."""
    t5_tokenizer = build_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance_embeds,
            axes_dims_rope=(4, 4, 8),
        )
        vae = tiny_vae(16, shift_factor=0.1159, scaling_factor=0.3611, use_quant_conv=False,
                       use_post_quant_conv=False)
        text_encoder = CLIPTextModel(tiny_text_config(32, "quick_gelu"))
        text_encoder_2 = T5EncoderModel(T5Config(
            vocab_size=len(t5_tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, pad_token_id=t5_tokenizer.pad_token_id,
            eos_token_id=t5_tokenizer.eos_token_id, decoder_start_token_id=0,
        ))
    scheduler = FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev's scheduler config
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=build_character_tokenizer(),
        text_encoder_2=text_encoder_2, tokenizer_2=t5_tokenizer, transformer=transformer,
    )
    pipe.default_sample_size = 8
    return pipe
