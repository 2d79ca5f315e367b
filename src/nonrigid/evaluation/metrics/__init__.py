"""The paper's evaluation metrics (method.md §3, Sec. 5.3): CLIP-T, LPIPS (VGG) and the LAION aesthetic score.

Usable on their own: ``load_clip`` (:mod:`.clip`), ``load_lpips`` (:mod:`.lpips`) and ``load_aesthetic_head``
(:mod:`.aesthetic`) give the three networks, and ``clip_t``, ``lpips_distance`` and ``aesthetic_score`` compute one
metric each. ``Metrics`` bundles them, loads each network the first time it is needed and scores (input, edited
image, target text) triples.

What each number is:

- **CLIP-T**: cosine similarity of the L2-normalised CLIP image embedding of the edited image and the CLIP text
  embedding of the target text, in [-1, 1]. The paper reports this cosine as is; it is *not* multiplied by 100
  (the "CLIPScore" convention). Default backbone: CLIP ViT-L/14 through transformers.
- **LPIPS** (v0.1, VGG16): distance between the input and the edited image (lower = identity better kept), by the
  ``lpips`` package's own network: VGG16 features at its 5 relu stages, each channel vector unit-normalised,
  squared differences weighted by the learned per-channel linear weights, averaged over space and summed over
  stages. Images are compared at the input's size
  (an edit of another size is resized to it, bicubic) with pixels scaled to [-1, 1].
- **Aesthetic score**: the LAION "improved aesthetic predictor", an MLP 768-1024-128-64-16-1 (dropout, no
  activations) on the L2-normalised CLIP ViT-L/14 image embedding of the edited image.

Where the weights come from (every one can be given as a local path; offline, a missing file is a one-line
``UsageError`` that names the file and where to put it):

| weights | default |
| --- | --- |
| CLIP | the Hugging Face hub cache (``openai/clip-vit-large-patch14``, downloaded once), or a local folder |
| VGG16 (ImageNet) | torchvision's ``vgg16-397923af.pth`` in the torch hub cache, downloaded once, hash checked |
| LPIPS linear layers | ``weights/v0.1/vgg.pth`` shipped inside the ``lpips`` package (a dependency) |
| aesthetic head | ``$NONRIGID_AESTHETIC_HEAD``, else ``<cache>/weights/aesthetic/`` (fetched once); sha256 checked |

PIE-Bench pairs (those with a mask) are also scored with PIE-Bench's own metrics (:mod:`.piebench`: structure
distance on DINO ViT-B/8, PSNR, LPIPS on SqueezeNet, MSE and SSIM of the unedited region, CLIP score of the whole
edit and of its edited region), whose networks load the first time a PIE-Bench pair is scored.

The ``.pth`` files are pickles; they are read with ``torch.load(weights_only=True)``, which only rebuilds tensors
and containers, never arbitrary objects.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from ...errors import UsageError
from ...models.fingerprint import weights_fingerprint
from ...models.loading import resolve_device
from ..protocol import DEFAULT_CLIP, DEFAULT_DINO
from .aesthetic import (
    AESTHETIC_ENV,
    AESTHETIC_FILENAME,
    AESTHETIC_SHA256,
    AESTHETIC_URL,
    AestheticHead,
    aesthetic_score,
    build_tiny_aesthetic_head,
    check_head_width,
    default_aesthetic_path,
    load_aesthetic_head,
)
from .clip import ClipBackbone, build_tiny_clip, clip_t, cosine, load_clip
from .common import check_same_length, chunks, metrics_dtype
from .lpips import LPIPS, VGG16_FILENAME, build_tiny_lpips, load_lpips, lpips_distance
from .piebench import PieBenchMetrics
from .weights import file_sha256

__all__ = [
    "AESTHETIC_ENV",
    "AESTHETIC_FILENAME",
    "AESTHETIC_SHA256",
    "AESTHETIC_URL",
    "DEFAULT_CLIP",
    "LPIPS",
    "VGG16_FILENAME",
    "AestheticHead",
    "ClipBackbone",
    "Metrics",
    "PieBenchMetrics",
    "aesthetic_score",
    "build_tiny_aesthetic_head",
    "build_tiny_clip",
    "build_tiny_lpips",
    "clip_t",
    "cosine",
    "default_aesthetic_path",
    "file_sha256",
    "load_aesthetic_head",
    "load_clip",
    "load_lpips",
    "lpips_distance",
]


class Metrics:
    """CLIP-T, LPIPS and aesthetic score of edits, with each network loaded the first time it is needed.

    ``clip_model``: hub id or local folder of the CLIP backbone for CLIP-T and, unless ``aesthetic_clip_model``
    names another, for the aesthetic score (whose head needs CLIP ViT-L/14 embeddings). ``lpips_weights``,
    ``vgg_weights``, ``aesthetic_head``: local weight files (see the module docstring for the defaults).
    ``dtype`` defaults to fp32 on every device: the metrics are cheap next to editing, and reported numbers should
    not depend on the GPU's half-precision rounding.
    """

    def __init__(
        self,
        clip_model: str = DEFAULT_CLIP,
        *,
        lpips_weights: str | os.PathLike | None = None,
        vgg_weights: str | os.PathLike | None = None,
        aesthetic_head: str | os.PathLike | None = None,
        aesthetic_clip_model: str | None = None,
        dino_model: str = DEFAULT_DINO,
        squeezenet_weights: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int = 8,
    ):
        if batch_size < 1:
            raise UsageError(f"metrics batch size must be at least 1, got {batch_size}")
        self.device = resolve_device(device)
        self.dtype = metrics_dtype(dtype, self.device)
        self.batch_size = batch_size
        self.clip_model = str(clip_model)
        self.aesthetic_clip_model = str(aesthetic_clip_model) if aesthetic_clip_model else self.clip_model
        self.lpips_weights, self.vgg_weights, self.aesthetic_head_path = lpips_weights, vgg_weights, aesthetic_head
        self._clip: ClipBackbone | None = None
        self._aesthetic_clip: ClipBackbone | None = None
        self._lpips: LPIPS | None = None
        self._head: AestheticHead | None = None
        self._file_digests: dict[str, str] = {}
        self.dino_model, self.squeezenet_weights = str(dino_model), squeezenet_weights
        self._pie: PieBenchMetrics | None = None

    # ---- the networks, loaded on first use

    @property
    def clip(self) -> ClipBackbone:
        if self._clip is None:
            self._clip = load_clip(self.clip_model, self.device, self.dtype)
        return self._clip

    @property
    def aesthetic_clip(self) -> ClipBackbone:
        if self._aesthetic_clip is None:
            if self.aesthetic_clip_model == self.clip_model:
                self._aesthetic_clip = self.clip
            else:
                self._aesthetic_clip = load_clip(self.aesthetic_clip_model, self.device, self.dtype)
        return self._aesthetic_clip

    @property
    def lpips(self) -> LPIPS:
        if self._lpips is None:
            self._lpips = load_lpips(self.lpips_weights, self.vgg_weights, self.device, self.dtype)
        return self._lpips

    @property
    def aesthetic_head(self) -> AestheticHead:
        if self._head is None:
            self._head = load_aesthetic_head(self.aesthetic_head_path, self.device)
        return self._head

    @property
    def pie(self) -> PieBenchMetrics:
        """PIE-Bench's metrics, sharing the CLIP backbone (both default to CLIP ViT-L/14)."""
        if self._pie is None:
            self._pie = PieBenchMetrics(self.clip_model, self.dino_model, squeezenet_weights=self.squeezenet_weights,
                                        device=self.device, dtype=self.dtype, clip=self.clip)
        return self._pie

    def load(self, piebench: bool = False) -> Metrics:
        """Load every network now (so a missing weight fails before a long evaluation, not after it); with
        ``piebench``, PIE-Bench's too."""
        check_head_width(self.aesthetic_clip, self.aesthetic_head)
        _ = self.clip, self.lpips
        if piebench:
            self.pie.load()
        return self

    # ---- scoring

    def score(self, source: Image.Image, edited: Image.Image, target_text: str) -> dict[str, float]:
        """``{"clip_t", "lpips", "aesthetic"}`` of one edit: CLIP-T(edited, text), LPIPS(source, edited) and the
        aesthetic score of the edited image."""
        return self.score_batch([source], [edited], [target_text])[0]

    def score_batch(
        self, sources: Sequence[Image.Image], edited: Sequence[Image.Image], texts: Sequence[str],
        masks: Sequence[Sequence[int] | None] | None = None,
    ) -> list[dict[str, float]]:
        """``score`` of each triple, computed in batches of ``batch_size``; one CLIP pass serves both CLIP-T and the
        aesthetic score when they share a backbone. ``masks``: each edit's PIE-Bench run-length mask (None: not a
        PIE-Bench pair); edits with one also get PIE-Bench's columns."""
        check_same_length(sources, edited, "sources", "edited images")
        check_same_length(edited, texts, "edited images", "texts")
        self.load()
        clip_scores: list[float] = []
        aesthetic_scores: list[float] = []
        for chunk in chunks(range(len(edited)), self.batch_size):
            images = [edited[i] for i in chunk]
            image_emb = self.clip.image_embeddings(images)
            text_emb = self.clip.text_embeddings([texts[i] for i in chunk])
            clip_scores.extend(cosine(image_emb, text_emb).tolist())
            if self.aesthetic_clip is not self.clip:
                image_emb = self.aesthetic_clip.image_embeddings(images)
            aesthetic_scores.extend(self.aesthetic_head(image_emb).tolist())
        lpips_scores = lpips_distance(self.lpips, list(sources), list(edited), batch_size=self.batch_size)
        rows = [
            {"clip_t": c, "lpips": p, "aesthetic": a}
            for c, p, a in zip(clip_scores, lpips_scores, aesthetic_scores, strict=True)
        ]
        pie = [i for i, mask in enumerate(masks or ()) if mask is not None]
        if pie:
            extra = self.pie.score_batch([sources[i] for i in pie], [edited[i] for i in pie], [texts[i] for i in pie],
                                         [masks[i] for i in pie])
            for i, scores in zip(pie, extra, strict=True):
                rows[i].update(scores)
        return rows

    # ---- the tiny variant and the record

    @classmethod
    def tiny(cls, seed: int = 0) -> Metrics:
        """Random-weight metrics built without any download (CPU, fp32), for tests of code that uses metrics.

        A tiny CLIP (32 px, 16-wide embeddings), the lpips package's LPIPS network with a random VGG16 trunk and
        random linear weights, and the aesthetic head's architecture with random weights, 16 wide. The numbers
        mean nothing; the code paths and the output format are the real ones.
        """
        metrics = cls(clip_model=f"tiny-random-clip(seed={seed})", device="cpu", dtype="fp32")
        metrics._clip = build_tiny_clip(seed)
        metrics._lpips = build_tiny_lpips(seed)
        metrics._head = build_tiny_aesthetic_head(metrics._clip.projection_dim, seed)
        metrics._pie = PieBenchMetrics.tiny(seed, clip=metrics._clip)
        return metrics

    def describe(self) -> dict:
        """Backbones, weight files and their sha256s, for an evaluation's record (loads the networks)."""
        self.load()
        clip, aesthetic_clip, net, head = self.clip, self.aesthetic_clip, self.lpips, self.aesthetic_head
        return {
            "clip_t": {
                "backbone": clip.name,
                "revision": clip.revision,
                "weights_fingerprint": weights_fingerprint(clip.model),
                "value": "cosine of L2-normalised CLIP image and text embeddings, in [-1, 1] (not multiplied by 100)",
            },
            "lpips": {
                "version": "0.1",
                "backbone": "vgg16" if net.sources.get("vgg_weights") else "vgg16 with random weights",
                "vgg_weights": net.sources.get("vgg_weights"),
                "vgg_sha256": self._digest(net.sources.get("vgg_weights")),
                "linear_weights": net.sources.get("linear_weights"),
                "linear_sha256": self._digest(net.sources.get("linear_weights")),
                "input": "RGB in [-1, 1] at the source image's size (edit resized to it, bicubic)",
            },
            "aesthetic": {
                "head": AESTHETIC_FILENAME if head.source else "tiny random head",
                "file": head.source,
                "sha256": head.sha256,
                "backbone": aesthetic_clip.name,
                "input": "L2-normalised CLIP image embedding of the edited image",
            },
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            **({"piebench": self._pie.describe()} if self._pie is not None and self._pie._dino is not None else {}),
        }

    def _digest(self, path: str | None) -> str | None:
        if path is None:
            return None
        if path not in self._file_digests:
            self._file_digests[path] = file_sha256(Path(path))
        return self._file_digests[path]
