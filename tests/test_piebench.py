"""PIE-Bench: its released layout (written here, exactly as PnPInversion ships it), the run-length masks both ways,
editing-type selection, each metric against an independent computation, and `nonrigid bench --types 5` then
`nonrigid report` end to end on the tiny model with tiny metrics."""

from __future__ import annotations

import csv
import json
import math
import re
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from nonrigid.cli import main
from nonrigid.errors import UsageError
from nonrigid.evaluation.data import select_pairs
from nonrigid.evaluation.metrics.piebench import PieBenchMetrics, build_tiny_dino
from nonrigid.evaluation.piebench import decode_mask, encode_mask, mask_at, parse_types, read_dataset
from nonrigid.evaluation.protocol import PIE_METRIC_NAMES, PIE_UNEDITED
from nonrigid.evaluation.runfolder import ADDED_COLUMNS, DATABASE_FILE, opened, read_config, read_rows

SIDE = 512


def rle(mask: np.ndarray) -> list[int]:
    """PIE-Bench's encoding, written out plainly: (start, length) of each run of ones, row-major."""
    out, start = [], None
    flat = mask.reshape(-1)
    for i, value in enumerate([*flat.tolist(), 0]):
        if value and start is None:
            start = i
        elif not value and start is not None:
            out += [start, i - start]
            start = None
    return out


def box(top: int, left: int, bottom: int, right: int) -> np.ndarray:
    mask = np.zeros((SIDE, SIDE), dtype=np.uint8)
    mask[top:bottom, left:right] = 1
    return mask


ITEMS = {  # id: (image_path, original_prompt, editing_prompt, type, mask)
    "000000000001": ("0_random_140/000000000001.jpg", "a cat sitting on a [wooden] bench",
                     "a cat sitting on a [metal] bench", "0", box(200, 100, 400, 300)),
    "511000000000": ("5_change_attribute_pose_40/1_artificial/1_animal/511000000000.jpg", "a [standing] horse",
                     "a [running] horse", "5", box(100, 150, 380, 420)),
    "512000000001": ("5_change_attribute_pose_40/1_artificial/2_human/512000000001.jpg", "a man [sitting]",
                     "a man [jumping]", "5", box(50, 50, 300, 200)),
    "521000000002": ("5_change_attribute_pose_40/2_natural/1_animal/521000000002.jpg", "a [lying] dog",
                     "a [standing] dog", "5", np.ones((SIDE, SIDE), dtype=np.uint8)),  # nothing left unedited
}


@pytest.fixture(scope="module")
def piedir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("piebench") / "data"
    rng = np.random.default_rng(0)
    mapping = {}
    for key, (path, original, editing, edit_type, mask) in ITEMS.items():
        image = root / "annotation_images" / path
        image.parent.mkdir(parents=True, exist_ok=True)
        gradient = np.linspace(0, 255, SIDE)[None, :, None] * np.ones((SIDE, 1, 3))
        Image.fromarray((0.6 * gradient + 0.4 * rng.uniform(0, 255, (SIDE, SIDE, 3))).astype(np.uint8)).save(image)
        mapping[key] = {"image_path": path, "original_prompt": original, "editing_prompt": editing,
                        "editing_instruction": "make it so", "editing_type_id": edit_type,
                        "blended_word": "", "mask": rle(mask)}
    (root / "mapping_file.json").write_text(json.dumps(mapping))
    return root


# --------------------------------------------------------------------------------------------------- layout


def test_the_mask_decodes_as_the_reference_and_encodes_back():
    mask = box(10, 20, 30, 500)
    encoded = rle(mask)
    assert encode_mask(mask) == encoded  # encoding: the benchmark's own
    decoded = decode_mask(encoded)
    bordered = mask.astype(float)
    bordered[0, :] = bordered[-1, :] = bordered[:, 0] = bordered[:, -1] = 1  # the reference's border convention
    np.testing.assert_array_equal(decoded, bordered)
    np.testing.assert_array_equal(decode_mask(encoded, border=False), mask)
    assert encode_mask(decode_mask(encoded, border=False)) == encoded
    tail = decode_mask([SIDE * SIDE - 3, 10], border=False)  # a run past the end is cut, as mask_decode's min()
    assert tail.sum() == 3 and tail[-1, -3:].tolist() == [1, 1, 1]
    np.testing.assert_array_equal(mask_at(encoded, SIDE), decoded)
    small = mask_at(encoded, 64)  # nearest neighbour, then the border again
    assert small.shape == (64, 64) and small[0].all() and small[:, -1].all() and small[2:3, 3:62].all()
    assert not small[5:-1, 5:60].any()


def test_the_layout_is_recognised_and_types_selected(piedir, tmp_path):
    layout, pairs = read_dataset(piedir)
    assert layout == "piebench" and [p.index for p in pairs] == [0, 1, 2, 3]
    horse = pairs[1]
    assert (horse.target_text, horse.source_text, horse.source_origin) == ("a running horse", "a standing horse",
                                                                           "mapping file")
    assert horse.edit_type == "5" and horse.image.is_file() and list(horse.mask) == rle(ITEMS["511000000000"][4])
    poses = read_dataset(piedir, types="5")[1]
    assert [p.index for p in poses] == [1, 2, 3]
    assert [p.index for p in select_pairs(poses, "0-2")] == [1, 2]  # the mapping file's places, not the list's
    assert [p.index for p in select_pairs(poses, "512000000001,3")] == [2, 3]  # by id (the image's stem)
    with pytest.raises(UsageError, match="none of these pairs"):
        select_pairs(poses, "0")
    assert parse_types("pose") == ("5",) and parse_types("attribute") == ("4", "5", "6", "7")
    assert parse_types("0,4-5") == ("0", "4", "5") and len(parse_types(None)) == 10
    for bad, message in (("12", "ids 0-9"), ("poses", "names")):
        with pytest.raises(UsageError, match=message):
            parse_types(bad)
    with pytest.raises(UsageError, match="no item of editing type 9"):
        read_dataset(piedir, types="9")
    (tmp_path / "input_list.json").write_text("[]")
    with pytest.raises(UsageError, match="types must be left out"):
        read_dataset(tmp_path, types="5")


# --------------------------------------------------------------------------------------------------- metrics


@pytest.fixture(scope="module")
def pie():
    return PieBenchMetrics.tiny(seed=0)


def _images(seed: int = 1, side: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(20, 236, (side, side, 3), dtype=np.uint8))


def _region(mask: list[int], side: int = 64) -> np.ndarray:
    return mask_at(mask, side)


def test_background_metrics_match_a_known_noise_level_and_ignore_the_edited_region(pie):
    mask = rle(box(128, 128, 384, 384))
    source = _images()
    rng = np.random.default_rng(2)
    noisy = np.asarray(source).astype(int) + 8 * rng.choice([-1, 1], size=(64, 64, 3))
    edited = Image.fromarray(noisy.astype(np.uint8))
    (row,) = pie.score_batch([source], [edited], ["a horse"], [mask])
    keep = 1 - _region(mask)
    expected_mse = (8 / 255) ** 2 * keep.mean()  # over every pixel: the region outside is zero in both images
    assert row["mse_unedit_part"] == pytest.approx(expected_mse, rel=1e-9)
    assert row["psnr_unedit_part"] == pytest.approx(10 * math.log10(1 / expected_mse), rel=1e-6)
    # anything inside the mask (and on its border) leaves every background metric as it was
    scribbled = np.asarray(edited).copy()
    scribbled[_region(mask) > 0] = rng.integers(0, 256, (int(_region(mask).sum()), 3))
    (other,) = pie.score_batch([source], [Image.fromarray(scribbled)], ["a horse"], [mask])
    for name in PIE_UNEDITED:
        assert other[name] == pytest.approx(row[name], abs=1e-6), name
    assert other["structure_distance"] != row["structure_distance"]  # the whole image does see it


def _ssim_numpy(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM by hand: 11 x 11 Gaussian (sigma 1.5) window, only where it fits, averaged over channels and pixels."""
    x = np.arange(11) - 5
    g = np.exp(-(x**2) / (2 * 1.5**2))
    g /= g.sum()

    def blur(img):
        rows = np.lib.stride_tricks.sliding_window_view(img, 11, axis=0) @ g
        return np.lib.stride_tricks.sliding_window_view(rows, 11, axis=1) @ g

    c1, c2 = 0.01**2, 0.03**2
    values = []
    for ch in range(3):
        p, q = a[..., ch], b[..., ch]
        mp, mq = blur(p), blur(q)
        vp, vq, cov = blur(p * p) - mp**2, blur(q * q) - mq**2, blur(p * q) - mp * mq
        values.append(((2 * mp * mq + c1) * (2 * cov + c2)) / ((mp**2 + mq**2 + c1) * (vp + vq + c2)))
    return float(np.mean(values))


def test_ssim_and_lpips_match_independent_computations(pie):
    import torchmetrics.functional.image.lpips as tm_lpips

    mask = rle(box(300, 0, 512, 512))
    source, edited = _images(3), _images(4)
    (row,) = pie.score_batch([source], [edited], ["a dog"], [mask])
    keep = (1 - _region(mask))[..., None]
    a, b = np.asarray(source) / 255 * keep, np.asarray(edited) / 255 * keep
    assert row["ssim_unedit_part"] == pytest.approx(_ssim_numpy(a, b), abs=1e-6)
    reference = tm_lpips._LPIPS(pretrained=False, net="squeeze", pnet_rand=True)  # torchmetrics' own network
    ours = {re.sub(r"^net\.slice(\d+)\.", lambda m: f"net.slices.{int(m[1]) - 1}.", k): v
            for k, v in pie.lpips.state_dict().items() if not k.startswith("scaling_layer")}  # its names for slices
    reference.load_state_dict(ours, strict=True)
    to_tensor = lambda x: torch.from_numpy(x).permute(2, 0, 1)[None].float() * 2 - 1  # noqa: E731
    with torch.no_grad():
        expected = float(reference(to_tensor(a), to_tensor(b)))
    assert row["lpips_unedit_part"] == pytest.approx(expected, rel=1e-4)


def test_structure_distance_is_the_mse_of_dino_key_self_similarities(pie):
    source, edited = _images(5), _images(6)
    (row,) = pie.score_batch([source], [edited], ["x"], [rle(box(0, 0, 10, 10))])
    dino = build_tiny_dino(0)  # the same weights, read another way: the last block's input from hidden_states

    def self_similarity(image):
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None]  # 0-255, as the reference
        pixels = F.interpolate(pixels, size=(32, 32), mode="bilinear", align_corners=False)
        mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
        pixels = (pixels - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
        with torch.no_grad():
            hidden = dino.model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
            last = dino.model.layers[-1]
            keys = last.attention.k_proj(last.layernorm_before(hidden))[0]
        return F.cosine_similarity(keys[:, None, :], keys[None, :, :], dim=-1)

    expected = float(F.mse_loss(self_similarity(edited), self_similarity(source)))
    assert row["structure_distance"] == pytest.approx(expected, rel=1e-4)
    (same,) = pie.score_batch([source], [source], ["x"], [rle(box(0, 0, 10, 10))])
    assert same["structure_distance"] == 0 and same["mse_unedit_part"] == 0 and same["ssim_unedit_part"] == 1


def test_clip_scores_are_clipscore_of_the_edit_and_of_its_edited_region(pie):
    mask = rle(box(0, 0, 256, 512))
    edited = _images(7)
    texts = ["a red apple"]
    (row,) = pie.score_batch([_images(8)], [edited], texts, [mask])
    cut = Image.fromarray((np.asarray(edited) * _region(mask)[..., None]).astype(np.uint8))
    clip = pie.clip
    for image, name in ((edited, "clip_similarity_target_image"), (cut, "clip_similarity_target_image_edit_part")):
        with torch.no_grad():
            pixels = clip.image_processor(images=[image], return_tensors="pt").pixel_values
            tokens = clip.tokenizer(texts, padding=True, return_tensors="pt")
            img = clip.model.visual_projection(clip.model.vision_model(pixel_values=pixels).pooler_output)
            txt = clip.model.text_projection(clip.model.text_model(**tokens).pooler_output)
        cos = float(F.cosine_similarity(img, txt))
        assert row[name] == pytest.approx(max(100 * cos, 0.0), abs=1e-4), name
    assert row["clip_similarity_target_image"] != row["clip_similarity_target_image_edit_part"] or \
        row["clip_similarity_target_image"] == 0


def test_an_empty_unedited_region_gives_nan_background_metrics(pie):
    (row,) = pie.score_batch([_images(1)], [_images(2)], ["x"], [[0, SIDE * SIDE]])
    assert all(math.isnan(row[name]) for name in PIE_UNEDITED)
    assert not math.isnan(row["structure_distance"]) and not math.isnan(row["clip_similarity_target_image"])


# --------------------------------------------------------------------------------------------------- end to end


def test_bench_types_5_and_the_report_table(piedir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run, report = tmp_path / "run", tmp_path / "report"
    assert main(["bench", "--data", str(piedir), "--types", "5", "--method", "nti", "--model", "tiny", "--size", "64",
                 "--set", "num_steps=2", "--set", "inner_steps=1", "--metrics", "tiny", "--out", str(run),
                 "--quiet"]) == 0
    config = read_config(run)
    assert config["dataset"] == "piebench" and config["types"] == ["5"]
    assert [p[2] for p in config["pairs"]] == ["a running horse", "a man jumping", "a standing dog"]
    rows = read_rows(run)
    assert [(r["pair"], r["edit_type"]) for r in rows] == [(1, "5"), (2, "5"), (3, "5")]
    for row in rows:
        assert row["structure_distance"] is not None and row["clip_similarity_target_image"] is not None
        assert row["clip_t"] is not None and row["lpips"] is not None  # the paper's metrics as well
    assert all(rows[2][name] is None for name in PIE_UNEDITED)  # the dog's mask covers everything
    assert all(rows[0][name] is not None for name in PIE_METRIC_NAMES)

    assert main(["report", str(run), "--out", str(report), "--bins", "2", "--min-per-bin", "1", "--quiet"]) == 0
    assert (report / "figure6-clip.png").is_file()
    with (report / "piebench.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [line["type"] for line in table] == ["5 change pose", "overall"]
    overall = table[-1]
    assert (overall["n"], overall["empty_unedited"], overall["empty_edited"]) == ("3", "1", "0")
    psnr = np.array([r["psnr_unedit_part"] for r in rows[:2]])
    assert float(overall["psnr_unedit_part"]) == pytest.approx(psnr.mean(), rel=1e-5)
    assert float(overall["psnr_unedit_part_se"]) == pytest.approx(psnr.std(ddof=1) / math.sqrt(2), rel=1e-5)
    distances = np.array([r["structure_distance"] for r in rows])
    assert float(overall["structure_distance"]) == pytest.approx(distances.mean(), rel=1e-5)
    markdown = (report / "piebench.md").read_text()
    assert "| 5 change pose | 3 | 1 |" in markdown and "Structure dist. x10³" in markdown
    assert "<h2>PIE-Bench</h2>" in (report / "gallery.html").read_text()


def test_bench_on_piebench_works_at_its_protocols_512_px_whatever_the_model(piedir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = tmp_path / "run"
    assert main(["bench", "--data", str(piedir), "--types", "5", "--limit", "1", "--method", "nti", "--model", "tiny",
                 "--set", "num_steps=2", "--set", "inner_steps=1", "--metrics", "tiny", "--out", str(run),
                 "--quiet"]) == 0  # tiny's own size is 64 px
    assert read_config(run)["size"] == 512
    (row,) = read_rows(run)
    assert Image.open(run / row["image"]).size == (512, 512)


def test_bench_refuses_types_on_tedbench_in_one_line(tmp_path, capsys):
    (tmp_path / "originals").mkdir()
    (tmp_path / "input_list.json").write_text(json.dumps([{"img_name": "a.png", "target_text": "x"}]))
    Image.new("RGB", (8, 8)).save(tmp_path / "originals" / "a.png")
    assert main(["bench", "--data", str(tmp_path), "--types", "5", "--out", str(tmp_path / "run"), "--model", "tiny",
                 "--quiet"]) != 0
    err = capsys.readouterr().err.strip()
    assert "--types must be left out" in err and "\n" not in err


def test_a_run_folder_from_before_piebench_gains_the_new_columns(tmp_path):
    identity = {"kind": "bench", "data": "x"}
    with opened(tmp_path / "run", identity):
        pass
    db = sqlite3.connect(tmp_path / "run" / DATABASE_FILE)
    with db:
        for name, _ in ADDED_COLUMNS:  # the edits table as it was before
            db.execute(f"ALTER TABLE edits DROP COLUMN {name}")
    db.close()
    with opened(tmp_path / "run", identity) as run:
        columns = {row[1] for row in run.db.execute("PRAGMA table_info(edits)")}
    assert {name for name, _ in ADDED_COLUMNS} <= columns and read_rows(tmp_path / "run") == []


def test_dino_loads_from_a_local_folder_and_fails_offline_in_one_line(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from nonrigid.evaluation.metrics.lpips import load_lpips_squeeze
    from nonrigid.evaluation.metrics.piebench import load_dino

    tiny = build_tiny_dino(0)
    tiny.model.save_pretrained(tmp_path / "dino")
    loaded = load_dino(tmp_path / "dino", device="cpu")
    image = _images(9)
    torch.testing.assert_close(loaded.key_self_similarity(image), tiny.key_self_similarity(image))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(UsageError, match="could not be loaded") as err:
        load_dino("facebook/dino-vitb8", device="cpu")
    assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match="not found at") as err:
        load_lpips_squeeze(squeezenet_weights=tmp_path / "missing.pth", device="cpu")
    assert "\n" not in str(err.value)
