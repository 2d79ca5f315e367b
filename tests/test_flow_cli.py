"""SD3 as a user has it: a diffusers folder in the real on-disk layout (``save_pretrained`` of ``tiny-sd3``, saved
without T5 as ``text_encoder_3=None`` pipelines are), loaded bit-identically, and ``nonrigid edit --model FOLDER``
with every method: the ones that apply write their files at the family's size, the others refuse in one line with
exit code 2. In-process CLI, offline, tiny settings; the output is noise, so the run's shape is what is checked.
"""

from __future__ import annotations

import json

import huggingface_hub.constants
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from PIL import Image

from nonrigid.cli import main
from nonrigid.methods.catalogue import METHODS
from nonrigid.models.loading import _single_file_class, load_pipeline
from nonrigid.models.registry import build_tiny_pipeline, family_of

PROMPT = "A photo of a jumping dog."
STEPS = ["--steps", "3"]
# methods that apply to SD3 -> (flags, number of variants)
APPLIES = {
    "ours": ([*STEPS, "--opt-steps", "2", "--inner-steps", "1", "--eta", "0", "0.5"], 2),
    "nti": ([*STEPS, "--inner-steps", "1", "--no-t5"], 1),  # the flag is accepted (this folder has no T5)
    "imagic": ([*STEPS, "--opt-steps", "1", "--set", "finetune_steps=1", "--set", "alphas=0.8,1.2"], 2),
    "flowedit": ([*STEPS, "--set", "n_max=2,3"], 2),
}
REFUSED = [name for name in METHODS if name not in APPLIES]
MODULES = ("transformer", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def built():
    return build_tiny_pipeline(kind="tiny-sd3")


@pytest.fixture(scope="module")
def folder(built, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sd3")
    built.save_pretrained(path, safe_serialization=True)
    return path



def test_an_sd3_folder_loads_bit_identically_with_its_flow_scheduler(built, folder):
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index.get("text_encoder_3", [None])[0] is None  # saved without T5
    assert (folder / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    pipe = load_pipeline(str(folder), device="cpu", dtype="fp32")
    assert isinstance(pipe, StableDiffusion3Pipeline) and pipe.text_encoder_3 is None
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.shift == 3.0
    for module in MODULES:
        want, got = getattr(built, module).state_dict(), getattr(pipe, module).state_dict()
        assert want.keys() == got.keys()
        assert all(torch.equal(want[k], got[k]) for k in want), module
    assert family_of(pipe).name == "sd3"
    # a single file read with this folder as its config is read as SD3
    assert _single_file_class(folder / "model.safetensors", str(folder)) is StableDiffusion3Pipeline


def test_a_dynamically_shifted_sd3_is_refused_in_one_line(folder, tmp_path):
    import shutil

    from nonrigid.errors import UsageError

    copy = tmp_path / "dynamic"
    shutil.copytree(folder, copy)
    config_path = copy / "scheduler" / "scheduler_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "use_dynamic_shifting": True}))
    with pytest.raises(UsageError, match="dynamic") as err:
        load_pipeline(str(copy), device="cpu", dtype="fp32")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("method", list(APPLIES))
def test_every_method_that_applies_edits_an_sd3_folder(folder, method, tedbench, tmp_path, capsys,
                                                       nonrigid_logger):
    image = tedbench / "originals" / "dog_01.jpeg"
    out = tmp_path / "out"
    flags, variants = APPLIES[method]
    code = main(["edit", str(image), PROMPT, "--method", method, "--model", str(folder), *flags,
                 "--device", "cpu", "--dtype", "fp32", "--seed", "0", "--out", str(out), "--no-cache", "--quiet"])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((out / "edit.json").read_text())
    assert manifest["method"] == method and "SD3 layout" in manifest["model_family"]
    assert manifest["size"] == 64  # the transformer's sample size x the VAE's factor, no --size given
    files = [v["file"] for v in manifest["variants"]]
    assert len(set(files)) == variants
    assert {p.name for p in out.iterdir()} == {*files, "input.png", "grid.png", "edit.json"}
    for name in files:
        with Image.open(out / name) as picture:
            assert picture.size == (64, 64)


@pytest.mark.parametrize("method", REFUSED)
def test_methods_that_do_not_apply_refuse_an_sd3_folder_in_one_line(folder, method, tedbench, tmp_path, capsys,
                                                                   nonrigid_logger):
    image = tedbench / "originals" / "dog_01.jpeg"
    out = tmp_path / "out"
    code = main(["edit", str(image), PROMPT, "--method", method, "--model", str(folder), "--device", "cpu",
                 "--dtype", "fp32", "--out", str(out), "--no-cache", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith(f"nonrigid: error: method '{method}' does not apply to this model (SD3 layout")
    assert "\n" not in err and "Traceback" not in err
    assert not out.exists()
