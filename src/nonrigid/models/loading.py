"""Loading models: hub ids, diffusers folders, single-file checkpoints, the built-in ``tiny`` and miniature models.

The family is detected from the model itself: a diffusers folder or hub id by its ``model_index.json`` pipeline
class, a single file by its ``--config`` (``config``) folder's class or else by its keys (diffusers'
``infer_diffusers_model_type``). Supported: ``StableDiffusionPipeline`` (SD 1.x and 2.x, epsilon or v prediction),
``StableDiffusionXLPipeline`` (SDXL base and fine-tunes; no refiner), ``StableDiffusion3Pipeline`` (SD3, SD3.5
medium and large; T5 optional) and ``FluxPipeline`` (FLUX.1 dev and schnell), each from hub ids, diffusers folders
and single files. A FLUX.1 single file (Black Forest Labs' layout) holds the transformer only: the VAE, text
encoders, tokenizers and scheduler come from ``config``, or from the hub repository diffusers infers from the file
(``black-forest-labs/FLUX.1-dev``, gated: accept its licence and log in once); an SD3 file's missing CLIPs or T5
likewise. Whatever the model's own scheduler (PNDM, Euler, ...), SD and SDXL stages get DDIM
built from its config (betas, prediction type, timestep spacing, offset), with the reference's settings: no sample
clipping, ``set_alpha_to_one`` off; SD3 keeps its flow-matching schedule (its shift). Loading never unpickles a file
unless the caller opts in: pickled checkpoints can run arbitrary code.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import torch
from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

from ..errors import UsageError, first_line
from . import DEFAULT_MODEL, check_model_name
from . import single_file as sf
from .family import ModelFamily
from .hub import component_class, hub_access, hub_class_name, index_class, index_has, model_index
from .qwen_edit import QwenImageEdit
from .registry import build_tiny_pipeline, family_for_class, family_for_file_type, family_of, pipeline_class, supported
from .registry import tiny_model_names as tiny_model_names

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


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, family: ModelFamily | None = None
                  ) -> torch.dtype:
    """Precision of the frozen networks. Default: fp32 on CPU; on CUDA the family's (``cuda_dtype``: fp16, bf16 for
    the instruction editors, as their model cards run them). Leaves and DDIM math stay fp32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.float16 if family is None else family.cuda_dtype
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


# --------------------------------------------------------------------------------------------------- models


def load_model(
    model: str | os.PathLike = DEFAULT_MODEL,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    allow_pickle: bool = False,
    config: str | None = None,
    t5: bool = True,
) -> ModelFamily:
    """Load a model of any supported family on ``device`` in ``dtype``, as its :class:`ModelFamily` (what every
    stage and method takes; its diffusers pipeline is ``.pipe``).

    ``model`` is a built-in name (``"tiny"``, ``"tiny-sdxl"``, ... : random weights built in code, for smoke runs,
    their output is noise; ``"mini"``, ``"mini-v"``, ``"mini-xl"``, ``"mini-flow"``: the miniature world's trained
    models), a local diffusers folder, a single-file checkpoint (``.safetensors``; ``.ckpt`` only with
    ``allow_pickle``), or a Hugging Face hub id (downloaded once into the hub cache). The family is detected from
    the model itself (a folder's or hub id's ``model_index.json`` class, a single file's ``config`` or keys).
    ``config`` names the diffusers folder or hub id whose pipeline class, component configs and tokenizers a
    single-file checkpoint is read with (default: inferred from its keys, and diffusers fetches the matching
    configs, which needs the network once). ``t5=False`` loads an SD3 model without its T5 text encoder (about
    4.7 B parameters, over 9 GB in half precision, saved; its part of the token embeddings is zeros, as diffusers
    does), and a folder saved without T5 loads without it anyway. SD and SDXL get DDIM built from their scheduler
    config with the reference's settings; flow models keep their own schedule.
    """
    device = resolve_device(device)
    resolve_dtype(dtype, device)  # an unknown dtype is refused before anything loads
    name = str(model)
    if name in tiny_model_names():
        pipe = build_tiny_pipeline(kind=name)
    elif name in MINI_MODELS:
        pipe = MINI_MODELS[name](allow_pickle)
    else:
        pipe = _load_from_disk_or_hub(name, allow_pickle=allow_pickle, config=config, t5=t5)
    family = family_of(pipe)
    dtype = resolve_dtype(dtype, device, family)
    family.adopt_scheduler(name)  # SD: DDIM with the reference's settings; SD3: the model's own flow schedule
    for module_name, module in family.modules().items():
        module.requires_grad_(False)
        module.eval()
        module.to(device=device)
        wanted = family.vae_dtype(dtype) if module_name == "vae" else dtype
        if module.dtype != wanted:  # casting to the dtype a module already has only earns a diffusers warning
            module.to(dtype=wanted)
        if device.type == "cpu":
            _align_storage(module)
    pipe.set_progress_bar_config(disable=True)
    return family


def load_pipeline(
    model: str | os.PathLike = DEFAULT_MODEL,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    allow_pickle: bool = False,
    config: str | None = None,
    t5: bool = True,
):
    """:func:`load_model`'s diffusers pipeline: for code that wants the pipeline itself (the public functions
    take either and resolve the family once)."""
    return load_model(model, device, dtype, allow_pickle=allow_pickle, config=config, t5=t5).pipe


def _align_storage(module: torch.nn.Module, alignment: int = 64) -> None:
    """Give weights read in place from a file (memory-mapped, at the file's offsets) storage of their own.

    CPU kernels' results depend on their operands' alignment: the same SD3 weights mapped from a diffusers folder
    and from a single file gave transformer outputs 3.6e-7 apart. Aligned copies make the output depend on the
    values alone, wherever they were read from (CUDA copies every weight to the device anyway).
    """
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.device.type == "cpu" and tensor.data_ptr() % alignment:
            tensor.data = tensor.data.clone()


def configure_model(
    model: ModelFamily,
    *,
    low_memory: bool = False,
    compile: bool = False,
    cuda_graphs: bool = False,
    channels_last: bool | None = None,
) -> ModelFamily:
    """Speed and memory settings of the frozen networks, applied to ``model``'s pipeline in place (and returned).

    - ``channels_last`` (default: on for CUDA, off on the CPU; never for a family without
      ``channels_last_layout``, Qwen-Image-Edit's 3-D VAE): NHWC layout for the UNet's and VAE's weights, the
      layout GPU convolution kernels run fastest in. The weights' values do not change (nor the cache keys).
    - ``low_memory``: VAE slicing (images encoded and decoded one at a time), VAE tiling (only acts on images larger
      than the VAE's own sample size, 512 px for SD), and UNet gradient checkpointing (the backward passes of text
      optimization and null-text inversion recompute activations instead of keeping them: about a third more time
      in those two stages). Results are identical up to tiling, which only larger images reach. ``False`` turns
      all three off again. (Callers short of memory also sample fewer variants per batch.) On the flow families
      (SD3, FLUX: ``ModelFamily.parks_text_encoders``) it also parks the text encoders on the CPU; each encoding
      brings them to the GPU and back (T5-XXL: 9.5 GB each way, a fraction of a second), so they hold no GPU
      memory while the transformer works. ``False`` brings them back to the transformer's device. On the
      instruction editors' families (``ModelFamily.cpu_offload``: FLUX.1 Kontext, Qwen-Image-Edit) on CUDA it is
      diffusers' model CPU offload instead (:func:`uses_cpu_offload`), as their users run them.
    - ``compile``: ``torch.compile`` the UNet in place (its default mode: "reduce-overhead" CUDA graphs suit
      neither the changing batch sizes of the stages nor their backward passes). The first call of each batch
      shape compiles (tens of seconds), so it pays off for long runs only. It cannot be undone.
    - ``cuda_graphs`` (CUDA only): ``torch.compile(mode="reduce-overhead")``, which captures each call shape, its
      backward pass included, as a CUDA graph and replays it: a call then costs its kernels' time without the
      launch overhead that dominates the stages' many small calls. A single-image edit makes calls of a handful of
      shapes (the shared A + B calls, NTI's inner calls, sampling), each captured once. Off by default: captured
      graphs hold their own memory, and a model whose shapes vary a lot (many images at once with early stops)
      captures many graphs. It cannot be undone.

    Deliberately not used: attention slicing (diffusers' default attention already runs PyTorch's SDPA, which never
    holds the whole attention matrix; slicing would hold slices of it: more memory, slower) and, outside the
    instruction editors' families, model CPU offload (every stage is UNet-bound, so the UNet stays on the GPU
    anyway; moving the 0.4 GB text encoder and VAE off it saves little, and accelerate's hooks move modules only
    when they run).
    """
    family, pipe = model, model.pipe
    network = family.network  # the UNet, or a flow model's transformer
    device = family.device
    if channels_last is None:
        channels_last = device.type == "cuda"
    channels_last = channels_last and family.channels_last_layout
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for module in (network, pipe.vae):
        module.to(memory_format=memory_format)
    if low_memory:
        pipe.vae.enable_slicing()
        pipe.vae.enable_tiling()
        network.enable_gradient_checkpointing()
    else:
        pipe.vae.disable_slicing()
        pipe.vae.disable_tiling()
        network.disable_gradient_checkpointing()
    offload = uses_cpu_offload(family, low_memory)
    if hasattr(network, "_hf_hook") and not offload:  # offloaded before: every network back on the device
        pipe.remove_all_hooks()
        pipe.to(device)
    if offload:
        pipe.enable_model_cpu_offload(device=device)
    elif family.parks_text_encoders:
        home = torch.device("cpu") if low_memory else device
        for encoder in family.text_encoders():
            encoder.to(home)
    for module in family.modules().values():
        module.requires_grad_(False)  # backward passes compute input gradients only
    if cuda_graphs and device.type != "cuda":
        raise UsageError(f"cuda_graphs must run on a CUDA device (CUDA graphs), and this model runs on {device.type}"
                         "; leave it off here")
    if cuda_graphs:
        network.compile(mode="reduce-overhead")
    elif compile:
        network.compile()
    return family


def uses_cpu_offload(family: ModelFamily, low_memory: bool) -> bool:
    """Whether ``low_memory`` means diffusers' model CPU offload for this model: on CUDA, for the families whose
    users run them so (``ModelFamily.cpu_offload``: the instruction editors, 34 and 58 GB in bf16). Each network
    then waits on the CPU and comes to the GPU only while it runs, so the GPU holds the largest one at a time."""
    return low_memory and family.cpu_offload and family.device.type == "cuda"


def _load_from_disk_or_hub(name: str, *, allow_pickle: bool, config: str | None, t5: bool = True):
    path = Path(name).expanduser()
    if path.is_file():
        return _load_single_file(path, allow_pickle=allow_pickle, config=config, t5=t5)
    if path.is_dir():
        _require_safetensors_or_opt_in(path, allow_pickle)
        cls = _pipeline_class(path, index_class(path / "model_index.json"))
        try:
            t5 = t5 and index_has(path / "model_index.json", "text_encoder_3")
            return cls.from_pretrained(str(path), use_safetensors=None if allow_pickle else True, **_extras(cls, t5))
        except Exception as err:
            raise UsageError(f"could not load diffusers folder {name}: {first_line(err)}") from err
    check_model_name(name)  # a path that does not exist (a mistyped built-in name too) ends here
    access = hub_access(name)
    try:
        cls = _pipeline_class(name, hub_class_name(name, **access))
        return cls.from_pretrained(name, use_safetensors=None if allow_pickle else True, **access,
                                   **_extras(cls, t5))
    except UsageError:
        raise
    except Exception as err:
        raise UsageError(
            f"could not load model {name!r}: not a local file or folder, and the hub did not provide it "
            f"({first_line(err)}); check the id, connect once to download it, or pass a local path"
        ) from err


def _load_single_file(path: Path, *, allow_pickle: bool, config: str | None, t5: bool = True):
    name = str(path)
    if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        raise UsageError(
            f"{name} is a pickle checkpoint, which can run arbitrary code when loaded; convert it to "
            ".safetensors or pass allow_pickle=True if you trust it"
        )
    cls, shapes = _single_file_kind(path, config)
    try:
        if family_for_class(cls.__name__).file_lacks_components and shapes:  # (a trusted pickle: diffusers reads it)
            pipe = _load_flow_file(path, cls, shapes, config or sf.default_repo(shapes), t5)
        else:
            pipe = cls.from_single_file(name, **_extras(cls, t5), **({"config": config} if config else {}))
    except UsageError:
        raise
    except Exception as err:  # the single-file loader raises many types for unreadable files
        raise UsageError(f"could not read checkpoint {name}: {first_line(err)}") from err
    missing = [f"{name}.{key}" for name, module in family_of(pipe).modules().items()
               for key, tensor in module.state_dict().items() if tensor.device.type == "meta"]
    if missing:  # a config of another shape: weights the file did not provide were never loaded
        raise UsageError(f"checkpoint {name} does not match {config or 'the inferred config'}: {len(missing)} "
                         f"weights were never loaded, e.g. {missing[0]}")
    return pipe


def _load_flow_file(path: Path, cls, shapes: dict, source: str, t5: bool):
    """A single file that may hold the denoiser alone (SD3 / SD3.5, FLUX.1), with ``source`` (a config folder or
    hub id) for what it lacks.

    Components whose weights the file does not hold (all but the transformer for FLUX.1; SD3 files come with or
    without CLIPs and T5: the family's ``absent_from_file``) are read from ``source`` and passed in: diffusers'
    single-file loader looks for them under diffusers' weight names only, so it would refuse a saved pipeline's
    text encoders. A denoiser diffusers' converter cannot read is converted by the family (``file_denoiser``).
    """
    family = family_for_class(cls.__name__)
    index = model_index(source)
    family.check_file(path, shapes, source)
    passed = dict(family.pipeline_kwargs(t5 and bool((index.get("text_encoder_3") or [None])[0])))
    for name in family.absent_from_file(shapes):
        if name not in passed and (index.get(name) or [None])[0]:
            passed[name] = component_class(index[name]).from_pretrained(source, subfolder=name)
    denoiser = family.file_denoiser(path, shapes, source)
    if denoiser is not None:
        passed[family.network_name] = denoiser
    return cls.from_single_file(str(path), config=source, **passed)


def _extras(cls, t5: bool = True) -> dict:
    """Constructor arguments of the family's pipeline class (no safety checker for SD; SD3 without T5 when asked
    or saved so)."""
    return family_for_class(cls.__name__).pipeline_kwargs(t5)


def _pipeline_class(name: str | Path, class_name: str | None):
    """The pipeline class a model's ``_class_name`` names, if a registered family supports it."""
    if class_name is None:
        return StableDiffusionPipeline
    cls = pipeline_class(class_name)
    if cls is None:
        hint = " (an SDXL refiner or image-to-image model: use the base model)" if "Img2Img" in class_name else ""
        raise UsageError(f"model {name} is a {class_name}{hint}; supported are {supported()}")
    return cls


def _single_file_class(path: Path, config: str | None):
    """The pipeline class of a single-file checkpoint: its ``config``'s, else inferred from its keys."""
    return _single_file_kind(path, config)[0]


def _single_file_kind(path: Path, config: str | None) -> tuple[type, dict]:
    """The pipeline class of a single-file checkpoint and its tensors' shapes (read from the header only; empty
    for pickles). A flow model's file and its ``config`` must be of the same family."""
    shapes = sf.read_header(path) if path.suffix.lower() == ".safetensors" and path.is_file() else {}
    try:
        model_type = sf.model_type_of(shapes) if shapes else None
    except Exception as err:  # diffusers' inference trips over some key sets; a config says what the file is
        if not config:
            raise UsageError(f"could not read checkpoint {path}: {first_line(err)}") from err
        model_type = None
    if shapes and sf.is_qwen_image(shapes):
        raise UsageError(f"{path} holds a Qwen-Image transformer: {QwenImageEdit.single_file_refusal}")
    reader = family_for_file_type(model_type)
    if model_type and model_type.startswith("flux") and reader is None:
        raise UsageError(f"{path} is a {model_type!r} checkpoint; supported FLUX single files are FLUX.1 dev and "
                         "schnell (not Fill, Depth, FLUX.2 or later)")
    layout = reader.pipeline_classes[0] if reader is not None else None
    if config:
        cls = _config_class(config)
        family = family_for_class(cls.__name__)
        if family.single_file_refusal:
            raise UsageError(family.single_file_refusal)
        lacks = family.file_lacks_components or (layout is not None and reader.file_lacks_components)
        if model_type and lacks and cls is not layout and model_type not in family.config_file_types:
            raise UsageError(f"checkpoint {path} is a {model_type!r} checkpoint but config {config} is a "
                             f"{cls.__name__}; give a config of the checkpoint's family")
        return cls, shapes
    if model_type is None:
        return StableDiffusionPipeline, shapes  # a trusted pickle: let diffusers' loader infer what it can
    if model_type == sf.SD3_OTHER_SIZE:
        raise UsageError(f"{path} has SD3's layout at a size diffusers has no config for; read it with a config: "
                         "a diffusers folder or hub id of the same shape")
    if layout is None:
        raise UsageError(f"{path} looks like a {model_type!r} checkpoint; supported are {supported()}")
    return layout, shapes


def _config_class(config: str):
    folder = Path(config).expanduser()
    if folder.is_dir():
        return _pipeline_class(config, index_class(folder / "model_index.json"))
    try:
        return _pipeline_class(config, hub_class_name(config))
    except UsageError:
        raise
    except Exception as err:
        raise UsageError(f"could not read the config {config!r}: {first_line(err)}") from err


def _load_mini(allow_pickle: bool) -> StableDiffusionPipeline:
    """The trained miniature model shipped as package data (see ``nonrigid.mini``)."""
    folder = mini_weights_dir()
    if not (folder / "model_index.json").is_file():
        raise UsageError(f"the miniature model is not in {folder}; train it with `nonrigid mini train --install`")
    return _load_from_disk_or_hub(str(folder), allow_pickle=allow_pickle, config=None)


def _load_mini_v(allow_pickle: bool) -> StableDiffusionPipeline:
    """``mini-v``: the miniature model with its v-prediction LoRA fused into the UNet (see ``nonrigid.mini``)."""
    from diffusers import DDIMScheduler

    folder = mini_weights_dir() / "v"
    if not (folder / "pytorch_lora_weights.safetensors").is_file():
        raise UsageError(f"the v-prediction miniature model is not in {folder}; train it with "
                         "`nonrigid mini train --variant v --install`")
    pipe = _load_mini(allow_pickle)
    pipe.scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    pipe.load_lora_weights(folder, weight_name="pytorch_lora_weights.safetensors")
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # the fused weights stay; the UNet is a plain UNet again
    return pipe


def _load_mini_xl(allow_pickle: bool) -> StableDiffusionXLPipeline:
    """``mini-xl``: the SDXL-layout miniature model, on the miniature model's VAE and tokenizer."""
    folder = mini_weights_dir() / "xl"
    if not (folder / "model_index.json").is_file():
        raise UsageError(f"the SDXL-layout miniature model is not in {folder}; train it with "
                         "`nonrigid mini train --variant xl --install`")
    base = _load_mini(allow_pickle)
    try:
        return StableDiffusionXLPipeline.from_pretrained(
            str(folder), vae=base.vae, tokenizer=base.tokenizer, tokenizer_2=base.tokenizer, use_safetensors=True
        )
    except Exception as err:
        raise UsageError(f"could not load {folder}: {first_line(err)}") from err


def _load_mini_flow(allow_pickle: bool):
    """``mini-flow``: the SD3-layout rectified-flow miniature model, on the miniature model's VAE and tokenizer."""

    folder = mini_weights_dir() / "flow"
    if not (folder / "model_index.json").is_file():
        raise UsageError(f"the SD3-layout miniature model is not in {folder}; train it with "
                         "`nonrigid mini train --variant flow --install`")
    base = _load_mini(allow_pickle)
    base.vae.register_to_config(shift_factor=0.0)  # unshifted latents; SD3's pipeline adds the config's shift
    try:
        return StableDiffusion3Pipeline.from_pretrained(
            str(folder), vae=base.vae, tokenizer=base.tokenizer, tokenizer_2=base.tokenizer, text_encoder_3=None,
            tokenizer_3=None, use_safetensors=True,
        )
    except Exception as err:
        raise UsageError(f"could not load {folder}: {first_line(err)}") from err


MINI_MODELS = {"mini": _load_mini, "mini-v": _load_mini_v, "mini-xl": _load_mini_xl, "mini-flow": _load_mini_flow}


def mini_weights_dir() -> Path:
    """Where the miniature model's trained weights live: package data of ``nonrigid.mini``."""
    return Path(str(resources.files("nonrigid.mini") / "weights"))


def _require_safetensors_or_opt_in(folder: Path, allow_pickle: bool) -> None:
    networks = [folder / name for name in ("unet", "transformer") if (folder / name).is_dir()]
    if allow_pickle or not networks:
        return
    network = networks[0]
    if not any(network.glob("*.safetensors")) and any(network.glob("*.bin")):
        raise UsageError(
            f"{folder} holds only pickle (.bin) weights, which can run arbitrary code when loaded; "
            "pass allow_pickle=True if you trust them"
        )


def describe_device(family: ModelFamily) -> dict[str, str]:
    """Device and precision of the denoiser, for the record."""
    device = family.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": str(device), "device_name": name, "dtype": str(family.dtype).replace("torch.", "")}
