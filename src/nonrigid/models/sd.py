"""Stable Diffusion 1.x and 2.x as a model family: one CLIP text encoder, a UNet predicting noise (epsilon) or
velocity (v, SD 2.x's 768 px models), DDIM, VAE.

The prediction type is read from the model's scheduler config, never assumed: DDIM sampling and inversion convert
the output to noise and x0 estimates inside diffusers' ``DDIMScheduler.step`` / ``DDIMInverseScheduler.step``,
text optimization regresses the model's own training target (:meth:`StableDiffusion.training_example`), and
methods that need the noise estimate itself (DDS) ask :meth:`StableDiffusion.noise_estimate`.

Every call is a translation into the pipeline's own components (``pipe.encode_prompt``, ``pipe.unet``,
``pipe.vae``, schedulers built from ``pipe.scheduler.config``); see :mod:`nonrigid.models.family` for what each
call means to the stages.
"""

from __future__ import annotations

import functools
import inspect
import logging
from typing import ClassVar

import numpy as np
import torch
from diffusers import (
    DDIMInverseScheduler,
    DDIMScheduler,
    LEditsPPPipelineStableDiffusion,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel

from ..errors import UsageError, check_finite
from .capabilities import EPSILON, V
from .family import Conditioning, ModelFamily, doubled, guided
from .tiny import TINY_VOCAB_SIZE, build_character_tokenizer, tiny_text_config, tiny_vae

logger = logging.getLogger("nonrigid")


def warn_if_clip_truncates(tokenizer, prompt: str) -> None:
    """CLIP sees at most 77 tokens; say which words it will never see (the pipelines cut them silently)."""
    ids = tokenizer(prompt, truncation=False, add_special_tokens=True).input_ids
    limit = tokenizer.model_max_length
    if len(ids) > limit:
        dropped = tokenizer.decode(ids[limit - 1 : -1])
        logger.warning("prompt is longer than %d CLIP tokens; CLIP ignores: %r", limit, dropped)

# The reference's scheduler settings (method.md, "Reference behaviour worth knowing"): no sample clipping, the
# final alpha from abar_0 rather than 1.
DDIM_OVERRIDES = {"clip_sample": False, "set_alpha_to_one": False}
PREDICTION_TYPES = ("epsilon", "v_prediction")
INVERSE_SPACINGS = ("leading", "trailing")  # the timestep spacings DDIMInverseScheduler.set_timesteps knows


def ddim_scheduler_for(config) -> DDIMScheduler:
    """A DDIM scheduler with the model's betas and the reference's clipping / final-alpha settings."""
    return DDIMScheduler.from_config(config, **DDIM_OVERRIDES)


def sd_ddim_scheduler() -> DDIMScheduler:
    """SD 1.x's own schedule (scaled-linear betas 0.00085 -> 0.012, steps offset 1) with the reference's settings:
    for models built in code (the tiny and the miniature model)."""
    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, **DDIM_OVERRIDES
    )


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor in [-1, 1], shape (1, 3, H, W)."""
    array = np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)


class StableDiffusion(ModelFamily):
    """SD 1.x / 2.x: ``tokens`` conditioning (1, 77, 768 or 1024), epsilon or v prediction, DDIM with the
    reference's settings."""

    name = "sd"
    label = "SD 1.x, SD 2.x (epsilon or v prediction)"
    pipeline_classes = (StableDiffusionPipeline,)
    single_file_types = ("v1", "v2")
    tiny_models: ClassVar[dict] = {"tiny": lambda seed: build_tiny_sd1(seed),
                                   "tiny-sd2": lambda seed: build_tiny_sd2(seed),
                                   "tiny-sd2-v": lambda seed: build_tiny_sd2(seed, v_prediction=True)}
    networks = ("unet", "vae", "text_encoder")
    attention_maps = True
    ledits = True
    default_guidance = 7.5  # diffusers' StableDiffusionPipeline default, and the paper's

    @classmethod
    def pipeline_kwargs(cls, t5: bool = True) -> dict:
        """No safety checker: it is an image classifier that blacks out images, which an editing tool must not."""
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    @property
    def prediction(self) -> str:
        """epsilon or v, as the model's scheduler config says."""
        return V if self.prediction_type == "v_prediction" else EPSILON

    def describe(self) -> str:
        """The layout as detected from the model: text-encoder width, prediction type, native size."""
        width = self.pipe.text_encoder.config.hidden_size
        layout = {768: "SD 1.x", 1024: "SD 2.x"}.get(width, f"SD layout, {width}-wide text encoder")
        return f"{layout}, {self.prediction_type} prediction, {self.defaults.size} px"

    def adopt_scheduler(self, model: str) -> None:
        """DDIM with the model's betas and prediction type and the reference's settings, whatever scheduler class
        the model shipped with; epsilon and v prediction only."""
        prediction = self.pipe.scheduler.config.get("prediction_type", "epsilon")
        if prediction not in PREDICTION_TYPES:
            raise UsageError(f"model {model!r} predicts {prediction!r}; supported are epsilon and v_prediction "
                             "models")
        self.pipe.scheduler = ddim_scheduler_for(self.pipe.scheduler.config)

    @property
    def prediction_type(self) -> str:
        return self.pipe.scheduler.config.prediction_type

    @property
    def latent_multiple(self) -> int:
        """The VAE's factor times the UNet's downsampling."""
        return self.pipe.vae_scale_factor * 2 ** (len(self.pipe.unet.config.block_out_channels) - 1)

    def ledits_editor(self, scheduler) -> LEditsPPPipelineStableDiffusion:
        """diffusers' LEDITS++ pipeline for SD 1.x / 2.x on this model's modules (no safety checker)."""
        pipe = self.pipe
        return LEditsPPPipelineStableDiffusion(
            vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )

    # ---- conditioning

    def encode_prompt(self, prompt: str) -> Conditioning:
        """``tau(prompt)``: the text encoder's output (1, 77, D) as fp32."""
        self.warn_if_truncated(prompt)
        pipe = self.pipe
        embedding, _ = pipe.encode_prompt(prompt, pipe.text_encoder.device, 1, do_classifier_free_guidance=False)
        return Conditioning({"tokens": embedding.float()})

    def warn_if_truncated(self, prompt: str) -> None:
        warn_if_clip_truncates(self.pipe.tokenizer, prompt)

    # ---- the network

    def predict(self, latents, timestep, cond, uncond=None, guidance_scale=1.0) -> torch.Tensor:
        unet = self.denoiser or self.pipe.unet
        batch = latents.shape[0]
        cond = Conditioning.of(cond).expand(batch).tokens
        dtype = unet.dtype
        if guidance_scale == 1.0 or uncond is None:
            return unet(latents.to(dtype), timestep, encoder_hidden_states=cond.to(dtype)).sample.float()
        uncond = Conditioning.of(uncond).expand(batch).tokens
        both = unet(
            torch.cat([latents, latents]).to(dtype),
            doubled(timestep, batch),
            encoder_hidden_states=torch.cat([uncond, cond]).to(dtype),
        ).sample.float()
        out_uncond, out_cond = both.chunk(2)
        return guided(out_uncond, out_cond, guidance_scale)

    # ---- schedules

    def sampling_scheduler(self, num_steps: int, latents: torch.Tensor | None = None) -> DDIMScheduler:
        scheduler = DDIMScheduler.from_config(self.pipe.scheduler.config)
        scheduler.set_timesteps(num_steps)
        return scheduler

    def inversion_scheduler(self, num_steps: int, latents: torch.Tensor | None = None) -> DDIMInverseScheduler:
        """diffusers' inverse DDIM walking the sampling timesteps backwards: ascending timesteps, the UNet queried at
        the timestep being stepped to, ``alpha`` of step 0 from ``set_alpha_to_one`` (off for SD: ``abar_0``).

        The inverse scheduler knows "leading" and "trailing" spacing, where it gives exactly the sampler's timesteps
        reversed, but not "linspace" (the default of diffusers' ``EulerDiscreteScheduler``, so of any SDXL
        pipeline saved with a default Euler scheduler), which ``DDIMScheduler`` samples with. So it is built with
        "leading" and given the sampler's timesteps reversed, whatever the spacing: both schedulers' steps pair a
        timestep ``t`` with ``t - T // N``, so each inverse step undoes the sampling step of its timestep.
        """
        accepted = inspect.signature(DDIMInverseScheduler.__init__).parameters  # others (Euler's) only earn warnings
        config = {k: v for k, v in self.pipe.scheduler.config.items() if k in accepted}
        if config.get("timestep_spacing") not in INVERSE_SPACINGS:
            config["timestep_spacing"] = "leading"  # its timesteps are replaced below
        scheduler = DDIMInverseScheduler.from_config(config)
        scheduler.set_timesteps(num_steps)
        scheduler.timesteps = self.sampling_scheduler(num_steps).timesteps.flip(0)
        return scheduler

    def draw_training_timestep(self, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.pipe.scheduler.config.num_train_timesteps, (1,), generator=generator)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` on the model's training schedule (DDS, Edit-friendly)."""
        return self._noise_schedule.add_noise(x0, noise, timesteps)

    def training_example(self, x0, noise, timesteps):
        """``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`` and the model's target: the noise itself (epsilon),
        or ``v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0`` (v prediction)."""
        schedule = self._noise_schedule
        noisy = schedule.add_noise(x0, noise, timesteps)
        if self.prediction_type == "v_prediction":
            return noisy, schedule.get_velocity(x0, noise, timesteps)
        return noisy, noise

    def noise_estimate(self, output: torch.Tensor, latents: torch.Tensor, timestep) -> torch.Tensor:
        """The noise estimate of a model output at ``latents`` (x_t): the output itself for epsilon models,
        ``sqrt(abar_t) v + sqrt(1 - abar_t) x_t`` for v models (what ``DDIMScheduler.step`` computes)."""
        if self.prediction_type != "v_prediction":
            return output
        abar = self._noise_schedule.alphas_cumprod.to(latents.device)[torch.as_tensor(timestep).cpu().long()]
        abar = abar.reshape(-1, *([1] * (latents.dim() - 1))).float()
        return abar.sqrt() * output + (1 - abar).sqrt() * latents

    @functools.cached_property
    def _noise_schedule(self) -> DDIMScheduler:
        """The training schedule's ``abar_t`` (only ``add_noise`` is used), made once per adapter."""
        return self.sampling_scheduler(1)

    # ---- latents

    def encode_image(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        """``s * E(image)``: the posterior mean (inversion), or a sample drawn with ``generator`` (text
        optimization, as the reference does)."""
        return vae_encode(self.pipe.vae, image, generator)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int = 8) -> list[Image.Image]:
        """``D(x_0 / s)`` to PIL images, a few at a time to bound the VAE decoder's memory."""
        return vae_decode(self.pipe.vae, latents, batch_size)


@torch.no_grad()
def vae_encode(vae, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
    """``(E(image) - shift) * scale`` in fp32 (shift 0 where the VAE has none, as SD's): the posterior mean, or a
    sample drawn with ``generator`` on the CPU (the same latent on any device)."""
    pixels = image_to_tensor(image).to(device=vae.device, dtype=vae.dtype)
    dist = vae.encode(pixels).latent_dist
    latent = dist.mean.float()
    if generator is not None:
        noise = torch.randn(latent.shape, generator=generator, dtype=torch.float32).to(latent.device)
        latent = latent + dist.std.float() * noise
    return (latent - (vae.config.get("shift_factor") or 0.0)) * vae.config.scaling_factor


DECODE_PIXELS = 8 * 512 * 512  # at most this many output pixels per VAE decoder call: 8 images at 512 px, 2 at 1024


@torch.no_grad()
def vae_decode(vae, latents: torch.Tensor, batch_size: int = 8) -> list[Image.Image]:
    """``D(x / scale + shift)`` to PIL images, at most ``batch_size`` at a time and at most :data:`DECODE_PIXELS`
    output pixels per call, to bound the decoder's memory: its activations grow with the pixels decoded at once, and
    six SDXL variants at 1024 px through its fp32 VAE in one call took 28 GB on the GPU where the UNet's own
    sampling needed 12 (measured with ``benchmarks/bench_edit.py --config sdxl``). The decoder treats each image
    on its own (no operation mixes images), so the chunking changes float rounding at most; up to 512 px (the
    miniature models, SD 1.x) the chunks are the same as before."""
    pixels_per_image = latents.shape[-2] * latents.shape[-1] * (2 ** (len(vae.config.block_out_channels) - 1)) ** 2
    batch_size = max(1, min(batch_size, DECODE_PIXELS // pixels_per_image))
    images: list[Image.Image] = []
    for chunk in latents.split(batch_size):
        scaled = chunk / vae.config.scaling_factor + (vae.config.get("shift_factor") or 0.0)
        pixels = vae.decode(scaled.to(vae.dtype)).sample.float()
        check_finite(pixels, "decoding")
        array = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        images.extend(Image.fromarray(a) for a in array)
    return images


# ---- the built-in random-weight models of this layout


def build_tiny_sd1(seed: int = 0) -> StableDiffusionPipeline:
    """``tiny``: SD 1.x's component classes and layout (VAE downsampling by 8, cross-attention UNet, CLIP text
    encoder with 77 positions) at a few hundred thousand parameters, random weights: output is noise."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=4,
            norm_num_groups=8,
        )
        vae = tiny_vae()
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=TINY_VOCAB_SIZE,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                bos_token_id=TINY_VOCAB_SIZE - 2,
                eos_token_id=TINY_VOCAB_SIZE - 1,
                pad_token_id=TINY_VOCAB_SIZE - 1,
            )
        )
    scheduler = sd_ddim_scheduler()
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_character_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def build_tiny_sd2(seed: int = 0, v_prediction: bool = False) -> StableDiffusionPipeline:
    """``tiny-sd2`` / ``tiny-sd2-v``: SD 2.x's layout (linear attention projections, head-size attention, a GELU
    text encoder, epsilon or v prediction; the v one at 96 px as SD 2.1 is larger than SD 2 base)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=12 if v_prediction else 8, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=48,
            attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8,
        )
        vae = tiny_vae()
        text_encoder = CLIPTextModel(tiny_text_config(48, "gelu"))
    scheduler = DDIMScheduler(  # SD 2.x's scheduler config
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, clip_sample=False,
        set_alpha_to_one=False, prediction_type="v_prediction" if v_prediction else "epsilon",
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=build_character_tokenizer(), unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
