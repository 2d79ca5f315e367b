"""Tiny instruction-editing pipelines built in code with seeded random weights (no download): FLUX.1 Kontext [dev]
(``FluxKontextPipeline``), Qwen-Image-Edit (``QwenImageEditPipeline``) and Qwen-Image-Edit-2509 / 2511
(``QwenImageEditPlusPipeline``), for tests of :mod:`nonrigid.models.edit_models` and smoke runs.

Each is the real model's layout at toy width: the same component classes, the same structure (FLUX's double and
single stream blocks with the guidance embedding; Qwen's MMDiT with 3-axis rope, its causal 3D VAE with 3 spatial
downsamplings and the real per-channel latent mean and std; Qwen2.5-VL with its windowed vision tower feeding the
language model) and the real scheduler configs, so the pipelines run their real code paths. Tokenizers and the
Qwen2-VL processor are built from code too: the Qwen tokenizer is a byte-level BPE with Qwen2's pre-tokenizer whose
merges make each piece of the pipelines' system prompt one token, so the prompt prefix has the 64 tokens the
pipelines' ``prompt_template_encode_start_idx`` drops, as with the real tokenizer.

The weights depend only on ``seed``; the global RNG is left as it was. Output is noise.
"""

from __future__ import annotations

from typing import Literal, TypeVar

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    FluxKontextPipeline,
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
    QwenImageTransformer2DModel,
)
from tokenizers import pre_tokenizers
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

from .flux import build_tiny_flux

# black-forest-labs/FLUX.1-Kontext-dev, scheduler/scheduler_config.json. Kontext [dev] is fine-tuned from FLUX.1 [dev]
# and its diffusers folder ships FLUX.1-dev's scheduler config (shift 3 with dynamic shifting between 256 and 4096
# tokens). The hub file itself could not be read from here (no hub access); the values are FLUX.1-dev's, which the
# diffusers Kontext pipeline's defaults for ``calculate_shift`` also encode.
KONTEXT_DEV_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}

# Qwen/Qwen-Image-Edit (and -2509, -2511, which ship the same file), scheduler/scheduler_config.json, as reproduced
# by several independent public projects (ostris/ai-toolkit, bghira/SimpleTuner, mirrors of the hub folder): an
# exponential time shift with mu from the image length between 256 and 8192 tokens (0.5 .. 0.9), and the schedule
# stretched so that its last sigma is 0.02.
QWEN_IMAGE_EDIT_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 0.9,
    "base_image_seq_len": 256,
    "max_image_seq_len": 8192,
    "shift_terminal": 0.02,
    "time_shift_type": "exponential",
    "invert_sigmas": False,
    "stochastic_sampling": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
}

# The Qwen2-VL image processor settings of Qwen/Qwen-Image-Edit's processor/preprocessor_config.json: 14 px patches
# merged 2x2 into one language-model token, 2 frames per temporal patch, images resized to between 3136 and
# 12845056 pixels in multiples of 28, CLIP's normalisation.
QWEN_IMAGE_PROCESSOR_CONFIG = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
}

# Qwen2.5-VL's added tokens, in the real tokenizer's order (ids 151643..151664 there; here right after the BPE
# vocabulary). The edit pipelines' templates use <|im_start|>, <|im_end|>, <|vision_start|>, <|image_pad|> and
# <|vision_end|>.
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)

# The text pieces of the edit pipelines' prompt templates (both share the system prompt; Plus labels its images
# "Picture 1: ..."): each becomes one token of the tiny tokenizer.
_TEMPLATE_TEXT = (
    "system\nDescribe the key features of the input image (color, shape, size, texture, objects, background), then "
    "explain how the user's text instruction should alter or modify the image. Generate a new image that meets the "
    "user's requirements while maintaining consistency with the original input where appropriate.\nuser\nPicture 1: "
    "assistant\n"
)

QwenEditPlusVersion = Literal["2509", "2511"]
PipelineT = TypeVar("PipelineT", FluxKontextPipeline, QwenImageEditPipeline, QwenImageEditPlusPipeline)


def build_tiny_kontext(seed: int = 0) -> FluxKontextPipeline:
    """FLUX.1 Kontext [dev]'s layout: exactly ``tiny-flux``'s components (FLUX.1-dev's transformer with the guidance
    embedding, CLIP and T5 with tokenizers built in code, the 16-channel VAE; the same weights for the same seed,
    as Kontext [dev] has FLUX.1 [dev]'s architecture) in a ``FluxKontextPipeline`` with Kontext-dev's scheduler.

    The pipeline's size handling is the real one: its output is resized to ``max_area`` (default 1024**2) and the
    reference image to one of Kontext's preferred resolutions unless ``_auto_resize=False``; tests pass a small
    ``max_area`` and ``_auto_resize=False``.
    """
    flux = build_tiny_flux(seed)
    return _evaluating(FluxKontextPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**KONTEXT_DEV_SCHEDULER_CONFIG),
        vae=flux.vae,
        text_encoder=flux.text_encoder,
        tokenizer=flux.tokenizer,
        text_encoder_2=flux.text_encoder_2,
        tokenizer_2=flux.tokenizer_2,
        transformer=flux.transformer,
    ))


def build_tiny_qwen_edit(seed: int = 0) -> QwenImageEditPipeline:
    """Qwen-Image-Edit's layout (one reference image, fed to the VL encoder and, as latents, to the transformer)."""
    return _evaluating(QwenImageEditPipeline(**_tiny_qwen_components(seed, zero_cond_t=False)))


def build_tiny_qwen_edit_plus(seed: int = 0, version: QwenEditPlusVersion = "2511") -> QwenImageEditPlusPipeline:
    """Qwen-Image-Edit-2509 / 2511's layout (a list of reference images). ``2511`` sets the transformer's
    ``zero_cond_t`` as the real 2511 config does (the reference tokens are modulated as at timestep 0); ``2509``
    leaves it off."""
    if version not in ("2509", "2511"):
        raise ValueError(f"unknown Qwen-Image-Edit-Plus version {version!r}; choose 2509 or 2511")
    return _evaluating(QwenImageEditPlusPipeline(**_tiny_qwen_components(seed, zero_cond_t=version == "2511")))


def _evaluating(pipe: PipelineT) -> PipelineT:
    """The pipeline with every network in eval mode, as ``from_pretrained`` leaves them: modules built directly
    start in training mode, where T5's dropout would make the prompt encoding random."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


def _tiny_qwen_components(seed: int, zero_cond_t: bool) -> dict:
    tokenizer = build_qwen_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = _tiny_qwen_transformer(zero_cond_t)
        vae = _tiny_qwen_vae()
        text_encoder = _tiny_qwen_vl(tokenizer)
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_EDIT_SCHEDULER_CONFIG),
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "processor": build_qwen_processor(tokenizer),
        "transformer": transformer,
    }


def _tiny_qwen_transformer(zero_cond_t: bool) -> QwenImageTransformer2DModel:
    """The real config's structure (2x2 patches of 16 latent channels in, 16 out; rope axes frame / height / width
    splitting the head, 16 + 56 + 56 = 128 there, 4 + 6 + 6 = 16 here; no guidance embedding) at 2 layers of
    2 heads x 16 instead of 60 of 24 x 128; the text width is the tiny VL model's."""
    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=_QWEN_TEXT_WIDTH, guidance_embeds=False, axes_dims_rope=(4, 6, 6),
        zero_cond_t=zero_cond_t,
    )


def _tiny_qwen_vae() -> AutoencoderKLQwenImage:
    """The real VAE's structure (16 latent channels, four levels: 8x spatial and 4x temporal downsampling, the real
    latents_mean / latents_std) with a base width of 2 channels instead of 96 and one residual block per level
    instead of two. Its 3D convolutions dominate the edit pipelines' CPU time: they always encode the reference at
    about 1024x1024."""
    return AutoencoderKLQwenImage(
        base_dim=2, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
        temperal_downsample=[False, True, True],
    )


_QWEN_TEXT_WIDTH = 32


def _tiny_qwen_vl(tokenizer: Qwen2Tokenizer) -> Qwen2_5_VLForConditionalGeneration:
    """Qwen2.5-VL-7B's structure at toy width: a language model with grouped-query attention and multimodal rope
    (its head split into temporal / height / width sections, 16 + 24 + 24 of 64 there, 2 + 3 + 3 of 8 here) and a
    vision tower of 14 px patches over 2 frames, windowed attention (112 px windows) with full attention in its last
    layer, merging 2x2 patches into one token of the language model's width."""
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": _QWEN_TEXT_WIDTH, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-6,
            "max_position_embeddings": 32768, "hidden_act": "silu",
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
            "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>"),
        },
        vision_config={
            "depth": 2, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "in_channels": 3,
            "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
            "fullatt_block_indexes": [1], "tokens_per_second": 2, "out_hidden_size": _QWEN_TEXT_WIDTH,
            "hidden_act": "silu",
        },
        **ids,
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def build_qwen_tokenizer() -> Qwen2Tokenizer:
    """A Qwen2 tokenizer built in code: byte-level BPE with Qwen2's pre-tokenizer, the 256 byte symbols, merges that
    make each piece of the edit templates' text one token (so the system prompt plus ``<|im_start|>user\\n`` is 64
    tokens, as with the real vocabulary), and Qwen2.5-VL's special tokens. Other text still tokenizes, byte by byte
    where no merge applies."""
    pieces = _template_pieces()
    for _ in range(len(pieces) + 1):
        tokenizer = _qwen_tokenizer_with_merges(pieces)
        split = [p for p in pieces if len(tokenizer.convert_tokens_to_ids(tokenizer.tokenize(_decode(p)))) != 1]
        if not split:
            return tokenizer
        pieces = split + [p for p in pieces if p not in split]  # BPE applies the best-ranked merge first
    raise ValueError(f"could not make these template pieces single tokens: {split}")


def build_qwen_processor(tokenizer: Qwen2Tokenizer | None = None) -> Qwen2VLProcessor:
    """Qwen2-VL's processor (the image processor with Qwen-Image-Edit's settings, and ``tokenizer``), which expands
    each ``<|image_pad|>`` to one token per merged 28x28 patch of its image. transformers 5 requires a video
    processor too (the edit pipelines never pass videos); it gets the same patch settings."""
    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**QWEN_IMAGE_PROCESSOR_CONFIG),
        tokenizer=tokenizer or build_qwen_tokenizer(),
        video_processor=Qwen2VLVideoProcessor(**QWEN_IMAGE_PROCESSOR_CONFIG),
    )


def _template_pieces() -> list[str]:
    """The byte-level pre-tokens of the templates' text (as Qwen2's pre-tokenizer splits it), first-seen order."""
    splitter = Qwen2Tokenizer()._tokenizer.pre_tokenizer
    assert isinstance(splitter, pre_tokenizers.Sequence)
    return list(dict.fromkeys(piece for piece, _ in splitter.pre_tokenize_str(_TEMPLATE_TEXT)))


def _qwen_tokenizer_with_merges(pieces: list[str]) -> Qwen2Tokenizer:
    vocab = list(_byte_symbols())
    merges: list[tuple[str, str]] = []
    for piece in pieces:
        current = piece[0]
        for symbol in piece[1:]:
            if (current, symbol) not in merges:
                merges.append((current, symbol))
            current += symbol
            vocab.append(current)
    vocab = list(dict.fromkeys(vocab))
    ids = {token: i for i, token in enumerate(vocab)}
    tokenizer = Qwen2Tokenizer(vocab=ids, merges=merges, model_max_length=32768, errors="replace")
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS)})
    return tokenizer


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes (GPT-2's mapping), in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[byte] for byte in range(256)]


def _decode(piece: str) -> str:
    """The text a byte-level piece stands for."""
    byte_of = {symbol: byte for byte, symbol in enumerate(_byte_symbols())}
    return bytes(byte_of[symbol] for symbol in piece).decode("utf-8")
