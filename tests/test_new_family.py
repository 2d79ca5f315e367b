"""A new model family is one module plus one registry line: here a renamed copy of SD 1.x, defined in this file
(its "module") and put into ``models.registry.FAMILIES`` (its line), runs the method and the baselines through
the command line from a folder saved in diffusers' layout, and through the library by its tiny model's name,
touching no other file.

The copy has SD 1.x's weights, so its edits must equal SD 1.x's pixel for pixel: the family seam, not a name,
decides everything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from diffusers import StableDiffusionPipeline
from PIL import Image

from nonrigid.cli import main
from nonrigid.models import registry
from nonrigid.models.sd import StableDiffusion, build_tiny_sd1

# the smallest settings that still run every stage of each method
FAST = {"ours": ["--steps", "3", "--opt-steps", "1", "--inner-steps", "1", "--eta", "0", "1"],
        "masactrl": ["--steps", "3", "--inner-steps", "1", "--set", "start_step=1,2"],
        "dds": ["--set", "iterations=1,2"]}


class RenamedPipeline(StableDiffusionPipeline):
    """A pipeline class diffusers has never heard of (as a new model's would be)."""


class Renamed(StableDiffusion):
    """The new family's module, all of it: what it is, and its tiny model."""

    name = "renamed"
    pipeline_classes = (RenamedPipeline,)
    single_file_types = ()
    tiny_models: ClassVar[dict] = {"tiny-renamed": lambda seed: RenamedPipeline(**build_tiny_sd1(seed).components)}


@pytest.fixture
def registered(monkeypatch):
    """The registry line (first, so that it is asked before SD 1.x, whose pipeline class its own extends)."""
    monkeypatch.setattr(registry, "FAMILIES", [Renamed, *registry.FAMILIES])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def edit(tmp_path: Path, image: Path, model: str, method: str, name: str) -> Path:
    out = tmp_path / name
    args = ["edit", str(image), "a photo of a jumping dog", "--model", model, "--method", method, "--size", "64",
            "--cache-dir", str(tmp_path / f"cache-{name}"), "--out", str(out), "--quiet", *FAST[method]]
    assert main(args) == 0, args
    return out


def pixels(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("seed*.png"))}


@pytest.fixture
def saved(tmp_path) -> Path:
    """The new family's tiny model saved in diffusers' layout: its model_index.json names RenamedPipeline."""
    folder = tmp_path / "renamed-model"
    Renamed.tiny_models["tiny-renamed"](0).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.mark.parametrize("method", ["ours", "masactrl", "dds"])
def test_a_registered_copy_of_sd_edits_through_the_cli_exactly_as_sd(registered, saved, tmp_path, tedbench, method):
    assert json.loads((saved / "model_index.json").read_text())["_class_name"] == "RenamedPipeline"
    image = tedbench / "originals" / "dog_01.jpeg"
    copy = edit(tmp_path, image, str(saved), method, f"renamed-{method}")
    original = edit(tmp_path, image, "tiny", method, f"sd-{method}")
    record, reference = (json.loads((folder / "edit.json").read_text()) for folder in (copy, original))
    assert record["method"] == method and record["model_family"] == reference["model_family"]
    assert pixels(copy) and pixels(copy).keys() == pixels(original).keys()
    for name, array in pixels(copy).items():
        assert np.array_equal(array, pixels(original)[name]), name


def test_its_tiny_model_loads_by_name_as_its_own_family(registered, tedbench):
    from nonrigid import run_method
    from nonrigid.models.loading import load_model

    model = load_model("tiny-renamed", device="cpu", dtype="fp32")
    assert isinstance(model, Renamed) and isinstance(model.pipe, RenamedPipeline)
    result = run_method(model, tedbench / "originals" / "dog_01.jpeg", "a dog", "nti", {"num_steps": 2}, size=64)
    assert result.variants[0].image.size == (64, 64)


def test_without_its_registry_line_the_family_is_unknown(saved, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    image = tmp_path / "in.png"
    Image.new("RGB", (64, 64), "gray").save(image)
    assert main(["edit", str(image), "a dog", "--model", str(saved), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    assert "RenamedPipeline" in capsys.readouterr().err
