"""SD3 / SD3.5 and FLUX.1 (dev, schnell) single-file checkpoints, as their makers ship them, load bit for bit.

The files are the tiny pipelines (``tiny-sd3``, ``tiny-flux``, ``tiny-flux-schnell``) rewritten by
``flow_layouts`` in the original layouts (Stability's SD3 file with its VAE and CLIPs; Black Forest Labs' FLUX.1
file, the transformer only), read back by ``load_pipeline(file, config=folder)`` with the pipeline saved by
``save_pretrained`` as the config folder: every tensor of every module equals the built pipeline's, and
``nonrigid edit --model FILE --config FOLDER`` writes the same PNGs as ``--model FOLDER``. The type is read from
the file's header alone; mismatched configs and unsupported FLUX variants are refused in one line. Offline.
"""

from __future__ import annotations

import json
import shutil
import struct

import huggingface_hub.constants
import pytest
import safetensors
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
from flow_layouts import flux_state_dict, sd3_state_dict
from safetensors.torch import save_file

from nonrigid.cli import main
from nonrigid.errors import UsageError
from nonrigid.models import single_file as sf
from nonrigid.models.loading import _single_file_class, load_pipeline
from nonrigid.models.registry import build_tiny_pipeline, family_of

MODULES = ("transformer", "vae", "text_encoder", "text_encoder_2")
FLUX_KINDS = {"tiny-flux": "flux-dev", "tiny-flux-schnell": "flux-schnell"}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _saved(pipe, root, state):
    """The pipeline saved as a diffusers folder (the config) and ``state`` written as one single file."""
    folder = root / "folder"
    pipe.save_pretrained(folder, safe_serialization=True)
    save_file(state, root / "model.safetensors")
    return folder, root / "model.safetensors"


@pytest.fixture(scope="module", params=["tiny-sd3", "tiny-sd35"])
def sd3(request, tmp_path_factory):
    """SD3 medium's layout, and SD3.5's (query/key norms, a dual-attention layer)."""
    pipe = build_tiny_pipeline(kind=request.param)
    with torch.no_grad():  # SD3 files have no CLIP-L projection: diffusers reads it as the identity
        pipe.text_encoder.text_projection.weight.copy_(torch.eye(16))
    folder, path = _saved(pipe, tmp_path_factory.mktemp(request.param), sd3_state_dict(pipe))
    return pipe, folder, path


@pytest.fixture(scope="module", params=list(FLUX_KINDS))
def flux(request, tmp_path_factory):
    pipe = build_tiny_pipeline(kind=request.param)
    folder, path = _saved(pipe, tmp_path_factory.mktemp(request.param), flux_state_dict(pipe.transformer))
    return pipe, folder, path, FLUX_KINDS[request.param]


def assert_same_weights(built, loaded) -> None:
    for module in MODULES:
        want, got = getattr(built, module).state_dict(), getattr(loaded, module).state_dict()
        assert want.keys() == got.keys(), module
        differ = [key for key in want if not torch.equal(want[key], got[key])]
        assert differ == [], f"{module}: {differ[:5]}"


def assert_one_line_usage_error(call, *fragments: str) -> None:
    with pytest.raises(UsageError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


# ------------------------------------------------------------------------------------------- round trips


def test_an_sd3_file_with_its_vae_and_clips_loads_bit_for_bit(sd3):
    built, folder, path = sd3
    loaded = load_pipeline(str(path), device="cpu", dtype="fp32", config=str(folder))
    assert isinstance(loaded, StableDiffusion3Pipeline) and loaded.text_encoder_3 is None  # no T5 in the folder
    assert family_of(loaded).name == "sd3"
    assert_same_weights(built, loaded)


def test_an_sd3_file_without_clips_takes_them_from_the_config(sd3, tmp_path):
    built, folder, _ = sd3
    state = {k: v for k, v in sd3_state_dict(built).items() if not k.startswith("text_encoders.")}
    save_file(state, tmp_path / "sd3_no_clips.safetensors")
    loaded = load_pipeline(str(tmp_path / "sd3_no_clips.safetensors"), device="cpu", dtype="fp32",
                           config=str(folder), t5=False)
    assert loaded.text_encoder_3 is None
    assert_same_weights(built, loaded)


@pytest.fixture(scope="module")
def sd3_with_t5(sd3, tmp_path_factory):
    """tiny-sd3 with a T5 encoder as wide as its joint attention (SD3's 4096 in miniature), saved with it."""
    from transformers import T5Config, T5EncoderModel

    from nonrigid.models.tiny import build_t5_tokenizer

    tokenizer = build_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=64, d_kv=8, d_ff=64, num_layers=1,
                                     num_heads=2, relative_attention_num_buckets=8, decoder_start_token_id=0,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))
    pipe = StableDiffusion3Pipeline(**{**sd3[0].components, "text_encoder_3": t5, "tokenizer_3": tokenizer})
    folder, path = _saved(pipe, tmp_path_factory.mktemp("sd3-t5"), sd3_state_dict(pipe))
    return pipe, folder, path


def test_an_sd3_file_with_t5_loads_it_bit_for_bit_unless_told_not_to(sd3_with_t5):
    built, folder, path = sd3_with_t5
    assert "text_encoders.t5xxl.transformer.shared.weight" in sf.read_header(path)
    loaded = load_pipeline(str(path), device="cpu", dtype="fp32", config=str(folder))
    assert_same_weights(built, loaded)
    want, got = built.text_encoder_3.state_dict(), loaded.text_encoder_3.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    without = load_pipeline(str(path), device="cpu", dtype="fp32", config=str(folder), t5=False)
    assert without.text_encoder_3 is None and without.tokenizer_3 is None
    assert_same_weights(built, without)


def test_a_flux_file_holds_the_transformer_and_loads_bit_for_bit_with_the_rest_from_its_config(flux):
    built, folder, path, model_type = flux
    keys = sf.read_header(path).keys()
    assert not any(k.startswith(("first_stage_model.", "text_encoders.")) for k in keys)  # the transformer only
    assert ("guidance_in.in_layer.weight" in keys) == (model_type == "flux-dev")
    loaded = load_pipeline(str(path), device="cpu", dtype="fp32", config=str(folder))
    assert isinstance(loaded, FluxPipeline) and family_of(loaded).name == "flux"
    assert loaded.transformer.config.guidance_embeds == (model_type == "flux-dev")
    assert_same_weights(built, loaded)


def test_a_flux_file_saved_under_the_model_prefix_loads_the_same(flux, tmp_path):
    built, folder, _, _ = flux
    save_file(flux_state_dict(built.transformer, prefix=sf.ORIGINAL_PREFIX), tmp_path / "prefixed.safetensors")
    loaded = load_pipeline(str(tmp_path / "prefixed.safetensors"), device="cpu", dtype="fp32", config=str(folder))
    assert_same_weights(built, loaded)


def test_the_flux_converter_equals_diffusers_at_flux1_width():
    """diffusers' converter splits ``linear1`` at FLUX.1's width (3072) only; ours reads the width from the file.
    On a file of FLUX.1's width (every row count of the tiny file times 96, one column: the converters only
    split and swap rows), the two give the same tensors under the same names."""
    tiny = flux_state_dict(build_tiny_pipeline(kind="tiny-flux").transformer)
    scale = sf.FLUX_WIDTH // tiny["img_in.weight"].shape[0]
    generator = torch.Generator().manual_seed(0)
    wide = {key: torch.randn(value.shape[0] * scale, 1, generator=generator) for key, value in tiny.items()}
    ours = sf.flux_to_diffusers(dict(wide))
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(wide))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[key], theirs[key]) for key in ours)
    with pytest.raises(ValueError, match="unknown FLUX key"):
        sf.flux_to_diffusers({**tiny, "double_blocks.0.img_attn.extra.weight": torch.zeros(1)})


# ------------------------------------------------------------------------------------------- detection


def test_the_type_is_read_from_the_header_alone(flux, sd3, monkeypatch):
    _, _, flux_path, model_type = flux
    real_open = safetensors.safe_open

    class HeaderOnly:  # the file's handle, with every way of reading a tensor's values removed
        def __init__(self, *args, **kwargs):
            self.handle = real_open(*args, **kwargs)

        def __enter__(self):
            self.inner = self.handle.__enter__()
            return self

        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_slice(self, key):
            inner = self.inner.get_slice(key)
            return type("ShapeOnly", (), {"get_shape": lambda _: inner.get_shape()})()

    monkeypatch.setattr(safetensors, "safe_open", HeaderOnly)
    assert sf.model_type_of(sf.read_header(flux_path)) == model_type
    assert _single_file_class(flux_path, None) is FluxPipeline
    # tiny SD3 is SD3's layout at a size diffusers has no config for: it says "v1"; read with a config it is SD3
    _, sd3_folder, sd3_path = sd3
    assert sf.model_type_of(sf.read_header(sd3_path)) == sf.SD3_OTHER_SIZE
    assert_one_line_usage_error(lambda: _single_file_class(sd3_path, None), "SD3's layout", "config")
    assert _single_file_class(sd3_path, str(sd3_folder)) is StableDiffusion3Pipeline


def _header_only_file(path, shapes: dict[str, tuple[int, ...]]):
    """A valid ``.safetensors`` file of real-model shapes whose data are holes (a sparse file: nothing written)."""
    header, offset = {}, 0
    for key, shape in shapes.items():
        size = 2 * int(torch.tensor(shape).prod())
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)) + text)
        handle.truncate(8 + len(text) + offset)
    return path


def test_sd3_medium_is_recognised_by_its_shapes_without_reading_its_tensors(tmp_path):
    path = _header_only_file(tmp_path / "sd3_medium.safetensors", {
        "model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": (9216,),
        "model.diffusion_model.pos_embed": (1, 36864, 1536)})  # 113 MB of holes
    assert sf.model_type_of(sf.read_header(path)) == "sd3"
    assert _single_file_class(path, None) is StableDiffusion3Pipeline
    assert sf.default_repo(sf.read_header(path)) == "stabilityai/stable-diffusion-3-medium-diffusers"


# ------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("img_in, extra, model_type", [
    ((8, 384), "guidance_in.in_layer.bias", "flux-fill"),
    ((8, 128), "guidance_in.in_layer.bias", "flux-depth"),
    ((8, 64), "single_stream_modulation.lin.weight", "flux-2-dev"),
])
def test_flux_variants_other_than_dev_and_schnell_are_refused_in_one_line(flux, tmp_path, img_in, extra,
                                                                          model_type):
    _, folder, _, _ = flux
    path = tmp_path / f"{model_type}.safetensors"
    save_file({"double_blocks.0.img_attn.norm.key_norm.scale": torch.zeros(4), "img_in.weight": torch.zeros(img_in),
               extra: torch.zeros(8)}, path)
    for config in (None, str(folder)):
        assert_one_line_usage_error(lambda c=config: load_pipeline(str(path), device="cpu", config=c),
                                    repr(model_type), "FLUX.1 dev and schnell")


def test_without_a_config_a_flux_file_reads_the_rest_from_the_hub_repo_diffusers_infers(flux):
    """Offline, the repository is named in one line (online it is downloaded; FLUX.1-dev is gated)."""
    _, _, path, model_type = flux
    repo = {"flux-dev": "black-forest-labs/FLUX.1-dev", "flux-schnell": "black-forest-labs/FLUX.1-schnell"}
    assert sf.default_repo(sf.read_header(path)) == repo[model_type]
    assert_one_line_usage_error(lambda: load_pipeline(str(path), device="cpu"), repr(repo[model_type]),
                                "local diffusers folder")


def test_a_file_and_a_config_of_different_families_are_refused_in_one_line(flux, sd3):
    _, flux_folder, flux_path, model_type = flux
    _, sd3_folder, sd3_path = sd3
    assert_one_line_usage_error(lambda: load_pipeline(str(flux_path), device="cpu", config=str(sd3_folder)),
                                repr(model_type), "StableDiffusion3Pipeline")
    assert_one_line_usage_error(lambda: load_pipeline(str(sd3_path), device="cpu", config=str(flux_folder)),
                                repr(sf.SD3_OTHER_SIZE), "FluxPipeline")


def _with_transformer_config(folder, tmp_path, **changes):
    copy = tmp_path / "changed"
    shutil.copytree(folder, copy)
    config_path = copy / "transformer" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **changes}))
    return str(copy)


@pytest.mark.parametrize("changes, fragment", [
    ({"num_layers": 2}, "it has 1 double_blocks where the config's transformer has 2"),
    ({"num_single_layers": 0}, "it has 1 single_blocks where the config's transformer has 0"),
])
def test_a_flux_config_of_another_depth_is_refused_in_one_line(flux, tmp_path, changes, fragment):
    _, folder, path, _ = flux
    config = _with_transformer_config(folder, tmp_path, **changes)
    assert_one_line_usage_error(lambda: load_pipeline(str(path), device="cpu", config=config), fragment)


def test_an_sd3_config_of_another_depth_is_refused_in_one_line(sd3, tmp_path):
    _, folder, path = sd3
    config = _with_transformer_config(folder, tmp_path, num_layers=3)
    assert_one_line_usage_error(lambda: load_pipeline(str(path), device="cpu", config=config),
                                "it has 2 joint_blocks where the config's transformer has 3")


# ------------------------------------------------------------------------------------------- the command line


def _edit(tedbench, out, model: list[str], capsys) -> dict:
    image = tedbench / "originals" / "dog_01.jpeg"
    code = main(["edit", str(image), "A photo of a jumping dog.", "--method", "flowedit", *model, "--size", "64",
                 "--steps", "3", "--set", "n_max=2", "--device", "cpu", "--dtype", "fp32", "--seed", "0",
                 "--out", str(out), "--no-cache", "--quiet"])
    assert code == 0, capsys.readouterr().err
    return json.loads((out / "edit.json").read_text())


def assert_same_edit(tedbench, tmp_path, capsys, folder, path, family: str) -> None:
    from_file = _edit(tedbench, tmp_path / "file", ["--model", str(path), "--config", str(folder)], capsys)
    from_folder = _edit(tedbench, tmp_path / "folder", ["--model", str(folder)], capsys)
    assert family in from_file["model_family"] and from_file["model_family"] == from_folder["model_family"]
    pngs = sorted(p.name for p in (tmp_path / "folder").glob("*.png"))
    assert len(pngs) >= 3 and pngs == sorted(p.name for p in (tmp_path / "file").glob("*.png"))
    for name in pngs:
        assert (tmp_path / "file" / name).read_bytes() == (tmp_path / "folder" / name).read_bytes(), name


def test_the_cli_edits_an_sd3_file_as_its_folder(sd3, tedbench, tmp_path, capsys, nonrigid_logger):
    pipe, folder, path = sd3
    layout = "SD3.5 layout" if pipe.transformer.config.qk_norm else "SD3 layout"
    assert_same_edit(tedbench, tmp_path, capsys, folder, path, layout)


def test_the_cli_edits_a_flux_file_as_its_folder(flux, tedbench, tmp_path, capsys, nonrigid_logger):
    _, folder, path, _ = flux
    assert_same_edit(tedbench, tmp_path, capsys, folder, path, "FLUX layout")
