"""``load_pipeline`` reads diffusers folders and original-layout single-file checkpoints, and never unpickles
a file the caller did not opt in to.

Everything runs offline on the tiny random model: the single-file checkpoint is the tiny pipeline rewritten in
the original LDM / CompVis key layout (``ldm_layout.to_ldm_state_dict``), and the ``config`` folder diffusers
needs to read it is the tiny pipeline saved with ``save_pretrained``.
"""

from __future__ import annotations

import os
import pickle
import random

import huggingface_hub.constants
import pytest
import safetensors.torch
import torch
from conftest import weight_differences
from diffusers import DDIMScheduler
from ldm_layout import to_ldm_state_dict

from nonrigid.errors import UsageError
from nonrigid.models.loading import load_pipeline
from nonrigid.models.registry import build_tiny_pipeline

MODULES = ("unet", "vae", "text_encoder")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No test may reach the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, at import; its is_offline_mode() looks at this constant at call
    # time, so set it too for the case where the hub library was imported before this fixture ran.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_pipeline()


@pytest.fixture(scope="module")
def diffusers_folder(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-diffusers")
    tiny.save_pretrained(folder, safe_serialization=True)
    return folder




def assert_reference_scheduler(pipe):
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert pipe.scheduler.config.clip_sample is False
    assert pipe.scheduler.config.set_alpha_to_one is False


def load_cpu(path, **kwargs):
    # Pin device and dtype: on a CUDA machine the default would be fp16, which is not bit-identical.
    return load_pipeline(str(path), device="cpu", dtype="fp32", **kwargs)


# ------------------------------------------------------------------------------------------------ (a) folder


def test_diffusers_folder_round_trips_bit_identically(tiny, diffusers_folder):
    pipe = load_cpu(diffusers_folder)
    assert weight_differences(tiny, pipe, MODULES) == []
    assert_reference_scheduler(pipe)


# ------------------------------------------------------------------------------------------- (b) single file


def test_ldm_layout_matches_what_diffusers_expects(tiny):
    state = to_ldm_state_dict(tiny)
    assert len(state) == sum(len(getattr(tiny, module).state_dict()) for module in MODULES)
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
    assert all(key.startswith(prefixes) for key in state)
    # The key diffusers' CLIP loader looks for, and the VAE attention stored as 1x1 convolutions.
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in state
    assert state["first_stage_model.decoder.mid.attn_1.q.weight"].ndim == 4


def test_single_file_ldm_checkpoint_loads_bit_identically(tiny, diffusers_folder, tmp_path):
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(to_ldm_state_dict(tiny), str(path))
    # ``config`` names the local diffusers folder, so diffusers reads the component configs (and the
    # tokenizer and scheduler) from it instead of inferring the model type from the checkpoint's keys
    # (``infer_diffusers_model_type``): that would fall back to "v1" and want stable-diffusion-v1-5's configs
    # from the hub, which are neither reachable offline nor the tiny model's shapes. Nothing is patched.
    pipe = load_cpu(path, config=str(diffusers_folder))
    problems = weight_differences(tiny, pipe, MODULES)
    assert problems == [], f"{len(problems)} tensors differ after the single-file round trip: {problems}"
    assert_reference_scheduler(pipe)


# ----------------------------------------------------------------------------------------------- (c) pickles


class _Trap:
    """Unpickling this creates ``marker``: proof that a file was unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_pickle_checkpoint_is_refused_without_opt_in(tiny, diffusers_folder, tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    torch.save(to_ldm_state_dict(tiny), path)
    with pytest.raises(UsageError, match=r"allow.pickle"):
        load_cpu(path, config=str(diffusers_folder))


def test_pickle_checkpoint_is_not_even_opened_without_opt_in(tmp_path):
    marker = tmp_path / "unpickled"
    trapped = tmp_path / "trap.ckpt"
    trapped.write_bytes(pickle.dumps({"state_dict": _Trap(marker)}))
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(random.Random(0).randbytes(4096))
    for path in (trapped, garbage):
        with pytest.raises(UsageError, match=r"allow.pickle"):
            load_cpu(path)
    assert not marker.exists()


def test_pickle_checkpoint_loads_with_opt_in(tiny, diffusers_folder, tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save(to_ldm_state_dict(tiny), path)
    pipe = load_cpu(path, config=str(diffusers_folder), allow_pickle=True)
    assert weight_differences(tiny, pipe, MODULES) == []


# ------------------------------------------------------------------------------------------- (d) .bin folder


def test_folder_with_only_bin_weights_needs_opt_in(tiny, tmp_path):
    folder = tmp_path / "bin-only"
    tiny.save_pretrained(folder, safe_serialization=False)
    # diffusers honours safe_serialization=False, but transformers 5 always writes model.safetensors: rewrite
    # the text encoder as the pytorch_model.bin older repos ship, so the folder holds pickle weights only.
    text_encoder = folder / "text_encoder"
    for weights in text_encoder.glob("*.safetensors"):
        torch.save(safetensors.torch.load_file(str(weights)), text_encoder / "pytorch_model.bin")
        weights.unlink()
    assert not list(folder.rglob("*.safetensors"))
    assert all(list((folder / module).glob("*.bin")) for module in MODULES)
    with pytest.raises(UsageError, match=r"allow.pickle"):
        load_cpu(folder)
    pipe = load_cpu(folder, allow_pickle=True)
    assert weight_differences(tiny, pipe, MODULES) == []
    assert_reference_scheduler(pipe)


def test_opt_in_still_loads_a_safetensors_folder(tiny, diffusers_folder):
    pipe = load_cpu(diffusers_folder, allow_pickle=True)
    assert weight_differences(tiny, pipe, MODULES) == []


# --------------------------------------------------------------------------------------------- (e) bad paths


def test_nonexistent_path_is_a_one_line_usage_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError) as caught:
        load_cpu("./no/such/model")
    message = str(caught.value)
    assert "no/such/model" in message and "does not exist" in message
    assert "\n" not in message


def test_a_mistyped_built_in_name_names_the_closest_one_and_every_built_in_name_loads(tmp_path, monkeypatch):
    from nonrigid.models import BUILT_IN_NAMES
    from nonrigid.models.loading import MINI_MODELS
    from nonrigid.models.registry import tiny_model_names

    assert set(BUILT_IN_NAMES) == set(MINI_MODELS) | set(tiny_model_names())  # the torch-free list: the loaders'

    monkeypatch.chdir(tmp_path)
    for typed, meant in (("mini-xll", "mini-xl"), ("tiny-sdx", "tiny-sdxl"), ("Mini", "mini")):
        with pytest.raises(UsageError, match=f"^model {typed} is not built in .*; did you mean {meant}\\? "):
            load_cpu(typed)


@pytest.fixture
def unreachable_hub(monkeypatch, tmp_path):
    """The hub at a port nothing listens on (a connection is refused at once), an empty hub cache, and offline mode
    off, so that loading tries the hub."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", closed)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_an_unreachable_hub_is_said_in_one_line_without_waiting_for_retries(unreachable_hub, monkeypatch):
    import time

    tick = time.perf_counter()
    with pytest.raises(UsageError) as caught:
        load_cpu("someone/not-a-model")
    assert time.perf_counter() - tick < 2  # huggingface_hub's retries alone wait 23 s
    message = str(caught.value)
    assert message.startswith(f"the Hugging Face hub ({huggingface_hub.constants.ENDPOINT}) cannot be reached to "
                              "download model someone/not-a-model; ")
    assert "local diffusers folder" in message and "HF_HUB_OFFLINE=1" in message and "\n" not in message
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UsageError, match=r"^HF_HUB_OFFLINE is set and model someone/not-a-model is not in the hub "):
        load_cpu("someone/not-a-model")


def test_a_model_in_the_hub_cache_loads_with_the_hub_unreachable(tiny, diffusers_folder, unreachable_hub):
    import shutil
    import time

    snapshot = unreachable_hub / "models--someone--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(diffusers_folder, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    tick = time.perf_counter()
    pipe = load_cpu("someone/tiny")
    assert time.perf_counter() - tick < 10  # no retries
    assert weight_differences(tiny, pipe, MODULES) == []


def test_corrupt_safetensors_is_a_one_line_usage_error(diffusers_folder, tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(random.Random(1).randbytes(4096))
    for kwargs in ({}, {"config": str(diffusers_folder)}):
        with pytest.raises(UsageError) as caught:
            load_cpu(path, **kwargs)
        message = str(caught.value)
        assert "broken.safetensors" in message
        assert "\n" not in message
