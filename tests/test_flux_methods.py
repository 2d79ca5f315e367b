"""Which editing methods run on FLUX (distilled guidance, no unconditional branch) and which refuse, in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nonrigid import run_method
from nonrigid.errors import UsageError
from nonrigid.methods.base import family_defaults, resolve_params
from nonrigid.methods.catalogue import METHODS
from nonrigid.methods.flowedit import flowedit_latents
from nonrigid.models.loading import load_model, load_pipeline
from nonrigid.models.registry import family_of

SOURCE = "a photo of a dog"
TARGET = "a photo of a jumping dog"
SIDE = 64


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("tiny-flux", device="cpu", dtype="fp32")


def test_ours_with_ddim_inversion_runs_on_flux_at_the_distilled_guidance(pipe, dog_image):
    result = run_method(pipe, dog_image, TARGET, "ours", {"num_steps": 3, "opt_steps": 2, "etas": (0.0, 1.0),
                        "inject": (0.34,), "inversion": "ddim", "guidance_scale": 3.5}, source_prompt=SOURCE)
    assert [v.image.size for v in result.variants] == [(SIDE, SIDE)] * 2


@pytest.mark.parametrize("inversion", ["nti", "npi"])
def test_inversions_of_the_unconditional_branch_refuse_flux_in_one_line(pipe, dog_image, inversion):
    with pytest.raises(UsageError, match=rf"^{inversion} inversion works on the unconditional branch .*FLUX"
                                         r".*; use ddim inversion$") as err:
        run_method(pipe, dog_image, TARGET, "ours", {"num_steps": 3, "opt_steps": 1, "inversion": inversion})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("method", ["nti", "masactrl", "edit-friendly", "dds", "ledits"])
def test_methods_that_need_a_unet_or_a_null_text_refuse_flux_in_one_line(pipe, dog_image, method):
    with pytest.raises(UsageError, match=rf"^method '{method}' does not apply to this model \(FLUX layout") as err:
        run_method(pipe, dog_image, TARGET, method)
    assert "\n" not in str(err.value)


def test_imagic_and_flowedit_with_flux_settings_run_on_flux(pipe, dog_image):
    imagic = run_method(pipe, dog_image, TARGET, "imagic", {"num_steps": 3, "opt_steps": 1, "finetune_steps": 1,
                        "alphas": (1.0,)}, source_prompt=SOURCE, seeds=(0,))
    assert imagic.variants[0].image.size == (SIDE, SIDE)
    # the authors' FLUX settings (28 steps, n_max 24, guidance 1.5 / 5.5) scaled down to 4 steps
    flow = run_method(pipe, dog_image, TARGET, "flowedit", {"num_steps": 4, "n_max": (3,), "source_guidance": 1.5,
                      "target_guidance": 5.5}, source_prompt=SOURCE, seeds=(0,))
    assert flow.variants[0].image.size == (SIDE, SIDE)


def test_flowedit_takes_its_authors_flux_settings_on_flux_scaled_to_the_steps_run(pipe, dog_image):
    """Unset, FlowEdit's parameters are the authors' FLUX settings (28 steps, n_max 24, distilled guidance 1.5 /
    5.5), not their SD3 ones; n_max counts out of 28 steps and follows --steps; what the caller sets stays."""
    result = run_method(pipe, dog_image, TARGET, "flowedit", {"num_steps": 7}, source_prompt=SOURCE)
    assert result.params["n_max"] == (6,)  # 24 of 28, at 7 steps
    assert (result.params["source_guidance"], result.params["target_guidance"]) == (1.5, 5.5)
    spelled = run_method(pipe, dog_image, TARGET, "flowedit", {"num_steps": 7, "n_max": (6,), "source_guidance": 1.5,
                         "target_guidance": 5.5}, source_prompt=SOURCE)
    assert np.array_equal(np.asarray(result.variants[0].image), np.asarray(spelled.variants[0].image))
    told = run_method(pipe, dog_image, TARGET, "flowedit", {"num_steps": 7, "n_max": (2,), "target_guidance": 4.0},
                      source_prompt=SOURCE)
    assert (told.params["n_max"], told.params["source_guidance"], told.params["target_guidance"]) == ((2,), 1.5, 4.0)
    assert resolve_params(METHODS["flowedit"], {}, family_of(pipe))["num_steps"] == 28
    schnell = load_model("tiny-flux-schnell", device="cpu", dtype="fp32")  # 4 steps: 24 of 28 becomes 3
    assert family_defaults(METHODS["flowedit"], schnell, {})["n_max"] == (3,)
    sd3 = load_model("tiny-sd3", device="cpu", dtype="fp32")  # SD3 keeps the SD3 settings
    on_sd3 = resolve_params(METHODS["flowedit"], {}, sd3)
    assert (on_sd3["num_steps"], on_sd3["n_max"], on_sd3["source_guidance"], on_sd3["target_guidance"]) == (
        50, (33,), 3.5, 13.5)


def test_flowedit_on_flux_moves_by_the_difference_of_distilled_guidance_velocities(pipe, dog_image):
    family = family_of(pipe)
    x_src = family.encode_image(dog_image.resize((SIDE, SIDE)))
    source = family.encode_prompt(SOURCE)
    same = flowedit_latents(family, x_src, source, source, (4,), num_steps=4, source_guidance=1.5,
                            target_guidance=1.5)
    torch.testing.assert_close(same, x_src, atol=1e-6, rtol=0)  # same prompt, same guidance value: no move
    # a different guidance value alone moves it: the value reaches the transformer (no unconditional branch)
    moved = flowedit_latents(family_of(pipe), x_src, source, source, (4,), num_steps=4, source_guidance=1.5,
                             target_guidance=5.5)
    assert float((moved - x_src).abs().max()) > 1e-4



def test_the_cli_edits_with_tiny_flux_by_default_with_the_plain_inversion_and_refuses_nti_in_one_line(
        tedbench, tmp_path, capsys, nonrigid_logger):
    """FLUX has no null text: with no --inversion, ours takes the stand-in (the plain inversion at the distilled
    guidance, 3.5), the same edit as asking for it; asking for NTI is refused in one line."""
    from nonrigid.cli import main

    image = tedbench / "originals" / "dog_01.jpeg"
    base = ["edit", str(image), TARGET, "--model", "tiny-flux", "--device", "cpu", "--dtype", "fp32",
            "--steps", "3", "--opt-steps", "1", "--eta", "0", "--no-cache", "--quiet"]
    code = main([*base, "--inversion", "ddim", "--out", str(tmp_path / "ok")])
    assert code == 0, capsys.readouterr().err
    assert "FLUX layout" in json.loads((tmp_path / "ok" / "edit.json").read_text())["model_family"]
    code = main([*base, "--out", str(tmp_path / "default")])
    assert code == 0, capsys.readouterr().err
    chosen = json.loads((tmp_path / "default" / "edit.json").read_text())
    asked = json.loads((tmp_path / "ok" / "edit.json").read_text())
    for record in (chosen, asked):  # --inversion ddim alone also takes the distilled guidance
        assert record["inversion"] == "ddim" and record["guidance_scale_used"] == 3.5
    for name in sorted(p.name for p in (tmp_path / "ok").glob("*.png")):
        assert (tmp_path / "default" / name).read_bytes() == (tmp_path / "ok" / name).read_bytes(), name
    # with the stage cache (FLUX's inversion has no unconditional conditioning to store): a second run reads both
    # stages back and draws the same images
    cached = [a for a in base if a != "--no-cache"] + ["--cache-dir", str(tmp_path / "cache")]
    for out in ("first", "second"):
        assert main([*cached, "--out", str(tmp_path / out)]) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "second" / "edit.json").read_text())["cache"]["inversion"] is True
    for name in sorted(p.name for p in (tmp_path / "ok").glob("*.png")):
        assert (tmp_path / "second" / name).read_bytes() == (tmp_path / "first" / name).read_bytes(), name
    code = main([*base, "--inversion", "nti", "--out", str(tmp_path / "nti")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and err.startswith("nonrigid: error: nti inversion works on the "
                                                            "unconditional branch")
    assert not (tmp_path / "nti").exists()


def test_flux_schnell_edits_with_the_4_steps_it_is_distilled_for_unless_told(tedbench, tmp_path, capsys,
                                                                              nonrigid_logger):
    from nonrigid.cli import main

    image = tedbench / "originals" / "dog_01.jpeg"
    base = ["edit", str(image), TARGET, "--model", "tiny-flux-schnell", "--device", "cpu", "--dtype", "fp32",
            "--opt-steps", "1", "--eta", "0", "--no-cache", "--quiet"]
    assert main([*base, "--out", str(tmp_path / "default")]) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "default" / "edit.json").read_text())["num_steps"] == 4
    assert main([*base, "--steps", "6", "--out", str(tmp_path / "six")]) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "six" / "edit.json").read_text())["num_steps"] == 6
    dev = family_of(load_pipeline("tiny-flux", device="cpu", dtype="fp32"))
    assert dev.default_steps is None  # dev takes the methods' own step counts (ours: 50)


# methods that apply to FLUX, through the CLI on a saved folder -> (flags, number of variants)
FOLDER_APPLIES = {
    "ours": (["--steps", "3", "--opt-steps", "1", "--eta", "0", "1"], 2),
    "imagic": (["--steps", "3", "--opt-steps", "1", "--set", "finetune_steps=1", "--set", "alphas=0.8,1.2"], 2),
    "flowedit": (["--steps", "4", "--set", "n_max=2,3"], 2),
}


@pytest.fixture(scope="module")
def flux_folder(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-flux-folder")
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.mark.parametrize("method", list(FOLDER_APPLIES))
def test_every_method_that_applies_edits_a_saved_flux_folder_through_the_cli(flux_folder, method, tedbench, tmp_path,
                                                                             capsys, nonrigid_logger):
    from nonrigid.cli import main

    flags, variants = FOLDER_APPLIES[method]
    out = tmp_path / "out"
    code = main(["edit", str(tedbench / "originals" / "dog_01.jpeg"), TARGET, "--method", method, "--model",
                 str(flux_folder), "--size", str(SIDE), *flags, "--device", "cpu", "--dtype", "fp32", "--seed", "0",
                 "--out", str(out), "--no-cache", "--quiet"])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((out / "edit.json").read_text())
    assert manifest["method"] == method and "FLUX layout" in manifest["model_family"]
    files = [v["file"] for v in manifest["variants"]]
    assert len(set(files)) == variants
    assert {p.name for p in out.iterdir()} == {*files, "input.png", "grid.png", "edit.json"}


@pytest.mark.parametrize("method", ["nti", "masactrl", "edit-friendly", "dds", "ledits"])
def test_methods_that_do_not_apply_refuse_a_saved_flux_folder_in_one_line(flux_folder, method, tedbench, tmp_path,
                                                                          capsys, nonrigid_logger):
    from nonrigid.cli import main

    out = tmp_path / "out"
    code = main(["edit", str(tedbench / "originals" / "dog_01.jpeg"), TARGET, "--method", method, "--model",
                 str(flux_folder), "--size", str(SIDE), "--device", "cpu", "--dtype", "fp32", "--out", str(out),
                 "--no-cache", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "Traceback" not in err
    assert err.startswith(f"nonrigid: error: method '{method}' does not apply to this model (FLUX layout")
    assert not out.exists()
