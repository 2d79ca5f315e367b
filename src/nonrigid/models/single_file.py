"""What loading needs to know about single-file checkpoints before diffusers reads them, and the FLUX converter.

- ``read_header`` / ``model_type_of``: a ``.safetensors`` file's tensor shapes from its header only (no tensor is
  read: FLUX.1 dev is 24 GB), and diffusers' model type for them (``infer_diffusers_model_type`` looks at keys and
  shapes only). diffusers recognises SD3 only at the real models' widths and calls anything else ``v1``; SD3's
  keys at another size are ``SD3_OTHER_SIZE`` here, readable with a config of the same shape.
- ``absent_components`` / ``check_depth``: what a flow model's file lacks (a FLUX.1 file is the transformer only;
  SD3 files come with or without CLIPs and T5), and whether its transformer has the config's number of blocks
  (diffusers drops surplus weights silently and leaves missing ones unloaded).
- ``flux_to_diffusers``: diffusers' ``convert_flux_transformer_checkpoint_to_diffusers`` with the width read from
  the file: diffusers 0.42 assumes FLUX.1's 3072 when it splits the single blocks' fused ``linear1``, so any other
  width (a pruned model, the tiny test models) goes through this mapping; tests prove the two agree at 3072.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from ..errors import UsageError, first_line

SD3_OTHER_SIZE = "sd3-other-size"
FLUX_WIDTH = 3072  # FLUX.1's transformer width, the only one diffusers' own converter splits correctly
ORIGINAL_PREFIX = "model.diffusion_model."
# the weights an SD3 file may hold besides the transformer, and the key prefix that shows each is there
SD3_FILE_COMPONENTS = {"vae": "first_stage_model.", "text_encoder": "text_encoders.clip_l.",
                       "text_encoder_2": "text_encoders.clip_g.", "text_encoder_3": "text_encoders.t5xxl."}
FLUX_FILE_ABSENT = ("vae", "text_encoder", "text_encoder_2")


def read_header(path: Path) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor in a ``.safetensors`` file, read from its header."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = handle.keys()
            return {key: tuple(handle.get_slice(key).get_shape()) for key in keys}
    except Exception as err:
        raise UsageError(f"could not read checkpoint {path}: {first_line(err)}") from err


class Shapes:
    """A read-only mapping from a checkpoint's keys to stand-ins that carry only the tensor's ``shape``: what
    diffusers' model-type inference reads."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        self.shapes = shapes

    def __contains__(self, key) -> bool:
        return key in self.shapes

    def __getitem__(self, key):
        return SimpleNamespace(shape=torch.Size(self.shapes[key]))

    def keys(self):
        return self.shapes.keys()


def model_type_of(shapes: dict[str, tuple[int, ...]]) -> str:
    """diffusers' model type of a checkpoint, or ``SD3_OTHER_SIZE`` where diffusers says ``v1`` to SD3's keys."""
    from diffusers.loaders.single_file_utils import CHECKPOINT_KEY_NAMES, infer_diffusers_model_type

    model_type = infer_diffusers_model_type(Shapes(shapes))
    if model_type == "v1" and any(key in shapes for key in CHECKPOINT_KEY_NAMES["sd3"]):
        return SD3_OTHER_SIZE
    return model_type


# keys only a Qwen-Image transformer (Qwen-Image, -Edit, -2509, -2511) has, with or without ``ORIGINAL_PREFIX``;
# diffusers' model-type inference calls such a file "v1"
QWEN_IMAGE_KEYS = ("txt_norm.weight", "img_in.weight", "transformer_blocks.0.img_mod.1.weight")


def is_qwen_image(shapes: dict[str, tuple[int, ...]]) -> bool:
    """Whether a checkpoint holds a Qwen-Image transformer (diffusers' key names, as ComfyUI's repackaging keeps
    them, optionally under ``model.diffusion_model.``)."""
    return all(key in shapes or ORIGINAL_PREFIX + key in shapes for key in QWEN_IMAGE_KEYS)


def default_repo(shapes: dict[str, tuple[int, ...]]) -> str:
    """The hub repository diffusers reads a checkpoint's configs from when none is given (by its model type)."""
    from diffusers.loaders.single_file_utils import fetch_diffusers_config

    return fetch_diffusers_config(Shapes(shapes))["pretrained_model_name_or_path"]


def strip_prefix(state: dict) -> dict:
    """Keys without the ``model.diffusion_model.`` prefix some tools save a transformer under."""
    return {key.removeprefix(ORIGINAL_PREFIX): value for key, value in state.items()}


def absent_components(flux: bool, shapes: dict) -> tuple[str, ...]:
    """Components whose weights a flow model's file lacks (they come from the config)."""
    if flux:
        return FLUX_FILE_ABSENT
    return tuple(name for name, prefix in SD3_FILE_COMPONENTS.items() if not any(k.startswith(prefix) for k in shapes))


def flux_width(shapes: dict) -> int:
    return strip_prefix(shapes)["img_in.weight"][0]


def check_depth(path: Path, flux: bool, shapes: dict, source: str) -> None:
    """The file's transformer has as many blocks as ``source``'s transformer config (a folder or hub id)."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    model = FluxTransformer2DModel if flux else SD3Transformer2DModel
    try:
        config = model.load_config(source, subfolder="transformer")
    except Exception as err:
        raise UsageError(f"could not read the config {source!r}: {first_line(err)}") from err
    blocks = {"num_layers": "double_blocks", "num_single_layers": "single_blocks"} if flux else {
        "num_layers": "joint_blocks"}
    keys = strip_prefix(shapes)
    for field, group in blocks.items():
        found = 1 + max((int(k.split(".")[1]) for k in keys if k.startswith(group + ".")), default=-1)
        if found != config.get(field):
            raise UsageError(f"checkpoint {path} does not match {source}: it has {found} {group} where the "
                             f"config's transformer has {config.get(field)}")


# Black Forest Labs' FLUX.1 names -> diffusers': per block group (with diffusers' group name), then outside blocks
_FLUX_DOUBLE = {"img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
                "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
                "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
                "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
                "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight", "img_attn.proj": "attn.to_out.0",
                "txt_attn.proj": "attn.to_add_out", "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
                "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2"}
_FLUX_SINGLE = {"modulation.lin": "norm.linear", "norm.query_norm.scale": "attn.norm_q.weight",
                "norm.key_norm.scale": "attn.norm_k.weight", "linear2": "proj_out"}
_FLUX_BLOCKS = {"double_blocks": ("transformer_blocks", _FLUX_DOUBLE),
                "single_blocks": ("single_transformer_blocks", _FLUX_SINGLE)}
_FLUX_OUTER = {"time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
               "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
               "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
               "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
               "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
               "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
               "txt_in": "context_embedder", "img_in": "x_embedder", "final_layer.linear": "proj_out",
               "final_layer.adaLN_modulation.1": "norm_out.linear"}
# fused projections -> the diffusers layers they split into, in order
_FLUX_FUSED = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
               "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
               "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}


def flux_to_diffusers(checkpoint: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A FLUX.1 transformer checkpoint in diffusers' names: q, k, v split from ``qkv``, and from ``linear1`` (whose
    rest is the MLP input), the final modulation's shift/scale halves swapped to diffusers' scale/shift order. A
    key it cannot place raises (``ValueError``)."""
    state = strip_prefix(checkpoint)
    width = state["img_in.weight"].shape[0]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        group, _, rest = key.partition(".")
        if group in _FLUX_BLOCKS:
            index, _, name = rest.partition(".")
            prefix, table = f"{_FLUX_BLOCKS[group][0]}.{index}.", _FLUX_BLOCKS[group][1]
        else:
            name, prefix, table = key, "", _FLUX_OUTER
        base, _, kind = name.rpartition(".")
        if prefix and base in _FLUX_FUSED:
            targets = _FLUX_FUSED[base]
            sizes = [width] * 3 + [value.shape[0] - 3 * width] if len(targets) == 4 else [value.shape[0] // 3] * 3
            parts = value.split(sizes)  # copied: views into one storage would be loaded as they are, unaligned
            out.update({f"{prefix}{target}.{kind}": part.clone() for target, part in zip(targets, parts, strict=True)})
            continue
        target = next((new + name[len(old):] for old, new in table.items()
                       if name == old or name.startswith(old + ".")), None)
        if target is None:
            raise ValueError(f"unknown FLUX key {key}")
        if base == "final_layer.adaLN_modulation.1":
            shift, scale = value.chunk(2)
            value = torch.cat([scale, shift])
        out[prefix + target] = value
    return out
