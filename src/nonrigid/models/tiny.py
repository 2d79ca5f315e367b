"""What every family's tiny random-weight models share, built in code without any download: a small VAE, CLIP
text-encoder configs, CLIP byte-level BPE tokenizers with a chosen vocabulary and a T5 tokenizer. Each family builds
its own tiny models from these (``ModelFamily.tiny_models``; e.g. ``StableDiffusion``'s ``tiny``), and
:func:`nonrigid.models.registry.build_tiny_pipeline` builds any of them by name."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

from diffusers import AutoencoderKL
from transformers import CLIPTextConfig, CLIPTokenizer, T5TokenizerFast


def tiny_vae(latent_channels: int = 4, **extra) -> AutoencoderKL:
    """The tiny models' VAE: 4 stages (a factor of 8, as SD's), 8 to 16 channels, 64 px sample size."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=64,
        **extra,
    )


def tiny_text_config(hidden: int, act: str, projection: int | None = None, layers: int = 2) -> CLIPTextConfig:
    extra = {"projection_dim": projection} if projection else {}
    return CLIPTextConfig(
        vocab_size=TINY_VOCAB_SIZE, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, max_position_embeddings=77, hidden_act=act, bos_token_id=TINY_VOCAB_SIZE - 2,
        eos_token_id=TINY_VOCAB_SIZE - 1, pad_token_id=TINY_VOCAB_SIZE - 1, **extra,
    )


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


def _byte_characters() -> list[str]:
    """The 256 printable stand-ins CLIP's byte-level BPE uses for bytes (GPT-2's mapping)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    codes, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


TINY_VOCAB_SIZE = 2 * 256 + 2  # the character tokenizer's: 256 byte characters, alone and word-final, + 2


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
