"""Every method behind one interface: parameter tables, the shared runner, the output layout, the CLI.

Each method's own properties are tested in its own file (test_methods_*.py); here: what all methods share.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, TEDBENCH
from PIL import Image

from nonrigid import invert, optimize_text, run_method, sample
from nonrigid.cli.common import parse_assignments
from nonrigid.cli.edit import describe_methods
from nonrigid.errors import UsageError
from nonrigid.methods.base import resolve_params
from nonrigid.methods.catalogue import METHODS, method_info
from nonrigid.methods.output import save_result, variant_filename
from nonrigid.models.registry import family_of
from nonrigid.stages.cache import StageCache
from nonrigid.stages.sampling import sample_latents

PROMPT = "a photo of a jumping dog"

# the smallest settings that still exercise every stage of each method
FAST = {
    "ours": {"num_steps": 4, "opt_steps": 2, "inner_steps": 1, "etas": (0.0, 0.5), "inject": (0.25,)},
    "nti": {"num_steps": 4, "inner_steps": 1},
    "imagic": {"num_steps": 3, "opt_steps": 2, "finetune_steps": 2, "alphas": (0.9, 1.2)},
    "masactrl": {"num_steps": 4, "inner_steps": 1, "start_step": (1, 3)},  # default start_layer
    "edit-friendly": {"num_steps": 6, "skip": (1, 3)},
    "dds": {"iterations": (1, 2)},
    "ledits": {"num_steps": 4, "edit_guidance": (3.0, 6.0), "mask": "noise"},  # tiny UNet: no maps for the others
    "flowedit": {"num_steps": 4, "n_max": (2, 3)},  # flow models only: tests/test_flow_methods.py runs it
    # their own models only: tests/test_editors.py runs them
    "kontext": {"num_steps": 2, "guidances": (2.5, 4.0)},
    "qwen-edit": {"num_steps": 2, "true_cfg": (1.0, 4.0)},
}
# the methods that apply to SD 1.x (the tiny model's family)
SD_METHODS = [name for name, info in METHODS.items()
              if set(info.requires) <= {"unet", "epsilon", "ddpm", "classifier-free", "attention-maps", "ledits",
                                        "text-conditioning"}]


def test_every_method_has_fast_settings_and_a_documented_table():
    assert set(FAST) == set(METHODS)
    listing = describe_methods()
    for name, info in METHODS.items():
        assert listing.count(f"\n{name}: ") + listing.startswith(f"{name}: ") == 1
        for p in info.params:
            assert f"--set {p.name}=" in listing and p.help
        resolve_params(info, FAST[name])  # the fast settings are valid
    # a method's own defaults for a family are listed with it (FlowEdit on FLUX: its authors' FLUX settings)
    assert ("  defaults on models with distilled guidance or no guidance (the reference's settings there): "
            "num_steps=28, n_max=24, source_guidance=1.5, target_guidance=5.5") in describe_methods(["flowedit"])


def test_parameters_parse_from_the_command_line_and_refuse_nonsense():
    info = method_info("ours")
    params = resolve_params(info, parse_assignments(["etas=0.1,0.3", "num_steps=20", "guidance_scale=none"]))
    assert params["etas"] == (0.1, 0.3) and params["num_steps"] == 20 and params["guidance_scale"] is None
    assert params["inject"] == (0.2,) and params["opt_steps"] == 200  # untouched defaults
    with pytest.raises(UsageError, match="etas must be <= 1"):
        resolve_params(info, {"etas": "0.5,1.5"})
    with pytest.raises(UsageError, match="inversion must be one of"):
        resolve_params(info, {"inversion": "magic"})
    with pytest.raises(UsageError, match="no parameter 'alpha'"):
        resolve_params(info, {"alpha": "1"})
    with pytest.raises(UsageError, match="key=value"):
        parse_assignments(["eta"])
    with pytest.raises(UsageError, match="unknown method"):
        method_info("sdedit")


def test_nti_editing_is_ours_with_eta_one_no_injection_and_no_text_optimization(tiny_pipe, dog_image):
    """The baseline and the method are one family: NTI editing = ours at eta 1, K 0, 0 optimization steps."""
    fast = {"num_steps": 4, "inner_steps": 2}
    nti = run_method(tiny_pipe, dog_image, PROMPT, "nti", fast, size=64)
    ours = run_method(tiny_pipe, dog_image, PROMPT, "ours", {**fast, "etas": (1.0,), "inject": (0.0,),
                                                             "opt_steps": 0}, size=64)
    assert np.array_equal(np.asarray(nti.variants[0].image), np.asarray(ours.variants[0].image))
    # and in latents, through the stage API
    inversion = invert(tiny_pipe, dog_image, "", "nti", 4, 7.5, 2)
    untouched = optimize_text(tiny_pipe, dog_image, PROMPT, steps=0)
    from_ours = sample(tiny_pipe, inversion, untouched, [1.0], [0], output_type="latent")
    from_nti = sample_latents(family_of(tiny_pipe), [inversion], family_of(tiny_pipe).encode_prompt(PROMPT), [0], [0])
    torch.testing.assert_close(from_ours, from_nti, rtol=0, atol=0)


def test_ours_through_the_method_runner_equals_edit(tiny_pipe, dog_image):
    from nonrigid import edit

    settings = {"num_steps": 4, "opt_steps": 2, "inner_steps": 1, "etas": (0.0, 0.5), "inject": (0.25, 0.5)}
    direct = edit(tiny_pipe, dog_image, PROMPT, size=64, seeds=(0, 1), **settings)
    runner = run_method(tiny_pipe, dog_image, PROMPT, "ours", settings, seeds=(0, 1), size=64)
    assert [(v.seed, v.knobs) for v in runner.variants] == [
        (s, {"K": k, "eta": e}) for s in (0, 1) for k in (1, 2) for e in (0.0, 0.5)
    ]
    for a, b in zip(direct.variants, runner.variants, strict=True):
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))


def test_deterministic_methods_run_once_whatever_the_seeds(tiny_pipe, dog_image):
    result = run_method(tiny_pipe, dog_image, PROMPT, "nti", FAST["nti"], seeds=(3, 4, 5), size=64)
    assert result.seeds == (3,) and [v.seed for v in result.variants] == [3]


def test_methods_share_the_cached_nti_inversion(tiny_pipe, dog_image, tmp_path):
    cache = StageCache(tmp_path / "cache")
    first = run_method(tiny_pipe, dog_image, PROMPT, "ours", FAST["ours"], size=64, cache=cache)
    second = run_method(tiny_pipe, dog_image, PROMPT, "nti", FAST["nti"], size=64, cache=cache)
    assert first.cache["inversion"] is False and second.cache["inversion"] is True


def test_saved_result_names_files_by_seed_and_sweep_and_lays_out_the_grid(tiny_pipe, dog_image, tmp_path):
    result = run_method(tiny_pipe, dog_image, PROMPT, "ours", {**FAST["ours"], "inject": (0.25, 0.5)},
                        seeds=(0, 7), size=64)
    out = save_result(result, tmp_path / "edit", record={"model": "tiny"})
    manifest = json.loads((out / "edit.json").read_text())
    names = [variant_filename(s, {"K": k, "eta": e}) for s in (0, 7) for k in (1, 2) for e in (0.0, 0.5)]
    assert [v["file"] for v in manifest["variants"]] == names
    assert names[0] == "seed0_K01_eta0.00.png"
    for v in result.variants:  # every file is the variant's image, exactly
        assert np.array_equal(np.asarray(Image.open(out / variant_filename(v.seed, v.knobs))), np.asarray(v.image))
    assert manifest["method"] == "ours" and manifest["etas"] == [0.0, 0.5] and manifest["model"] == "tiny"
    grid = Image.open(out / "grid.png")
    assert grid.width >= 2 * 64 and grid.height >= 4 * 64  # columns: eta; rows: seed x K
    assert grid.width < 3 * 64 + 200 and grid.height < 5 * 64


def run_cli(args, cwd, cache):
    env = {"NONRIGID_CACHE_DIR": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": ""}
    return subprocess.run([sys.executable, "-m", "nonrigid.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_methods_command_lists_every_method_and_parameter(tmp_path):
    result = run_cli(["methods"], tmp_path, tmp_path / "cache")
    assert result.returncode == 0
    for name, info in METHODS.items():
        assert f"{name}: " in result.stdout
        assert all(f"--set {p.name}=" in result.stdout for p in info.params)
    one = run_cli(["methods", "dds"], tmp_path, tmp_path / "cache")
    assert one.stdout.startswith("dds: ") and "imagic" not in one.stdout
    bad = run_cli(["methods", "sdedit"], tmp_path, tmp_path / "cache")
    assert bad.returncode == 2 and bad.stderr.startswith("nonrigid: error: unknown method 'sdedit'")


@pytest.mark.parametrize("method", SD_METHODS)
def test_every_method_edits_through_the_cli(method, tmp_path):
    image = TEDBENCH / "originals" / "cat.jpeg"
    if not image.is_file():
        pytest.skip("TEdBench not found")
    settings = [f"--set={k}={','.join(map(str, v)) if isinstance(v, tuple) else v}" for k, v in FAST[method].items()]
    out = tmp_path / "out"
    result = run_cli(["edit", str(image), PROMPT, "--method", method, *settings, "--model", "tiny", "--size", "64",
                      "--seed", "0", "1", "--quiet", "--out", str(out)], tmp_path, tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    manifest = json.loads((out / "edit.json").read_text())
    info = METHODS[method]
    seeds = [0, 1] if info.seeded else [0]
    sweep_sizes = [len(FAST[method].get(p.name, p.default)) for p in info.sweeps]
    assert manifest["method"] == method and manifest["seeds"] == seeds
    assert len(manifest["variants"]) == len(seeds) * int(np.prod(sweep_sizes))
    for variant in manifest["variants"]:
        assert Image.open(out / variant["file"]).size == (64, 64)
    assert Image.open(out / "grid.png").size[0] >= 64 * (sweep_sizes[-1] if sweep_sizes else 1)
    for p in info.params:  # every parameter, resolved, is recorded
        assert p.name in manifest


def test_every_method_runs_with_its_default_structure_on_an_sd_layout_model():
    """The tiny model has 4 self-attention layers and no cross-attention maps at LEDITS++'s mask resolution, so
    defaults tied to SD's layout (MasaCtrl's layer 10 of 16, LEDITS++'s intersect mask) need SD's layout: the
    benchmark's mid-size random model has it (16 self-attention layers, attention at three resolutions)."""
    if not image_exists():
        pytest.skip("TEdBench not found")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from random_models import build_random_pipeline

    pipe = build_random_pipeline("mid")
    image = TEDBENCH / "originals" / "dog_01.jpeg"
    masactrl = run_method(pipe, image, PROMPT, "masactrl", {"num_steps": 3, "inner_steps": 1, "start_step": (1,)},
                          size=128)
    assert masactrl.record["start_layer_used"] == 10 and masactrl.record["controlled_layers"] == 6
    ledits = run_method(pipe, image, PROMPT, "ledits", {"num_steps": 3, "edit_guidance": (5.0,)}, size=128)
    assert ledits.params["mask"] == "intersect" and ledits.variants[0].image.size == (128, 128)


def image_exists() -> bool:
    return (TEDBENCH / "originals" / "dog_01.jpeg").is_file()


def test_step_counting_defaults_follow_the_step_count():
    edit_friendly, masactrl = method_info("edit-friendly"), method_info("masactrl")
    assert resolve_params(edit_friendly, {"num_steps": 20})["skip"] == (5, 7, 10)
    assert resolve_params(edit_friendly, {"num_steps": 100})["skip"] == (24, 36, 48)  # the reference's own
    assert resolve_params(edit_friendly)["skip"] == (24, 36, 48)
    assert resolve_params(edit_friendly, {"num_steps": 20, "skip": (24,)})["skip"] == (24,)  # given: kept
    assert resolve_params(edit_friendly, {"num_steps": "20", "skip": "3,9"})["skip"] == (3, 9)
    assert resolve_params(masactrl, {"num_steps": 25})["start_step"] == (2, 5, 10)  # round(v * 25 / 50)
    assert resolve_params(masactrl, {"num_steps": 50})["start_step"] == (4, 10, 20)
    assert resolve_params(masactrl, {"num_steps": 25, "start_step": (4,)})["start_step"] == (4,)


def test_the_cli_scales_edit_friendly_skips_with_steps(tmp_path, monkeypatch):
    import logging

    from nonrigid.cli import main

    image = TEDBENCH / "originals" / "dog_01.jpeg"
    if not image.is_file():
        pytest.skip("TEdBench not found")
    monkeypatch.setenv("NONRIGID_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    logger = logging.getLogger("nonrigid")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    out = tmp_path / "out"
    try:
        code = main(["edit", str(image), PROMPT, "--model", "tiny", "--size", "64", "--method", "edit-friendly",
                     "--steps", "20", "--seed", "0", "--out", str(out), "--quiet"])
    finally:  # main configures the "nonrigid" logger for the command line; later tests need it as it was
        logger.handlers[:], logger.propagate = saved[0], saved[1]
        logger.setLevel(saved[2])
    assert code == 0
    manifest = json.loads((out / "edit.json").read_text())
    assert manifest["num_steps"] == 20 and manifest["skip"] == [5, 7, 10]
    assert [v["skip"] for v in manifest["variants"]] == [5, 7, 10]


def test_ledits_defaults_to_the_noise_mask_where_the_unet_has_no_maps(tiny_pipe, dog_image, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="nonrigid"):
        result = run_method(tiny_pipe, dog_image, PROMPT, "ledits", {"num_steps": 4, "edit_guidance": (3.0,)},
                            size=64)
    assert result.record["mask_used"] == "noise" and len(result.variants) == 1
    assert result.variants[0].image.size == (64, 64)
    said = [r for r in caplog.records if r.name == "nonrigid" and r.levelno == logging.WARNING]
    assert len(said) == 1 and "mask=noise" in said[0].getMessage(), [r.getMessage() for r in said]
    assert "\n" not in said[0].getMessage()
    with pytest.raises(UsageError, match="use mask=noise"):
        run_method(tiny_pipe, dog_image, PROMPT, "ledits",
                   {"num_steps": 4, "edit_guidance": (3.0,), "mask": "intersect"}, size=64)


def test_ledits_defaults_to_the_intersect_mask_where_the_unet_has_the_maps(model, model_image, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="nonrigid"):
        result = run_method(model, model_image, "a photo", "ledits", {"num_steps": 4, "edit_guidance": (3.0,)},
                            size=64)
    assert result.record["mask_used"] == "intersect"
    assert not [r for r in caplog.records if "mask=noise" in r.getMessage()]


def test_grid_shows_the_input_first_in_every_row(tiny_pipe, dog_image, tmp_path):
    result = run_method(tiny_pipe, dog_image, PROMPT, "ours",
                        {"num_steps": 4, "opt_steps": 2, "inner_steps": 1, "etas": (0.0, 0.5)}, seeds=[0, 1],
                        size=64, cache=StageCache(tmp_path / "cache"))
    out = save_result(result, tmp_path / "out")
    grid = np.asarray(Image.open(out / "grid.png").convert("RGB"))
    source = np.asarray(Image.open(out / "input.png").convert("RGB"))
    assert source.shape == (64, 64, 3)
    height, width = grid.shape[:2]
    margin_top = height - 2 * 64  # two rows (seed 0, seed 1) of 64 px cells under a header
    margin_left = width - 3 * 64  # three columns: the input, eta 0, eta 0.5
    assert margin_top > 0 and margin_left >= 90
    variants = {(v.seed, v.knobs["eta"]): np.asarray(v.image.convert("RGB")) for v in result.variants}
    for row, seed in enumerate([0, 1]):
        band = grid[margin_top + row * 64: margin_top + (row + 1) * 64]
        cells = [band[:, margin_left + c * 64: margin_left + (c + 1) * 64] for c in range(3)]
        assert np.array_equal(cells[0], source), f"row {row}: the first cell is not the input"
        assert np.array_equal(cells[1], variants[(seed, 0.0)]) and np.array_equal(cells[2], variants[(seed, 0.5)])
        assert not np.array_equal(cells[1], source)


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_an_edit_folder_gets_the_mode_any_new_folder_gets(tmp_path, umask):
    """Written in a private staging folder and renamed into place, the folder is as readable as a plain mkdir's
    (not 0700: others on a shared machine, or a web server, could not read the edits)."""
    import os
    import stat

    from nonrigid.methods.output import write_folder_atomically

    before = os.umask(umask)
    try:
        write_folder_atomically(tmp_path / "edit", {"input.png": Image.new("RGB", (4, 4))})
    finally:
        os.umask(before)
    assert stat.S_IMODE((tmp_path / "edit").stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE((tmp_path / "edit" / "input.png").stat().st_mode) == 0o666 & ~umask
