"""The paper's evaluation metrics (method.md §3, Sec. 5.3): CLIP-T, LPIPS (VGG) and the LAION aesthetic score.

Usable on their own: ``load_clip``, ``load_lpips`` and ``load_aesthetic_head`` give the three networks, and
``clip_t``, ``lpips_distance`` and ``aesthetic_score`` compute one metric each. ``Metrics`` bundles them, loads each
network the first time it is needed and scores (input, edited image, target text) triples.

What each number is:

- **CLIP-T**: cosine similarity of the L2-normalised CLIP image embedding of the edited image and the CLIP text
  embedding of the target text, in [-1, 1]. The paper reports this cosine as is; it is *not* multiplied by 100
  (the "CLIPScore" convention). Default backbone: CLIP ViT-L/14 through transformers.
- **LPIPS** (v0.1, VGG16): distance between the input and the edited image (lower = identity better kept). VGG16
  features at its 5 relu stages, each channel vector unit-normalised, squared differences weighted by the learned
  per-channel linear weights, averaged over space and summed over stages. Images are compared at the input's size
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

The ``.pth`` files are pickles; they are read with ``torch.load(weights_only=True)``, which only rebuilds tensors
and containers, never arbitrary objects.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import torch
import torch.nn.functional as F
import transformers
from PIL import Image
from torch import nn
from torchvision.models import vgg as torchvision_vgg
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTokenizer, CLIPVisionConfig

from .cache import default_cache_dir
from .diffusion import image_to_tensor
from .errors import UsageError, first_line
from .images import to_rgb
from .loading import build_character_tokenizer, resolve_device, resolve_dtype

logger = logging.getLogger("nonrigid")

DEFAULT_CLIP = "openai/clip-vit-large-patch14"

AESTHETIC_FILENAME = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_SHA256 = "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0"
AESTHETIC_URL = f"https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/{AESTHETIC_FILENAME}"
AESTHETIC_ENV = "NONRIGID_AESTHETIC_HEAD"
AESTHETIC_WIDTH = 768  # CLIP ViT-L/14's embedding width, the head's input

VGG16_FILENAME = "vgg16-397923af.pth"  # torchvision's name: the part after the dash is its sha256 prefix
VGG16_URL = f"https://download.pytorch.org/models/{VGG16_FILENAME}"
VGG16_SHA256_PREFIX = "397923af"
LPIPS_LINEAR_IN_PACKAGE = ("weights", "v0.1", "vgg.pth")

# torchvision's vgg16.features ends a stage after relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3: slicing the
# Sequential at these indices gives the five feature maps LPIPS compares.
VGG16_STAGE_ENDS = (4, 9, 16, 23, 30)
# LPIPS v0.1 maps [-1, 1] pixels to the ImageNet statistics VGG was trained on with this fixed shift and scale.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
LPIPS_MIN_SIDE = 16  # VGG pools 4 times before its last stage

# The tiny LPIPS net has VGG16's layer layout (so the same stage indices) at an eighth of its widths.
TINY_VGG_LAYOUT = [8, 8, "M", 16, 16, "M", 32, 32, 32, "M", 64, 64, 64, "M", 64, 64, 64]
TINY_CLIP_IMAGE_SIZE = 32

# transformers 5 splits the PIL-based processor (the one that matches OpenAI's preprocessing: PIL bicubic resize,
# center crop) from the torchvision one; 4.x only has the PIL one, under the plain name.
_CLIP_IMAGE_PROCESSOR = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


# --------------------------------------------------------------------------------------------------- CLIP


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
    dtype = _metrics_dtype(dtype, device)
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
    image_list, single = _as_list(images, Image.Image)
    text_list, single_text = _as_list(texts, str)
    _check_same_length(image_list, text_list, "images", "texts")
    scores = []
    for chunk in _chunks(range(len(image_list)), batch_size):
        image_emb = clip.image_embeddings([image_list[i] for i in chunk])
        text_emb = clip.text_embeddings([text_list[i] for i in chunk])
        scores.extend(cosine(image_emb, text_emb).tolist())
    return scores[0] if single and single_text else scores


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of two (B, D) batches, in fp32."""
    return (F.normalize(a.float(), dim=-1) * F.normalize(b.float(), dim=-1)).sum(dim=-1)


# --------------------------------------------------------------------------------------------------- LPIPS


class LPIPS(nn.Module):
    """LPIPS v0.1 on a VGG-layout feature net: ``sum_stage mean_space sum_c w_c (f0_c/|f0| - f1_c/|f1|)^2``.

    ``features`` is a torchvision VGG ``features`` Sequential; ``stage_ends`` are the indices it is cut at (after
    each stage's last relu); ``linear_weights`` are the learned non-negative per-channel weights of each stage.
    ``sources`` records which files the weights came from.
    """

    def __init__(
        self,
        features: nn.Sequential,
        linear_weights: Sequence[torch.Tensor],
        stage_ends: Sequence[int] = VGG16_STAGE_ENDS,
        sources: dict[str, str | None] | None = None,
    ):
        super().__init__()
        self.features = features
        self.stage_ends = tuple(stage_ends)
        widths = stage_widths(features, self.stage_ends)
        given = [int(w.numel()) for w in linear_weights]
        if given != widths:
            raise ValueError(f"LPIPS linear weights have widths {given}; the feature stages have {widths}")
        for index, weight in enumerate(linear_weights):
            self.register_buffer(f"lin{index}", weight.detach().float().reshape(1, -1, 1, 1).clone())
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).reshape(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).reshape(1, 3, 1, 1))
        self.sources = dict(sources or {})
        self.requires_grad_(False)
        self.eval()

    def stage_features(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """The feature map at the end of each stage, for pixels in [-1, 1]."""
        hidden = (pixels - self.shift.to(pixels.dtype)) / self.scale.to(pixels.dtype)
        outputs, start = [], 0
        for end in self.stage_ends:
            hidden = self.features[start:end](hidden)
            outputs.append(hidden)
            start = end
        return outputs

    @torch.no_grad()
    def forward(self, pixels0: torch.Tensor, pixels1: torch.Tensor) -> torch.Tensor:
        """LPIPS of each pair in two (B, 3, H, W) batches in [-1, 1], as fp32 (B,)."""
        both = self.stage_features(torch.cat([pixels0, pixels1]))
        batch = pixels0.shape[0]
        total = torch.zeros(batch, device=pixels0.device)
        for index, stage in enumerate(both):
            stage = _unit_channels(stage.float())
            squared = (stage[:batch] - stage[batch:]) ** 2
            total = total + (squared * getattr(self, f"lin{index}")).sum(dim=1).mean(dim=(1, 2))
        return total


def _unit_channels(features: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Divide each position's channel vector by its norm (LPIPS's eps in the denominator, so zeros stay zero)."""
    return features / (features.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


def stage_widths(features: nn.Sequential, stage_ends: Sequence[int]) -> list[int]:
    """Channels of each stage's output: the last convolution's width before each cut."""
    widths, start = [], 0
    for end in stage_ends:
        convs = [layer for layer in list(features)[start:end] if isinstance(layer, nn.Conv2d)]
        if not convs:
            raise ValueError(f"feature stage {start}:{end} has no convolution")
        widths.append(convs[-1].out_channels)
        start = end
    return widths


def load_lpips(
    lpips_weights: str | os.PathLike | None = None,
    vgg_weights: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> LPIPS:
    """LPIPS v0.1 with torchvision's ImageNet VGG16 trunk and the LPIPS project's learned linear layers.

    ``lpips_weights``: the linear layers (the lpips project's ``weights/v0.1/vgg.pth``; default: the copy inside
    the installed ``lpips`` package). ``vgg_weights``: a torchvision VGG16 checkpoint (default: ``vgg16-397923af.pth``
    in the torch hub cache, downloaded once and hash-checked when missing).
    """
    device = resolve_device(device)
    dtype = _metrics_dtype(dtype, device)
    linear_path = _resolve_lpips_linear(lpips_weights)
    vgg_path = _resolve_vgg16(vgg_weights)
    with torch.device("meta"):  # no point initialising 15 M weights that the checkpoint replaces
        features = torchvision_vgg.make_layers(torchvision_vgg.cfgs["D"])
    state = _vgg_features_state(_read_tensors(vgg_path, "VGG16 weights"))
    try:
        features.load_state_dict(state, assign=True)
    except RuntimeError as err:
        raise UsageError(f"{vgg_path} is not a torchvision VGG16 checkpoint: {first_line(err)}") from err
    linear = _lpips_linear_weights(_read_tensors(linear_path, "LPIPS linear weights"), linear_path)
    try:
        net = LPIPS(features, linear, sources={"vgg_weights": str(vgg_path), "linear_weights": str(linear_path)})
    except ValueError as err:
        raise UsageError(f"{linear_path} does not match VGG16 (LPIPS v0.1 vgg.pth expected): {err}") from err
    return net.to(device=device, dtype=dtype)


def build_tiny_lpips(seed: int = 0) -> LPIPS:
    """LPIPS on a random VGG16-layout net at an eighth of its widths, with random non-negative linear weights.

    Same code path as the real metric (stage cuts, normalisation, weighting), built without any download. The
    weights depend only on ``seed``; the global RNG is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        features = torchvision_vgg.make_layers(TINY_VGG_LAYOUT)
        widths = stage_widths(features, VGG16_STAGE_ENDS)
        linear = [torch.rand(width) for width in widths]
    return LPIPS(features, linear, sources={"vgg_weights": None, "linear_weights": None})


def lpips_distance(
    net: LPIPS,
    sources: Image.Image | Sequence[Image.Image],
    edited: Image.Image | Sequence[Image.Image],
    *,
    batch_size: int = 8,
) -> float | list[float]:
    """LPIPS between each source and its edit, compared at the source's size (edits of another size are resized).

    One pair gives a float; sequences of equal length give a list. Pairs of the same size are batched together.
    """
    source_list, single = _as_list(sources, Image.Image)
    edited_list, _ = _as_list(edited, Image.Image)
    _check_same_length(source_list, edited_list, "sources", "edited images")
    pairs = [_lpips_pair(source, edit) for source, edit in zip(source_list, edited_list, strict=True)]
    by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index, (source, _) in enumerate(pairs):
        by_size[source.size].append(index)
    parameter = next(net.parameters())
    scores: list[float] = [0.0] * len(pairs)
    for indices in by_size.values():
        for chunk in _chunks(indices, batch_size):
            pixels0 = torch.cat([image_to_tensor(pairs[i][0]) for i in chunk])
            pixels1 = torch.cat([image_to_tensor(pairs[i][1]) for i in chunk])
            to = {"device": parameter.device, "dtype": parameter.dtype}
            values = net(pixels0.to(**to), pixels1.to(**to)).tolist()
            for index, value in zip(chunk, values, strict=True):
                scores[index] = value
    return scores[0] if single else scores


def _lpips_pair(source: Image.Image, edited: Image.Image) -> tuple[Image.Image, Image.Image]:
    """Both images as RGB at the source's size (the LPIPS convention: compare at the reference's resolution)."""
    source, edited = to_rgb(source), to_rgb(edited)
    if min(source.size) < LPIPS_MIN_SIDE:
        raise UsageError(f"LPIPS needs images of at least {LPIPS_MIN_SIDE} px a side, got {source.size}")
    if edited.size != source.size:
        edited = edited.resize(source.size, Image.Resampling.BICUBIC)
    return source, edited


def _resolve_lpips_linear(path: str | os.PathLike | None) -> Path:
    if path is not None:
        return _existing_file(path, "LPIPS linear weights (v0.1 vgg.pth of the lpips project)")
    spec = importlib.util.find_spec("lpips")  # locates the package without importing it (and scipy with it)
    if spec is not None and spec.submodule_search_locations:
        packaged = Path(next(iter(spec.submodule_search_locations)), *LPIPS_LINEAR_IN_PACKAGE)
        if packaged.is_file():
            return packaged
    raise UsageError(
        "the LPIPS v0.1 linear weights (vgg.pth) were not found: install the lpips package (pip install lpips), "
        "which ships them, or pass lpips_weights=PATH"
    )


def _resolve_vgg16(path: str | os.PathLike | None) -> Path:
    if path is not None:
        return _existing_file(path, f"VGG16 weights (torchvision's {VGG16_FILENAME})")
    cached = Path(torch.hub.get_dir()) / "checkpoints" / VGG16_FILENAME
    if not cached.is_file():
        _download(VGG16_URL, cached, VGG16_SHA256_PREFIX, "torchvision's ImageNet VGG16 weights", "vgg_weights=PATH")
    return cached


def _vgg_features_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``features`` part of a full torchvision VGG16 checkpoint (a features-only one is taken as is)."""
    prefix = "features."
    if any(key.startswith(prefix) for key in state):
        return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    return state


def _lpips_linear_weights(state: dict[str, torch.Tensor], path: Path) -> list[torch.Tensor]:
    """The per-channel weights ``lin{k}.model.1.weight`` (a 1x1 conv with one output) of the lpips layout."""
    try:
        return [state[f"lin{k}.model.1.weight"].reshape(-1) for k in range(len(VGG16_STAGE_ENDS))]
    except KeyError as err:
        raise UsageError(
            f"{path} is not an LPIPS linear-layer file (no {err.args[0]}); pass the lpips project's v0.1 vgg.pth"
        ) from err


# --------------------------------------------------------------------------------------------------- aesthetic


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
    state = _read_tensors(file, "aesthetic head")
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
        return _existing_file(path, what, source=AESTHETIC_URL)
    default = default_aesthetic_path()
    if os.environ.get(AESTHETIC_ENV):
        return _existing_file(default, what + f" named by ${AESTHETIC_ENV}", source=AESTHETIC_URL)
    if not default.is_file():
        _download(AESTHETIC_URL, default, AESTHETIC_SHA256, "the LAION aesthetic head", "aesthetic_head=PATH")
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
    _check_head_width(clip, head)
    image_list, single = _as_list(images, Image.Image)
    scores = []
    for chunk in _chunks(range(len(image_list)), batch_size):
        scores.extend(head(clip.image_embeddings([image_list[i] for i in chunk])).tolist())
    return scores[0] if single else scores


def _check_head_width(clip: ClipBackbone, head: AestheticHead) -> None:
    if clip.projection_dim != head.input_size:
        raise UsageError(
            f"the aesthetic head reads {head.input_size}-wide CLIP ViT-L/14 embeddings but CLIP model "
            f"{clip.name} gives {clip.projection_dim}-wide ones; use a ViT-L/14 backbone for the aesthetic score"
        )


# --------------------------------------------------------------------------------------------------- all three


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
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        batch_size: int = 8,
    ):
        if batch_size < 1:
            raise UsageError(f"metrics batch size must be at least 1, got {batch_size}")
        self.device = resolve_device(device)
        self.dtype = _metrics_dtype(dtype, self.device)
        self.batch_size = batch_size
        self.clip_model = str(clip_model)
        self.aesthetic_clip_model = str(aesthetic_clip_model) if aesthetic_clip_model else self.clip_model
        self.lpips_weights, self.vgg_weights, self.aesthetic_head_path = lpips_weights, vgg_weights, aesthetic_head
        self._clip: ClipBackbone | None = None
        self._aesthetic_clip: ClipBackbone | None = None
        self._lpips: LPIPS | None = None
        self._head: AestheticHead | None = None
        self._file_digests: dict[str, str] = {}

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

    def load(self) -> Metrics:
        """Load every network now (so a missing weight fails before a long evaluation, not after it)."""
        _check_head_width(self.aesthetic_clip, self.aesthetic_head)
        _ = self.clip, self.lpips
        return self

    # ---- scoring

    def score(self, source: Image.Image, edited: Image.Image, target_text: str) -> dict[str, float]:
        """``{"clip_t", "lpips", "aesthetic"}`` of one edit: CLIP-T(edited, text), LPIPS(source, edited) and the
        aesthetic score of the edited image."""
        return self.score_batch([source], [edited], [target_text])[0]

    def score_batch(
        self, sources: Sequence[Image.Image], edited: Sequence[Image.Image], texts: Sequence[str]
    ) -> list[dict[str, float]]:
        """``score`` of each triple, computed in batches of ``batch_size``; one CLIP pass serves both CLIP-T and the
        aesthetic score when they share a backbone."""
        _check_same_length(sources, edited, "sources", "edited images")
        _check_same_length(edited, texts, "edited images", "texts")
        self.load()
        clip_scores: list[float] = []
        aesthetic_scores: list[float] = []
        for chunk in _chunks(range(len(edited)), self.batch_size):
            images = [edited[i] for i in chunk]
            image_emb = self.clip.image_embeddings(images)
            text_emb = self.clip.text_embeddings([texts[i] for i in chunk])
            clip_scores.extend(cosine(image_emb, text_emb).tolist())
            if self.aesthetic_clip is not self.clip:
                image_emb = self.aesthetic_clip.image_embeddings(images)
            aesthetic_scores.extend(self.aesthetic_head(image_emb).tolist())
        lpips_scores = lpips_distance(self.lpips, list(sources), list(edited), batch_size=self.batch_size)
        return [
            {"clip_t": c, "lpips": p, "aesthetic": a}
            for c, p, a in zip(clip_scores, lpips_scores, aesthetic_scores, strict=True)
        ]

    # ---- the tiny variant and the record

    @classmethod
    def tiny(cls, seed: int = 0) -> Metrics:
        """Random-weight metrics built without any download (CPU, fp32), for tests of code that uses metrics.

        A tiny CLIP (32 px, 16-wide embeddings), LPIPS on a narrow VGG16-layout net with random linear weights, and
        the aesthetic head's architecture with random weights, 16 wide. The numbers mean nothing; the code paths
        and the output format are the real ones.
        """
        metrics = cls(clip_model=f"tiny-random-clip(seed={seed})", device="cpu", dtype="fp32")
        metrics._clip = build_tiny_clip(seed)
        metrics._lpips = build_tiny_lpips(seed)
        metrics._head = build_tiny_aesthetic_head(metrics._clip.projection_dim, seed)
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
                "backbone": "vgg16" if net.sources.get("vgg_weights") else "tiny random vgg16-layout net",
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
        }

    def _digest(self, path: str | None) -> str | None:
        if path is None:
            return None
        if path not in self._file_digests:
            self._file_digests[path] = file_sha256(Path(path))
        return self._file_digests[path]


# --------------------------------------------------------------------------------------------------- helpers


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_fingerprint(module: nn.Module) -> str:
    """A short hash of every tensor's name, shape, dtype and a strided sample of its values (cheap at 400 M)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64].float().cpu().numpy()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(sample.tobytes())
    return digest.hexdigest()[:16]


def _metrics_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """fp32 unless asked otherwise (``resolve_dtype``'s default would be fp16 on CUDA)."""
    return torch.float32 if dtype is None or dtype == "auto" else resolve_dtype(dtype, device)


def _existing_file(path: str | os.PathLike, what: str, source: str | None = None) -> Path:
    file = Path(path).expanduser()
    if not file.is_file():
        origin = f" (from {source})" if source else ""
        raise UsageError(f"{what} not found at {file}: put the file there{origin} or give the path of your copy")
    return file


def _download(url: str, destination: Path, sha256: str, what: str, how_to_pass: str) -> None:
    """Fetch ``url`` once into ``destination`` (written to a temporary file, hash-checked, then renamed)."""
    logger.info("downloading %s from %s to %s (once)", what, url, destination)
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(destination), hash_prefix=sha256, progress=False)
    except Exception as err:  # offline, refused, or a bad hash: all mean "put the file there yourself"
        raise UsageError(
            f"{destination.name} ({what}) is not at {destination} and could not be downloaded "
            f"({first_line(err)}); put the file from {url} there, or pass {how_to_pass}"
        ) from err
    if len(sha256) == 64 and file_sha256(destination) != sha256:  # belt and braces: never keep a wrong file
        destination.unlink(missing_ok=True)
        raise UsageError(f"the download of {url} does not have the expected sha256; {what} was not installed")


def _read_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """A state dict from a ``.pth`` pickle, rebuilding tensors only (``weights_only``: no arbitrary objects)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UsageError(f"could not read {what} from {path}: {first_line(err)}") from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"{path} does not hold a state dict of tensors ({what} expected)")
    return state


def _as_list(items: Any, single_type: type) -> tuple[list, bool]:
    """``(items as a list, whether a single item was given)``."""
    if isinstance(items, single_type):
        return [items], True
    return list(items), False


def _check_same_length(first: Sequence, second: Sequence, first_name: str, second_name: str) -> None:
    if len(first) != len(second):
        raise UsageError(f"got {len(first)} {first_name} but {len(second)} {second_name}; give one per edit")


def _chunks(indices: Sequence[int] | range, size: int) -> Iterator[list[int]]:
    indices = list(indices)
    for start in range(0, len(indices), size):
        yield indices[start : start + size]
