"""The miniature model: Stable Diffusion 1.x's component classes, sized for 64 x 64 scenes on a CPU.

AutoencoderKL (3 blocks: 64 px -> 16 x 16 x 4 latents), UNet2DConditionModel with cross-attention at 8 x 8 and
4 x 4, a 2-layer CLIP text encoder over a tokenizer whose merges make every word of the world one token, and
SD's DDIM scheduler. Every stage and method of the project runs on it unchanged.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from ..models.sd import sd_ddim_scheduler
from ..models.tiny import build_clip_tokenizer
from .world import vocabulary

TEXT_DIM = 64


def build_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )


def build_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(64, 128, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def build_text_encoder(vocab_size: int, bos: int, eos: int) -> CLIPTextModel:
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=TEXT_DIM,
            intermediate_size=4 * TEXT_DIM,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=eos,
        )
    )


def build_untrained_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """The miniature model's architecture with fresh weights (deterministic in ``seed``)."""
    tokenizer = build_clip_tokenizer(vocabulary())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae, unet = build_vae(), build_unet()
        text_encoder = build_text_encoder(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
    scheduler = sd_ddim_scheduler()
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
