"""The aesthetic score: the LAION "improved aesthetic predictor", an MLP 768-1024-128-64-16-1 (dropout, no
activations) on the L2-normalised CLIP ViT-L/14 image embedding of the edited image.

The head's file is ``$NONRIGID_AESTHETIC_HEAD``, else ``<cache>/weights/aesthetic/`` (fetched once), or a path
given; its sha256 is checked, and it is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ...errors import UsageError, first_line
from ...models.loading import resolve_device
from ...stages.cache import default_cache_dir
from .clip import ClipBackbone
from .common import as_list, chunks
from .weights import download, existing_file, file_sha256, read_tensors

AESTHETIC_FILENAME = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_SHA256 = "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0"
AESTHETIC_URL = f"https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/{AESTHETIC_FILENAME}"
AESTHETIC_ENV = "NONRIGID_AESTHETIC_HEAD"
AESTHETIC_WIDTH = 768  # CLIP ViT-L/14's embedding width, the head's input


class AestheticHead(nn.Module):
    """The LAION improved aesthetic predictor's MLP (layer indices match its state dict, ``layers.0`` …).

    ``forward`` takes CLIP image embeddings, L2-normalises them (the head was trained on normalised ViT-L/14
    embeddings) and returns one score per row as fp32. ``source`` and ``sha256`` record the file it came from.
    """

    def __init__(self, input_size: int = AESTHETIC_WIDTH):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )
        self.source: str | None = None
        self.sha256: str | None = None
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        normalised = F.normalize(embeddings.float(), dim=-1)
        return self.layers(normalised.to(self.layers[0].weight.device)).squeeze(-1)


def load_aesthetic_head(
    path: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    *,
    expected_sha256: str | None = AESTHETIC_SHA256,
) -> AestheticHead:
    """The LAION head from ``path``, else ``$NONRIGID_AESTHETIC_HEAD``, else the user cache (downloaded once).

    The file's sha256 must be ``expected_sha256`` (the LAION file's, by default): a different file is refused.
    The head always runs in fp32 (it is 1 M weights).
    """
    file = _resolve_aesthetic(path)
    digest = file_sha256(file)
    if expected_sha256 is not None and digest != expected_sha256:
        raise UsageError(
            f"{file} is not the LAION aesthetic head: its sha256 is {digest[:16]}…, expected "
            f"{expected_sha256[:16]}…; replace it with {AESTHETIC_FILENAME} from {AESTHETIC_URL}"
        )
    state = read_tensors(file, "aesthetic head")
    width = state["layers.0.weight"].shape[1] if "layers.0.weight" in state else AESTHETIC_WIDTH
    head = AestheticHead(width)
    try:
        head.load_state_dict(state)
    except RuntimeError as err:
        raise UsageError(f"{file} is not a LAION aesthetic head state dict: {first_line(err)}") from err
    head.source, head.sha256 = str(file), digest
    return head.to(resolve_device(device))


def default_aesthetic_path() -> Path:
    """Where the head is looked for and downloaded to: ``$NONRIGID_AESTHETIC_HEAD`` or the user cache."""
    override = os.environ.get(AESTHETIC_ENV)
    if override:
        return Path(override).expanduser()
    return default_cache_dir() / "weights" / "aesthetic" / AESTHETIC_FILENAME


def _resolve_aesthetic(path: str | os.PathLike | None) -> Path:
    what = f"aesthetic head ({AESTHETIC_FILENAME})"
    if path is not None:
        return existing_file(path, what, source=AESTHETIC_URL)
    default = default_aesthetic_path()
    if os.environ.get(AESTHETIC_ENV):
        return existing_file(default, what + f" named by ${AESTHETIC_ENV}", source=AESTHETIC_URL)
    if not default.is_file():
        download(AESTHETIC_URL, default, AESTHETIC_SHA256, "the LAION aesthetic head", "aesthetic_head=PATH")
    return default


def build_tiny_aesthetic_head(input_size: int, seed: int = 0) -> AestheticHead:
    """The head's architecture with random weights, for a tiny CLIP whose embeddings are ``input_size`` wide."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AestheticHead(input_size)


def aesthetic_score(
    clip: ClipBackbone,
    head: AestheticHead,
    images: Image.Image | Sequence[Image.Image],
    *,
    batch_size: int = 8,
) -> float | list[float]:
    """The aesthetic head's score of each image's CLIP embedding. One image gives a float, a sequence a list."""
    check_head_width(clip, head)
    image_list, single = as_list(images, Image.Image)
    scores = []
    for chunk in chunks(range(len(image_list)), batch_size):
        scores.extend(head(clip.image_embeddings([image_list[i] for i in chunk])).tolist())
    return scores[0] if single else scores


def check_head_width(clip: ClipBackbone, head: AestheticHead) -> None:
    if clip.projection_dim != head.input_size:
        raise UsageError(
            f"the aesthetic head reads {head.input_size}-wide CLIP ViT-L/14 embeddings but CLIP model "
            f"{clip.name} gives {clip.projection_dim}-wide ones; use a ViT-L/14 backbone for the aesthetic score"
        )
