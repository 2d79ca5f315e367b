"""``mini-xl``: an SDXL-layout miniature model, trained in the miniature world.

SDXL's component classes and conditioning, sized for 64 x 64 scenes:

- two CLIP text encoders over the miniature tokenizer (3 layers, 32 wide each). As in SDXL, the token embeddings
  are both encoders' penultimate hidden states side by side (32 + 32 = 64 wide, SDXL's 768 + 1280), and the
  pooled embedding is the second encoder's projected end-of-text state (32 wide, SDXL's 1280);
- a UNet2DConditionModel with SDXL's ``text_time`` added conditioning: the pooled embedding plus the Fourier
  features of the size conditioning ``(original h, w, crop top, left, target h, w)``;
- the miniature model's VAE and tokenizer, shared (not stored twice), and SDXL's Euler scheduler config (which
  :func:`nonrigid.models.loading.load_pipeline` turns into DDIM, as it does for SDXL itself).

Training follows SDXL's recipe where it applies at this size: the epsilon objective, both text encoders trained
jointly, and a caption dropped 10% of the time to *zero* token and pooled embeddings, which is what SDXL's
pipeline feeds the unconditional branch (``force_zeros_for_empty_prompt``). Every scene is 64 x 64 and uncropped,
so the size conditioning is always ``(64, 64, 0, 0, 64, 64)``: the model has the input, not a learned use of it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from .config import VariantConfig
from .train import Log
from .variants import caption_ids, fit, log_done, save_trained, snr_weights, trainable, training_run, world_latents

TEXT_DIM = 32  # each encoder; the UNet's cross-attention sees both side by side
TIME_DIM = 8  # Fourier features per size-conditioning number (SDXL: 256)
SIZE = 64
NETWORKS = ("unet", "text_encoder", "text_encoder_2")  # what training moves and saving keeps (in fp16)


def xl_config(steps: int = 2500, lr: float = 8e-4, ema_decay: float = 0.995, weight_decay: float = 0.01,
              warmup: int = 100) -> VariantConfig:
    """The recipe of ``mini-xl`` (the miniature model's UNet recipe, 2500 steps as the SD 1.x miniature model's:
    1200 steps, 18 minutes, drew the captioned pose at chance; 2500, 60 minutes on one busy thread, 0.62)."""
    return VariantConfig(steps=steps, lr=lr, ema_decay=ema_decay, weight_decay=weight_decay, warmup=warmup)


def build_text_encoder(cls, vocab_size: int, bos: int, eos: int):
    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=TEXT_DIM, intermediate_size=4 * TEXT_DIM, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
        projection_dim=TEXT_DIM,
    )
    return cls(config)


def build_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=SIZE // 4,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(48, 96, 96),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=16,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_DIM,
        projection_class_embeddings_input_dim=TEXT_DIM + 6 * TIME_DIM,
    )


def sdxl_scheduler() -> EulerDiscreteScheduler:
    """SDXL base 1.0's scheduler config (scaled-linear betas 0.00085 -> 0.012, leading spacing, offset 1)."""
    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  steps_offset=1, timestep_spacing="leading", interpolation_type="linear")


def build_untrained_pipeline(base, seed: int = 0) -> StableDiffusionXLPipeline:
    """``mini-xl``'s architecture with fresh weights, on ``base``'s (the miniature model's) VAE and tokenizer."""
    tokenizer = base.tokenizer
    ids = (len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = build_unet()
        text_encoder = build_text_encoder(CLIPTextModel, *ids)
        text_encoder_2 = build_text_encoder(CLIPTextModelWithProjection, *ids)
    return StableDiffusionXLPipeline(
        vae=base.vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet, scheduler=sdxl_scheduler(), force_zeros_for_empty_prompt=True,
    )


def conditioning(pipe, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token embeddings (B, 77, 64) and pooled embedding (B, 32) of token ids, as SDXL's ``encode_prompt`` makes
    them (penultimate hidden states side by side; the second encoder's projected end-of-text state)."""
    first = pipe.text_encoder(ids, output_hidden_states=True)
    second = pipe.text_encoder_2(ids, output_hidden_states=True)
    tokens = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    return tokens, second.text_embeds


def train_xl(out: Path, config: VariantConfig, *, progress: bool = True, log: Log | None = None) -> Path:
    """Train ``mini-xl`` into ``out/model`` (checkpoints under ``out/work``) on the miniature VAE's latents."""
    from ..models.loading import load_pipeline

    with training_run(out, config, log) as (log, watch):
        base = load_pipeline("mini", device="cpu", dtype="fp32")
        work = out / "work"
        work.mkdir(parents=True, exist_ok=True)
        with watch("dataset"):
            latents, captions = world_latents(base.vae, config.dataset_size, config.seed, work, progress)
        pipe = build_untrained_pipeline(base, config.seed)
        with watch("train"):
            _train(pipe, latents, captions, config, work, log, progress)
        folder = out / "model"
        save_trained(pipe, folder, NETWORKS)
        log_done(log, watch, f"model saved to {folder}")
        return folder


def _train(pipe, latents, captions, config: VariantConfig, work: Path, log: Log, progress: bool) -> None:
    modules = trainable(pipe, NETWORKS)
    scheduler = pipe.scheduler
    ids = caption_ids(pipe.tokenizer, captions)
    time_ids = torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]], dtype=torch.float32)

    def loss_of_batch(generator: torch.Generator) -> torch.Tensor:
        index = torch.randint(0, latents.shape[0], (config.batch,), generator=generator)
        x0 = latents[index]
        keep = (torch.rand(config.batch, generator=generator) >= config.caption_dropout).float()
        t = torch.randint(0, scheduler.config.num_train_timesteps, (config.batch,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        tokens, pooled = conditioning(pipe, ids[index])
        tokens, pooled = tokens * keep[:, None, None], pooled * keep[:, None]  # dropped: zeros, as SDXL's uncond
        added = {"text_embeds": pooled, "time_ids": time_ids.expand(config.batch, -1)}
        prediction = pipe.unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=tokens,
                               added_cond_kwargs=added).sample
        error = F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3))
        return (error * snr_weights(scheduler, t, config.snr_gamma, "epsilon")).mean()

    fit(modules, loss_of_batch, config, work / "xl.pt", log, progress, "mini-xl")
    modules.eval().requires_grad_(False)
