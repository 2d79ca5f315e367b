"""Reading images the way the stages expect them: any Pillow mode to RGB, center crop to a square, resize.

Torch-free, so that the command line can reject a bad image before it loads a model.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UsageError, first_line


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


def open_image(path: str | os.PathLike) -> Image.Image:
    """The image file decoded whole (a missing, unreadable or truncated file is a one-line error): read once, it
    can be prepared at any size later."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"image {path} does not exist")
    if path.is_dir():
        raise UsageError(f"image {path} is a folder, not an image file")
    try:
        img = Image.open(path)
        img.load()
    except UnidentifiedImageError as err:
        raise UsageError(f"{path} is not an image Pillow can read") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise UsageError(f"image {path} is damaged or truncated ({first_line(err)})") from err
    return img


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
