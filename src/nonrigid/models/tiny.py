"""Models built in code with random weights, for tests and smoke runs (no download): the tiny SD-1.x-shaped
pipeline and CLIP byte-level BPE tokenizers with a chosen vocabulary."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .sd import sd_ddim_scheduler


def build_tiny_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A tiny SD-1.x-shaped pipeline with random weights, built without any download.

    Same component classes and layout as SD 1.x (VAE downsampling by 8, cross-attention UNet, CLIP text encoder
    with 77 positions) at a few hundred thousand parameters. Its output is noise: it is for tests and smoke runs.
    The weights depend only on ``seed``; the global RNG is left as it was.
    """
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
