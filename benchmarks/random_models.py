"""Random-weight pipelines of the SD 1.x, SDXL and SD3 layouts for the benchmark: real weights would not change what is
measured.

- ``"sd14"``: the full Stable Diffusion v1.4 architecture (UNet 860 M parameters, CLIP ViT-L/14 text encoder, the
  SD VAE): the cost of the real model, for CUDA at 512 px.
- ``"mid"``: the same layout (four UNet levels, two ResNet layers per block, cross-attention at the first three
  levels, 768-wide text embeddings, a four-level VAE) at a tenth of the UNet's and a quarter of the VAE's channel
  widths, and a four-layer text encoder: about 10 M UNet parameters, so that the CPU benchmark of a whole default
  edit at 256 px takes minutes. Its attention layers have one head each, 32 to 128 channels wide like SD's heads
  (40 to 160): with SD's eight heads at a tenth of the width, the CPU attention kernels on 4-channel heads would
  take most of the time, which says nothing about SD.

- ``"sdxl"``: the full SDXL base 1.0 architecture (UNet 2.6 B parameters: three levels 320/640/1280 wide, 1, 2
  and 10 transformer layers per attention block, 64-wide heads, linear projections, 2048-wide cross-attention,
  pooled-text and size conditioning; CLIP ViT-L and OpenCLIP bigG text encoders; SD's VAE with SDXL's scaling
  factor 0.13025 and ``force_upcast``): the cost of the real model, for CUDA at 1024 px.
- ``"sdxl-mid"``: the SDXL layout cut down as ``"mid"`` cuts down SD's: a tenth of the UNet's channel widths
  (32/64/128) with one head per attention layer (32 to 128 channels wide like SDXL's 64), the same levels, ResNet
  and transformer layer counts (1, 2, 10) and the same conditioning shapes (tokens 77 x 2048, pooled 1280, six size
  ids); ``"mid"``'s four-level VAE at a quarter of SD's widths; both text encoders at full width with four layers
  each. For the CPU at 256 px.

- ``"sd3"``: the full Stable Diffusion 3 medium architecture (MMDiT transformer 2 B parameters: 24 joint blocks
  1536 wide, 24 heads of 64, patch 2, 4096-wide token and 2048-wide pooled conditioning; CLIP ViT-L and OpenCLIP
  bigG text encoders with projections; the 16-channel VAE with SD3's shift and scaling factors; flow matching with
  shift 3), without T5: its 256 token rows are zeros as diffusers makes them for ``text_encoder_3=None``, so the
  transformer sees the same 333 tokens as with T5 and the per-step cost is the real model's (T5-XXL runs once per
  prompt). For CUDA at 1024 px.

SDXL pipelines get the DDIM scheduler the project's loader gives SDXL (``ddim_scheduler_for`` of SDXL's
Euler config) and ``force_zeros_for_empty_prompt`` as SDXL base; their VAE is kept in fp32 when the other networks
are fp16 (``family.vae_dtype``), as the loader does. The tokenizer is the project's byte-level CLIP tokenizer (no
download); tokenization costs nothing either way.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from nonrigid.models.registry import family_of
from nonrigid.models.sd import DDIM_OVERRIDES, ddim_scheduler_for
from nonrigid.models.tiny import build_clip_tokenizer, build_t5_tokenizer

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

SDXL_LAYOUTS = {
    "sdxl": {
        "unet": {"block_out_channels": (320, 640, 1280), "attention_head_dim": (5, 10, 20), "norm_num_groups": 32},
        "vae": {"block_out_channels": (128, 256, 512, 512), "norm_num_groups": 32},
        "text": {"num_hidden_layers": 12},
        "text_2": {"num_hidden_layers": 32},
    },
    "sdxl-mid": {
        "unet": {"block_out_channels": (32, 64, 128), "attention_head_dim": (1, 1, 1), "norm_num_groups": 32},
        "vae": {"block_out_channels": (32, 64, 128, 128), "norm_num_groups": 32},
        "text": {"num_hidden_layers": 4},
        "text_2": {"num_hidden_layers": 4},
    },
}


def build_random_pipeline(
    layout: str, *, seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> StableDiffusionPipeline:
    """A pipeline of ``layout`` with weights drawn from ``seed``, frozen, on ``device`` in ``dtype``.

    Built directly on ``device`` (no 3 GB detour through host memory for SD v1.4). The scheduler is the reference's
    DDIM. The global RNG is left as it was. ``"sdxl"`` and ``"sdxl-mid"`` give a ``StableDiffusionXLPipeline``.
    """
    if layout in SDXL_LAYOUTS:
        return build_random_sdxl_pipeline(layout, seed=seed, device=device, dtype=dtype)
    if layout == "sd3":
        return build_random_sd3_pipeline(seed=seed, device=device, dtype=dtype)
    if layout == "flux":
        return build_random_flux_pipeline(seed=seed, device=device, dtype=dtype)
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
        vae = four_level_vae(latent_channels=4, sample_size=512, **spec["vae"])
        text_encoder = CLIPTextModel(
            CLIPTextConfig(hidden_size=768, intermediate_size=3072, **clip_special_tokens(tokenizer), **spec["text"])
        )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, **DDIM_OVERRIDES
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    return frozen(pipe, device, dtype)


def build_random_sdxl_pipeline(
    layout: str, *, seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> StableDiffusionXLPipeline:
    """An SDXL-layout pipeline (``SDXL_LAYOUTS[layout]``) as :func:`build_random_pipeline` builds SD's."""
    spec = SDXL_LAYOUTS[layout]
    device = torch.device(device)
    tokenizer = build_clip_tokenizer()
    special = clip_special_tokens(tokenizer)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=128,
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            use_linear_projection=True,
            cross_attention_dim=2048,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,  # 6 size ids x 256 + the 1280-wide pooled embedding
            **spec["unet"],
        )
        vae = four_level_vae(latent_channels=4, sample_size=1024, scaling_factor=0.13025, force_upcast=True,
                             **spec["vae"])
        text_encoder = CLIPTextModel(  # CLIP ViT-L/14
            CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, hidden_act="quick_gelu",
                           **special, **spec["text"])
        )
        text_encoder_2 = CLIPTextModelWithProjection(  # OpenCLIP ViT-bigG/14
            CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, hidden_act="gelu",
                           projection_dim=1280, **special, **spec["text_2"])
        )
    euler = EulerDiscreteScheduler(  # SDXL base 1.0's scheduler config, turned into DDIM as the loader does
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        timestep_spacing="leading",  # (its interpolation_type "linear" is Euler's default and means nothing to DDIM)
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=build_clip_tokenizer(), unet=unet, scheduler=ddim_scheduler_for(euler.config),
        force_zeros_for_empty_prompt=True,
    )
    return frozen(pipe, device, dtype)


def build_random_sd3_pipeline(
    *, seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> StableDiffusion3Pipeline:
    """SD3 medium's architecture (see the module's docstring) as :func:`build_random_pipeline` builds SD's."""
    device = torch.device(device)
    tokenizer = build_clip_tokenizer()
    special = clip_special_tokens(tokenizer)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(  # stabilityai/stable-diffusion-3-medium-diffusers's config
            sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
            pooled_projection_dim=2048, pos_embed_max_size=192,
        )
        vae = flow_vae(shift_factor=0.0609, scaling_factor=1.5305)  # SD3's
        text_encoder = CLIPTextModelWithProjection(  # CLIP ViT-L/14
            CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, hidden_act="quick_gelu",
                           num_hidden_layers=12, projection_dim=768, **special)
        )
        text_encoder_2 = CLIPTextModelWithProjection(  # OpenCLIP ViT-bigG/14
            CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_attention_heads=20, hidden_act="gelu",
                           num_hidden_layers=32, projection_dim=1280, **special)
        )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=build_clip_tokenizer(), text_encoder_3=None, tokenizer_3=None,
    )
    return frozen(pipe, device, dtype)


def build_random_flux_pipeline(
    *, seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> FluxPipeline:
    """FLUX.1-dev's architecture with random weights, as :func:`build_random_pipeline` builds SD's: the FLUX
    transformer (19 double- and 38 single-stream blocks, 24 heads of 128, guidance embedding; 11.9 B parameters),
    CLIP ViT-L (its pooled output), T5-XXL's encoder (24 layers, 4096 wide; 4.7 B parameters, its token table cut
    to the built tokenizer's ~100 entries: a lookup costs the same), the 16-channel VAE with FLUX's shift and scale,
    and FLUX.1-dev's scheduler config (dynamic shifting)."""
    device = torch.device(device)
    tokenizer, t5_tokenizer = build_clip_tokenizer(), build_t5_tokenizer()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), device:
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(  # black-forest-labs/FLUX.1-dev's config
            patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        )
        vae = flow_vae(shift_factor=0.1159, scaling_factor=0.3611)  # FLUX's
        text_encoder = CLIPTextModel(CLIPTextConfig(  # CLIP ViT-L/14
            hidden_size=768, intermediate_size=3072, num_attention_heads=12, hidden_act="quick_gelu",
            num_hidden_layers=12, **clip_special_tokens(tokenizer),
        ))
        text_encoder_2 = T5EncoderModel(T5Config(  # google/t5-v1_1-xxl's encoder
            vocab_size=len(t5_tokenizer), d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
            feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, pad_token_id=t5_tokenizer.pad_token_id,
            eos_token_id=t5_tokenizer.eos_token_id, decoder_start_token_id=0,
        ))
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=t5_tokenizer, transformer=transformer)
    return frozen(pipe, device, dtype)


def four_level_vae(**config) -> AutoencoderKL:
    """SD's four-level VAE layout (two ResNet layers per level) with ``config``'s widths, channels and factors."""
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, **config)


def flow_vae(*, shift_factor: float, scaling_factor: float) -> AutoencoderKL:
    """The 16-channel VAE of SD3 and FLUX (SD's widths, no quant convolutions); they differ in shift and scale."""
    return four_level_vae(block_out_channels=(128, 256, 512, 512), latent_channels=16, norm_num_groups=32,
                          sample_size=1024, shift_factor=shift_factor, scaling_factor=scaling_factor,
                          use_quant_conv=False, use_post_quant_conv=False)


def clip_special_tokens(tokenizer) -> dict:
    """The CLIP text config entries the tokenizer decides (special ids, vocabulary) and CLIP's 77 positions."""
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id, "vocab_size": len(tokenizer), "max_position_embeddings": 77}


def frozen(pipe, device: torch.device, dtype: torch.dtype):
    """``pipe`` with every network frozen in eval mode on ``device`` in ``dtype`` (the VAE in the precision its
    family keeps it in, as the loader does), progress bars off."""
    family = family_of(pipe)
    for module in family.modules().values():
        module.requires_grad_(False)
        module.eval()
        module.to(device=device, dtype=family.vae_dtype(dtype) if module is pipe.vae else dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
