"""Write a diffusers Stable Diffusion pipeline's weights in the original LDM / CompVis (SD 1.x) or SGM (SDXL)
single-file checkpoint layout.

This is the inverse of what diffusers' single-file loader (``diffusers.loaders.single_file_utils``:
``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``,
``convert_open_clip_checkpoint``) reads, so a test can build a ``.safetensors`` file that looks like an original
SD 1.x or SDXL checkpoint without downloading one.

Every index is derived from the model configs (number of blocks, ``layers_per_block``, which blocks carry
attention, how many text-encoder layers), so the tiny test models convert as faithfully as the real ones. Every
tensor of the networks must find a home: an unmapped key raises instead of being silently dropped.

SDXL (``StableDiffusionXLPipeline``, Stability's ``generative-models`` layout):

- UNet under ``model.diffusion_model.`` as SD 1.x, plus the size/pooled-embedding MLP ``add_embedding.linear_1/2``
  as ``label_emb.0.0`` / ``label_emb.0.2``; several transformer blocks per attention keep their
  ``transformer_blocks.N`` names.
- VAE under ``first_stage_model.`` as SD 1.x.
- The first text encoder (HF ``CLIPTextModel``) under ``conditioner.embedders.0.transformer.text_model.``.
- The second (HF ``CLIPTextModelWithProjection``) under ``conditioner.embedders.1.model.`` in OpenCLIP's layout:
  ``token_embedding.weight``, ``positional_embedding``, ``transformer.resblocks.N.{ln_1, attn.in_proj_weight /
  in_proj_bias (q, k, v stacked), attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}``, ``ln_final`` and
  ``text_projection``, stored as OpenCLIP multiplies by it (``x @ text_projection``): the transpose of the HF
  linear layer's weight.
"""

from __future__ import annotations

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."

# diffusers ResnetBlock2D parameter names -> LDM ResBlock names (UNet only; the VAE keeps diffusers' names
# except for the shortcut).
_UNET_RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET_NAMES = {"conv_shortcut": "nin_shortcut"}
# diffusers Attention (linear projections) -> LDM AttnBlock (1x1 convolutions).
_VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def to_ldm_state_dict(pipe) -> dict[str, torch.Tensor]:
    """The pipeline's networks under the original single-file key names: LDM for SD 1.x (UNet, VAE, CLIP text
    encoder), SGM for an SDXL pipeline (one with ``text_encoder_2``: UNet, VAE, CLIP and OpenCLIP encoders)."""
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    out: dict[str, torch.Tensor] = {}
    out.update(_convert(pipe.unet.state_dict(), _unet_rules(pipe.unet.config), UNET_PREFIX))
    out.update(_convert(pipe.vae.state_dict(), _vae_rules(pipe.vae.config), VAE_PREFIX))
    out.update(_hf_clip(pipe.text_encoder, SDXL_CLIP_PREFIX if sdxl else CLIP_PREFIX))
    if sdxl:
        out.update(_open_clip(pipe.text_encoder_2, SDXL_OPEN_CLIP_PREFIX))
    return out


def _hf_clip(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    """An HF CLIP text encoder as original checkpoints hold it: its own key names, under ``text_model.``."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in text_encoder.state_dict().items():
        # Original checkpoints hold the HF CLIPTextModel with its ``text_model.`` wrapper; transformers >= 5.6
        # flattened the wrapper away (diffusers strips it again on load), so put it back where it is missing.
        if key.endswith("position_ids"):  # a buffer, absent from recent transformers' state dicts
            continue
        name = key if key.startswith("text_model.") else f"text_model.{key}"
        out[prefix + name] = tensor.detach().clone().contiguous()
    return out


# HF CLIP encoder-layer parameter names -> OpenCLIP residual-block names (q/k/v are fused separately).
_OPEN_CLIP_LAYER_NAMES = {
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "self_attn.out_proj.": "attn.out_proj.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
}
_OPEN_CLIP_NAMES = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}


def _open_clip(text_encoder, prefix: str) -> dict[str, torch.Tensor]:
    """An HF ``CLIPTextModelWithProjection`` in OpenCLIP's layout (what ``convert_open_clip_checkpoint`` reads).

    The per-layer ``q_proj`` / ``k_proj`` / ``v_proj`` become one ``attn.in_proj_weight`` (and ``_bias``), q, k
    and v stacked along the output dimension; ``text_projection`` is stored transposed (OpenCLIP computes
    ``x @ text_projection``, a linear layer ``x @ weight.T``).
    """
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}  # "resblocks.N.attn.in_proj_weight" -> {"q": ..., ...}
    unmapped = []
    for key, tensor in text_encoder.state_dict().items():
        if key.endswith("position_ids"):  # a buffer, absent from recent transformers' state dicts
            continue
        value = tensor.detach().clone()
        name = key.removeprefix("text_model.")  # the wrapper, whether or not this transformers version keeps it
        if name == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
            continue
        if name in _OPEN_CLIP_NAMES:
            out[prefix + _OPEN_CLIP_NAMES[name]] = value.contiguous()
            continue
        if name.startswith("encoder.layers."):
            layer, rest = name.removeprefix("encoder.layers.").split(".", 1)
            block = f"transformer.resblocks.{layer}."
            projection = rest.removeprefix("self_attn.")
            if rest.startswith("self_attn.") and projection[:7] in ("q_proj.", "k_proj.", "v_proj."):
                kind = projection[7:]  # weight or bias
                fused.setdefault(f"{block}attn.in_proj_{kind}", {})[projection[0]] = value
                continue
            target = next((new + rest[len(old):] for old, new in _OPEN_CLIP_LAYER_NAMES.items()
                           if rest.startswith(old)), None)
            if target is not None:
                out[prefix + block + target] = value.contiguous()
                continue
        unmapped.append(key)
    for name, parts in fused.items():
        if sorted(parts) != ["k", "q", "v"]:
            unmapped.append(f"{name} (only {sorted(parts)})")
            continue
        out[prefix + name] = torch.cat([parts["q"], parts["k"], parts["v"]]).contiguous()
    if unmapped:
        raise ValueError(f"no OpenCLIP name for {len(unmapped)} keys, e.g. {unmapped[:5]}")
    return out


# A rule maps a diffusers key prefix to an LDM key prefix, plus the renames applied to the rest of the key
# (its leading component) and whether linear weights become 1x1 convolution weights.
_Rule = tuple[str, str, dict[str, str], bool]


def _convert(state: dict[str, torch.Tensor], rules: list[_Rule], prefix: str) -> dict[str, torch.Tensor]:
    # Every prefix ends at a "." boundary and no two overlap, so the first matching rule is the only one.
    out: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, tensor in state.items():
        for old, new, renames, linear_to_conv in rules:
            if not key.startswith(old):
                continue
            rest = key[len(old) :]
            for source, target in renames.items():
                if rest.startswith(source + "."):
                    rest = target + rest[len(source) :]
                    break
            value = tensor.detach().clone()
            if linear_to_conv and value.ndim == 2:
                value = value[:, :, None, None]
            out[prefix + new + rest] = value.contiguous()
            break
        else:
            unmapped.append(key)
    if unmapped:
        raise ValueError(f"no LDM name for {len(unmapped)} keys, e.g. {unmapped[:5]}")
    return out


def _unet_rules(config) -> list[_Rule]:
    """UNet2DConditionModel -> openaimodel.UNetModel.

    LDM numbers the encoder as one flat list ``input_blocks``: entry 0 is ``conv_in``, then per down block
    ``layers_per_block`` entries ``[resnet, attention?]`` followed (except after the last block) by one entry
    holding the downsampler as ``op``. The decoder ``output_blocks`` has ``layers_per_block + 1`` entries per
    up block, ``[resnet, attention?, upsampler?]``, the upsampler riding in the block's last entry.
    """
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise ValueError("only a single int layers_per_block has an LDM layout")
    down_types, up_types = config["down_block_types"], config["up_block_types"]
    rules: list[_Rule] = []

    def rule(old: str, new: str, resnet: bool = False) -> None:
        rules.append((old, new, _UNET_RESNET_NAMES if resnet else {}, False))

    rule("time_embedding.linear_1.", "time_embed.0.")
    rule("time_embedding.linear_2.", "time_embed.2.")
    if config.get("addition_embed_type") == "text_time":  # SDXL's pooled-text and size embedding
        rule("add_embedding.linear_1.", "label_emb.0.0.")
        rule("add_embedding.linear_2.", "label_emb.0.2.")
    rule("conv_in.", "input_blocks.0.0.")
    rule("conv_norm_out.", "out.0.")
    rule("conv_out.", "out.2.")
    rule("mid_block.resnets.0.", "middle_block.0.", resnet=True)
    rule("mid_block.attentions.0.", "middle_block.1.")
    rule("mid_block.resnets.1.", "middle_block.2.", resnet=True)
    for block, block_type in enumerate(down_types):
        first = 1 + block * (layers + 1)
        for layer in range(layers):
            rule(f"down_blocks.{block}.resnets.{layer}.", f"input_blocks.{first + layer}.0.", resnet=True)
            if "CrossAttn" in block_type:
                rule(f"down_blocks.{block}.attentions.{layer}.", f"input_blocks.{first + layer}.1.")
        if block < len(down_types) - 1:
            rule(f"down_blocks.{block}.downsamplers.0.conv.", f"input_blocks.{first + layers}.0.op.")
    for block, block_type in enumerate(up_types):
        first = block * (layers + 1)
        has_attention = "CrossAttn" in block_type
        for layer in range(layers + 1):
            rule(f"up_blocks.{block}.resnets.{layer}.", f"output_blocks.{first + layer}.0.", resnet=True)
            if has_attention:
                rule(f"up_blocks.{block}.attentions.{layer}.", f"output_blocks.{first + layer}.1.")
        if block < len(up_types) - 1:
            slot = 2 if has_attention else 1
            rule(f"up_blocks.{block}.upsamplers.0.conv.", f"output_blocks.{first + layers}.{slot}.conv.")
    return rules


def _vae_rules(config) -> list[_Rule]:
    """AutoencoderKL -> ldm.modules.diffusionmodules.model Encoder/Decoder.

    Resnet indices inside a block carry over unchanged; the decoder's ``up`` list is stored in reverse order
    (``up.0`` is the block nearest the output, diffusers' last ``up_blocks`` entry).
    """
    count, layers = len(config["down_block_types"]), config["layers_per_block"]
    if len(config["up_block_types"]) != count:
        raise ValueError("the LDM VAE layout needs as many up blocks as down blocks")
    rules: list[_Rule] = []

    def rule(old: str, new: str, renames: dict[str, str] | None = None, linear_to_conv: bool = False) -> None:
        rules.append((old, new, renames or {}, linear_to_conv))

    rule("quant_conv.", "quant_conv.")
    rule("post_quant_conv.", "post_quant_conv.")
    for part in ("encoder", "decoder"):
        rule(f"{part}.conv_in.", f"{part}.conv_in.")
        rule(f"{part}.conv_out.", f"{part}.conv_out.")
        rule(f"{part}.conv_norm_out.", f"{part}.norm_out.")
        rule(f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", _VAE_RESNET_NAMES)
        rule(f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", _VAE_RESNET_NAMES)
        rule(
            f"{part}.mid_block.attentions.0.",
            f"{part}.mid.attn_1.",
            _VAE_ATTENTION_NAMES,
            linear_to_conv=True,
        )
    for block in range(count):
        mirrored = count - 1 - block
        for layer in range(layers):  # the encoder has layers_per_block resnets per block ...
            rule(
                f"encoder.down_blocks.{block}.resnets.{layer}.",
                f"encoder.down.{block}.block.{layer}.",
                _VAE_RESNET_NAMES,
            )
        for layer in range(layers + 1):  # ... the decoder one more
            rule(
                f"decoder.up_blocks.{block}.resnets.{layer}.",
                f"decoder.up.{mirrored}.block.{layer}.",
                _VAE_RESNET_NAMES,
            )
        rule(f"encoder.down_blocks.{block}.downsamplers.0.conv.", f"encoder.down.{block}.downsample.conv.")
        rule(f"decoder.up_blocks.{block}.upsamplers.0.conv.", f"decoder.up.{mirrored}.upsample.conv.")
    return rules
