"""Loading: models (hub ids, diffusers folders, single-file checkpoints, the built-in tiny model) and images.

The stages only need a ``StableDiffusionPipeline`` whose scheduler is configured as DDIM the way the reference
implementation does (scaled-linear betas 0.00085 -> 0.012, no sample clipping, ``set_alpha_to_one`` off). Loading
never unpickles a file unless the caller opts in: pickled checkpoints can run arbitrary code.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .errors import UsageError, first_line
from .images import image_digest, load_image  # noqa: F401 - part of the loading API
from .options import DEFAULT_MODEL

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# The reference's scheduler settings (method.md, "Reference behaviour worth knowing").
DDIM_OVERRIDES = {"clip_sample": False, "set_alpha_to_one": False}


# --------------------------------------------------------------------------------------------------- devices


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None`` picks CUDA when present, else the CPU; a named device must exist."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise UsageError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Precision of the frozen networks. Default: fp32 on CPU, fp16 on CUDA (leaves and DDIM math stay fp32)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


# --------------------------------------------------------------------------------------------------- models


def load_pipeline(
    model: str | os.PathLike = DEFAULT_MODEL,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    allow_pickle: bool = False,
    config: str | None = None,
) -> StableDiffusionPipeline:
    """Load an SD 1.x pipeline with the reference's DDIM scheduler, on ``device`` in ``dtype``.

    ``model`` is ``"tiny"`` (random weights built in code, for smoke runs: its output is noise), a local diffusers
    folder, a single-file checkpoint (``.safetensors``; ``.ckpt`` only with ``allow_pickle``), or a Hugging Face
    hub id (downloaded once into the hub cache). ``config`` names the diffusers folder or hub id whose component
    configs and tokenizer a single-file checkpoint is read with (default: diffusers infers it, which needs the
    network once).
    """
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    name = str(model)
    if name == "tiny":
        pipe = build_tiny_pipeline()
    elif name == "mini":
        pipe = _load_mini(allow_pickle)
    else:
        pipe = _load_from_disk_or_hub(name, allow_pickle=allow_pickle, config=config)
    pipe.scheduler = ddim_scheduler_for(pipe.scheduler.config)
    if pipe.scheduler.config.prediction_type != "epsilon":
        raise UsageError(
            f"model {name!r} predicts {pipe.scheduler.config.prediction_type!r}; only epsilon-prediction "
            "models (Stable Diffusion 1.x) are supported"
        )
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
        module.eval()
        module.to(device=device)
        if module.dtype != dtype:  # casting to the dtype a module already has only earns a diffusers warning
            module.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# Variants per sampling batch that the CLI should use in low-memory mode when no --batch-size is given (each variant
# is two UNet rows under classifier-free guidance).
LOW_MEMORY_BATCH_SIZE = 2


def configure_pipeline(
    pipe: StableDiffusionPipeline,
    *,
    low_memory: bool = False,
    compile: bool = False,
    channels_last: bool | None = None,
) -> StableDiffusionPipeline:
    """Speed and memory settings of the frozen networks, applied to ``pipe`` in place (and returned).

    - ``channels_last`` (default: on for CUDA, off on the CPU): NHWC layout for the UNet's and VAE's weights, the
      layout GPU convolution kernels run fastest in. The weights' values do not change (nor the cache keys).
    - ``low_memory``: VAE slicing (images encoded and decoded one at a time), VAE tiling (only acts on images larger
      than the VAE's own sample size, 512 px for SD), and UNet gradient checkpointing (the backward passes of text
      optimization and null-text inversion recompute activations instead of keeping them: about a third more time
      in those two stages). Results are identical up to tiling, which only larger images reach. ``False`` turns
      all three off again. The CLI should also sample in chunks of :data:`LOW_MEMORY_BATCH_SIZE` variants.
    - ``compile``: ``torch.compile`` the UNet in place (its default mode: "reduce-overhead" CUDA graphs suit
      neither the changing batch sizes of the stages nor their backward passes). The first call of each batch
      shape compiles (tens of seconds), so it pays off for long runs only. It cannot be undone.

    Deliberately not used: attention slicing (diffusers' default attention already runs PyTorch's SDPA, which never
    holds the whole attention matrix; slicing would hold slices of it: more memory, slower) and model CPU offload
    (every stage is UNet-bound, so the UNet stays on the GPU anyway; moving the 0.4 GB text encoder and VAE off it
    saves little, and accelerate's hooks move modules only when they run, while the stages read
    ``pipe.unet.device`` to place their tensors and to key the stage cache).
    """
    device = pipe.unet.device
    if channels_last is None:
        channels_last = device.type == "cuda"
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for module in (pipe.unet, pipe.vae):
        module.to(memory_format=memory_format)
    if low_memory:
        pipe.vae.enable_slicing()
        pipe.vae.enable_tiling()
        pipe.unet.enable_gradient_checkpointing()
    else:
        pipe.vae.disable_slicing()
        pipe.vae.disable_tiling()
        pipe.unet.disable_gradient_checkpointing()
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)  # backward passes compute input gradients only
    if compile:
        pipe.unet.compile()
    return pipe


def ddim_scheduler_for(config) -> DDIMScheduler:
    """A DDIM scheduler with the model's betas and the reference's clipping / final-alpha settings."""
    return DDIMScheduler.from_config(config, **DDIM_OVERRIDES)


def _load_from_disk_or_hub(name: str, *, allow_pickle: bool, config: str | None) -> StableDiffusionPipeline:
    path = Path(name).expanduser()
    no_safety = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    if path.is_file():
        if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
            raise UsageError(
                f"{name} is a pickle checkpoint, which can run arbitrary code when loaded; convert it to "
                ".safetensors or pass --allow-pickle if you trust it"
            )
        kwargs = {"config": config} if config else {}
        try:
            return StableDiffusionPipeline.from_single_file(str(path), **no_safety, **kwargs)
        except Exception as err:  # the single-file loader raises many types for unreadable files
            raise UsageError(f"could not read checkpoint {name}: {first_line(err)}") from err
    if path.is_dir():
        _require_safetensors_or_opt_in(path, allow_pickle)
        try:
            return StableDiffusionPipeline.from_pretrained(
                str(path), use_safetensors=None if allow_pickle else True, **no_safety
            )
        except Exception as err:
            raise UsageError(f"could not load diffusers folder {name}: {first_line(err)}") from err
    if _looks_like_path(name):
        raise UsageError(f"model path {name} does not exist")
    try:
        return StableDiffusionPipeline.from_pretrained(
            name, use_safetensors=None if allow_pickle else True, **no_safety
        )
    except Exception as err:
        raise UsageError(
            f"could not load model {name!r}: not a local file or folder, and the hub did not provide it "
            f"({first_line(err)}); check the id, connect once to download it, or pass a local path"
        ) from err


def _load_mini(allow_pickle: bool) -> StableDiffusionPipeline:
    """The trained miniature model shipped as package data (see ``nonrigid.mini``)."""
    from .mini.model import weights_dir

    folder = weights_dir()
    if not (folder / "model_index.json").is_file():
        raise UsageError(f"the miniature model is not in {folder}; train it with `nonrigid mini train --install`")
    return _load_from_disk_or_hub(str(folder), allow_pickle=allow_pickle, config=None)


def _require_safetensors_or_opt_in(folder: Path, allow_pickle: bool) -> None:
    unet = folder / "unet"
    if allow_pickle or not unet.is_dir():
        return
    if not any(unet.glob("*.safetensors")) and any(unet.glob("*.bin")):
        raise UsageError(
            f"{folder} holds only pickle (.bin) weights, which can run arbitrary code when loaded; "
            "pass --allow-pickle if you trust them"
        )


def _looks_like_path(name: str) -> bool:
    suffixes = (*PICKLE_SUFFIXES, ".safetensors")
    return name.startswith((".", "/", "~")) or name.count("/") != 1 or name.endswith(suffixes)


def build_tiny_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A tiny SD-1.x-shaped pipeline with random weights, built without any download.

    Same component classes and layout as SD 1.x (VAE downsampling by 8, cross-attention UNet, CLIP text encoder
    with 77 positions) at a few hundred thousand parameters. Its output is noise: it is for tests and smoke runs.
    The weights depend only on ``seed``; the global RNG is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=4,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=64,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=_TINY_VOCAB_SIZE,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                bos_token_id=_TINY_VOCAB_SIZE - 2,
                eos_token_id=_TINY_VOCAB_SIZE - 1,
                pad_token_id=_TINY_VOCAB_SIZE - 1,
            )
        )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, **DDIM_OVERRIDES
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_character_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _byte_characters() -> list[str]:
    """The 256 printable stand-ins CLIP's byte-level BPE uses for bytes (GPT-2's mapping)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    codes, extra = list(printable), 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for code in codes]


_TINY_VOCAB_SIZE = 2 * 256 + 2


def build_character_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer with no merges: every character is a token (enough for tests, no download)."""
    return build_clip_tokenizer(())


def build_clip_tokenizer(words: Sequence[str] = ()) -> CLIPTokenizer:
    """A CLIP byte-level BPE tokenizer whose merges make each of ``words`` a single token.

    Its base vocabulary is the 256 byte characters (alone and word-final), so any text still tokenizes; the
    merges build every given word left to right. A merge of one word can pre-empt another's (BPE applies the
    best-ranked pair first), so words that come out split are moved ahead and the merges rebuilt until each
    word is one token.
    """
    order = list(dict.fromkeys(words))
    for _ in range(len(order) + 1):
        tokenizer = _tokenizer_with_merges(order)
        split = [w for w in order if len(tokenizer(w, add_special_tokens=False).input_ids) != 1]
        if not split:
            return tokenizer
        order = split + [w for w in order if w not in split]
    raise ValueError(f"could not make these words single tokens: {split}")


def _tokenizer_with_merges(words: Sequence[str]) -> CLIPTokenizer:
    chars = _byte_characters()
    vocab = chars + [c + "</w>" for c in chars]
    merges: list[tuple[str, str]] = []
    for word in words:
        pieces = [*word[:-1], word[-1] + "</w>"]
        current = pieces[0]
        for piece in pieces[1:]:
            pair = (current, piece)
            current = current + piece
            if pair not in merges:
                merges.append(pair)
                vocab.append(current)
    vocab = [*dict.fromkeys(vocab), "<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
        Path(folder, "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        return CLIPTokenizer(
            str(Path(folder, "vocab.json")), str(Path(folder, "merges.txt")), model_max_length=77
        )


def model_fingerprint(pipe: StableDiffusionPipeline) -> str:
    """A short hash that changes when any network's weights (or their dtype) change.

    Hashes every tensor's name, shape and dtype and a strided sample of its values: any fine-tune or other
    checkpoint changes the sample, and it costs milliseconds even for SD's 1 B parameters.
    """
    digest = hashlib.sha256()
    for module_name in ("unet", "vae", "text_encoder"):
        for name, tensor in getattr(pipe, module_name).state_dict().items():
            flat = tensor.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 64)][:64].float().cpu().numpy()
            digest.update(f"{module_name}.{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(sample.tobytes())
    schedule = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}  # "_…" keys vary by run
    digest.update(json.dumps(schedule, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def latent_multiple(pipe: StableDiffusionPipeline) -> int:
    """Image sizes must be a multiple of this: the VAE's factor times the UNet's downsampling."""
    return pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
