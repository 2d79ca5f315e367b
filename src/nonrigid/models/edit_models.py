"""What the instruction editors' pipelines compute, as small functions a model family can call: FLUX.1 Kontext [dev]
(``FluxKontextPipeline``) and Qwen-Image-Edit / -2509 / -2511 (``QwenImageEditPipeline``,
``QwenImageEditPlusPipeline``), as diffusers 0.42 runs them. ``tests/test_tiny_edit_models.py`` checks that a loop
written with these functions reproduces each pipeline's output from the same initial latents.

Both models are rectified-flow transformers over packed 2x2 patches of 16-channel latents that *edit by
attending to the reference image*: the reference's clean latents are packed the same way and appended to the noisy
tokens, the transformer sees both, and only the noisy tokens' output is the velocity. They differ in everything
around that:

- **Kontext** (FLUX.1-dev's architecture): T5 tokens + CLIP pooled text conditioning, *distilled* guidance fed to
  the transformer (``guidance``, the pipeline's ``guidance_scale``), no unconditional branch (the pipeline also
  offers true CFG with a negative prompt, off by default). The reference tokens are told apart by their position
  ids: (1, row, col) instead of the noisy tokens' (0, row, col). Without a reference the computation is exactly
  FLUX.1-dev's text-to-image one.
- **Qwen-Image-Edit**: the prompt is encoded *together with the reference image* by Qwen2.5-VL (a chat template
  whose user turn holds the image; the system prompt's 64 tokens are dropped), *true* CFG against a negative
  prompt with the combined velocity rescaled to the conditional one's norm per token, 3-axis rope whose frame axis
  numbers the images (0 the noisy latents, 1.. the references), a causal 3D VAE whose latents are normalised per
  channel. The Plus pipeline (2509 / 2511) takes several references, labelled "Picture i:" in the prompt, and
  shows the VL encoder smaller copies (about 384x384) than the VAE (about 1024x1024).

Conventions: latents at this seam are (B, 16, h, w) (Qwen's frame axis is added and removed inside the VAE
functions); timesteps are the schedulers' (sigma x 1000); velocities are (B, 16, h, w). Functions take the pipeline
(or the one component they use) so that they follow its dtype and device and can be handed a replacement network
(a family's ``denoiser``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import FluxKontextPipeline, QwenImageEditPlusPipeline
from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

# ---------------------------------------------------------------------------------------------------------------
# shared: packing, position ids, the sigma schedule, the Euler step


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): one token per 2x2 patch, row-major, features (channel, dy, dx); the
    layout of both pipelines' ``_pack_latents``."""
    batch, channels, height, width = latents.shape
    patches = latents.reshape(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack` for (h, w) latents."""
    batch, _, features = tokens.shape
    patches = tokens.reshape(batch, height // 2, width // 2, features // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(batch, features // 4, height, width)


def image_position_ids(rows: int, cols: int, index: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """FLUX's (rows * cols, 3) position ids of a packed image: (index, row, col) per token, row-major. Kontext's
    noisy latents are index 0, its reference image index 1."""
    ids = torch.zeros(rows, cols, 3)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3).to(device=device, dtype=dtype)


def dynamic_shift_mu(image_seq_len: int, config) -> float:
    """Both pipelines' ``calculate_shift``: mu linear in the number of *noisy* image tokens (the reference tokens
    do not count), through (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift), not clamped."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    slope = (max_shift - base_shift) / (max_len - base_len)
    return image_seq_len * slope + (base_shift - slope * base_len)


@dataclass
class FlowSchedule:
    """Sampling timesteps (sigma x 1000, float32, noisiest first) and the N + 1 sigmas they walk, ending at 0."""

    timesteps: torch.Tensor
    sigmas: torch.Tensor


def flow_schedule(config, num_steps: int, image_seq_len: int) -> FlowSchedule:
    """The schedule each pipeline sets: sigmas ``linspace(1, 1/N, N)``, shifted by the scheduler config's time
    shift with ``mu = dynamic_shift_mu(image_seq_len)`` (FLUX: ``exp(mu) / (exp(mu) + 1/s - 1)``; Qwen the same,
    ``time_shift_type`` "exponential"), then, with ``shift_terminal`` (Qwen: 0.02), stretched so that the last
    sigma is ``shift_terminal``; a final sigma 0 is appended. Computed in float32 in the order
    ``FlowMatchEulerDiscreteScheduler.set_timesteps`` uses, so the values are bit-identical to its. One step with
    ``shift_terminal`` is refused: its single sigma 1 cannot be stretched (0 / 0, NaN in diffusers)."""
    if not config.get("use_dynamic_shifting", False):
        raise ValueError("both edit pipelines' schedulers use dynamic shifting; this config does not")
    if any(config.get(key, False) for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                                              "invert_sigmas", "stochastic_sampling")):
        raise ValueError("sigma conversions, inverted sigmas and stochastic sampling are not reproduced here")
    if config.get("shift_terminal") and num_steps < 2:
        raise ValueError("a schedule stretched to shift_terminal needs more than one step (diffusers gives NaN)")
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps).astype(np.float32)
    mu = dynamic_shift_mu(image_seq_len, config)
    if config.get("time_shift_type", "exponential") == "exponential":
        sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
    else:  # "linear"
        sigmas = mu / (mu + (1 / sigmas - 1) ** 1.0)
    if config.get("shift_terminal"):
        one_minus = 1 - sigmas
        sigmas = 1 - one_minus / (one_minus[-1] / (1 - config["shift_terminal"]))
    sigmas_t = torch.from_numpy(sigmas).to(torch.float32)
    timesteps = sigmas_t * config.get("num_train_timesteps", 1000)
    return FlowSchedule(timesteps, torch.cat([sigmas_t, torch.zeros(1)]))


def euler_step(latents: torch.Tensor, velocity: torch.Tensor, schedule: FlowSchedule, index: int) -> torch.Tensor:
    """``x + (sigma_{i+1} - sigma_i) v`` in float32, returned in the velocity's dtype (the scheduler's ``step``)."""
    step = schedule.sigmas[index + 1] - schedule.sigmas[index]
    return (latents.float() + step.to(latents.device) * velocity).to(velocity.dtype)


def _timestep_input(timestep, batch: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The transformers' time input as both pipelines form it: the scheduler timestep, expanded to the batch, in the
    latents' dtype, divided by 1000."""
    t = torch.as_tensor(timestep, dtype=torch.float32, device=device).reshape(-1)
    return (t.expand(batch) if t.numel() == 1 else t).to(dtype) / 1000


# ---------------------------------------------------------------------------------------------------------------
# FLUX.1 Kontext [dev]

KONTEXT_MAX_AREA = 1024**2  # the pipeline's default ``max_area``
KONTEXT_MAX_SEQUENCE_LENGTH = 512  # T5 tokens, the pipeline's default (and maximum)


def kontext_output_size(height: int, width: int, max_area: int = KONTEXT_MAX_AREA, multiple: int = 16
                        ) -> tuple[int, int]:
    """The generated image's (height, width): the requested aspect ratio scaled to ``max_area`` pixels, each side
    floored to ``multiple`` (the VAE's 8 x the 2x2 packing). Requested sizes default to 1024x1024 in the pipeline
    (``default_sample_size`` x 8), *not* to the reference's size: pass the reference's aspect to keep it."""
    aspect = width / height
    out_width, out_height = round((max_area * aspect) ** 0.5), round((max_area / aspect) ** 0.5)
    return out_height // multiple * multiple, out_width // multiple * multiple


def kontext_reference_size(image_height: int, image_width: int, auto_resize: bool = True, multiple: int = 16
                           ) -> tuple[int, int]:
    """The (height, width) the reference image is resized to: its size floored to ``multiple``, or with
    ``auto_resize`` (the pipeline's default) the preferred Kontext resolution (672x1568 .. 1568x672, about 1 MP)
    nearest its aspect ratio."""
    height, width = image_height - image_height % multiple, image_width - image_width % multiple
    if auto_resize:
        aspect = width / height
        _, width, height = min((abs(aspect - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    return height // multiple * multiple, width // multiple * multiple


def kontext_preprocess(pipe: FluxKontextPipeline, image: PIL.Image.Image, auto_resize: bool = True
                       ) -> torch.Tensor:
    """The reference image as the pipeline feeds it to the VAE: resized (PIL, Lanczos) to
    :func:`kontext_reference_size`, as (1, 3, H, W) in [-1, 1]."""
    height, width = kontext_reference_size(image.height, image.width, auto_resize, pipe.vae_scale_factor * 2)
    resized = pipe.image_processor.resize(image, height, width)
    return pipe.image_processor.preprocess(resized, height, width)


def kontext_encode_image(vae, pixels: torch.Tensor) -> torch.Tensor:
    """FLUX VAE latents (B, 16, h, w) of images in [-1, 1]: the posterior's mode, shifted and scaled."""
    moments = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
    return (moments.mode() - vae.config.shift_factor) * vae.config.scaling_factor


def kontext_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] from (B, 16, h, w) latents: the inverse scaling, then the decoder."""
    latents = latents / vae.config.scaling_factor + vae.config.shift_factor
    return vae.decode(latents.to(vae.dtype), return_dict=False)[0]


@dataclass
class KontextConditioning:
    """What the Kontext transformer is given besides the noisy latents.

    ``tokens``: T5's states (B, 512, 4096 for the real model); ``pooled``: CLIP's pooled output (B, 768);
    ``text_ids``: zeros (512, 3); ``reference``: the packed reference latents (B, N_ref, 64) or None for text-to-image;
    ``reference_ids``: their position ids (N_ref, 3), first coordinate 1.
    """

    tokens: torch.Tensor
    pooled: torch.Tensor
    text_ids: torch.Tensor
    reference: torch.Tensor | None = None
    reference_ids: torch.Tensor | None = None


def kontext_encode_prompt(pipe: FluxKontextPipeline, prompt: str | list[str],
                          max_sequence_length: int = KONTEXT_MAX_SEQUENCE_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
    """(T5 tokens, CLIP pooled) as FLUX encodes a prompt: T5 over ``max_sequence_length`` padded tokens (its last
    hidden state), CLIP over its 77 padded tokens (its pooled output); both truncate longer prompts."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    t5_ids = pipe.tokenizer_2(prompts, padding="max_length", max_length=max_sequence_length, truncation=True,
                              return_tensors="pt").input_ids
    tokens = pipe.text_encoder_2(t5_ids.to(pipe.text_encoder_2.device), output_hidden_states=False)[0]
    clip_ids = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer_max_length, truncation=True,
                              return_tensors="pt").input_ids
    pooled = pipe.text_encoder(clip_ids.to(pipe.text_encoder.device), output_hidden_states=False).pooler_output
    return tokens.to(pipe.text_encoder_2.dtype), pooled.to(pipe.text_encoder.dtype)


def kontext_conditioning(pipe: FluxKontextPipeline, prompt: str | list[str], image: PIL.Image.Image | None = None,
                         auto_resize: bool = True, max_sequence_length: int = KONTEXT_MAX_SEQUENCE_LENGTH
                         ) -> KontextConditioning:
    """The prompt's encoding and, given an image, its packed latents and ids (the reference is resized with
    :func:`kontext_preprocess`, encoded in the T5 encoder's dtype as the pipeline does, and repeated per prompt)."""
    tokens, pooled = kontext_encode_prompt(pipe, prompt, max_sequence_length)
    text_ids = torch.zeros(tokens.shape[1], 3, device=tokens.device, dtype=tokens.dtype)
    if image is None:
        return KontextConditioning(tokens, pooled, text_ids)
    pixels = kontext_preprocess(pipe, image, auto_resize).to(device=tokens.device, dtype=tokens.dtype)
    latents = kontext_encode_image(pipe.vae, pixels).to(tokens.dtype)
    latents = latents.expand(tokens.shape[0], -1, -1, -1)
    rows, cols = latents.shape[-2] // 2, latents.shape[-1] // 2
    return KontextConditioning(tokens, pooled, text_ids, pack(latents),
                               image_position_ids(rows, cols, 1, tokens.dtype, tokens.device))


def kontext_velocity(transformer, latents: torch.Tensor, timestep, cond: KontextConditioning,
                     guidance: float | torch.Tensor | None = 3.5) -> torch.Tensor:
    """The velocity for (B, 16, h, w) latents at ``timestep``: the packed latents, followed by the packed reference,
    through the transformer with their ids (noisy (0, row, col), reference (1, row, col)), the distilled
    ``guidance`` embedded (one value, or one per row; ignored by a transformer without a guidance embedding), the
    output cut to the noisy tokens and unpacked."""
    batch, _, height, width = latents.shape
    dtype, device = transformer.dtype, latents.device
    hidden = pack(latents.to(dtype))
    ids = image_position_ids(height // 2, width // 2, 0, dtype, device)
    if cond.reference is not None:
        hidden = torch.cat([hidden, cond.reference.to(dtype)], dim=1)
        ids = torch.cat([ids, cond.reference_ids.to(dtype)], dim=0)
    embedded = None
    if transformer.config.guidance_embeds:
        embedded = torch.as_tensor(guidance, dtype=torch.float32).reshape(-1).expand(batch).to(device)
    out = transformer(hidden_states=hidden, timestep=_timestep_input(timestep, batch, dtype, device),
                      guidance=embedded, pooled_projections=cond.pooled.to(dtype),
                      encoder_hidden_states=cond.tokens.to(dtype), txt_ids=cond.text_ids.to(dtype), img_ids=ids,
                      return_dict=False)[0]
    return unpack(out[:, : (height // 2) * (width // 2)], height, width)


def true_cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain classifier-free guidance, ``uncond + scale (cond - uncond)``: Kontext's optional ``true_cfg_scale``
    with a negative prompt (the pipeline applies it only for scale > 1)."""
    return uncond + scale * (cond - uncond)


# ---------------------------------------------------------------------------------------------------------------
# Qwen-Image-Edit, -2509, -2511

QWEN_SYSTEM_PROMPT = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n"
)
# Qwen-Image-Edit: the image between vision markers, then the instruction
QWEN_EDIT_TEMPLATE = QWEN_SYSTEM_PROMPT + (
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n<|im_start|>assistant\n")
# Plus (2509, 2511): "Picture i: <image>" per reference, then the instruction
QWEN_EDIT_PLUS_TEMPLATE = QWEN_SYSTEM_PROMPT + "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
QWEN_PLUS_IMAGE_LABEL = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"
QWEN_DROP_TOKENS = 64  # the system turn and "<|im_start|>user\n", dropped from the encoder's output
QWEN_NEGATIVE_PROMPT = " "  # the model cards' negative prompt (the pipelines' own default is None: no CFG)
QWEN_TRUE_CFG_SCALE = 4.0  # the pipelines' default and the model cards'
QWEN_VAE_IMAGE_AREA = 1024 * 1024  # references are encoded by the VAE at about this many pixels
QWEN_PLUS_CONDITION_AREA = 384 * 384  # and shown to the VL encoder at about this many (Plus only)


def qwen_dimensions(area: int, aspect: float) -> tuple[int, int]:
    """``calculate_dimensions``: the (width, height) of about ``area`` pixels at ``aspect`` (width / height), each
    rounded to a multiple of 32."""
    width = math.sqrt(area * aspect)
    height = width / aspect
    return round(width / 32) * 32, round(height / 32) * 32


@dataclass
class QwenEditSizes:
    """The sizes a Qwen edit pipeline works at, as (width, height) pairs: ``vae``: each reference as the VAE
    encodes it; ``condition``: each reference as the VL encoder sees it; ``output``: the generated image."""

    vae: list[tuple[int, int]]
    condition: list[tuple[int, int]]
    output: tuple[int, int]


def qwen_edit_sizes(image_sizes: Sequence[tuple[int, int]], plus: bool, height: int | None = None,
                    width: int | None = None, multiple: int = 16) -> QwenEditSizes:
    """How the pipelines size things from the references' (width, height): every reference is resized to about
    1 MP at its own aspect for the VAE (Plus) or the (single) reference is (Edit); the VL encoder sees that same
    1 MP copy (Edit) or a copy of about 384x384 (Plus). The output defaults to the 1 MP size of the *first*
    reference (Edit) or of the *last* one (Plus), and a requested size is floored to ``multiple``."""
    vae = [qwen_dimensions(QWEN_VAE_IMAGE_AREA, w / h) for w, h in image_sizes]
    condition = [qwen_dimensions(QWEN_PLUS_CONDITION_AREA, w / h) for w, h in image_sizes] if plus else vae
    default_width, default_height = vae[-1] if plus else vae[0]
    out_width, out_height = width or default_width, height or default_height
    return QwenEditSizes(vae, condition, (out_width // multiple * multiple, out_height // multiple * multiple))


@dataclass
class QwenPrompt:
    """The VL encoder's last hidden states for the templated prompt with its image(s), from the user turn on
    (B, L, 3584 for the real model), and their mask (B, L), None when every token is valid (a single prompt):
    the pipelines pass None then, and attention without a mask is what they compute."""

    embeds: torch.Tensor
    mask: torch.Tensor | None


@dataclass
class QwenReference:
    """The references' packed latents, concatenated along the sequence (B, sum N_i, 64), and each one's token grid
    (1, h_i / 2, w_i / 2): the transformer's rope numbers them as frames 1, 2, ... after the noisy latents' frame 0."""

    latents: torch.Tensor
    shapes: list[tuple[int, int, int]]


@dataclass
class QwenEditConditioning:
    """Everything a Qwen edit's denoising loop needs: the prompt's and (for true CFG) the negative prompt's
    encodings, both made with the same reference images, and the references' latents."""

    prompt: QwenPrompt
    negative: QwenPrompt | None
    reference: QwenReference


def qwen_prompt_text(prompt: str, num_images: int, plus: bool) -> str:
    """The chat text the VL encoder reads: Edit puts its one image in the user turn's template; Plus prefixes
    the instruction with "Picture 1: <image>Picture 2: <image>..."."""
    if not plus:
        return QWEN_EDIT_TEMPLATE.format(prompt)
    labels = "".join(QWEN_PLUS_IMAGE_LABEL.format(i + 1) for i in range(num_images))
    return QWEN_EDIT_PLUS_TEMPLATE.format(labels + prompt)


def qwen_encode_prompt(pipe, prompt: str | list[str], images: list[PIL.Image.Image], plus: bool,
                       with_3d_positions: bool = False) -> QwenPrompt:
    """The prompt encoded with its images by Qwen2.5-VL: the processor expands each ``<|image_pad|>`` to one token
    per merged 28x28 patch and prepares the patches, the model's last hidden states are kept for the valid
    tokens, the first 64 (the system turn) dropped, and the prompts padded to a common length.

    ``with_3d_positions``: the processor's ``mm_token_type_ids`` are passed to the model, which needs them (since
    transformers 5.15) to give the image tokens Qwen2.5-VL's 3D rope positions, as in training. diffusers 0.42's
    edit pipelines do not pass them (diffusers issue #14194), so the image tokens get sequential positions;
    False reproduces the pipelines.
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    texts = [qwen_prompt_text(p, len(images), plus) for p in prompts]
    encoder = pipe.text_encoder
    inputs = pipe.processor(text=texts, images=images, padding=True, return_tensors="pt").to(encoder.device)
    extra = {"mm_token_type_ids": inputs["mm_token_type_ids"]} if with_3d_positions else {}
    outputs = encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                      pixel_values=inputs.get("pixel_values"), image_grid_thw=inputs.get("image_grid_thw"),
                      output_hidden_states=True, **extra)
    hidden, valid = outputs.hidden_states[-1], inputs["attention_mask"].bool()
    kept = [states[mask][QWEN_DROP_TOKENS:] for states, mask in zip(hidden, valid, strict=True)]
    length = max(len(states) for states in kept)
    embeds = torch.stack([torch.cat([s, s.new_zeros(length - len(s), s.shape[1])]) for s in kept])
    mask = torch.stack([torch.arange(length, device=embeds.device) < len(s) for s in kept]).long()
    return QwenPrompt(embeds.to(encoder.dtype), None if mask.all() else mask)


def qwen_encode_image(vae, pixels: torch.Tensor) -> torch.Tensor:
    """Qwen VAE latents (B, 16, h, w) of images (B, 3, H, W) in [-1, 1]: the causal 3D VAE sees a one-frame video
    (B, 3, 1, H, W); its posterior's mode is normalised per channel, ``(z - latents_mean) / latents_std``."""
    latents = vae.encode(pixels.unsqueeze(2).to(device=vae.device, dtype=vae.dtype)).latent_dist.mode()
    mean, std = _qwen_latent_stats(vae, latents)
    return ((latents - mean) / std)[:, :, 0]


def qwen_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] from normalised (B, 16, h, w) latents: de-normalised as the pipelines do it
    (dividing by 1 / std, which rounds differently from multiplying by std), decoded as one frame."""
    latents = latents.unsqueeze(2).to(vae.dtype)
    mean, std = _qwen_latent_stats(vae, latents)
    return vae.decode(latents / (1.0 / std) + mean, return_dict=False)[0][:, :, 0]


def _qwen_latent_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(like.device, like.dtype)
    return mean, torch.tensor(vae.config.latents_std).view(shape).to(like.device, like.dtype)


def qwen_reference(pipe, images: list[PIL.Image.Image], sizes: QwenEditSizes, batch: int = 1) -> QwenReference:
    """The references' latents as the pipelines make them: each image resized (PIL, Lanczos) to its VAE size,
    encoded in the text encoder's dtype, packed, repeated per prompt, concatenated in order."""
    processor, dtype = pipe.image_processor, pipe.text_encoder.dtype
    packed, shapes = [], []
    for image, (width, height) in zip(images, sizes.vae, strict=True):
        pixels = processor.preprocess(processor.resize(image, height, width), height, width)
        latents = qwen_encode_image(pipe.vae, pixels.to(device=pipe.vae.device, dtype=dtype)).to(dtype)
        packed.append(pack(latents.expand(batch, -1, -1, -1)))
        shapes.append((1, latents.shape[-2] // 2, latents.shape[-1] // 2))
    return QwenReference(torch.cat(packed, dim=1), shapes)


def qwen_edit_conditioning(pipe, prompt: str | list[str], image: PIL.Image.Image | list[PIL.Image.Image],
                           negative_prompt: str | None = QWEN_NEGATIVE_PROMPT, with_3d_positions: bool = False
                           ) -> QwenEditConditioning:
    """The prompt's (and the negative prompt's) encoding with the reference image(s), and the references'
    latents, for ``QwenImageEditPipeline`` (one image: a list uses its first) or ``QwenImageEditPlusPipeline``
    (a list of images). ``negative_prompt`` None: no true CFG."""
    plus = isinstance(pipe, QwenImageEditPlusPipeline)
    images = list(image) if isinstance(image, (list, tuple)) else [image]
    images = images if plus else images[:1]
    sizes = qwen_edit_sizes([im.size for im in images], plus)
    shown = [pipe.image_processor.resize(im, h, w) for im, (w, h) in zip(images, sizes.condition, strict=True)]
    encoded = qwen_encode_prompt(pipe, prompt, shown, plus, with_3d_positions)
    negative = None
    if negative_prompt is not None:
        negative = qwen_encode_prompt(pipe, negative_prompt, shown, plus, with_3d_positions)
    return QwenEditConditioning(encoded, negative, qwen_reference(pipe, images, sizes, encoded.embeds.shape[0]))


def qwen_velocity(transformer, latents: torch.Tensor, timestep, prompt: QwenPrompt, reference: QwenReference
                  ) -> torch.Tensor:
    """The velocity for (B, 16, h, w) latents at ``timestep`` under one prompt encoding: the packed latents
    followed by the packed references, the image grids for the rope (frame 0 the latents, then each reference),
    the output cut to the noisy tokens and unpacked. (A 2511 transformer, ``zero_cond_t``, modulates the
    reference tokens as at timestep 0 by itself, from those grids.)"""
    batch, _, height, width = latents.shape
    dtype, device = transformer.dtype, latents.device
    hidden = torch.cat([pack(latents.to(dtype)), reference.latents.to(dtype)], dim=1)
    shapes = [[(1, height // 2, width // 2), *reference.shapes]] * batch
    mask = None if prompt.mask is None else prompt.mask.to(device)
    out = transformer(hidden_states=hidden, timestep=_timestep_input(timestep, batch, dtype, device),
                      guidance=None, encoder_hidden_states_mask=mask, encoder_hidden_states=prompt.embeds.to(dtype),
                      img_shapes=shapes, return_dict=False)[0]
    return unpack(out[:, : (height // 2) * (width // 2)], height, width)


def qwen_true_cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """The pipelines' true CFG: ``uncond + scale (cond - uncond)``, then rescaled so that each *token* (a 2x2
    patch, its 64 packed features) keeps the conditional velocity's norm. The norm is taken in the packed layout;
    a per-pixel norm over the 16 channels would be a different guidance."""
    height, width = cond.shape[-2:]
    cond_tokens, uncond_tokens = pack(cond), pack(uncond)
    combined = uncond_tokens + scale * (cond_tokens - uncond_tokens)
    cond_norm = torch.norm(cond_tokens, dim=-1, keepdim=True)
    combined_norm = torch.norm(combined, dim=-1, keepdim=True)
    return unpack(combined * (cond_norm / combined_norm), height, width)


def qwen_guided_velocity(transformer, latents: torch.Tensor, timestep, cond: QwenEditConditioning,
                         true_cfg_scale: float = QWEN_TRUE_CFG_SCALE) -> torch.Tensor:
    """The velocity a Qwen edit pipeline steps with: the conditional one, combined by :func:`qwen_true_cfg` with
    the negative prompt's when there is one and ``true_cfg_scale > 1`` (otherwise the pipelines skip the second
    pass)."""
    velocity = qwen_velocity(transformer, latents, timestep, cond.prompt, cond.reference)
    if cond.negative is None or true_cfg_scale <= 1:
        return velocity
    negative = qwen_velocity(transformer, latents, timestep, cond.negative, cond.reference)
    return qwen_true_cfg(velocity, negative, true_cfg_scale)
