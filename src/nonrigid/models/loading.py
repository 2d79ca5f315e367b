"""Loading models: hub ids, diffusers folders, single-file checkpoints, the built-in ``tiny`` and ``mini`` models.

The stages only need a ``StableDiffusionPipeline`` whose scheduler is configured as DDIM the way the reference
implementation does (scaled-linear betas 0.00085 -> 0.012, no sample clipping, ``set_alpha_to_one`` off). Loading
never unpickles a file unless the caller opts in: pickled checkpoints can run arbitrary code.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from ..errors import UsageError, first_line
from . import DEFAULT_MODEL
from .sd import ddim_scheduler_for
from .tiny import build_tiny_pipeline

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}



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
        raise UsageError(f"device {str(device)!r} was asked for but no CUDA GPU is available; use the CPU")
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
      all three off again. (Callers short of memory also sample fewer variants per batch.)
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


def _load_from_disk_or_hub(name: str, *, allow_pickle: bool, config: str | None) -> StableDiffusionPipeline:
    path = Path(name).expanduser()
    no_safety = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    if path.is_file():
        if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
            raise UsageError(
                f"{name} is a pickle checkpoint, which can run arbitrary code when loaded; convert it to "
                ".safetensors or pass allow_pickle=True if you trust it"
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
    folder = mini_weights_dir()
    if not (folder / "model_index.json").is_file():
        raise UsageError(f"the miniature model is not in {folder}; train it with `nonrigid mini train --install`")
    return _load_from_disk_or_hub(str(folder), allow_pickle=allow_pickle, config=None)


def mini_weights_dir() -> Path:
    """Where the miniature model's trained weights live: package data of ``nonrigid.mini``."""
    return Path(str(resources.files("nonrigid.mini") / "weights"))


def _require_safetensors_or_opt_in(folder: Path, allow_pickle: bool) -> None:
    unet = folder / "unet"
    if allow_pickle or not unet.is_dir():
        return
    if not any(unet.glob("*.safetensors")) and any(unet.glob("*.bin")):
        raise UsageError(
            f"{folder} holds only pickle (.bin) weights, which can run arbitrary code when loaded; "
            "pass allow_pickle=True if you trust them"
        )


def _looks_like_path(name: str) -> bool:
    suffixes = (*PICKLE_SUFFIXES, ".safetensors")
    return name.startswith((".", "/", "~")) or name.count("/") != 1 or name.endswith(suffixes)


def describe_device(pipe) -> dict[str, str]:
    """Device and precision of the denoiser, for the record."""
    device = pipe.unet.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": str(device), "device_name": name, "dtype": str(pipe.unet.dtype).replace("torch.", "")}
