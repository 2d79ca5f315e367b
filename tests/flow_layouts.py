"""Write a diffusers SD3 pipeline's, or a FLUX transformer's, weights in the original single-file layouts.

This is the inverse of what diffusers' single-file loader (``diffusers.loaders.single_file_utils``) reads, so a
test can build a ``.safetensors`` file that looks like an original checkpoint without downloading one:

- SD3 / SD3.5 (Stability's ``sd3_medium_incl_clips.safetensors`` layout, read by
  ``convert_sd3_transformer_checkpoint_to_diffusers``): the MMDiT under ``model.diffusion_model.`` as
  ``joint_blocks.N.{x_block, context_block}`` with q, k and v fused into ``attn.qkv``; the last block's context
  branch is "pre only" (modulation without attention output or MLP), and its modulation, like the final layer's,
  stores shift before scale (diffusers' ``AdaLayerNormContinuous`` wants scale first: the halves are swapped).
  The VAE under ``first_stage_model.`` in the LDM layout (``ldm_layout``); CLIP-L and CLIP-G as HF models
  under ``text_encoders.clip_l.transformer.`` / ``text_encoders.clip_g.transformer.`` (``convert_ldm_clip_checkpoint``
  strips the prefix; CLIP-L is stored without its projection, which diffusers reads as the identity), and T5 when
  the pipeline has one under ``text_encoders.t5xxl.transformer.`` (``convert_sd3_t5_checkpoint_to_diffusers``).
- FLUX.1 (Black Forest Labs' ``flux1-dev.safetensors`` layout, the transformer only, no prefix, read by
  ``convert_flux_transformer_checkpoint_to_diffusers``): ``double_blocks.N.{img,txt}_{mod,attn,mlp}`` with q, k, v
  fused into ``qkv`` and the q/k RMS norms as ``norm.query_norm.scale`` / ``key_norm.scale``;
  ``single_blocks.N.linear1`` fusing q, k, v and the MLP input, ``linear2`` the output; ``img_in``, ``txt_in``,
  ``time_in``, ``vector_in``, ``guidance_in`` (dev only) and ``final_layer`` (modulation halves swapped as SD3's).

Every index is derived from the model configs; every tensor of the networks must find a home: an unmapped key
raises instead of being silently dropped.
"""

from __future__ import annotations

import torch
from ldm_layout import VAE_PREFIX, _convert, _vae_rules

SD3_PREFIX = "model.diffusion_model."
CLIP_L_PREFIX = "text_encoders.clip_l.transformer."
CLIP_G_PREFIX = "text_encoders.clip_g.transformer."
T5_PREFIX = "text_encoders.t5xxl.transformer."


class _Writer:
    """Moves a diffusers state dict's tensors to original names, remembering which keys it used."""

    def __init__(self, state: dict[str, torch.Tensor], prefix: str = "") -> None:
        self.state, self.prefix, self.used = state, prefix, set()
        self.out: dict[str, torch.Tensor] = {}

    def linear(self, original: str, *parts: str, swap: bool = False) -> None:
        """``original.weight`` (and ``.bias`` where the parts have one): the parts' tensors stacked along the
        output dimension, in order; ``swap`` exchanges the two halves (shift/scale order)."""
        for suffix in ("weight", "bias"):
            keys = [f"{part}.{suffix}" for part in parts]
            present = [key in self.state for key in keys]
            if suffix == "bias" and not any(present):
                continue
            if not all(present):
                raise ValueError(f"missing {[k for k, p in zip(keys, present, strict=True) if not p]} for {original}")
            value = torch.cat([self.state[key].detach() for key in keys])
            if swap:
                first, second = value.chunk(2, dim=0)
                value = torch.cat([second, first])
            self.put(f"{original}.{suffix}", value, keys)

    def tensor(self, original: str, key: str) -> None:
        self.put(original, self.state[key].detach(), [key])

    def put(self, original: str, value: torch.Tensor, keys: list[str]) -> None:
        if self.prefix + original in self.out:
            raise ValueError(f"two tensors for {original}")
        self.out[self.prefix + original] = value.clone().contiguous()
        self.used.update(keys)

    def finish(self) -> dict[str, torch.Tensor]:
        unmapped = sorted(set(self.state) - self.used)
        if unmapped:
            raise ValueError(f"no original name for {len(unmapped)} keys, e.g. {unmapped[:5]}")
        return self.out


def _embedders(w: _Writer, pairs: dict[str, str]) -> None:
    """Two-layer MLP embedders: original ``name.{0,2}`` or ``name.{in,out}_layer`` <- diffusers ``linear_1/2``."""
    for original, diffusers in pairs.items():
        first, second = ("mlp.0", "mlp.2") if original.endswith("_embedder") else ("in_layer", "out_layer")
        w.linear(f"{original}.{first}", f"{diffusers}.linear_1")
        w.linear(f"{original}.{second}", f"{diffusers}.linear_2")


def sd3_transformer_state_dict(transformer, prefix: str = SD3_PREFIX) -> dict[str, torch.Tensor]:
    """An ``SD3Transformer2DModel`` in the MMDiT layout of SD3 / SD3.5 single files."""
    config = transformer.config
    w = _Writer(transformer.state_dict(), prefix)
    w.tensor("pos_embed", "pos_embed.pos_embed")
    w.linear("x_embedder.proj", "pos_embed.proj")
    _embedders(w, {"t_embedder": "time_text_embed.timestep_embedder", "y_embedder": "time_text_embed.text_embedder"})
    w.linear("context_embedder", "context_embedder")
    last = config.num_layers - 1
    for i in range(config.num_layers):
        x, c, d = f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block.", f"transformer_blocks.{i}."
        w.linear(x + "attn.qkv", *(f"{d}attn.to_{p}" for p in "qkv"))
        w.linear(c + "attn.qkv", *(f"{d}attn.add_{p}_proj" for p in "qkv"))
        w.linear(x + "attn.proj", d + "attn.to_out.0")
        w.linear(x + "adaLN_modulation.1", d + "norm1.linear")
        w.linear(c + "adaLN_modulation.1", d + "norm1_context.linear", swap=i == last)  # pre-only: shift, scale
        w.linear(x + "mlp.fc1", d + "ff.net.0.proj")
        w.linear(x + "mlp.fc2", d + "ff.net.2")
        if i != last:  # the last context branch ends after its modulation
            w.linear(c + "attn.proj", d + "attn.to_add_out")
            w.linear(c + "mlp.fc1", d + "ff_context.net.0.proj")
            w.linear(c + "mlp.fc2", d + "ff_context.net.2")
        if config.qk_norm:
            for original, name in (("x_block.attn.ln_q", "attn.norm_q"), ("x_block.attn.ln_k", "attn.norm_k"),
                                   ("context_block.attn.ln_q", "attn.norm_added_q"),
                                   ("context_block.attn.ln_k", "attn.norm_added_k")):
                w.linear(f"joint_blocks.{i}.{original}", d + name)
        if i in config.dual_attention_layers:  # SD3.5 medium's second image self-attention
            w.linear(x + "attn2.qkv", *(f"{d}attn2.to_{p}" for p in "qkv"))
            w.linear(x + "attn2.proj", d + "attn2.to_out.0")
            if config.qk_norm:
                w.linear(x + "attn2.ln_q", d + "attn2.norm_q")
                w.linear(x + "attn2.ln_k", d + "attn2.norm_k")
    w.linear("final_layer.linear", "proj_out")
    w.linear("final_layer.adaLN_modulation.1", "norm_out.linear", swap=True)
    return w.finish()


def _hf_text_encoder(text_encoder, prefix: str, skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """An HF text encoder under ``prefix`` with its own key names (buffers such as ``position_ids`` left out, as
    recent transformers do)."""
    return {prefix + key: tensor.detach().clone().contiguous() for key, tensor in text_encoder.state_dict().items()
            if not key.endswith("position_ids") and key not in skip}


def sd3_state_dict(pipe) -> dict[str, torch.Tensor]:
    """A ``StableDiffusion3Pipeline`` as one original SD3 file: MMDiT, VAE, CLIP-L, CLIP-G (and T5 if present).

    CLIP-L's projection has no place in the layout (diffusers reads it as the identity), so it must be the
    identity here, or the file would not hold the pipeline.
    """
    projection = pipe.text_encoder.text_projection.weight
    if not torch.equal(projection, torch.eye(*projection.shape, dtype=projection.dtype)):
        raise ValueError("CLIP-L's text projection must be the identity: SD3 files do not store it")
    out = sd3_transformer_state_dict(pipe.transformer)
    out.update(_convert(pipe.vae.state_dict(), _vae_rules(pipe.vae.config), VAE_PREFIX))
    out.update(_hf_text_encoder(pipe.text_encoder, CLIP_L_PREFIX, skip=("text_projection.weight",)))
    out.update(_hf_text_encoder(pipe.text_encoder_2, CLIP_G_PREFIX))
    if getattr(pipe, "text_encoder_3", None) is not None:
        out.update(_hf_text_encoder(pipe.text_encoder_3, T5_PREFIX))
    return out


def flux_state_dict(transformer, prefix: str = "") -> dict[str, torch.Tensor]:
    """A ``FluxTransformer2DModel`` in Black Forest Labs' FLUX.1 layout (the whole file: the transformer only)."""
    config = transformer.config
    w = _Writer(transformer.state_dict(), prefix)
    embedders = {"time_in": "time_text_embed.timestep_embedder", "vector_in": "time_text_embed.text_embedder"}
    if config.guidance_embeds:  # FLUX.1-dev's distilled guidance; schnell has none
        embedders["guidance_in"] = "time_text_embed.guidance_embedder"
    _embedders(w, embedders)
    w.linear("txt_in", "context_embedder")
    w.linear("img_in", "x_embedder")
    for i in range(config.num_layers):
        b, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        w.linear(b + "img_mod.lin", d + "norm1.linear")
        w.linear(b + "txt_mod.lin", d + "norm1_context.linear")
        w.linear(b + "img_attn.qkv", *(f"{d}attn.to_{p}" for p in "qkv"))
        w.linear(b + "txt_attn.qkv", *(f"{d}attn.add_{p}_proj" for p in "qkv"))
        w.linear(b + "img_attn.norm.query_norm", d + "attn.norm_q")
        w.linear(b + "img_attn.norm.key_norm", d + "attn.norm_k")
        w.linear(b + "txt_attn.norm.query_norm", d + "attn.norm_added_q")
        w.linear(b + "txt_attn.norm.key_norm", d + "attn.norm_added_k")
        w.linear(b + "img_attn.proj", d + "attn.to_out.0")
        w.linear(b + "txt_attn.proj", d + "attn.to_add_out")
        w.linear(b + "img_mlp.0", d + "ff.net.0.proj")
        w.linear(b + "img_mlp.2", d + "ff.net.2")
        w.linear(b + "txt_mlp.0", d + "ff_context.net.0.proj")
        w.linear(b + "txt_mlp.2", d + "ff_context.net.2")
    for i in range(config.num_single_layers):
        b, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        w.linear(b + "modulation.lin", d + "norm.linear")
        w.linear(b + "linear1", *(f"{d}attn.to_{p}" for p in "qkv"), d + "proj_mlp")
        w.linear(b + "norm.query_norm", d + "attn.norm_q")
        w.linear(b + "norm.key_norm", d + "attn.norm_k")
        w.linear(b + "linear2", d + "proj_out")
    w.linear("final_layer.linear", "proj_out")
    w.linear("final_layer.adaLN_modulation.1", "norm_out.linear", swap=True)
    out = w.finish()
    # BFL names the RMS norms' weights "scale"
    return {key.replace("_norm.weight", "_norm.scale"): value for key, value in out.items()}
