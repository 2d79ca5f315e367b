"""The instruction editors as methods (issue 29): ``kontext`` (FLUX.1 Kontext [dev]) and ``qwen-edit``
(Qwen-Image-Edit, -2509, -2511) behind the same front door as every other method, on tiny models built in code.

- The oracle: each method's images equal diffusers' ``FluxKontextPipeline`` / ``QwenImageEditPipeline`` /
  ``QwenImageEditPlusPipeline`` from the same seed (``generator=torch.Generator().manual_seed(seed)``) at the
  working size, bit for bit; its latents equal the pipeline's bit for bit one variant at a time, within 1e-5 when
  the variants run as one batch.
- The decision that ours and FlowEdit run on a Kontext model exactly as on FLUX.1-dev (same weights, same images),
  and that nothing but ``qwen-edit`` runs on Qwen-Image-Edit.
- The command as a user runs it on saved diffusers folders and a Kontext single file, its refusals (one line, no
  traceback, nothing written), the benchmark with per-method models on TEdBench and PIE-Bench, and the page's API.

Costs: a Qwen call VAE-encodes its reference at about 1 MP, as the pipelines always do (seconds even for the
tiny VAE), so each Qwen computation here happens once: one CLI edit with its pipeline run, one Plus conditioning
with its pipeline run, one benchmark job.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from conftest import TEDBENCH
from diffusers import QwenImageEditPlusPipeline
from flow_layouts import flux_state_dict
from PIL import Image
from safetensors.torch import save_file

from nonrigid.cli import main
from nonrigid.cli.edit import describe_methods
from nonrigid.errors import UsageError
from nonrigid.evaluation.runfolder import read_rows
from nonrigid.methods.base import resolve_params
from nonrigid.methods.catalogue import INSTRUCTION_TEMPLATE, method_info, methods_for, template_instruction
from nonrigid.methods.kontext import kontext_latents
from nonrigid.methods.qwen_edit import qwen_edit_latents
from nonrigid.methods.run import EditRequest, prepare_inputs, run_edits
from nonrigid.models import edit_models as em
from nonrigid.models.kontext import FluxKontext, build_small_kontext
from nonrigid.models.loading import configure_model, load_model, resolve_dtype
from nonrigid.models.qwen_edit import QwenImageEdit
from nonrigid.models.registry import build_tiny_pipeline, family_for_class

PROMPT = "A photo of a jumping cat."
TEMPLATED = "Change the picture so that it shows a photo of a jumping cat, keeping everything else the same."
IMAGE = TEDBENCH / "originals" / "cat.jpeg"
needs_data = pytest.mark.skipif(not IMAGE.is_file(), reason="TEdBench originals not present")


def picture(height: int, width: int, seed: int) -> Image.Image:
    """A smooth, seeded RGB picture (random colour gradients): resizing it is well behaved."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    channels = [np.sin(rng.uniform(2, 6) * x + rng.uniform(2, 6) * y + rng.uniform(0, 6)) for _ in range(3)]
    return Image.fromarray(((np.stack(channels, -1) + 1) * 127.5).astype(np.uint8))


def pixels(image) -> np.ndarray:
    return np.asarray(Image.open(image).convert("RGB") if isinstance(image, Path) else image.convert("RGB"))


class FinalLatents:
    """A ``callback_on_step_end`` keeping the latents after each step: after the last one, the final latents."""

    def __init__(self):
        self.latents = None

    def __call__(self, pipe, step, timestep, kwargs):
        self.latents = kwargs["latents"].clone()
        return {}


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def kontext():
    return load_model("tiny-kontext", "cpu")


@pytest.fixture(scope="module")
def kontext_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-kontext")
    build_small_kontext().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def kontext_file(tmp_path_factory) -> Path:
    """tiny-kontext's transformer in BFL's single-file layout: FLUX.1-dev's keys, as ``flux1-kontext-dev``."""
    path = tmp_path_factory.mktemp("kontext-file") / "flux1-kontext-tiny.safetensors"
    save_file(flux_state_dict(build_small_kontext().transformer), path)
    return path


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-qwen-edit")
    build_tiny_pipeline(kind="tiny-qwen-edit").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def qwen_file(tmp_path_factory) -> Path:
    """A Qwen-Image transformer as one .safetensors file (ComfyUI's repackaging keeps diffusers' key names)."""
    path = tmp_path_factory.mktemp("qwen-file") / "qwen_image_edit_tiny.safetensors"
    save_file(build_tiny_pipeline(kind="tiny-qwen-edit").transformer.state_dict(), path)
    return path


# ---- the oracle


def test_kontext_equals_the_kontext_pipeline_from_the_same_seed_at_the_pictures_aspect(kontext):
    pipe, instruction = kontext.pipe, "make the cat jump"
    (result,) = run_edits(kontext, [EditRequest(picture(48, 80, 1), PROMPT, instruction=instruction)], "kontext",
                          {"num_steps": 2, "guidances": (2.5, 4.0)}, seeds=(0, 3), size=64, batch_size=1)
    width, height = result.input_image.size
    assert width > height and width % 16 == height % 16 == 0  # the picture's aspect, on the latent grid
    assert result.record | {"instruction": instruction, "instruction_source": "given",
                            "output_size": [width, height]} == result.record
    assert [(v.seed, v.knobs) for v in result.variants] == [(0, {"guidance": 2.5}), (0, {"guidance": 4.0}),
                                                             (3, {"guidance": 2.5}), (3, {"guidance": 4.0})]
    theirs = {}
    for v in result.variants:
        final = FinalLatents()
        image = pipe(image=result.input_image, prompt=instruction, height=height, width=width,
                     max_area=height * width, _auto_resize=False, num_inference_steps=2,
                     guidance_scale=v.knobs["guidance"], generator=seeded(v.seed), callback_on_step_end=final).images[0]
        assert v.image.size == (width, height)
        np.testing.assert_array_equal(pixels(v.image), pixels(image))  # one variant at a time: bit for bit
        theirs[v.seed, v.knobs["guidance"]] = final.latents
    # every variant in one batch: the same latents up to the last bits of batched products
    cond = em.kontext_conditioning(pipe, instruction, result.input_image, auto_resize=False)
    rows = list(theirs)
    batched = kontext_latents(kontext, cond, rows, height, width, 2)
    for row, key in enumerate(rows):
        torch.testing.assert_close(em.pack(batched[row:row + 1]), theirs[key], atol=1e-5, rtol=0)
    alone = kontext_latents(kontext, cond, rows[1:2], height, width, 2)
    assert torch.equal(em.pack(alone), theirs[rows[1]])


def test_ours_and_flowedit_run_on_a_kontext_model_exactly_as_on_flux_dev(kontext):
    """Kontext's transformer is FLUX.1-dev's and tiny-kontext holds tiny-flux's weights: the methods that run on
    FLUX.1-dev give the same images on it, and Kontext adds its own method."""
    flux = load_model("tiny-flux", "cpu")
    assert methods_for(kontext) == [*methods_for(flux), "kontext"]
    image = picture(64, 64, 2)
    for method, params in (("flowedit", {"num_steps": 3, "n_max": (2,)}),
                           ("ours", {"num_steps": 2, "opt_steps": 1, "etas": (0.5,)})):
        (on_kontext,), (on_flux,) = (run_edits(m, [EditRequest(image, PROMPT)], method, params, size=64)
                                     for m in (kontext, flux))
        assert on_kontext.params == on_flux.params
        for a, b in zip(on_kontext.variants, on_flux.variants, strict=True):
            np.testing.assert_array_equal(pixels(a.image), pixels(b.image))


def test_qwen_edit_plus_from_its_folder_equals_the_plus_pipeline_batched_or_not(tmp_path):
    folder = tmp_path / "plus"
    build_tiny_pipeline(kind="tiny-qwen-edit-plus").save_pretrained(folder)
    model = load_model(str(folder), "cpu")  # the Plus pipeline and 2511 told from the folder itself
    assert isinstance(model.pipe, QwenImageEditPlusPipeline) and (model.plus, model.version) == (True, "2511")
    assert resolve_params(method_info("qwen-edit"), {}, model)["num_steps"] == 40  # the 2509 / 2511 cards'
    (edit,) = prepare_inputs(model, [EditRequest(picture(80, 48, 3), PROMPT)], 64)
    width, height = edit.image.size
    cond = em.qwen_edit_conditioning(model.pipe, TEMPLATED, edit.image, negative_prompt=" ")
    rows = [(7, 4.0), (7, 1.0), (8, 2.5)]
    alone = torch.cat([qwen_edit_latents(model, cond, [row], height, width, 2) for row in rows])
    torch.testing.assert_close(qwen_edit_latents(model, cond, rows, height, width, 2), alone, atol=1e-5, rtol=0)
    final = FinalLatents()
    image = model.pipe(image=[edit.image], prompt=TEMPLATED, negative_prompt=" ", true_cfg_scale=4.0, height=height,
                       width=width, num_inference_steps=2, generator=seeded(7), callback_on_step_end=final).images[0]
    assert torch.equal(em.pack(alone[:1]), final.latents)
    np.testing.assert_array_equal(pixels(model.decode(alone[:1])[0]), pixels(image))
    assert not torch.equal(alone[0], alone[1])  # true CFG 1 is the conditional velocity alone, another edit


# ---- the command line


@needs_data
def test_qwen_edit_through_the_cli_on_a_saved_folder_equals_the_pipeline(qwen_folder, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["edit", str(IMAGE), PROMPT, "--method", "qwen-edit", "--model", str(qwen_folder), "--size", "64",
                 "--steps", "2", "--seed", "5", "--device", "cpu", "--no-cache", "--quiet", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    manifest = json.loads((out / "edit.json").read_text())
    assert {p.name for p in out.iterdir()} == {"input.png", "grid.png", "edit.json", "seed5_cfg4.00.png"}
    assert manifest["instruction"] == TEMPLATED == template_instruction(PROMPT)
    assert (manifest["instruction_source"], manifest["target_prompt"], manifest["method"]) == ("template", PROMPT,
                                                                                            "qwen-edit")
    assert (manifest["true_cfg"], manifest["num_steps"], manifest["negative_prompt"]) == ([4.0], 2, " ")
    assert manifest["pipeline"] == "QwenImageEditPipeline" and manifest["model_family"].startswith(
        "Qwen-Image-Edit layout (Edit")
    assert manifest["reference_vae_size"] == [1024, 1024]  # the pipelines encode references at about 1 MP
    pipe = load_model(str(qwen_folder), "cpu").pipe
    reference = Image.open(out / "input.png").convert("RGB")
    image = pipe(image=reference, prompt=TEMPLATED, negative_prompt=" ", true_cfg_scale=4.0, height=reference.height,
                 width=reference.width, num_inference_steps=2, generator=seeded(5)).images[0]
    np.testing.assert_array_equal(pixels(out / "seed5_cfg4.00.png"), pixels(image))


@needs_data
def test_kontext_through_the_cli_from_a_folder_and_from_a_single_file_with_its_config(kontext_folder, kontext_file,
                                                                                     tmp_path, capsys):
    common = ["--method", "kontext", "--size", "64", "--steps", "2", "--set", "guidances=2,3.5", "--seed", "0", "1",
              "--instruction", "Make the cat jump.", "--device", "cpu", "--no-cache", "--quiet"]
    folder_out, file_out = tmp_path / "folder", tmp_path / "file"
    assert main(["edit", str(IMAGE), PROMPT, "--model", str(kontext_folder), *common, "--out", str(folder_out)]) == 0
    assert main(["edit", str(IMAGE), PROMPT, "--model", str(kontext_file), "--config", str(kontext_folder), *common,
                 "--out", str(file_out)]) == 0, capsys.readouterr().err
    manifest = json.loads((folder_out / "edit.json").read_text())
    assert (manifest["instruction"], manifest["instruction_source"]) == ("Make the cat jump.", "given")
    assert manifest["guidances"] == [2.0, 3.5] and manifest["model_family"].startswith("FLUX.1 Kontext layout")
    names = [v["file"] for v in manifest["variants"]]
    assert names == ["seed0_guidance2.00.png", "seed0_guidance3.50.png", "seed1_guidance2.00.png",
                     "seed1_guidance3.50.png"]
    assert Image.open(folder_out / "grid.png").size[0] >= 3 * 64  # the input, then one column per guidance
    assert json.loads((file_out / "edit.json").read_text())["model_family"].startswith("FLUX.1 Kontext layout")
    for name in names:  # the file holds the same transformer: the same edits
        np.testing.assert_array_equal(pixels(folder_out / name), pixels(file_out / name))


def refusal_cases(kontext_file, qwen_file, qwen_folder) -> dict[str, tuple[list[str], str]]:
    image = str(IMAGE)
    return {
        "ours on Qwen-Image-Edit": (["--method", "ours", "--model", "tiny-qwen-edit"],
                                    "method 'ours' does not apply to this model (Qwen-Image-Edit layout (Edit, "
                                    "QwenImageEditPipeline), 2 transformer layers, true CFG, flow (velocity) "
                                    "prediction, 64 px): its stages need a text-only conditioning of the prompt, and "
                                    "this model's prompt encoder reads the input image with the text; methods for "
                                    "this model: qwen-edit"),
        "flowedit on Qwen-Image-Edit": (["--method", "flowedit", "--model", "tiny-qwen-edit-plus"],
                                        "methods for this model: qwen-edit"),
        "kontext on SD": (["--method", "kontext", "--model", "tiny"],
                          "it runs FLUX.1 Kontext's own instruction editing, and this is not a Kontext model; load "
                          "one, e.g. --model black-forest-labs/FLUX.1-Kontext-dev"),
        "qwen-edit on Kontext": (["--method", "qwen-edit", "--model", "tiny-kontext"],
                                 "this is not a Qwen-Image-Edit model; load one, e.g. --model "
                                 "Qwen/Qwen-Image-Edit-2509"),
        "qwen-edit from a single file": (["--method", "qwen-edit", "--model", str(qwen_file)],
                                         "nonrigid: error: Qwen-Image-Edit has no single-file loading in diffusers "
                                         "0.42: pass the hub id (e.g. Qwen/Qwen-Image-Edit-2509) or a diffusers "
                                         "folder"),
        "a Qwen file for any method": (["--method", "ours", "--model", str(qwen_file)],
                                       "holds a Qwen-Image transformer: Qwen-Image-Edit has no single-file loading"),
        "a file with a Qwen config": (["--method", "kontext", "--model", str(kontext_file), "--config",
                                       str(qwen_folder)], "nonrigid: error: Qwen-Image-Edit has no single-file"),
        "a Kontext file without its config": (["--method", "kontext", "--model", str(kontext_file)],
                                              "nonrigid: error: a FLUX.1 Kontext single file has FLUX.1-dev's keys, "
                                              "so nothing in it says Kontext: give --config "
                                              "black-forest-labs/FLUX.1-Kontext-dev (or a local Kontext diffusers "
                                              "folder) to read it as Kontext"),
        "a mask": (["--method", "kontext", "--model", "tiny-kontext", "--mask", image],
                   "nonrigid: error: --mask does not apply to --method kontext: it regenerates the whole picture"),
        "an instruction for ours": (["--method", "ours", "--model", "tiny", "--instruction", "make it jump"],
                                    "nonrigid: error: --instruction does not apply to --method ours: only kontext, "
                                    "qwen-edit follow an instruction"),
    }


@needs_data
def test_what_cannot_run_is_refused_in_one_line_and_nothing_is_written(kontext_file, qwen_file, qwen_folder,
                                                                       tmp_path, capsys, nonrigid_logger):
    for case, (args, expected) in refusal_cases(kontext_file, qwen_file, qwen_folder).items():
        out = tmp_path / case.replace(" ", "-")
        code = main(["edit", str(IMAGE), PROMPT, *args, "--size", "64", "--steps", "2", "--device", "cpu",
                     "--no-cache", "--quiet", "--out", str(out)])
        err = capsys.readouterr().err.strip()
        assert code == 2, case
        assert expected in err and err.startswith("nonrigid: error: "), (case, err)
        assert "\n" not in err and "Traceback" not in err, case
        assert not out.exists(), case


def test_the_methods_listing_shows_the_editors_knobs_and_the_instruction_template():
    listing = describe_methods(["kontext", "qwen-edit"])
    for line in ("  --set guidances=2.5  ", "  --set num_steps=28  ", "  --set true_cfg=4  ", "  --set num_steps=50  ",
                 "  --set negative_prompt=  ", "  --set positions_3d=False  ", "  needs: a FLUX.1 Kontext model",
                 "  needs: a Qwen-Image-Edit model"):
        assert line in listing, line
    assert listing.count(f'else "{INSTRUCTION_TEMPLATE.format(target="<PROMPT>")}"') == 2
    assert template_instruction("  A photo of a jumping dog. ") == ("Change the picture so that it shows a photo of a "
                                                                    "jumping dog, keeping everything else the same.")
    assert template_instruction("NASA's rocket taking off") == ("Change the picture so that it shows NASA's rocket "
                                                                "taking off, keeping everything else the same.")
    for name, bad in (("guidances", (0.5,)), ("true_cfg", (0.0,)), ("num_steps", 1)):
        info = method_info("kontext" if name == "guidances" else "qwen-edit")
        with pytest.raises(UsageError, match=f"^{name} must be >= "):
            resolve_params(info, {name: bad})


# ---- the families: what they declare, dtype and memory settings


def test_the_families_declare_what_runs_on_them_and_the_qwen_seam_refuses_the_stages(kontext):
    assert family_for_class("FluxKontextPipeline") is FluxKontext
    assert family_for_class("QwenImageEditPipeline") is family_for_class("QwenImageEditPlusPipeline") is QwenImageEdit
    qwen = load_model("tiny-qwen-edit", "cpu")
    assert methods_for(qwen) == ["qwen-edit"] and "kontext" in methods_for(kontext)
    assert (qwen.default_steps, qwen.version, qwen.defaults.guidance_scale) == (50, "Edit", 4.0)
    for call in (lambda: qwen.encode_prompt("a cat"), qwen.unconditional, lambda: qwen.sampling_scheduler(4),
                 lambda: qwen.predict(torch.zeros(1, 16, 8, 8), 500, None)):
        with pytest.raises(UsageError, match=r"^Qwen-Image-Edit's prompt encoder reads the input image"):
            call()
    latents = qwen.encode_image(picture(64, 96, 4))  # its VAE both ways, as the pipelines use it
    assert latents.shape == (1, 16, 8, 12) and qwen.decode(latents)[0].size == (96, 64)


def test_bf16_on_cuda_by_default_and_low_memory_is_diffusers_model_offload(kontext, monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    qwen = load_model("tiny-qwen-edit", "cpu")
    assert resolve_dtype(None, cuda, kontext) == resolve_dtype(None, cuda, qwen) == torch.bfloat16
    assert resolve_dtype(None, cuda, load_model("tiny-flux", "cpu")) == torch.float16  # FLUX.1-dev as before
    assert resolve_dtype(None, cpu, kontext) == torch.float32 and resolve_dtype("fp16", cuda, qwen) == torch.float16
    assert kontext.dtype == qwen.dtype == torch.float32  # loaded on the CPU
    for family in (kontext, qwen):
        offloads: list[torch.device] = []

        def offload(device, seen=offloads):
            seen.append(device)

        with monkeypatch.context() as patch:
            patch.setattr(type(family), "device", property(lambda self: cuda))  # as on a GPU
            patch.setattr(type(family), "parks_text_encoders", False)  # (no GPU to bring the encoders to)
            patch.setattr(family.pipe, "enable_model_cpu_offload", offload)
            configure_model(family, low_memory=False, channels_last=False)
            assert offloads == []
            configure_model(family, low_memory=True, channels_last=False)
            assert offloads == [cuda]
        configure_model(family, low_memory=False)  # back to the other tests' settings
    configure_model(qwen, channels_last=True)  # as on CUDA: its 3-D VAE keeps its layout
    assert qwen.pipe.vae.decoder.conv_in.weight.is_contiguous()
    flux = load_model("tiny-flux", "cpu")
    with monkeypatch.context() as patch:
        patch.setattr(type(flux), "device", property(lambda self: cuda))
        patch.setattr(flux.pipe, "enable_model_cpu_offload", lambda device: pytest.fail("offloaded"))
        configure_model(flux, low_memory=True, channels_last=False)  # FLUX.1-dev keeps the stages' settings


# ---- the benchmark


@needs_data
def test_bench_runs_each_method_on_its_own_model_with_rows_images_and_a_report(tmp_path, capsys, nonrigid_logger):
    run, report = tmp_path / "run", tmp_path / "report"
    common = ["bench", "--data", str(TEDBENCH), "--pairs", "0", "--method", "ours", "--method", "kontext",
              "--method", "qwen-edit", "--model", "tiny", "--size", "64", "--metrics", "tiny", "--quiet"]
    # a model for a method the run does not have: one line, before anything loads
    assert main([*common, "--method-model", "dds=tiny", "--out", str(run)]) == 2 and not run.exists()
    assert capsys.readouterr().err.strip() == ("nonrigid: error: --method-model dds: dds is not among the run's "
                                               "methods (ours, kontext, qwen-edit)")
    # an editor left on --model (SD here): refused once its model is loaded, before any job
    refused = tmp_path / "refused"
    assert main([*common, "--method-model", "qwen-edit=tiny-qwen-edit", "--out", str(refused)]) == 2
    assert capsys.readouterr().err.strip().startswith("nonrigid: error: method 'kontext' does not apply to this "
                                                      "model (SD layout")
    assert read_rows(refused) == []
    assert main([*common, "--method-model", "kontext=tiny-kontext", "--method-model", "qwen-edit=tiny-qwen-edit",
                 "--set", "num_steps=2", "--set", "opt_steps=1", "--set", "inner_steps=1", "--set", "etas=0",
                 "--out", str(run)]) == 0, capsys.readouterr().err
    rows = read_rows(run)
    assert [r["method"] for r in rows] == ["ours", "kontext", "qwen-edit"]
    for row in rows:
        assert (run / row["image"]).is_file() and row["clip_t"] is not None and row["lpips"] is not None
    ours, kontext_row, qwen_row = rows
    assert "instruction" not in ours["record"]
    for row in (kontext_row, qwen_row):
        assert (row["record"]["instruction"], row["record"]["instruction_source"]) == (
            template_instruction(row["target_text"]), "template")
    assert kontext_row["params"] == {"guidances": 2.5, "num_steps": 2}
    assert qwen_row["params"] | {"true_cfg": 4.0, "num_steps": 2} == qwen_row["params"]
    fingerprints = json.loads(dict(_meta(run))["model_fingerprints"])
    assert set(fingerprints) == {"ours", "kontext", "qwen-edit"} and len(set(fingerprints.values())) == 3
    assert main(["report", str(run), "--out", str(report), "--bins", "2", "--min-per-bin", "1", "--quiet"]) == 0
    figure = (report / "figure6.csv").read_text()
    summary = (report / "summary.md").read_text()
    for method in ("ours", "kontext", "qwen-edit"):
        assert method in figure and f"| {method} |" in summary


def _meta(run: Path) -> list[tuple[str, str]]:
    import sqlite3

    with sqlite3.connect(run / "results.sqlite") as db:
        return list(db.execute("SELECT * FROM meta"))


def test_bench_on_piebench_gives_kontext_the_datasets_instruction(tmp_path, capsys, nonrigid_logger):
    data = tmp_path / "pie"
    path = "5_change_attribute_pose_40/1_artificial/1_animal/511000000000.jpg"
    (data / "annotation_images" / path).parent.mkdir(parents=True)
    picture(512, 512, 5).save(data / "annotation_images" / path)
    mask = [512 * 100 + 150, 200]  # one run of edited pixels
    (data / "mapping_file.json").write_text(json.dumps({"511000000000": {
        "image_path": path, "original_prompt": "a [standing] horse", "editing_prompt": "a [running] horse",
        "editing_instruction": "Make the horse run", "editing_type_id": "5", "blended_word": "horse horse",
        "mask": mask}}))
    run, report = tmp_path / "run", tmp_path / "report"
    assert main(["bench", "--data", str(data), "--types", "pose", "--method", "kontext", "--method-model",
                 "kontext=tiny-kontext", "--size", "64", "--steps", "2", "--metrics", "tiny", "--quiet", "--out",
                 str(run)]) == 0, capsys.readouterr().err
    (row,) = read_rows(run)
    assert (row["record"]["instruction"], row["record"]["instruction_source"]) == ("Make the horse run", "benchmark")
    assert row["target_text"] == "a running horse" and row["edit_type"] == "5" and row["psnr_unedit_part"] is not None
    assert main(["report", str(run), "--out", str(report), "--bins", "2", "--min-per-bin", "1", "--quiet"]) == 0
    assert "kontext" in (report / "piebench.md").read_text()


# ---- the page


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_data
def test_the_page_offers_kontext_on_a_kontext_model_and_edits_with_it(tmp_path):
    pytest.importorskip("gradio", reason="the ui extra (gradio) is part of the dev install")
    from gradio_client import Client, handle_file

    from nonrigid.ui.app import launch
    from nonrigid.ui.session import Editor

    editor = Editor("tiny-kontext", tmp_path / "out", use_cache=False)
    editor.load()
    port = free_port()
    app = launch(editor, port=port, block=False, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        (method,) = [c for c in client.config["components"] if c.get("props", {}).get("elem_id") == "method"]
        assert [choice[1] for choice in method["props"]["choices"]] == methods_for(editor.family)
        assert "kontext" in methods_for(editor.family)
        gallery, _, status, *_ = client.predict(
            image=handle_file(str(IMAGE)), target=PROMPT, source="", method="kontext", size=64,
            instruction="Make the cat jump.", kontext_num_steps=2, kontext_guidances="2.5,4", api_name="/edit")
    finally:
        app.close()
    assert "**kontext**: 2 variants" in status
    folder = next(p for p in editor.out.iterdir() if p.is_dir() and not p.name.startswith("."))
    manifest = json.loads((folder / "edit.json").read_text())
    assert (manifest["instruction"], manifest["instruction_source"]) == ("Make the cat jump.", "given")
    (library,) = run_edits(editor.family, [EditRequest(IMAGE, PROMPT, instruction="Make the cat jump.")], "kontext",
                           {"num_steps": 2, "guidances": (2.5, 4.0)}, size=64)
    for shown, variant in zip(gallery[1:], library.variants, strict=True):
        np.testing.assert_array_equal(pixels(Path(shown["image"])), pixels(variant.image))
