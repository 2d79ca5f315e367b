"""PIE-Bench's metrics, as its evaluation code defines them (cure-lab/PnPInversion, ``evaluation/evaluate.py``'s
``calculate_metric`` and ``evaluation/matrics_calculator.py``'s ``MetricsCalculator``), with the default metric set of
its ``evaluate.py`` that the paper's Table 1 reports:

- ``structure_distance`` (``calculate_structure_distance`` -> ``LossG.calculate_global_ssim_loss``, from Splicing
  ViT, ``dino_model_name="dino_vitb8"``): MSE between the cosine self-similarity matrices of the last block's keys
  (all tokens, CLS included) of DINO ViT-B/8, for source and edit; whole images.
- ``psnr_unedit_part`` (``calculate_psnr`` with ``1 - mask``): torchmetrics PSNR, data range 1, of both images
  multiplied by the unedited region.
- ``lpips_unedit_part`` (``calculate_lpips`` with ``1 - mask``): LPIPS v0.1 on SqueezeNet 1.1 (torchmetrics'
  ``net_type="squeeze"``), pixels in [-1, 1], of the masked images.
- ``mse_unedit_part`` (``calculate_mse`` with ``1 - mask``): torchmetrics MSE over every pixel and channel of the
  masked images, in [0, 1] units.
- ``ssim_unedit_part`` (``calculate_ssim`` with ``1 - mask``): torchmetrics SSIM (Gaussian 11 x 11, sigma 1.5), data
  range 1, of the masked images, averaged where the window fits (:func:`ssim`).
- ``clip_similarity_target_image`` (``calculate_clip_similarity(tgt_image, tgt_prompt)``): torchmetrics CLIPScore,
  ``max(100 cos, 0)`` with CLIP ViT-L/14, of the edit and the target prompt.
- ``clip_similarity_target_image_edit_part`` (the same with ``tgt_mask``): the same of the edit multiplied by the
  mask (``uint8(img * mask)``: black outside the edited region).

Conventions kept from the reference: masked metrics are computed over the *whole* image with the other region set
to zero in both images (so PSNR and MSE are averaged over every pixel, not only the region's); the mask's border
rows and columns count as edited (:func:`~nonrigid.evaluation.piebench.decode_mask`); the structure distance feeds
DINO pixels in 0-255 normalised with ImageNet's mean and standard deviation as if they were in [0, 1] (the
reference never divides by 255), resized to the ViT's 224 px by bilinear interpolation without antialiasing
(torchvision 0.13's tensor ``Resize``); a region metric of an item whose region is empty is NaN (the reference
writes "nan"), left out of means and counted by the report. Images are compared at the input's size, the mask
resized to it (:func:`~nonrigid.evaluation.piebench.mask_at`); at 512 px, PIE-Bench's size, exactly the
reference's comparison.

Networks: CLIP through transformers (the same backbone as CLIP-T), DINO ViT-B/8 as transformers' ``ViTModel``
(``facebook/dino-vitb8``; its LayerNorm eps is 1e-12 where DINO's is 1e-6), both from a local folder or the hub
cache; SqueezeNet 1.1 from torchvision's file and the lpips package's linear layers (:mod:`.lpips`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import huggingface_hub.constants
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import ViTConfig, ViTModel

from ...errors import UsageError, first_line
from ...images import to_rgb
from ...models.fingerprint import weights_fingerprint
from ...models.loading import resolve_device
from ..piebench import mask_at
from ..protocol import DEFAULT_CLIP, DEFAULT_DINO, PIE_METRIC_NAMES
from .clip import ClipBackbone, build_tiny_clip, cosine, load_clip
from .common import check_same_length, metrics_dtype
from .lpips import LPIPS, build_tiny_lpips, load_lpips_squeeze

logger = logging.getLogger("nonrigid")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------------------------------- pixel metrics


def masked_pixels(image: Image.Image, region: np.ndarray, scale: float = 255.0) -> torch.Tensor:
    """(1, 3, H, W) fp64 pixels divided by ``scale``, multiplied by the (H, W) ``region`` (the reference's
    ``img * mask``)."""
    pixels = np.asarray(to_rgb(image), dtype=np.float64) / scale * region[..., None]
    return torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0).contiguous()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return float(peak_signal_noise_ratio(a, b, data_range=1.0))


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    from torchmetrics.functional.regression import mean_squared_error

    return float(mean_squared_error(a, b))


SSIM_CROP = 5  # half of the 11 x 11 Gaussian window


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """torchmetrics' SSIM map (Gaussian window, sigma 1.5, data range 1) averaged without the 5-pixel margin the
    window's reflect padding made up: what torchmetrics returned until 1.5 (its PR #2721 began to average the margin
    too), so, whichever version is installed, the number the reference's PIE-Bench results were computed with."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    _, full = structural_similarity_index_measure(a, b, data_range=1.0, return_full_image=True)
    return float(full[..., SSIM_CROP:-SSIM_CROP, SSIM_CROP:-SSIM_CROP].mean())


# --------------------------------------------------------------------------------------------------- structure distance


class Dino:
    """A DINO ViT (transformers ``ViTModel``) read for the keys of its last block, as Splicing ViT's extractor."""

    def __init__(self, model: ViTModel, name: str):
        self.model = model.requires_grad_(False).eval()
        self.name = name
        layers = model.layers if hasattr(model, "layers") else model.encoder.layer  # transformers 5 / 4
        attention = layers[-1].attention
        self.key_projection = attention.k_proj if hasattr(attention, "k_proj") else attention.attention.key

    @property
    def side(self) -> int:
        size = self.model.config.image_size
        return size if isinstance(size, int) else size[0]

    @torch.no_grad()
    def key_self_similarity(self, image: Image.Image) -> torch.Tensor:
        """(T, T) cosine similarity of the last block's keys (heads concatenated, CLS token included)."""
        parameter = next(self.model.parameters())
        pixels = torch.from_numpy(np.asarray(to_rgb(image), dtype=np.float32)).permute(2, 0, 1).unsqueeze(0)
        pixels = F.interpolate(pixels, size=(self.side, self.side), mode="bilinear", align_corners=False,
                               antialias=False)
        mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        pixels = ((pixels - mean) / std).to(device=parameter.device, dtype=parameter.dtype)
        captured: list[torch.Tensor] = []
        handle = self.key_projection.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            self.model(pixel_values=pixels)
        finally:
            handle.remove()
        keys = captured[-1][0].double()  # (T, heads * head_dim)
        norms = keys.norm(dim=-1, keepdim=True)
        return (keys @ keys.T) / (norms @ norms.T).clamp(min=1e-8)

    def distance(self, source: Image.Image, edited: Image.Image) -> float:
        return float(F.mse_loss(self.key_self_similarity(edited), self.key_self_similarity(source)))


def load_dino(name_or_path: str | os.PathLike = DEFAULT_DINO, device: Any = None, dtype: Any = None) -> Dino:
    """DINO ViT-B/8 from a local folder (``save_pretrained``) or a hub id, looked up in the hub cache first and
    downloaded once unless the hub is set offline; safetensors only."""
    device = resolve_device(device)
    name = str(name_or_path)
    offline = huggingface_hub.constants.HF_HUB_OFFLINE or os.path.isdir(os.path.expanduser(name))
    model = None
    for local in (True, False) if not offline else (True,):
        try:
            model = ViTModel.from_pretrained(os.path.expanduser(name), add_pooling_layer=False,
                                             local_files_only=local, use_safetensors=True)
            break
        except Exception as err:  # hub and file errors come in many types; all mean "not loadable from here"
            failure = err
            if local and not offline:
                logger.info("DINO model %s is not in the hub cache; downloading it once", name)
    if model is None:
        raise UsageError(f"DINO model {name!r} could not be loaded ({first_line(failure)}); connect once to download "
                         "it into the hub cache, or pass a local folder written by save_pretrained") from failure
    return Dino(model.to(device=device, dtype=metrics_dtype(dtype, device)), name)


def build_tiny_dino(seed: int = 0) -> Dino:
    """A random-weight ViT with DINO's layout (32 px, patch 8, 2 blocks), for tests; the global RNG is untouched."""
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=64, qkv_bias=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ViTModel(config, add_pooling_layer=False)
    return Dino(model, f"tiny-random-dino(seed={seed})")


# --------------------------------------------------------------------------------------------------- the bundle


def clip_score(clip: ClipBackbone, images: Sequence[Image.Image], texts: Sequence[str]) -> list[float]:
    """torchmetrics' CLIPScore of each (image, text): ``max(100 * cosine, 0)``."""
    values = cosine(clip.image_embeddings(list(images)), clip.text_embeddings(list(texts)))
    return [max(100.0 * v, 0.0) for v in values.tolist()]


class PieBenchMetrics:
    """The PIE-Bench columns (:data:`~nonrigid.evaluation.protocol.PIE_METRIC_NAMES`) of edits, each network loaded
    the first time it is needed. ``clip``: a loaded backbone to share (CLIP-T's, when it is the same model)."""

    def __init__(self, clip_model: str = DEFAULT_CLIP, dino_model: str = DEFAULT_DINO, *,
                 lpips_weights: str | os.PathLike | None = None, squeezenet_weights: str | os.PathLike | None = None,
                 device: Any = None, dtype: Any = None, clip: ClipBackbone | None = None):
        self.device = resolve_device(device)
        self.dtype = metrics_dtype(dtype, self.device)
        self.clip_model, self.dino_model = str(clip_model), str(dino_model)
        self.lpips_weights, self.squeezenet_weights = lpips_weights, squeezenet_weights
        self._clip, self._dino, self._lpips = clip, None, None

    @property
    def clip(self) -> ClipBackbone:
        if self._clip is None:
            self._clip = load_clip(self.clip_model, self.device, self.dtype)
        return self._clip

    @property
    def dino(self) -> Dino:
        if self._dino is None:
            self._dino = load_dino(self.dino_model, self.device, self.dtype)
        return self._dino

    @property
    def lpips(self) -> LPIPS:
        if self._lpips is None:
            self._lpips = load_lpips_squeeze(self.lpips_weights, self.squeezenet_weights, self.device, self.dtype)
        return self._lpips

    def load(self) -> PieBenchMetrics:
        _ = self.clip, self.dino, self.lpips
        return self

    @classmethod
    def tiny(cls, seed: int = 0, clip: ClipBackbone | None = None) -> PieBenchMetrics:
        """Random-weight networks (tiny CLIP, tiny ViT, LPIPS on a random SqueezeNet), no download, for tests."""
        metrics = cls(f"tiny-random-clip(seed={seed})", f"tiny-random-dino(seed={seed})", device="cpu", dtype="fp32",
                      clip=clip or build_tiny_clip(seed))
        metrics._dino = build_tiny_dino(seed)
        metrics._lpips = build_tiny_lpips(seed, "squeeze")
        return metrics

    def score_batch(self, sources: Sequence[Image.Image], edited: Sequence[Image.Image], texts: Sequence[str],
                    masks: Sequence[Sequence[int]]) -> list[dict[str, float]]:
        """The PIE-Bench columns of each (source, edit, target text, run-length mask)."""
        check_same_length(sources, edited, "sources", "edited images")
        check_same_length(edited, texts, "edited images", "texts")
        check_same_length(edited, masks, "edited images", "masks")
        rows, whole, cut, empty = [], [], [], []
        for source, edit, mask in zip(sources, edited, masks, strict=True):
            source, edit = to_rgb(source), to_rgb(edit)
            if source.size[0] != source.size[1]:
                raise UsageError(f"PIE-Bench metrics need square images, got {source.size}")
            if edit.size != source.size:
                edit = edit.resize(source.size, Image.Resampling.BICUBIC)
            region = mask_at(mask, source.size[0])
            rows.append(self.region_scores(source, edit, region))
            whole.append(edit)
            cut.append(Image.fromarray((np.asarray(edit) * region[..., None]).astype(np.uint8)))  # uint8(img * mask)
            empty.append(region.sum() == 0)
        whole_scores = clip_score(self.clip, whole, texts)
        cut_scores = clip_score(self.clip, cut, texts)
        for row, w, c, nothing in zip(rows, whole_scores, cut_scores, empty, strict=True):
            row["clip_similarity_target_image"] = w
            row["clip_similarity_target_image_edit_part"] = math.nan if nothing else c
        return [{name: row[name] for name in PIE_METRIC_NAMES} for row in rows]

    def region_scores(self, source: Image.Image, edited: Image.Image, region: np.ndarray) -> dict[str, float]:
        """Structure distance of the whole images and the four background metrics of the unedited region
        (``1 - region``; NaN each when it is empty, as the reference's "nan")."""
        row = {"structure_distance": self.dino.distance(source, edited)}
        keep = 1.0 - region
        if keep.sum() == 0:
            return {**row, **dict.fromkeys(("psnr_unedit_part", "lpips_unedit_part", "mse_unedit_part",
                                            "ssim_unedit_part"), math.nan)}
        a, b = masked_pixels(source, keep), masked_pixels(edited, keep)
        parameter = next(self.lpips.parameters())
        to = {"device": parameter.device, "dtype": parameter.dtype}
        distance = float(self.lpips((a * 2 - 1).to(**to), (b * 2 - 1).to(**to))[0])
        return {**row, "psnr_unedit_part": psnr(a, b), "lpips_unedit_part": distance, "mse_unedit_part": mse(a, b),
                "ssim_unedit_part": ssim(a, b)}

    def describe(self) -> dict[str, Any]:
        """Backbones and where their weights came from, for the run's record (loads the networks)."""
        self.load()
        return {
            "reference": "cure-lab/PnPInversion evaluation/evaluate.py + matrics_calculator.py",
            "clip": {"backbone": self.clip.name, "revision": self.clip.revision, "value": "max(100 cos, 0)"},
            "dino": {"backbone": self.dino.name, "weights_fingerprint": weights_fingerprint(self.dino.model)},
            "lpips": {"backbone": "squeezenet1_1", **self.lpips.sources},
        }
