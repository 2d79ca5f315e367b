"""``nonrigid edit`` runs every method on the families beyond SD 1.x, loaded the ways a user has them: an SD 2.x
v-prediction model as a diffusers folder, an SDXL model as an original-layout single-file checkpoint with
``--config`` naming its diffusers folder.

The CLI runs in-process (``main([...])``) on tiny random models with tiny settings; the output is noise, so what
is checked is the run's shape: the folder's files, the record's model family and the family's default size (no
``--size`` is given) in edit.json and in every PNG.
"""

from __future__ import annotations

import json

import huggingface_hub.constants
import pytest
import safetensors.torch
from ldm_layout import to_ldm_state_dict
from PIL import Image

from nonrigid.cli import main
from nonrigid.models.registry import build_tiny_pipeline

PROMPT = "A photo of a jumping dog."
STEPS = ["--steps", "4"]
# each method at its smallest (few steps, short optimizations) with a two-value sweep where it has one:
# method -> (flags, number of variants)
METHOD_ARGS = {
    "ours": ([*STEPS, "--opt-steps", "2", "--inner-steps", "2", "--eta", "0", "0.5"], 2),
    "nti": ([*STEPS, "--inner-steps", "2"], 1),
    "imagic": ([*STEPS, "--opt-steps", "2", "--set", "finetune_steps=2", "--set", "alphas=0.8,1.2"], 2),
    "masactrl": ([*STEPS, "--inner-steps", "2", "--set", "start_step=1,2"], 2),
    "edit-friendly": ([*STEPS, "--set", "skip=1,2"], 2),
    "dds": (["--set", "iterations=1,2"], 2),
    "ledits": ([*STEPS, "--set", "edit_guidance=5,10"], 2),
}
# model -> (what its record's model_family says, its default size: the UNet's sample size x the VAE's factor)
FAMILIES = {"sd2-v folder": ("v_prediction", 96), "sdxl single file": ("SDXL", 64)}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test may reach the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, list[str]]:
    """The --model (and --config) flags of each family, saved once for the module."""
    root = tmp_path_factory.mktemp("models")
    sd2v = root / "tiny-sd2-v"
    build_tiny_pipeline(kind="tiny-sd2-v").save_pretrained(sd2v, safe_serialization=True)
    sdxl = build_tiny_pipeline(kind="tiny-sdxl")
    sdxl_folder, sdxl_file = root / "sdxl", root / "sdxl.safetensors"
    sdxl.save_pretrained(sdxl_folder, safe_serialization=True)
    safetensors.torch.save_file(to_ldm_state_dict(sdxl), str(sdxl_file))
    return {"sd2-v folder": ["--model", str(sd2v)],
            "sdxl single file": ["--model", str(sdxl_file), "--config", str(sdxl_folder)]}



@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("method", list(METHOD_ARGS))
def test_every_method_edits_with_the_family_defaults(models, family, method, tedbench, tmp_path, capsys,
                                                     nonrigid_logger):
    image = tedbench / "originals" / "dog_01.jpeg"
    out = tmp_path / "out"
    flags, variants = METHOD_ARGS[method]
    code = main(["edit", str(image), PROMPT, "--method", method, *models[family], *flags,
                 "--device", "cpu", "--dtype", "fp32", "--seed", "0", "--out", str(out), "--no-cache", "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert capsys.readouterr().out.strip() == str(out)

    described, size = FAMILIES[family]
    manifest = json.loads((out / "edit.json").read_text())
    assert manifest["method"] == method and manifest["model"] == models[family][1]
    assert described in manifest["model_family"], manifest["model_family"]
    assert manifest["size"] == size
    files = [v["file"] for v in manifest["variants"]]
    assert len(files) == len(set(files)) == variants
    assert {p.name for p in out.iterdir()} == {*files, "input.png", "grid.png", "edit.json"}
    for name in [*files, "input.png"]:
        with Image.open(out / name) as picture:
            assert picture.size == (size, size), name
    with Image.open(out / "grid.png") as grid:
        assert grid.width >= (1 + variants) * size and grid.height >= size  # the input, then the variants



@pytest.fixture(scope="module")
def euler_default_folders(tmp_path_factory) -> dict[str, str]:
    """SD 1.x and SDXL folders in diffusers' layout saved with a default ``EulerDiscreteScheduler`` (as a pipeline
    assembled outside this project gets one): "linspace" spacing, ``steps_offset`` 0."""
    from diffusers import EulerDiscreteScheduler

    root = tmp_path_factory.mktemp("euler-default")
    folders = {}
    for kind in ("tiny", "tiny-sdxl"):
        pipe = build_tiny_pipeline(kind=kind)
        pipe.scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
        assert (pipe.scheduler.config.timestep_spacing, pipe.scheduler.config.steps_offset) == ("linspace", 0)
        pipe.save_pretrained(root / kind, safe_serialization=True)
        folders[kind] = str(root / kind)
    return folders


@pytest.mark.parametrize("kind", ["tiny", "tiny-sdxl"])
@pytest.mark.parametrize("method", ["ours", "nti", "masactrl"])
def test_methods_that_invert_run_on_a_model_saved_with_a_default_euler_scheduler(euler_default_folders, kind, method,
                                                                                tedbench, tmp_path, capsys,
                                                                                nonrigid_logger):
    out = tmp_path / "out"
    flags, variants = METHOD_ARGS[method]
    code = main(["edit", str(tedbench / "originals" / "dog_01.jpeg"), PROMPT, "--method", method, "--model",
                 euler_default_folders[kind], *flags, "--size", "64", "--device", "cpu", "--dtype", "fp32",
                 "--out", str(out), "--no-cache", "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert len(json.loads((out / "edit.json").read_text())["variants"]) == variants
