"""LPIPS (v0.1, VGG16): distance between the input and the edited image (lower = identity better kept), computed
by the ``lpips`` package's own network, ``lpips.LPIPS(net="vgg", version="0.1")``.

VGG16 features at its 5 relu stages, each channel vector unit-normalised, squared differences weighted by the
learned per-channel linear weights, averaged over space and summed over stages. Images are compared at the
input's size (an edit of another size is resized to it, bicubic) with pixels scaled to [-1, 1].

Nothing is downloaded by the package: the network is built empty and filled from two local files, both read with
``torch.load(weights_only=True)``: torchvision's ImageNet VGG16 (``vgg16-397923af.pth``, a given path or the torch
hub cache, fetched once and hash-checked when missing) and the linear layers ``weights/v0.1/vgg.pth`` shipped
inside the ``lpips`` package (or a given path).
"""

from __future__ import annotations

import os
import warnings
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import lpips as lpips_package
import torch
from PIL import Image
from torch import nn

from ...errors import UsageError, first_line
from ...images import to_rgb
from ...models.loading import resolve_device
from ...models.sd import image_to_tensor
from .common import as_list, check_same_length, chunks, metrics_dtype
from .weights import download, existing_file, read_tensors

VGG16_FILENAME = "vgg16-397923af.pth"  # torchvision's name: the part after the dash is its sha256 prefix
VGG16_URL = f"https://download.pytorch.org/models/{VGG16_FILENAME}"
VGG16_SHA256_PREFIX = "397923af"
LPIPS_LINEAR_IN_PACKAGE = ("weights", "v0.1", "vgg.pth")
LPIPS_STAGES = 5  # VGG16's relu1_2 ... relu5_3, one linear layer each
# PIE-Bench's LPIPS is torchmetrics' net_type="squeeze": the same network on torchvision's SqueezeNet 1.1 trunk
SQUEEZENET_FILENAME = "squeezenet1_1-b8a52dc0.pth"
SQUEEZENET_URL = f"https://download.pytorch.org/models/{SQUEEZENET_FILENAME}"
SQUEEZENET_SHA256_PREFIX = "b8a52dc0"
LPIPS_MIN_SIDE = 16  # VGG pools 4 times before its last stage


class LPIPS(lpips_package.LPIPS):
    """The lpips package's LPIPS v0.1 VGG network, built without weights (on the meta device: nothing is
    initialised or downloaded) until :func:`load_lpips` or :func:`build_tiny_lpips` fills it
    (:meth:`fill_trunk`, :meth:`fill_linear`, :meth:`ready`).

    ``forward`` takes two (B, 3, H, W) batches in [-1, 1] and returns one fp32 distance per pair, (B,), without
    gradients. ``sources`` records which files the weights came from.
    """

    def __init__(self, sources: dict[str, str | None] | None = None, net: str = "vgg"):
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torchvision's note that pretrained= is deprecated
            super().__init__(pretrained=False, net=net, version="0.1", pnet_rand=True, verbose=False)
        self.scaling_layer = lpips_package.ScalingLayer()  # constants, not weights: made for real
        self.sources = dict(sources or {})

    @torch.no_grad()
    def forward(self, pixels0: torch.Tensor, pixels1: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(pixels0, pixels1).reshape(-1).float()

    def trunk_names(self) -> dict[str, str]:
        """Each trunk tensor's name -> its name in torchvision's ``vgg16().features`` (the package cuts the
        features into slices that keep the layer indices: ``slice2.5.weight`` is ``5.weight``)."""
        return {name: name.split(".", 1)[1] for name in self.net.state_dict()}

    def linear_names(self) -> list[str]:
        return [f"lin{k}.model.1.weight" for k in range(self.L)]  # one per stage: 5 (VGG), 7 (SqueezeNet)

    def fill_trunk(self, trunk: dict[str, torch.Tensor]) -> None:
        """Take the VGG16 trunk's tensors, named as in torchvision's ``features`` (:meth:`trunk_names`); ValueError
        if one is missing or has the wrong shape."""
        try:
            self.net.load_state_dict({name: trunk[source] for name, source in self.trunk_names().items()},
                                     assign=True)
        except KeyError as err:
            raise ValueError(f"it has no tensor features.{err.args[0]}") from None
        except RuntimeError as err:
            raise ValueError(first_line(err)) from None

    def fill_linear(self, linear: dict[str, torch.Tensor]) -> None:
        """Take the linear layers' tensors (:meth:`linear_names`, the lpips package's layout); KeyError naming a
        missing one, ValueError if one has the wrong shape."""
        try:
            self.load_state_dict({name: linear[name] for name in self.linear_names()}, strict=False, assign=True)
        except RuntimeError as err:
            raise ValueError(first_line(err)) from None

    def ready(self) -> LPIPS:
        """Frozen and in eval mode, once both parts are filled."""
        empty = [name for name, t in (*self.named_parameters(), *self.named_buffers()) if t.is_meta]
        if empty:
            raise ValueError(f"LPIPS tensors left without weights: {', '.join(empty)}")
        self.requires_grad_(False)
        return self.eval()


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
    dtype = metrics_dtype(dtype, device)
    linear_path = _resolve_lpips_linear(lpips_weights)
    vgg_path = _resolve_vgg16(vgg_weights)
    trunk = _vgg_features_state(read_tensors(vgg_path, "VGG16 weights"))
    linear = read_tensors(linear_path, "LPIPS linear weights")
    net = LPIPS(sources={"vgg_weights": str(vgg_path), "linear_weights": str(linear_path)})
    try:
        net.fill_trunk(trunk)
    except ValueError as err:
        raise UsageError(f"{vgg_path} is not a torchvision VGG16 checkpoint: {err}") from err
    try:
        net.fill_linear(linear)
    except KeyError as err:
        raise UsageError(
            f"{linear_path} is not an LPIPS linear-layer file (no {err.args[0]}); pass the lpips project's v0.1 "
            "vgg.pth"
        ) from err
    except ValueError as err:
        raise UsageError(f"{linear_path} does not match VGG16 (LPIPS v0.1 vgg.pth expected): {err}") from err
    return net.ready().to(device=device, dtype=dtype)


def load_lpips_squeeze(
    lpips_weights: str | os.PathLike | None = None,
    squeezenet_weights: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> LPIPS:
    """LPIPS v0.1 on torchvision's ImageNet SqueezeNet 1.1 trunk, what torchmetrics'
    ``LearnedPerceptualImagePatchSimilarity(net_type="squeeze")`` computes (PIE-Bench's LPIPS): the linear layers
    ``weights/v0.1/squeeze.pth`` of the lpips package (or ``lpips_weights``), the trunk from ``squeezenet_weights``
    or the torch hub cache (``squeezenet1_1-b8a52dc0.pth``, downloaded once and hash-checked when missing)."""
    device = resolve_device(device)
    dtype = metrics_dtype(dtype, device)
    linear_path = _resolve_lpips_linear(lpips_weights, "squeeze")
    trunk_path = _resolve_trunk(squeezenet_weights, SQUEEZENET_FILENAME, SQUEEZENET_URL, SQUEEZENET_SHA256_PREFIX,
                                "torchvision's ImageNet SqueezeNet 1.1 weights", "squeezenet_weights=PATH")
    net = LPIPS(sources={"squeezenet_weights": str(trunk_path), "linear_weights": str(linear_path)}, net="squeeze")
    try:
        net.fill_trunk(_vgg_features_state(read_tensors(trunk_path, "SqueezeNet 1.1 weights")))
        net.fill_linear(read_tensors(linear_path, "LPIPS linear weights"))
    except (KeyError, ValueError) as err:
        raise UsageError(f"{trunk_path} or {linear_path} does not fit LPIPS on SqueezeNet 1.1: {first_line(err)}") \
            from err
    return net.ready().to(device=device, dtype=dtype)


def build_tiny_lpips(seed: int = 0, net_type: str = "vgg") -> LPIPS:
    """The package's LPIPS network (``net_type`` vgg or squeeze) with a random trunk (Kaiming-initialised) and
    random non-negative linear weights, for tests: built without any download, same code path as the real metric.
    The weights depend only on ``seed``; the global RNG is left as it was."""
    net = LPIPS(sources={f"{'vgg' if net_type == 'vgg' else 'squeezenet'}_weights": None, "linear_weights": None},
                net=net_type)
    state = net.state_dict()
    shapes = {source: state[f"net.{name}"].shape for name, source in net.trunk_names().items()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        trunk = {}
        for name, shape in shapes.items():
            tensor = torch.zeros(shape)
            if name.endswith("weight") and tensor.dim() > 1:
                nn.init.kaiming_normal_(tensor, mode="fan_out", nonlinearity="relu")
            trunk[name] = tensor
        linear = {name: torch.rand(state[name].shape) for name in net.linear_names()}
    net.fill_trunk(trunk)
    net.fill_linear(linear)
    return net.ready()


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
    source_list, single = as_list(sources, Image.Image)
    edited_list, _ = as_list(edited, Image.Image)
    check_same_length(source_list, edited_list, "sources", "edited images")
    pairs = [_lpips_pair(source, edit) for source, edit in zip(source_list, edited_list, strict=True)]
    by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index, (source, _) in enumerate(pairs):
        by_size[source.size].append(index)
    parameter = next(net.parameters())
    scores: list[float] = [0.0] * len(pairs)
    for indices in by_size.values():
        for chunk in chunks(indices, batch_size):
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


def _resolve_lpips_linear(path: str | os.PathLike | None, net: str = "vgg") -> Path:
    if path is not None:
        return existing_file(path, f"LPIPS linear weights (v0.1 {net}.pth of the lpips project)")
    packaged = Path(lpips_package.__file__).parent.joinpath(*LPIPS_LINEAR_IN_PACKAGE[:-1], f"{net}.pth")
    if packaged.is_file():
        return packaged
    raise UsageError(
        f"the LPIPS v0.1 linear weights ({net}.pth) are not in the lpips package at {packaged}: reinstall it "
        "(pip install lpips), or pass lpips_weights=PATH"
    )


def _resolve_vgg16(path: str | os.PathLike | None) -> Path:
    return _resolve_trunk(path, VGG16_FILENAME, VGG16_URL, VGG16_SHA256_PREFIX, "torchvision's ImageNet VGG16 weights",
                          "vgg_weights=PATH")


def _resolve_trunk(path: str | os.PathLike | None, filename: str, url: str, sha_prefix: str, what: str,
                   how_to_pass: str) -> Path:
    """A given trunk checkpoint, else torchvision's file in the torch hub cache (fetched once, hash-checked)."""
    if path is not None:
        return existing_file(path, f"{what} ({filename})")
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if not cached.is_file():
        download(url, cached, sha_prefix, what, how_to_pass)
    return cached


def _vgg_features_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``features`` part of a full torchvision VGG16 checkpoint (a features-only one is taken as is)."""
    prefix = "features."
    if any(key.startswith(prefix) for key in state):
        return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    return state
