"""Input images of every kind become the square RGB picture the stages expect, and the stage cache only ever
returns what was stored: bit-identical round trips, damaged entries dropped and recomputed, no half-written files.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TEDBENCH
from PIL import Image

import nonrigid
from nonrigid.images import load_image
from nonrigid.models.loading import load_pipeline
from nonrigid.models.registry import family_of
from nonrigid.stages.cache import StageCache

ORIGINALS = TEDBENCH / "originals"
S = 64
WHITE = (255, 255, 255)


@pytest.fixture
def nonrigid_log(caplog):
    """caplog for the ``nonrigid`` logger, even after the CLI (run in-process elsewhere) turned propagation off."""
    logger = logging.getLogger("nonrigid")
    propagate, level = logger.propagate, logger.level
    logger.propagate = True
    caplog.set_level(logging.INFO, logger="nonrigid")
    yield caplog
    logger.propagate, logger.level = propagate, level


def pixels(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    assert img.size == (S, S)
    return np.asarray(img).astype(int)


def assert_colour(region: np.ndarray, colour: tuple[int, int, int], tol: int = 2) -> None:
    diff = np.abs(region - np.array(colour)).max()
    assert diff <= tol, f"expected {colour}, found values up to {diff} away (mean {region.reshape(-1, 3).mean(0)})"


# ------------------------------------------------------------------------------------------------ (a) TEdBench


@pytest.mark.skipif(not ORIGINALS.is_dir(), reason="TEdBench originals not present")
@pytest.mark.parametrize("name", sorted(p.name for p in ORIGINALS.iterdir()) if ORIGINALS.is_dir() else [])
def test_every_tedbench_original_loads_as_a_square_rgb(name):
    img = load_image(ORIGINALS / name, S, crop="square")
    assert img.mode == "RGB"
    assert img.size == (S, S)


# ------------------------------------------------------------------------------------------------ (b) modes


def halves(mode: str, left, right, size=(80, 80)) -> Image.Image:
    """An image whose left half is ``left`` and right half is ``right``."""
    img = Image.new(mode, size, left)
    img.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return img


def check_halves(img: Image.Image, left: tuple[int, int, int], right: tuple[int, int, int]) -> None:
    p = pixels(img)
    assert_colour(p[:, : S // 2 - 6], left)  # keep clear of the bicubic ringing at the seam
    assert_colour(p[:, S // 2 + 6 :], right)


def test_rgba_transparent_pixels_become_white():
    img = halves("RGBA", (255, 0, 0, 0), (0, 0, 255, 255))  # invisible red | opaque blue
    check_halves(load_image(img, S, crop="square"), WHITE, (0, 0, 255))


def test_rgba_half_transparent_pixels_are_composited_on_white():
    img = Image.new("RGBA", (80, 80), (0, 0, 0, 128))
    assert_colour(pixels(load_image(img, S, crop="square")), (127, 127, 127), tol=1)


def test_la_transparent_pixels_become_white():
    img = halves("LA", (0, 0), (100, 255))
    check_halves(load_image(img, S, crop="square"), WHITE, (100, 100, 100))


def test_palette_transparency_becomes_white():
    img = halves("P", 0, 1)
    img.putpalette([255, 0, 0, 0, 255, 0])  # 0: red, 1: green
    img.info["transparency"] = 0
    check_halves(load_image(img, S, crop="square"), WHITE, (0, 255, 0))


def test_palette_without_transparency_keeps_its_colours():
    img = halves("P", 0, 1)
    img.putpalette([255, 0, 0, 0, 255, 0])
    check_halves(load_image(img, S, crop="square"), (255, 0, 0), (0, 255, 0))


def test_greyscale_becomes_grey_rgb():
    assert_colour(pixels(load_image(Image.new("L", (80, 80), 77), S, crop="square")), (77, 77, 77), tol=0)


def test_cmyk_is_converted():
    red = Image.new("CMYK", (80, 80), (0, 255, 255, 0))
    assert_colour(pixels(load_image(red, S, crop="square")), (255, 0, 0))


def gradient(dtype, top: float) -> np.ndarray:
    """A left-to-right ramp from 0 to ``top``, 128 x 128."""
    return np.tile(np.linspace(0, top, 128).astype(dtype), (128, 1))


@pytest.mark.parametrize(
    "mode, values",
    [
        ("I;16", gradient(np.uint16, 65535)),
        ("I", gradient(np.int32, 65535)),
        ("F", gradient(np.float32, 1.0)),
        ("F", gradient(np.float32, 255.0)),
    ],
    ids=["I;16", "I", "F-unit", "F-255"],
)
def test_wide_formats_are_rescaled_not_clipped(tmp_path, mode, values):
    img = Image.fromarray(values) if mode != "I" else Image.fromarray(values, "I")
    assert img.mode == mode
    if mode == "I;16":  # the common case: a 16-bit PNG on disk
        img.save(tmp_path / "deep.png")
        img = tmp_path / "deep.png"
    p = pixels(load_image(img, S, crop="square"))
    assert p.min() <= 10, "the dark end became grey"
    assert p.max() >= 245, "the bright end is missing"
    columns = p[..., 0].mean(axis=0)
    assert columns[0] < 20 and columns[-1] > 235
    assert np.all(np.diff(columns) >= -1), "the ramp is not monotonic: values wrapped or were clipped"
    assert (p[..., 0] == 255).mean() < 0.1, "most of the image was clipped to white"


def test_exif_orientation_is_applied(tmp_path):
    # Stored 120 wide x 60 high, tagged "rotate 90 degrees clockwise to display" (orientation 6): displayed it is
    # 60 x 120. The marker fills the stored top half of the middle columns; after the rotation it is the right
    # half of the displayed square crop (unrotated, it would be the top half).
    marker, background = (255, 0, 0), (0, 0, 255)
    img = Image.new("RGB", (120, 60), background)
    img.paste(marker, (30, 0, 90, 30))
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(tmp_path / "phone.png", exif=exif)
    assert Image.open(tmp_path / "phone.png").getexif().get(0x0112) == 6
    p = pixels(load_image(tmp_path / "phone.png", S, crop="square"))
    assert_colour(p[:, S // 2 + 4 :], marker)
    assert_colour(p[:, : S // 2 - 4], background)
    # Without the square crop the displayed picture keeps its portrait shape.
    width, height = load_image(tmp_path / "phone.png", S).size
    assert height > width


# ------------------------------------------------------------------------------------------------ (c) crop


@pytest.mark.parametrize("size", [(100, 60), (60, 100)], ids=["landscape", "portrait"])
def test_center_crop_keeps_the_middle(size):
    middle, sides = (10, 200, 30), (240, 240, 0)
    img = Image.new("RGB", size, sides)
    w, h = size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img.paste(middle, (left, top, left + side, top + side))
    assert_colour(pixels(load_image(img, S, crop="square")), middle, tol=0)


# ------------------------------------------------------------------------------------------------ (d) cache


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "latent": torch.randn(2, 4, 8, 8, generator=g),
        "embedding": torch.randn(1, 77, 32, generator=g).half(),
        "bf": torch.randn(3, generator=g).bfloat16(),
        "steps": torch.arange(5, dtype=torch.int64),
        "odd": torch.tensor([float("inf"), -0.0, 1e-40]),
        "empty": torch.zeros(0, 3),
    }


META = {"method": "nti", "losses": [0.5, 0.25, None], "prompt": "a dog \u00e9", "nested": {"k": [1, 2]}}


def entry_files(cache: StageCache, stage: str) -> list[Path]:
    folder = cache.root / stage
    return sorted(folder.iterdir()) if folder.is_dir() else []


def test_cache_round_trip_is_bit_identical(tmp_path):
    cache = StageCache(tmp_path)
    tensors = sample_tensors()
    path = cache.save("inversion", "k1", tensors, META)
    assert path == cache.path("inversion", "k1") and path.is_file()
    loaded, meta = cache.load("inversion", "k1")
    assert meta == META
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape
        assert loaded[name].view(torch.uint8).numpy().tobytes() == tensor.view(torch.uint8).numpy().tobytes()
    assert cache.load("inversion", "other") is None


def test_cache_uses_the_environment_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("NONRIGID_CACHE_DIR", str(tmp_path / "env-cache"))
    assert StageCache().root == tmp_path / "env-cache"


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the tensor payload ends the file
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [truncate, flip_last_byte], ids=["truncated", "bit-flipped"])
def test_damaged_entry_is_dropped_with_a_warning(tmp_path, nonrigid_log, damage):
    cache = StageCache(tmp_path)
    path = cache.save("text", "k1", {"x": torch.arange(64, dtype=torch.float32)}, {"seed": 0})
    damage(path)
    assert cache.load("text", "k1") is None
    warnings = [r for r in nonrigid_log.records if r.levelno == logging.WARNING and r.name == "nonrigid"]
    assert len(warnings) == 1 and str(path) in warnings[0].getMessage()
    assert not path.exists()
    assert cache.load("text", "k1") is None  # and it stays gone, quietly


def test_interrupted_save_leaves_no_entry_and_no_temp_file(tmp_path, monkeypatch):
    cache = StageCache(tmp_path)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        cache.save("inversion", "k1", {"x": torch.ones(3)}, {})
    monkeypatch.undo()
    assert entry_files(cache, "inversion") == []
    assert cache.load("inversion", "k1") is None


def test_interrupted_save_keeps_the_previous_entry(tmp_path, monkeypatch):
    cache = StageCache(tmp_path)
    cache.save("inversion", "k1", {"x": torch.ones(3)}, {"v": 1})

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        cache.save("inversion", "k1", {"x": torch.zeros(3)}, {"v": 2})
    monkeypatch.undo()
    assert [p.name for p in entry_files(cache, "inversion")] == ["k1.safetensors"]
    tensors, meta = cache.load("inversion", "k1")
    assert meta == {"v": 1} and torch.equal(tensors["x"], torch.ones(3))


# ------------------------------------------------------------------------------------------------ (e) edit + cache


@pytest.fixture(scope="module")
def tiny():
    return load_pipeline("tiny", device="cpu", dtype="fp32")


def small_image() -> Image.Image:
    rng = np.random.default_rng(0)
    base = np.zeros((96, 80, 3), np.uint8)
    base[..., 0] = np.linspace(0, 255, 80, dtype=np.uint8)
    base[20:70, 20:60] = (30, 160, 90)
    return Image.fromarray(np.clip(base + rng.integers(0, 20, base.shape), 0, 255).astype(np.uint8))


def run_edit(pipe, image, cache, etas):
    return nonrigid.edit(
        pipe, image, "A photo of a jumping dog.", size=S, num_steps=4, opt_steps=2, inner_steps=1, etas=etas,
        cache=cache,
    )


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.cpu(), b.cpu())


def test_edit_reuses_cached_stages_and_recomputes_a_corrupt_one(tiny, tmp_path, nonrigid_log):
    image = small_image()
    cache = StageCache(tmp_path / "cache")

    first = run_edit(tiny, image, cache, (0.0,))
    assert first.cache == {"text_optimization": [], "inversion": False}
    assert len(entry_files(cache, "text")) == 1 and len(entry_files(cache, "inversion")) == 1

    second = run_edit(tiny, image, cache, (0.3, 0.5))
    assert second.cache["inversion"] is True
    assert second.cache["text_optimization"] == [0]
    assert [v.params['etas'] for v in second.variants] == [0.3, 0.5]
    a, b = first.stages.text_optimizations[0], second.stages.text_optimizations[0]
    assert same(a.optimized_embedding, b.optimized_embedding)
    assert same(a.target_embedding, b.target_embedding)
    assert a.losses == b.losses
    for name in ("latent", "trajectory", "null_embeddings", "reconstruction"):
        assert same(getattr(first.stages.inversion, name), getattr(second.stages.inversion, name)), name

    [inversion_file] = entry_files(cache, "inversion")
    flip_last_byte(inversion_file)
    nonrigid_log.clear()
    third = run_edit(tiny, image, cache, (0.1,))
    assert third.cache["inversion"] is False
    assert third.cache["text_optimization"] == [0]
    assert any(
        "corrupt" in r.getMessage() and str(inversion_file) in r.getMessage()
        for r in nonrigid_log.records
        if r.levelno == logging.WARNING and r.name == "nonrigid"
    )
    # The first run inverted alongside the text optimization (its conditional predictions rode in A's batches);
    # this one inverts alone, so the two agree to float rounding, not bit for bit (tests/test_programs.py bounds it).
    for name in ("latent", "null_embeddings"):
        recomputed, original = getattr(third.stages.inversion, name), getattr(first.stages.inversion, name)
        assert recomputed.shape == original.shape and recomputed.dtype == original.dtype
        torch.testing.assert_close(recomputed, original, rtol=0, atol=1e-3)
    # The recomputed entry replaced the damaged one and reads back cleanly.
    assert entry_files(cache, "inversion") == [inversion_file]
    assert cache.load("inversion", inversion_file.stem) is not None


# ------------------------------------------------------------------------------------------------ (f) long prompt


def test_long_prompt_warns_with_the_dropped_words(tiny, nonrigid_log):
    # The tiny model's tokenizer has one token per non-space character: the head alone is over 77 tokens.
    head = "zebra " + "a photo of a dog " * 7
    assert len(head.replace(" ", "")) > 77
    family_of(tiny).encode_prompt(head + "wearing a purple hat")
    warnings = [r.getMessage() for r in nonrigid_log.records if r.levelno == logging.WARNING and r.name == "nonrigid"]
    assert len(warnings) == 1, warnings
    assert "77" in warnings[0]
    assert "purple hat" in warnings[0]
    assert "zebra" not in warnings[0]


def test_short_prompt_does_not_warn(tiny, nonrigid_log):
    family_of(tiny).encode_prompt("a photo of a dog")
    assert not [r for r in nonrigid_log.records if r.levelno >= logging.WARNING and r.name == "nonrigid"]


# ---- images too large to read


@pytest.mark.parametrize("size", [(20_000, 20_000), (12_000, 12_000), (10_001, 2)],
                         ids=["bomb-pillow-refuses", "bomb-pillow-warns", "one-px-too-wide"])
def test_an_over_size_image_is_refused_from_its_header_in_one_line(tmp_path, size):
    from conftest import write_bomb_png

    from nonrigid.errors import UsageError
    from nonrigid.images import check_image

    bomb = write_bomb_png(tmp_path / "bomb.png", *size)
    shown = f"{size[0]} x {size[1]} px" if max(size) < 15_000 else "over 10,000 px a side"
    for read in (lambda: load_image(bomb, 64), lambda: check_image(bomb)):
        with pytest.raises(UsageError) as caught:
            read()
        assert str(caught.value) == f"image {bomb} is {shown}; images up to 10,000 px a side are accepted"
    # at the limit the header passes (these few bytes then fail as the truncated file they are)
    at_limit = write_bomb_png(tmp_path / "at-limit.png", 10_000, 2)
    assert check_image(at_limit) == (10_000, 2)
    with pytest.raises(UsageError, match="damaged or truncated"):
        load_image(at_limit, 64)
