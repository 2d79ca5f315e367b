"""Reading images the way the stages expect them: any Pillow mode to RGB, at the working size (the picture's own
aspect ratio at about ``size`` x ``size`` pixels, or center-cropped to a square), and masks alike.

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


CROPS = ("square",)  # besides None: the whole picture at its own aspect ratio


def load_image(image: str | os.PathLike | Image.Image, size: int = 512, crop: str | None = None,
               multiple: int = 8) -> Image.Image:
    """Read an image the way the stages expect it: RGB at the working size.

    ``crop=None`` keeps the whole picture at its own aspect ratio with about ``size`` x ``size`` pixels (the
    *pixel budget* a model of native side ``size`` was trained at: SDXL's and FLUX's aspect buckets keep the area,
    not the long side), each side rounded to ``multiple`` (the model's latent grid). ``crop="square"`` is the
    reference implementations' way: center-cropped to a square, resized to ``size`` x ``size``.

    Any mode Pillow reads is handled: EXIF rotation is applied, transparency is composited on white, 16-bit
    and float images are rescaled rather than clipped, CMYK and palettes are converted.
    """
    img = open_image(image) if not isinstance(image, Image.Image) else image
    img = to_rgb(ImageOps.exif_transpose(img))
    box, shape = geometry(img.size, size, crop, multiple)
    return img.crop(box).resize(shape, Image.Resampling.BICUBIC)


def geometry(image_size: tuple[int, int], size: int, crop: str | None = None, multiple: int = 8
             ) -> tuple[tuple[int, int, int, int], tuple[int, int]]:
    """Which part of a ``image_size`` (width, height) picture is kept, and the (width, height) it is resized to
    (:func:`load_image`'s rule; masks follow the same)."""
    if size <= 0:
        raise UsageError(f"size must be positive, got {size}")
    if crop is not None and crop not in CROPS:
        raise UsageError(f"crop must be one of {', '.join(CROPS)} or none (the whole picture), got {crop!r}")
    width, height = image_size
    if crop == "square":
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        return (left, top, left + side, top + side), (size, size)
    scale = size / (width * height) ** 0.5  # the same area as a size x size square

    def side(length: int) -> int:
        return max(multiple, round(length * scale / multiple) * multiple)

    return (0, 0, width, height), (side(width), side(height))


MaskLike = str | os.PathLike | Image.Image | np.ndarray


def load_mask(mask: MaskLike, image_size: tuple[int, int], size: int, crop: str | None = None, multiple: int = 8,
              name: str | None = None) -> tuple[np.ndarray, str | None]:
    """A mask of where an edit may change the picture, prepared as :func:`load_image` prepares the picture: a float
    array (height, width) in [0, 1] at the working size (white, 1: may change; black, 0: keep), and a note when it
    had to be resized to the picture (``None`` otherwise).

    ``image_size`` is the original picture's (width, height): a mask of another size is resized to it first, and
    the note says so. Refused in one line: a file that is no image (an empty one too), a mask with NaN values, and
    one that is all grey (no white or black to tell the regions apart; all white and all black are fine).
    """
    values, note = read_mask(mask, image_size, name)
    box, shape = geometry(tuple(image_size), size, crop, multiple)
    return np.clip(_resize(values[box[1] : box[3], box[0] : box[2]], shape), 0.0, 1.0).astype(np.float32), note


def read_mask(mask: MaskLike, image_size: tuple[int, int], name: str | None = None
              ) -> tuple[np.ndarray, str | None]:
    """The mask as floats in [0, 1] at the picture's size (``image_size``: width, height), checked, and a note
    when it had to be resized to it (torch-free: the command line checks a mask before loading a model)."""
    shown = name or (str(mask) if not isinstance(mask, Image.Image | np.ndarray) else "given")
    values = _mask_values(mask, shown)
    note = None
    if (values.shape[1], values.shape[0]) != tuple(image_size):
        note = (f"the mask {shown} is {values.shape[1]} x {values.shape[0]} px and the image {image_size[0]} x "
                f"{image_size[1]}: resized to the image")
        values = _resize(values, tuple(image_size))
    if values.max() - values.min() < 0.5 and 0.01 < values.mean() < 0.99:
        raise UsageError(f"the mask {shown} is all grey: paint white where the edit may change the picture and black "
                         "where it must stay")
    return values.astype(np.float32), note


def _mask_values(mask: MaskLike, shown: str) -> np.ndarray:
    """The mask as floats in [0, 1]: grey levels of an image (or of an array), float images as they are."""
    if isinstance(mask, np.ndarray):
        values = mask.astype(np.float32)
        values = values / 255.0 if values.max(initial=0) > 1 else values
    else:
        img = mask if isinstance(mask, Image.Image) else open_image(mask, name=shown)
        img = ImageOps.exif_transpose(img)
        if img.mode in ("F", "I", "I;16", "I;16B", "I;16L"):
            values = np.asarray(img, dtype=np.float32)
            top = 1.0 if img.mode == "F" and np.nanmax(values, initial=0) <= 1 else \
                65535.0 if np.nanmax(values, initial=0) > 255 else 255.0
            values = values / top
        else:
            values = np.asarray(to_rgb(img).convert("L"), dtype=np.float32) / 255.0
    if values.ndim == 3:
        values = values.mean(axis=-1)
    if values.ndim != 2 or values.size == 0:
        raise UsageError(f"mask {shown} is not a 2-D picture")
    if not np.isfinite(values).all():
        raise UsageError(f"mask {shown} has NaN or infinite values: give a picture, white where the edit may change")
    return values


def _resize(values: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A float array resized to (width, height), bilinearly."""
    if (values.shape[1], values.shape[0]) == tuple(shape):
        return values
    return np.asarray(Image.fromarray(values.astype(np.float32)).resize(shape, Image.Resampling.BILINEAR))


def mask_digest(values: np.ndarray) -> str:
    """Hash of a prepared mask: what ``edit.json`` records of it."""
    return hashlib.sha256(f"{values.shape}".encode() + np.ascontiguousarray(values, np.float32).tobytes()
                          ).hexdigest()[:16]


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
