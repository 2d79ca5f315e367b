"""Models built in code with random weights, for tests and smoke runs (no download): tiny pipelines in each
supported family's layout (SD 1.x, SD 2.x epsilon and v, SDXL, SD3) and CLIP byte-level BPE tokenizers with a chosen
vocabulary."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

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
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from .sd import sd_ddim_scheduler

# the built-in random-weight models, by name (``load_pipeline(name)``)
TINY_KINDS = ("tiny", "tiny-sd2", "tiny-sd2-v", "tiny-sdxl", "tiny-sd3", "tiny-sd35", "tiny-flux", "tiny-flux-schnell")


def build_tiny_pipeline(seed: int = 0, kind: str = "tiny"):
    """A tiny pipeline with random weights in the layout ``kind`` names, built without any download.

    ``tiny``: SD 1.x's component classes and layout (VAE downsampling by 8, cross-attention UNet, CLIP text
    encoder with 77 positions) at a few hundred thousand parameters. ``tiny-sd2`` / ``tiny-sd2-v``: SD 2.x's
    (linear attention projections, head-size attention, a GELU text encoder, epsilon or v prediction; the v one
    at 96 px as SD 2.1 is larger than SD 2 base). ``tiny-sdxl``: SDXL's (two text encoders, a pooled embedding,
    size conditioning, two transformer layers in the inner attention blocks, Euler scheduler config).
    ``tiny-sd3``: SD3's (an MMDiT transformer predicting velocity, two CLIP encoders with projections and no T5,
    a 16-channel VAE with a shift factor, a flow-matching scheduler with shift 3). ``tiny-sd35``: SD3.5's
    additions to it (RMS-normed queries and keys, as SD3.5 medium and large; a second image self-attention in the
    first layer, as SD3.5 medium's dual-attention layers). ``tiny-flux`` /
    ``tiny-flux-schnell``: FLUX.1-dev's / schnell's (a FLUX transformer over packed 2x2 patches, with or without
    the guidance embedding, a CLIP encoder's pooled output and a T5 encoder's tokens with a T5 tokenizer built in
    code, the 16-channel VAE, a flow-matching scheduler with dynamic shifting), native size 64 px.
    Their output is noise: they are for tests and smoke runs. The weights depend only on ``seed``; the global RNG
    is left as it was.
    """
    if kind == "tiny":
        return _build_tiny_sd1(seed)
    if kind in ("tiny-sd2", "tiny-sd2-v"):
        return _build_tiny_sd2(seed, v_prediction=kind == "tiny-sd2-v")
    if kind == "tiny-sdxl":
        return _build_tiny_sdxl(seed)
    if kind in ("tiny-sd3", "tiny-sd35"):
        return _build_tiny_sd3(seed, sd35=kind == "tiny-sd35")
    if kind in ("tiny-flux", "tiny-flux-schnell"):
        return _build_tiny_flux(seed, guidance_embeds=kind == "tiny-flux")
    raise ValueError(f"unknown tiny model {kind!r}; choose one of {', '.join(TINY_KINDS)}")


def _build_tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
    )


def _tiny_text_config(hidden: int, act: str, projection: int | None = None, layers: int = 2) -> CLIPTextConfig:
    extra = {"projection_dim": projection} if projection else {}
    return CLIPTextConfig(
        vocab_size=_TINY_VOCAB_SIZE, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=77, hidden_act=act, bos_token_id=_TINY_VOCAB_SIZE - 2,
        eos_token_id=_TINY_VOCAB_SIZE - 1, pad_token_id=_TINY_VOCAB_SIZE - 1, **extra,
    )


def _build_tiny_sd2(seed: int, v_prediction: bool) -> StableDiffusionPipeline:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=12 if v_prediction else 8, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=48,
            attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8,
        )
        vae = _build_tiny_vae()
        text_encoder = CLIPTextModel(_tiny_text_config(48, "gelu"))
    scheduler = DDIMScheduler(  # SD 2.x's scheduler config
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, clip_sample=False,
        set_alpha_to_one=False, prediction_type="v_prediction" if v_prediction else "epsilon",
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=build_character_tokenizer(), unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _build_tiny_sdxl(seed: int) -> StableDiffusionXLPipeline:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
            cross_attention_dim=48, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8,
            addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
        )
        vae = _build_tiny_vae()
        # Like SDXL's (768 + 1280 wide, the second with 32 layers), the encoders differ in width and the second
        # has a tenth layer: diffusers' single-file loader tells them apart by width and recognises SDXL by it.
        text_encoder = CLIPTextModel(_tiny_text_config(16, "quick_gelu"))
        text_encoder_2 = CLIPTextModelWithProjection(_tiny_text_config(32, "gelu", projection=32, layers=10))
    scheduler = EulerDiscreteScheduler(  # SDXL base 1.0's scheduler config
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        timestep_spacing="leading", interpolation_type="linear",
    )
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=build_character_tokenizer(),
        tokenizer_2=build_character_tokenizer(), unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
    )


def _build_tiny_sd3(seed: int, sd35: bool = False) -> StableDiffusion3Pipeline:
    """SD3 medium's layout at toy width (with ``sd35``, SD3.5's query/key norms and a dual-attention layer); no T5
    (its part of the token embeddings is zeros, as diffusers builds it for a pipeline loaded with
    ``text_encoder_3=None``)."""
    sd35_layout = {"qk_norm": "rms_norm", "dual_attention_layers": (0,)} if sd35 else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
            num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=48,
            pos_embed_max_size=32, **sd35_layout,
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
            latent_channels=16, norm_num_groups=4, sample_size=64, shift_factor=0.0609, scaling_factor=1.5305,
            use_quant_conv=False, use_post_quant_conv=False,
        )
        # CLIP-L and CLIP-G stand-ins: penultimate states 16 + 32 wide (padded to the 64-wide joint attention),
        # pooled projections 16 + 32 (the transformer's 48-wide pooled input)
        text_encoder = CLIPTextModelWithProjection(_tiny_text_config(16, "quick_gelu", projection=16))
        text_encoder_2 = CLIPTextModelWithProjection(_tiny_text_config(32, "gelu", projection=32))
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=text_encoder, tokenizer=build_character_tokenizer(), text_encoder_2=text_encoder_2,
        tokenizer_2=build_character_tokenizer(), text_encoder_3=None, tokenizer_3=None,
    )


def _build_tiny_flux(seed: int, guidance_embeds: bool) -> FluxPipeline:
    """FLUX.1's layout at toy width (as diffusers' own FluxPipeline tests build theirs): CLIP 32 wide (its pooled
    output is the transformer's pooled input), T5 32 wide (the joint attention width), rope axes 4 + 4 + 8 = the
    head size. ``default_sample_size`` is set to 8 latents (64 px) instead of FluxPipeline's 128."""
    t5_tokenizer = build_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance_embeds,
            axes_dims_rope=(4, 4, 8),
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
            latent_channels=16, norm_num_groups=4, sample_size=64, shift_factor=0.1159, scaling_factor=0.3611,
            use_quant_conv=False, use_post_quant_conv=False,
        )
        text_encoder = CLIPTextModel(_tiny_text_config(32, "quick_gelu"))
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


def build_t5_tokenizer() -> T5TokenizerFast:
    """A T5 tokenizer built in code (no sentencepiece file): a unigram model whose pieces are the printable ASCII
    characters, with T5's ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, the word-start marker and an appended ``</s>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(chr(code), -2.0) for code in range(33, 127)]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=512)


def _build_tiny_sd1(seed: int) -> StableDiffusionPipeline:
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
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=64,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=_TINY_VOCAB_SIZE,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                bos_token_id=_TINY_VOCAB_SIZE - 2,
                eos_token_id=_TINY_VOCAB_SIZE - 1,
                pad_token_id=_TINY_VOCAB_SIZE - 1,
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


def _byte_characters() -> list[str]:
    """The 256 printable stand-ins CLIP's byte-level BPE uses for bytes (GPT-2's mapping)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    codes, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


_TINY_VOCAB_SIZE = 2 * 256 + 2


def build_character_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer with no merges: every character is a token (enough for tests, no download)."""
    return build_clip_tokenizer(())


def build_clip_tokenizer(words: Sequence[str] = ()) -> CLIPTokenizer:
    """A CLIP byte-level BPE tokenizer whose merges make each of ``words`` a single token.

    Its base vocabulary is the 256 byte characters (alone and word-final), so any text still tokenizes; the
    merges build every given word left to right. A merge of one word can pre-empt another's (BPE applies the
    best-ranked pair first), so words that come out split are moved ahead and the merges rebuilt until each
    word is one token.
    """
    order = list(dict.fromkeys(words))
    for _ in range(len(order) + 1):
        tokenizer = _tokenizer_with_merges(order)
        split = [w for w in order if len(tokenizer(w, add_special_tokens=False).input_ids) != 1]
        if not split:
            return tokenizer
        order = split + [w for w in order if w not in split]
    raise ValueError(f"could not make these words single tokens: {split}")


def _tokenizer_with_merges(words: Sequence[str]) -> CLIPTokenizer:
    chars = _byte_characters()
    vocab = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    for word in words:
        pieces = [*word[:-1], word[-1] + "</w>"]
        current = pieces[0]
        for piece in pieces[1:]:
            pair = (current, piece)
            current = current + piece
            if pair not in merges:
                merges.append(pair)
                vocab.append(current)
    vocab = [*dict.fromkeys(vocab), "<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
        Path(folder, "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        return CLIPTokenizer(
            str(Path(folder, "vocab.json")), str(Path(folder, "merges.txt")), model_max_length=77
        )
