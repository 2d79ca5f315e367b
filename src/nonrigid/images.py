"""Reading images the way the stages expect them: any Pillow mode to RGB, center crop to a square, resize.

Torch-free, so that the command line can reject a bad image before it loads a model.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UsageError, first_line

# The widest image read, in px a side (10,000 x 10,000 RGB is 300 MB decoded): checked from the file's header, so a
# decompression bomb (a few bytes whose header claims 20,000 x 20,000 px) is refused before a pixel is decoded.
MAX_SIDE = 10_000


def load_image(image: str | os.PathLike | Image.Image, size: int = 512) -> Image.Image:
    """Read an image the way the stages expect it: RGB, center-cropped to a square, resized to ``size``.

    Any mode Pillow reads is handled: EXIF rotation is applied, transparency is composited on white, 16-bit
    and float images are rescaled rather than clipped, CMYK and palettes are converted.
    """
    if size <= 0:
        raise UsageError(f"size must be positive, got {size}")
    img = open_image(image) if not isinstance(image, Image.Image) else image
    img = to_rgb(ImageOps.exif_transpose(img))
    width, height = img.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    img = img.crop((left, top, left + side, top + side))
    return img.resize((size, size), Image.Resampling.BICUBIC)


def open_image(path: str | os.PathLike, name: str | None = None) -> Image.Image:
    """The image file at ``path``, decoded whole; a missing, unreadable, damaged or over-size file is a one-line
    :class:`~nonrigid.errors.UsageError`.

    The size is read from the header and checked against :data:`MAX_SIDE` before any pixel is decoded. ``name`` is
    how messages call the file (default: its path; the page names the uploaded file, not where the server keeps it).
    """
    path = Path(path)
    shown = name or str(path)
    if not path.exists():
        raise UsageError(f"image {shown} does not exist")
    if path.is_dir():
        raise UsageError(f"image {shown} is a folder, not an image file")
    img = _open_header(path, shown)
    try:
        img.load()
    except (OSError, SyntaxError, ValueError) as err:
        raise UsageError(f"image {shown} is damaged or truncated ({first_line(err)})") from err
    return img


def check_image(path: str | os.PathLike, name: str | None = None) -> tuple[int, int]:
    """The size of the image file at ``path`` from its header alone (no pixel decoded), refused in one line as
    :func:`open_image` refuses it: for checking a whole benchmark's images before its first job."""
    with _open_header(Path(path), name or str(path)) as img:
        return img.size


def _open_header(path: Path, shown: str) -> Image.Image:
    """The file opened (its header read, no pixel decoded) and its size checked against :data:`MAX_SIDE`.

    Pillow's own decompression-bomb check stops at about 179 million pixels with a message of its own; any image
    it refuses is over :data:`MAX_SIDE` a side, so both cases end in this project's message.
    """
    try:
        with warnings.catch_warnings():  # Pillow's warning above 89 million pixels: the check below decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
    except Image.DecompressionBombError:
        raise UsageError(too_large(shown)) from None
    except UnidentifiedImageError as err:
        raise UsageError(f"{shown} is not an image Pillow can read (PNG, JPEG, WebP, ...)") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise UsageError(f"image {shown} is damaged or truncated ({first_line(err)})") from err
    if max(img.size) > MAX_SIDE:
        img.close()
        raise UsageError(too_large(shown, img.size))
    return img


def too_large(shown: str, size: tuple[int, int] | None = None) -> str:
    """The message for an image over :data:`MAX_SIDE` a side (``size`` None: Pillow refused even to open it)."""
    found = f"{size[0]} x {size[1]} px" if size else f"over {MAX_SIDE:,} px a side"
    return f"image {shown} is {found}; images up to {MAX_SIDE:,} px a side are accepted"


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB without clipping wide formats or leaving alpha garbage."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        values = np.asarray(img, dtype=np.float64)
        top = 65535.0 if values.max(initial=0) > 255 else 255.0
        if img.mode == "F" and values.max(initial=0) <= 1.0:
            top = 1.0
        img = Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def image_digest(img: Image.Image) -> str:
    """Hash of the preprocessed pixels: the image part of every cache key."""
    rgb = img.convert("RGB")
    return hashlib.sha256(f"{rgb.size}".encode() + rgb.tobytes()).hexdigest()[:16]
