"""Random-weight pipelines of the SD 1.x layout for the benchmark: real weights would not change what is measured.

- ``"sd14"``: the full Stable Diffusion v1.4 architecture (UNet 860 M parameters, CLIP ViT-L/14 text encoder, the
  SD VAE): the cost of the real model, for CUDA at 512 px.
- ``"mid"``: the same layout (four UNet levels, two ResNet layers per block, cross-attention at the first three
  levels, 768-wide text embeddings, a four-level VAE) at a tenth of the UNet's and a quarter of the VAE's channel
  widths, and a four-layer text encoder: about 10 M UNet parameters, so that the CPU benchmark of a whole default
  edit at 256 px takes minutes. Its attention layers have one head each, 32 to 128 channels wide like SD's heads
  (40 to 160): with SD's eight heads at a tenth of the width, the CPU attention kernels on 4-channel heads would
  take most of the time, which says nothing about SD.

The tokenizer is the project's byte-level CLIP tokenizer (no download); tokenization costs nothing either way.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from nonrigid.models.sd import DDIM_OVERRIDES
from nonrigid.models.tiny import build_clip_tokenizer

LAYOUTS = {
    "sd14": {
        "unet": {"block_out_channels": (320, 640, 1280, 1280), "attention_head_dim": 8, "norm_num_groups": 32},
        "vae": {"block_out_channels": (128, 256, 512, 512), "norm_num_groups": 32},
        "text": {"num_hidden_layers": 12, "num_attention_heads": 12},
    },
    "mid": {
        "unet": {"block_out_channels": (32, 64, 128, 128), "attention_head_dim": 1, "norm_num_groups": 32},
        "vae": {"block_out_channels": (32, 64, 128, 128), "norm_num_groups": 32},
        "text": {"num_hidden_layers": 4, "num_attention_heads": 12},
    },
}


def build_random_pipeline(
    layout: str, *, seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> StableDiffusionPipeline:
    """A pipeline of ``layout`` with weights drawn from ``seed``, frozen, on ``device`` in ``dtype``.

    Built directly on ``device`` (no 3 GB detour through host memory for SD v1.4). The scheduler is the reference's
    DDIM. The global RNG is left as it was.
    """
    spec = LAYOUTS[layout]
    device = torch.device(device)
    tokenizer = build_clip_tokenizer()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=768,
            **spec["unet"],
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
            **spec["vae"],
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=768,
                intermediate_size=3072,
                max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **spec["text"],
            )
        )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, **DDIM_OVERRIDES
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
        module.eval()
        module.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
