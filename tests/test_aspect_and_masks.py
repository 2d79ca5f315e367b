"""Real photos (issue 28): any aspect ratio end to end, and a region to edit that keeps everything outside it.

On the tiny models of every family: a 16:9 picture edits at 16:9 (within the latent grid's rounding), sampling
with the edit switched off at a non-square size equals each family's diffusers pipeline, ``crop="square"`` is the
reference implementations' center crop, and a mask keeps the inversion's own path outside it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from PIL import Image

from nonrigid import edit, load_image, run_method, sample
from nonrigid.errors import UsageError
from nonrigid.images import geometry, load_mask
from nonrigid.models.loading import load_pipeline
from nonrigid.models.registry import family_of

PROMPT = "a photo of a jumping dog"
FAMILIES = ["tiny", "tiny-sd2-v", "tiny-sdxl", "tiny-sd3", "tiny-sd35", "tiny-flux", "tiny-flux-schnell"]
FAST = {"num_steps": 3, "opt_steps": 1, "inner_steps": 1, "etas": (0.0, 1.0), "inject": (0.34,)}


@pytest.fixture(scope="module")
def wide(dog_image_path) -> Image.Image:
    """A 16:9 crop of a TEdBench photo."""
    image = Image.open(dog_image_path).convert("RGB")
    width, height = image.size
    crop = round(width * 9 / 16)
    return image.crop((0, (height - crop) // 2, width, (height - crop) // 2 + crop))


@pytest.fixture(scope="module")
def dog_image_path(tedbench):
    return tedbench / "originals" / "dog_01.jpeg"


@pytest.fixture(scope="module", params=FAMILIES)
def pipe(request):
    return load_pipeline(request.param, device="cpu", dtype="fp32")


def test_the_working_size_keeps_the_aspect_ratio_and_the_pixel_budget():
    box, shape = geometry((1920, 1080), 512, None, 8)
    assert box == (0, 0, 1920, 1080) and shape == (680, 384)  # about 512^2 pixels, sides on the grid of 8
    assert abs(shape[0] / shape[1] - 16 / 9) < 8 / 384 * 2
    assert geometry((1920, 1080), 512, "square", 8) == ((420, 0, 1500, 1080), (512, 512))
    assert geometry((1000, 1000), 512, None, 8)[1] == (512, 512)  # a square picture: as before
    with pytest.raises(UsageError, match="crop must be one of square"):
        geometry((10, 10), 64, "circle")


def test_a_square_crop_is_the_reference_implementations_center_crop(wide):
    side = min(wide.size)
    left = (wide.width - side) // 2
    expected = wide.crop((left, 0, left + side, side)).resize((64, 64), Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(load_image(wide, 64, crop="square")), np.asarray(expected))


def test_a_16_by_9_input_edits_at_16_by_9_on_every_family(pipe, wide):
    model = family_of(pipe)
    result = run_method(model, wide, PROMPT, "ours", FAST)
    width, height = result.input_image.size
    multiple = model.latent_multiple
    assert width % multiple == 0 and height % multiple == 0 and width > height
    assert abs(width / height - 16 / 9) <= 16 / 9 * multiple / height  # within one step of the latent grid
    assert abs(width * height - model.defaults.size ** 2) <= model.defaults.size * 2 * multiple  # the pixel budget
    assert all(v.image.size == (width, height) for v in result.variants)
    assert result.record["working_size"] == [width, height]


def test_sampling_with_the_edit_off_at_a_non_square_size_equals_the_diffusers_pipeline(pipe, wide):
    model = family_of(pipe)
    guidance = model.defaults.guidance_scale
    result = edit(pipe, wide, PROMPT, etas=(1.0,), inject=(0.0,), opt_steps=0, inversion="ddim",
                  guidance_scale=guidance, num_steps=3)
    width, height = result.input_image.size
    assert width != height
    x_t = result.stages.inversion.latent
    ours = sample(pipe, result.stages.inversion, result.stages.text_optimizations, etas=(1.0,), inject_steps=(0,),
                  output_type="latent")
    flux = isinstance(pipe, FluxPipeline)
    latents = FluxPipeline._pack_latents(x_t, *x_t.shape) if flux else x_t
    theirs = pipe(prompt=PROMPT, latents=latents.clone(), num_inference_steps=3, guidance_scale=guidance,
                  height=height, width=width, output_type="latent").images
    if flux:
        ours = FluxPipeline._pack_latents(ours, *ours.shape)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------------ masks


def mask_of(image: Image.Image, value: int) -> Image.Image:
    return Image.new("L", image.size, value)


@pytest.mark.parametrize("method, params", [
    ("ours", FAST), ("nti", {"num_steps": 3, "inner_steps": 1}),
    ("masactrl", {"num_steps": 3, "inner_steps": 1, "start_step": (1,)}),
    ("edit-friendly", {"num_steps": 4, "skip": (1,)}), ("dds", {"iterations": (2,)}),
])
def test_an_all_white_mask_gives_exactly_the_unmasked_edit(tiny_pipe, wide, method, params):
    plain = run_method(tiny_pipe, wide, PROMPT, method, params)
    masked = run_method(tiny_pipe, wide, PROMPT, method, params, mask=mask_of(wide, 255))
    assert [v.image.tobytes() for v in plain.variants] == [v.image.tobytes() for v in masked.variants]
    assert masked.record["mask"] and "mask" not in plain.record


def test_an_all_white_mask_gives_exactly_the_unmasked_flowedit(wide):
    pipe = load_pipeline("tiny-sd3", device="cpu", dtype="fp32")
    params = {"num_steps": 4, "n_max": (3,)}
    plain = run_method(pipe, wide, PROMPT, "flowedit", params)
    masked = run_method(pipe, wide, PROMPT, "flowedit", params, mask=mask_of(wide, 255))
    assert [v.image.tobytes() for v in plain.variants] == [v.image.tobytes() for v in masked.variants]
    black = run_method(pipe, wide, PROMPT, "flowedit", params, mask=mask_of(wide, 0))
    assert black.variants[0].record["latent_change"] == 0.0  # nothing moved outside an all-black mask


def test_an_all_black_mask_gives_the_same_image_for_every_eta_and_injection(tiny_pipe, wide):
    result = run_method(tiny_pipe, wide, PROMPT, "ours", {**FAST, "etas": (0.0, 0.5, 1.0), "inject": (0.0, 0.34)},
                        mask=mask_of(wide, 0))
    images = {v.image.tobytes() for v in result.variants}
    assert len(result.variants) == 6 and len(images) == 1
    plain = run_method(tiny_pipe, wide, PROMPT, "ours", {**FAST, "etas": (0.0, 0.5, 1.0), "inject": (0.0, 0.34)})
    assert len({v.image.tobytes() for v in plain.variants}) > 1  # without the mask they differ: the test has teeth


def test_outside_an_eroded_mask_the_pixels_are_the_reconstructions(tiny_pipe, wide):
    """Where the mask is black the latent is the reconstruction's; the VAE decoder mixes a few pixels across the
    border, so the comparison keeps off it by a margin."""
    model = family_of(tiny_pipe)
    params = {**FAST, "etas": (1.0,)}
    width = run_method(model, wide, PROMPT, "ours", params).input_image.width
    mask = np.zeros((wide.height, wide.width), np.uint8)
    mask[:, : wide.width // 2] = 255  # the left half may change
    result = run_method(model, wide, PROMPT, "ours", params, mask=Image.fromarray(mask))
    reconstruction = model.decode(result.stages.inversion.reconstruction[-1:])[0]
    edited, kept = (np.asarray(im, dtype=int) for im in (result.variants[0].image, reconstruction))
    outside = slice(width // 2 + 16, None)  # the right half, off the feathered border (one latent pixel)
    assert np.abs(edited[:, outside] - kept[:, outside]).max() <= 1
    assert np.abs(edited[:, : width // 2 - 16] - kept[:, : width // 2 - 16]).max() > 10  # inside: edited


def test_a_mask_of_another_size_is_resized_and_said(wide):
    values, note = load_mask(Image.new("L", (32, 18), 255), wide.size, 64)
    assert values.shape == (48, 88) and values.min() == 1.0  # 16:9 at about 64 x 64 px, sides on a grid of 8
    assert "is 32 x 18 px and the image 1024 x 576: resized to the image" in note


@pytest.mark.parametrize("content, message", [
    (b"", "not an image"), (b"not an image", "not an image"),
])
def test_broken_masks_are_refused_in_one_line(tmp_path, wide, content, message):
    path = tmp_path / "mask.png"
    path.write_bytes(content)
    with pytest.raises(UsageError, match=message):
        load_mask(path, wide.size, 64)


def test_all_grey_and_nan_masks_are_refused(tmp_path, wide):
    with pytest.raises(UsageError, match="all grey"):
        load_mask(Image.new("L", wide.size, 128), wide.size, 64)
    nan = np.full((wide.height, wide.width), np.nan, np.float32)
    Image.fromarray(nan).save(tmp_path / "nan.tiff")
    with pytest.raises(UsageError, match="NaN"):
        load_mask(tmp_path / "nan.tiff", wide.size, 64)


def test_methods_that_cannot_keep_a_region_refuse_a_mask_in_one_line(tiny_pipe, wide):
    for method in ("imagic", "ledits"):
        with pytest.raises(UsageError, match=f"method '{method}' takes no mask: ") as refused:
            run_method(tiny_pipe, wide, PROMPT, method, mask=mask_of(wide, 255))
        assert "\n" not in str(refused.value)


# ------------------------------------------------------------------------------------------------ the command line


def cli(*args: str) -> int:
    from nonrigid.cli import main

    return main(list(args))


@pytest.fixture
def wide_file(wide, tmp_path):
    path = tmp_path / "wide.png"
    wide.resize((256, 144)).save(path)
    return path


@pytest.mark.parametrize("content, message", [
    (b"", "is not an image"), (b"<html>no</html>", "is not an image"), ("grey", "is all grey"),
    ("imagic", "--mask does not apply to --method imagic"),
])
def test_a_bad_mask_is_one_line_and_exit_2_with_nothing_written(wide_file, tmp_path, capsys, monkeypatch, content,
                                                                message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    mask = tmp_path / "mask.png"
    method = ["--method", "imagic"] if content == "imagic" else []
    if content in ("grey", "imagic"):
        Image.new("L", (256, 144), 128 if content == "grey" else 255).save(mask)
    else:
        mask.write_bytes(content)
    out = tmp_path / "out"
    assert cli("edit", str(wide_file), PROMPT, "--model", "tiny", "--mask", str(mask), "--out", str(out),
               "--quiet", *method) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and not out.exists()


def test_a_mask_of_another_size_is_resized_and_the_edit_records_it(wide_file, tmp_path, capsys, monkeypatch):
    import json

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    mask = tmp_path / "small.png"
    Image.new("L", (32, 18), 255).save(mask)
    out = tmp_path / "out"
    assert cli("edit", str(wide_file), PROMPT, "--model", "tiny", "--mask", str(mask), "--out", str(out),
               "--steps", "2", "--opt-steps", "1", "--inner-steps", "1", "--eta", "0") == 0
    assert "is 32 x 18 px and the image 256 x 144: resized to the image" in capsys.readouterr().err
    record = json.loads((out / "edit.json").read_text())
    assert record["mask"] and record["mask_file"] == str(mask) and record["working_size"][0] > record["working_size"][1]
    assert record["input_size"] == [256, 144] and "crop" not in record  # what was given, and no crop


def test_bench_edits_inside_a_folder_of_masks_and_refuses_a_missing_one(tedbench, tmp_path, capsys, monkeypatch):
    from nonrigid.evaluation.runfolder import read_rows

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    masks = tmp_path / "masks"
    masks.mkdir()
    args = ["bench", "--data", str(tedbench), "--limit", "2", "--model", "tiny", "--size", "64", "--metrics", "tiny",
            "--set", "num_steps=3", "--set", "opt_steps=1", "--set", "inner_steps=1", "--sweep", "eta=0,1",
            "--masks", str(masks), "--out", str(tmp_path / "run"), "--quiet"]
    assert cli(*args) == 2 and "has no" in capsys.readouterr().err  # one mask per image, named like it
    for name in {json_name["img_name"] for json_name in __import__("json").loads(
            (tedbench / "input_list.json").read_text())[:2]}:
        Image.new("L", (8, 8), 0).save(masks / f"{name.rsplit('.', 1)[0]}.png")  # all black: nothing may change
    assert cli(*args) == 0
    rows = read_rows(tmp_path / "run")
    by_pair: dict = {}
    for row in rows:
        by_pair.setdefault(row["pair"], set()).add(Image.open(tmp_path / "run" / row["image"]).tobytes())
    assert len(rows) == 4 and all(len(images) == 1 for images in by_pair.values())  # every eta: the same image
