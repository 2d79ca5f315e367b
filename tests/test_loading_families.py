"""``load_pipeline`` on the families beyond SD 1.x: SD 2.x (v prediction) and SDXL, from diffusers folders and from
an SDXL single-file checkpoint in the original SGM layout, and the models it refuses.

Everything runs offline on tiny random models: the folders are the tiny pipelines saved with ``save_pretrained``,
the single file is ``tiny-sdxl`` rewritten by ``ldm_layout.to_ldm_state_dict`` (its two text encoders differ in
width and the second has a tenth layer, as diffusers' single-file loader needs to recognise SDXL).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import safetensors.torch
import torch
from conftest import weight_differences
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.loaders.single_file_utils import infer_diffusers_model_type
from ldm_layout import SDXL_OPEN_CLIP_PREFIX, to_ldm_state_dict

from nonrigid.errors import UsageError
from nonrigid.models.loading import _single_file_class, load_pipeline
from nonrigid.models.registry import build_tiny_pipeline, family_of

SDXL_MODULES = ("unet", "vae", "text_encoder", "text_encoder_2")
SD_MODULES = ("unet", "vae", "text_encoder")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test may reach the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, at import; its is_offline_mode() looks at this constant at call
    # time, so set it too for the case where the hub library was imported before this fixture ran.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def sd2v():
    return build_tiny_pipeline(kind="tiny-sd2-v")


@pytest.fixture(scope="module")
def sdxl():
    return build_tiny_pipeline(kind="tiny-sdxl")


@pytest.fixture(scope="module")
def sdxl_sgm():
    return build_tiny_pipeline(kind="tiny-sdxl")


def saved(pipe, tmp_path_factory, name: str) -> Path:
    folder = tmp_path_factory.mktemp(name)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def sd2v_folder(sd2v, tmp_path_factory):
    return saved(sd2v, tmp_path_factory, "tiny-sd2-v")


@pytest.fixture(scope="module")
def sdxl_folder(sdxl, tmp_path_factory):
    return saved(sdxl, tmp_path_factory, "tiny-sdxl")


@pytest.fixture(scope="module")
def sgm_folder(sdxl_sgm, tmp_path_factory):
    return saved(sdxl_sgm, tmp_path_factory, "sdxl-sgm")


@pytest.fixture(scope="module")
def sgm_state(sdxl_sgm):
    return to_ldm_state_dict(sdxl_sgm)


@pytest.fixture(scope="module")
def sgm_file(sgm_state, tmp_path_factory):
    path = tmp_path_factory.mktemp("sdxl-single-file") / "sdxl.safetensors"
    safetensors.torch.save_file(sgm_state, str(path))
    return path


def load_cpu(path, **kwargs):
    # Pin device and dtype: on a CUDA machine the default would be fp16, which is not bit-identical.
    return load_pipeline(str(path), device="cpu", dtype="fp32", **kwargs)




def assert_reference_ddim(pipe, original_config):
    """DDIM with the reference's settings on top of the model's own schedule, whatever class it shipped with."""
    config = pipe.scheduler.config
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert config.clip_sample is False and config.set_alpha_to_one is False
    for key in ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "steps_offset", "timestep_spacing"):
        assert config[key] == original_config[key], key
    assert config.prediction_type == original_config.get("prediction_type", "epsilon")


def one_line_usage_error(call) -> str:
    with pytest.raises(UsageError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message, message
    return message


def with_class_name(folder: Path, class_name: str, tmp_path: Path) -> Path:
    """A copy of a saved diffusers folder whose model_index.json names another pipeline class."""
    copy = tmp_path / class_name
    shutil.copytree(folder, copy)
    index = copy / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "_class_name": class_name}))
    return copy


# --------------------------------------------------------------------------------------------- (a) folders


def test_sd2_v_folder_round_trips_bit_identically_and_keeps_v_prediction(sd2v, sd2v_folder):
    pipe = load_cpu(sd2v_folder)
    assert type(pipe) is StableDiffusionPipeline
    assert family_of(pipe).name == "sd"
    assert weight_differences(sd2v, pipe, SD_MODULES) == []
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert_reference_ddim(pipe, sd2v.scheduler.config)
    assert "v_prediction" in family_of(pipe).describe()


def test_sdxl_folder_round_trips_bit_identically_with_ddim_from_its_euler_config(sdxl, sdxl_folder):
    assert json.loads((sdxl_folder / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == \
        "EulerDiscreteScheduler"
    pipe = load_cpu(sdxl_folder)
    assert type(pipe) is StableDiffusionXLPipeline
    assert family_of(pipe).name == "sdxl"
    assert weight_differences(sdxl, pipe, SDXL_MODULES) == []
    assert_reference_ddim(pipe, sdxl.scheduler.config)
    assert pipe.scheduler.config.steps_offset == 1 and pipe.scheduler.config.timestep_spacing == "leading"
    assert pipe.scheduler.config.prediction_type == "epsilon"
    # the tokenizers and the empty-prompt rule come from the folder too
    assert pipe.tokenizer.get_vocab() == sdxl.tokenizer.get_vocab()
    assert pipe.tokenizer_2.get_vocab() == sdxl.tokenizer_2.get_vocab()
    assert pipe.config.force_zeros_for_empty_prompt is True


# ------------------------------------------------------------------------------------------ (b) single file


def test_sgm_layout_is_what_diffusers_reads_as_sdxl_base(sdxl_sgm, sgm_state):
    # every tensor maps, the OpenCLIP encoder's q/k/v fused into one in_proj per block (6 tensors -> 2)
    layers = sdxl_sgm.text_encoder_2.config.num_hidden_layers
    total = sum(len(getattr(sdxl_sgm, module).state_dict()) for module in SDXL_MODULES)
    assert len(sgm_state) == total - 4 * layers
    prefixes = ("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer.text_model.",
                SDXL_OPEN_CLIP_PREFIX)
    assert all(key.startswith(prefixes) for key in sgm_state)
    assert infer_diffusers_model_type(sgm_state) == "xl_base"
    # the pooled/size embedding MLP, and the second transformer block of the inner attention
    add = sdxl_sgm.unet.add_embedding
    assert torch.equal(sgm_state["model.diffusion_model.label_emb.0.0.weight"], add.linear_1.weight)
    assert torch.equal(sgm_state["model.diffusion_model.label_emb.0.2.bias"], add.linear_2.bias)
    assert any(".1.transformer_blocks.1.attn2.to_k.weight" in key for key in sgm_state)
    # OpenCLIP multiplies by text_projection: the transpose of the HF linear weight; in_proj stacks q, k, v
    hf = sdxl_sgm.text_encoder_2
    assert torch.equal(sgm_state[SDXL_OPEN_CLIP_PREFIX + "text_projection"], hf.text_projection.weight.T)
    attention = hf.text_model.encoder.layers[3].self_attn
    fused = sgm_state[SDXL_OPEN_CLIP_PREFIX + "transformer.resblocks.3.attn.in_proj_weight"]
    assert torch.equal(fused, torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight]))


def test_sd1_layout_is_unchanged():
    state = to_ldm_state_dict(build_tiny_pipeline())
    assert not any(key.startswith("conditioner.") or "label_emb" in key for key in state)
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in state


def test_sdxl_single_file_loads_bit_identically_with_its_config_folder(sdxl_sgm, sgm_folder, sgm_file):
    pipe = load_cpu(sgm_file, config=str(sgm_folder))
    assert type(pipe) is StableDiffusionXLPipeline
    assert family_of(pipe).name == "sdxl"
    problems = weight_differences(sdxl_sgm, pipe, SDXL_MODULES)
    assert problems == [], f"{len(problems)} tensors differ after the single-file round trip: {problems[:10]}"
    assert_reference_ddim(pipe, sdxl_sgm.scheduler.config)


def test_sdxl_single_file_without_config_is_detected_from_its_keys(sgm_file):
    # Only the keys are read (safetensors' header, tensors on demand): no configs, no network.
    assert _single_file_class(sgm_file, None) is StableDiffusionXLPipeline


def test_single_file_with_a_refiner_config_is_refused(sgm_file, sgm_folder, tmp_path):
    refiner = with_class_name(sgm_folder, "StableDiffusionXLImg2ImgPipeline", tmp_path)
    message = one_line_usage_error(lambda: load_cpu(sgm_file, config=str(refiner)))
    assert "StableDiffusionXLImg2ImgPipeline" in message and "refiner" in message


def test_refiner_single_file_is_refused_by_its_keys(sgm_state, tmp_path):
    # An SDXL refiner holds only the OpenCLIP encoder, as conditioner.embedders.0.model.
    refiner = {key.replace("conditioner.embedders.1.", "conditioner.embedders.0."): value
               for key, value in sgm_state.items() if not key.startswith("conditioner.embedders.0.")}
    path = tmp_path / "refiner.safetensors"
    safetensors.torch.save_file(refiner, str(path))
    message = one_line_usage_error(lambda: load_cpu(path))
    assert "xl_refiner" in message and "SDXL" in message


# ------------------------------------------------------------------------------------------- (c) refusals


@pytest.mark.parametrize("class_name, named", [
    ("StableDiffusionXLImg2ImgPipeline", "refiner"),
    ("PixArtAlphaPipeline", "SD 1.x, SD 2.x"),  # (FLUX is supported now: tests/test_flux_family.py)
])
def test_unsupported_pipeline_folders_are_refused_in_one_line(sdxl_folder, tmp_path, class_name, named):
    folder = with_class_name(sdxl_folder, class_name, tmp_path)
    message = one_line_usage_error(lambda: load_cpu(folder))
    assert class_name in message and named in message and str(folder) in message


def test_sample_prediction_is_refused_in_one_line(sd2v_folder, tmp_path):
    folder = tmp_path / "sample-prediction"
    shutil.copytree(sd2v_folder, folder)
    config_path = folder / "scheduler" / "scheduler_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "prediction_type": "sample"}))
    message = one_line_usage_error(lambda: load_cpu(folder))
    assert "'sample'" in message and "v_prediction" in message
