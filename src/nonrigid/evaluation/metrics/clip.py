"""CLIP-T: cosine similarity of the L2-normalised CLIP image embedding of the edited image and the CLIP text
embedding of the target text, in [-1, 1] (the paper reports the cosine as is, *not* multiplied by 100). Default
backbone: CLIP ViT-L/14 through transformers, from the Hugging Face hub cache or a local folder. The CLIP
backbone also gives the aesthetic score its image embeddings."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import torch
import torch.nn.functional as F
import transformers
from PIL import Image
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTokenizer, CLIPVisionConfig

from ...errors import UsageError, first_line
from ...images import to_rgb
from ...models.loading import resolve_device
from ...models.tiny import build_character_tokenizer
from ..protocol import DEFAULT_CLIP
from .common import as_list, check_same_length, chunks, metrics_dtype

logger = logging.getLogger("nonrigid")

TINY_CLIP_IMAGE_SIZE = 32

# transformers 5 splits the PIL-based processor (the one that matches OpenAI's preprocessing: PIL bicubic resize,
# center crop) from the torchvision one; 4.x only has the PIL one, under the plain name.
_CLIP_IMAGE_PROCESSOR = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor

__all__ = ["DEFAULT_CLIP", "ClipBackbone", "build_tiny_clip", "clip_t", "cosine", "load_clip"]


@dataclass
class ClipBackbone:
    """A CLIP model with its tokenizer and image processor, and where it came from (for the record)."""

    model: CLIPModel
    tokenizer: CLIPTokenizer
    image_processor: Any
    name: str
    revision: str | None = None

    @property
    def projection_dim(self) -> int:
        return self.model.config.projection_dim

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def image_embeddings(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Projected image embeddings (B, D) as fp32, not normalised (what OpenAI's ``encode_image`` returns)."""
        rgb = [to_rgb(image) for image in images]
        pixels = self.image_processor(images=rgb, return_tensors="pt").pixel_values
        pixels = pixels.to(device=self.device, dtype=self.model.dtype)
        # vision_model + visual_projection is get_image_features in every transformers version (5.x changed what
        # get_image_features returns).
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return self.model.visual_projection(pooled).float()

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """Projected text embeddings (B, D) as fp32, not normalised; texts are cut at CLIP's 77 tokens."""
        max_length = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
        tokens = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        ).to(self.device)
        pooled = self.model.text_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).pooler_output
        return self.model.text_projection(pooled).float()

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write model, tokenizer and image processor to one folder, which ``load_clip(folder)`` reads offline."""
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        self.image_processor.save_pretrained(folder)


def load_clip(
    name_or_path: str | os.PathLike = DEFAULT_CLIP,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    local_files_only: bool = False,
) -> ClipBackbone:
    """A CLIP backbone from a local folder (``save_pretrained`` layout) or a hub id.

    A hub id is looked up in the hub cache first, so an offline machine that downloaded it once never touches the
    network; only if it is not there (and the hub is not set offline, nor ``local_files_only``) is it downloaded.
    Weights must be safetensors (pickle ``.bin`` files can run code when loaded).
    """
    device = resolve_device(device)
    dtype = metrics_dtype(dtype, device)
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_file():
        raise UsageError(f"CLIP model {name} is a file; pass a folder written by save_pretrained or a hub id")
    if path.is_dir():
        parts = _try_clip_parts(str(path), local_files_only=True)
        if isinstance(parts, Exception):
            raise UsageError(f"could not load CLIP model from folder {name}: {first_line(parts)}") from parts
    elif name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UsageError(f"CLIP model folder {name} does not exist")
    else:
        parts = _try_clip_parts(name, local_files_only=True)
        offline = local_files_only or huggingface_hub.constants.HF_HUB_OFFLINE
        if isinstance(parts, Exception) and not offline:
            logger.info("CLIP model %s is not in the hub cache; downloading it once", name)
            parts = _try_clip_parts(name, local_files_only=False)
        if isinstance(parts, Exception):
            why = "the hub is set offline" if offline else "could not be downloaded"
            raise UsageError(
                f"CLIP model {name!r} is not in the Hugging Face hub cache and {why} ({first_line(parts)}); "
                "connect once to download it, or pass a local folder written by save_pretrained"
            ) from parts
    model, tokenizer, image_processor = parts
    model.requires_grad_(False).eval().to(device=device, dtype=dtype)
    revision = getattr(model.config, "_commit_hash", None)
    return ClipBackbone(model, tokenizer, image_processor, name=name, revision=revision)


def _try_clip_parts(name: str, *, local_files_only: bool) -> tuple[CLIPModel, CLIPTokenizer, Any] | Exception:
    """The three CLIP parts, or the exception that stopped loading them (callers decide whether to retry)."""
    try:
        model = CLIPModel.from_pretrained(name, local_files_only=local_files_only, use_safetensors=True)
        tokenizer = CLIPTokenizer.from_pretrained(name, local_files_only=local_files_only)
        image_processor = _CLIP_IMAGE_PROCESSOR.from_pretrained(name, local_files_only=local_files_only)
    except Exception as err:  # hub and file errors come in many types; all mean "not loadable from here"
        return err
    return model, tokenizer, image_processor


def build_tiny_clip(seed: int = 0, projection_dim: int = 16) -> ClipBackbone:
    """A tiny CLIP with random weights (32 px images, character tokenizer), built without any download.

    For tests of code that uses metrics: its numbers mean nothing, but they are computed by the same code path
    as the real backbone's. The weights depend only on ``seed``; the global RNG is left as it was.
    """
    tokenizer = build_character_tokenizer()
    vocab_size = len(tokenizer)
    text_config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision_config = CLIPVisionConfig(
        image_size=TINY_CLIP_IMAGE_SIZE,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    config = CLIPConfig(
        text_config=text_config.to_dict(), vision_config=vision_config.to_dict(), projection_dim=projection_dim
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config)
    model.requires_grad_(False).eval()
    side = TINY_CLIP_IMAGE_SIZE
    image_processor = _CLIP_IMAGE_PROCESSOR(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    return ClipBackbone(model, tokenizer, image_processor, name=f"tiny-random-clip(seed={seed})")


def clip_t(
    clip: ClipBackbone,
    images: Image.Image | Sequence[Image.Image],
    texts: str | Sequence[str],
    *,
    batch_size: int = 8,
) -> float | list[float]:
    """CLIP-T of each (image, text) pair: the cosine of their normalised embeddings, in [-1, 1] (not x100).

    One image and one text give a float; sequences of equal length give a list.
    """
    image_list, single = as_list(images, Image.Image)
    text_list, single_text = as_list(texts, str)
    check_same_length(image_list, text_list, "images", "texts")
    scores = []
    for chunk in chunks(range(len(image_list)), batch_size):
        image_emb = clip.image_embeddings([image_list[i] for i in chunk])
        text_emb = clip.text_embeddings([text_list[i] for i in chunk])
        scores.extend(cosine(image_emb, text_emb).tolist())
    return scores[0] if single and single_text else scores


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of two (B, D) batches, in fp32."""
    return (F.normalize(a.float(), dim=-1) * F.normalize(b.float(), dim=-1)).sum(dim=-1)
