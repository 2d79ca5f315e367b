"""Speed and peak memory of the two instruction editors, FLUX.1 Kontext [dev] and Qwen-Image-Edit-2509, on their
real architectures with random weights, through the project's own methods (``nonrigid.methods.run.run_edits``).

    python benchmarks/bench_editors.py                    # CUDA: both editors at 1024x1024, default then --low-memory
    python benchmarks/bench_editors.py --editor kontext   # one of them
    python benchmarks/bench_editors.py --dry-run          # the same code paths on the CPU with the tiny models

**Random weights.** Nothing can be downloaded on a lent GPU, so each architecture is built in code from its config
(``notes/kontext_qwen.md``; diffusers' and transformers' config classes) and filled with random numbers. Speed and
memory are the real models' (the same layers, widths, token counts and steps); the pictures are noise, and nothing
measured here says anything about edit quality.

- ``kontext``: ``FluxKontextPipeline`` with FLUX.1-dev's transformer (19 double- and 38 single-stream blocks, 24
  heads of 128, guidance embedding; 11.9 B parameters), T5-XXL's encoder (4.8 B), CLIP ViT-L (0.12 B), FLUX's
  16-channel VAE, Kontext-dev's scheduler; the method's defaults: 28 steps, distilled guidance 2.5.
- ``qwen-edit``: ``QwenImageEditPlusPipeline`` as Qwen-Image-Edit-2509 (no ``zero_cond_t``): the Qwen-Image
  transformer (60 layers, 24 heads of 128, joint width 3584; 20.4 B), Qwen2.5-VL-7B with its vision tower (8.3 B,
  its full 152,064-token tables), the causal 3-D VAE; the method's defaults on 2509: 40 steps, true CFG 4 against
  the negative prompt " " (two transformer calls a step).

The tokenizers and the Qwen2-VL processor are the project's, built in code (``nonrigid.models.tiny`` /
``tiny_edit``); the real prompt template's 64-token prefix is kept, and a tokenization costs nothing either way.

**Building 20 B random parameters fast.** The pipelines are constructed under accelerate's ``init_empty_weights``
(parameters on the meta device: nothing allocated, no ``torch.nn.init`` run; buffers such as rope frequencies and
position ids computed for real), then every parameter is created directly on the device in bf16 and filled in one
kernel: biases zero, per-channel scales one, other weights normal with standard deviation ``fan_in ** -0.5``, which
keeps activations near unit scale through 60 layers, so bf16 neither overflows nor trips the methods' finiteness
checks (a fixed 0.02 would shrink or grow them with the layer widths). Tied weights stay tied (T5's token table).

**What is measured.** For each editor, one seed, a 1024x1024 picture (``bench_edit.input_image``), the target
prompt's template instruction: a first edit (the process's first kernels for this model, the prompt encoders, the
VAE), a second ("warm") edit, each with its wall time, the method's own split (encoding, sampling, decoding), the
transformer's calls and time (forward hooks, synchronised) and ``torch.cuda.max_memory_allocated`` (reset before the
edit). Then the same after ``configure_model(low_memory=True)``, which for these families on CUDA is diffusers' model
CPU offload (``ModelFamily.cpu_offload``): each network waits on the CPU and comes to the GPU while it runs. The
sections run in the order of their value under a time limit (both editors' default edits, then the offloaded ones),
each model built afresh for each mode (one at a time: both would need about 92 GB), and the results are saved
after every section, marked partial until the end, so a run stopped at its limit keeps what finished.

Results go to ``benchmarks/results/editors.json`` and into the ``bench:editors`` block of ``docs/PERFORMANCE.md``.
``--dry-run`` builds the tiny models (``tiny-kontext``'s and the Plus tiny builder's layouts, 2509) the same way on
the CPU in fp32, at 64 px with 2 steps: it checks the script and measures nothing; its results go to a temporary
folder and its block to a scratch copy of the page (never to ``docs/PERFORMANCE.md``).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import diffusers  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from accelerate import init_empty_weights  # noqa: E402
from bench_edit import DOC, RESULTS, free, input_image  # noqa: E402
from diffusers import (  # noqa: E402
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    FluxKontextPipeline,
    FluxTransformer2DModel,
    QwenImageEditPlusPipeline,
    QwenImageTransformer2DModel,
)
from docblocks import replace_block  # noqa: E402
from measure import Recorder, UNetCounter  # noqa: E402
from random_models import clip_special_tokens, flow_vae, parameter_count  # noqa: E402
from transformers import (  # noqa: E402
    CLIPTextConfig,
    CLIPTextModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    T5Config,
    T5EncoderModel,
)

from nonrigid.methods.run import EditRequest, run_edits  # noqa: E402
from nonrigid.models.family import ModelFamily  # noqa: E402
from nonrigid.models.loading import configure_model, uses_cpu_offload  # noqa: E402
from nonrigid.models.registry import family_of  # noqa: E402
from nonrigid.models.tiny import build_clip_tokenizer, build_t5_tokenizer  # noqa: E402
from nonrigid.models.tiny_edit import (  # noqa: E402
    KONTEXT_DEV_SCHEDULER_CONFIG,
    QWEN_IMAGE_EDIT_SCHEDULER_CONFIG,
    build_qwen_processor,
    build_qwen_tokenizer,
    build_tiny_kontext,
    build_tiny_qwen_edit_plus,
)

CONFIG = "editors"  # the results file's stem and the page's block: bench:editors
DRY_RUN_RESULTS = Path(tempfile.gettempdir()) / "nonrigid-bench-editors-dry-run"
SIZE, DRY_RUN_SIZE, DRY_RUN_STEPS = 1024, 64, 2
TARGET_PROMPT = "A photo of a sitting dog."
EDITS = ("first", "warm")
MODES = ("default", "low_memory")  # configure_model(low_memory=False / True)
GB = 1024**3

# ----------------------------------------------------------------------------------------------- architectures
# black-forest-labs/FLUX.1-dev (and FLUX.1-Kontext-dev: the same architecture), transformer/config.json
FLUX_DEV_TRANSFORMER = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
# google/t5-v1_1-xxl's encoder (FLUX's text_encoder_2), with its 32,128-token table
T5_XXL = {"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
          "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 32, "decoder_start_token_id": 0}
# openai/clip-vit-large-patch14's text tower (FLUX's text_encoder: its pooled output)
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
          "hidden_act": "quick_gelu"}
CLIP_VOCAB = 49408
# Qwen/Qwen-Image-Edit-2509, transformer/config.json (2511 adds zero_cond_t; the cost is the same)
QWEN_IMAGE_TRANSFORMER = {
    "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 60, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 3584, "guidance_embeds": False, "axes_dims_rope": (16, 56, 56),
    "zero_cond_t": False,
}
# its vae/config.json (diffusers' defaults for AutoencoderKLQwenImage are this config, latents mean / std included)
QWEN_IMAGE_VAE = {"base_dim": 96, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": [],
                  "temperal_downsample": [False, True, True], "dropout": 0.0}
# Qwen/Qwen2.5-VL-7B-Instruct (Qwen-Image-Edit's text_encoder/config.json)
QWEN25_VL_7B_TEXT = {
    "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
    "num_attention_heads": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-6, "max_position_embeddings": 128000,
    "hidden_act": "silu", "tie_word_embeddings": False,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
}
QWEN25_VL_7B_VISION = {
    "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "in_channels": 3, "patch_size": 14,
    "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
    "tokens_per_second": 2, "out_hidden_size": 3584, "hidden_act": "silu",
}


def kontext_architecture() -> FluxKontextPipeline:
    """FLUX.1 Kontext [dev]'s pipeline at full size (construct it under ``init_empty_weights``: see
    :func:`build`)."""
    clip_tokenizer, t5_tokenizer = build_clip_tokenizer(), build_t5_tokenizer()
    t5_ids = {"pad_token_id": t5_tokenizer.pad_token_id, "eos_token_id": t5_tokenizer.eos_token_id}
    return FluxKontextPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**KONTEXT_DEV_SCHEDULER_CONFIG),
        vae=flow_vae(shift_factor=0.1159, scaling_factor=0.3611),  # FLUX's
        text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L, **{**clip_special_tokens(clip_tokenizer),
                                                                "vocab_size": CLIP_VOCAB})),
        tokenizer=clip_tokenizer,
        text_encoder_2=T5EncoderModel(T5Config(**T5_XXL, **t5_ids)),
        tokenizer_2=t5_tokenizer,
        transformer=FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER),
    )


def qwen_edit_2509_architecture() -> QwenImageEditPlusPipeline:
    """Qwen-Image-Edit-2509's pipeline at full size (construct it under ``init_empty_weights``: see :func:`build`).
    The VL model's special-token ids are the built tokenizer's (its table keeps the real 152,064 rows)."""
    tokenizer = build_qwen_tokenizer()
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    text = {**QWEN25_VL_7B_TEXT, "bos_token_id": tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>")}
    config = Qwen2_5_VLConfig(text_config=text, vision_config=QWEN25_VL_7B_VISION, tie_word_embeddings=False, **ids)
    return QwenImageEditPlusPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_EDIT_SCHEDULER_CONFIG),
        vae=AutoencoderKLQwenImage(**QWEN_IMAGE_VAE),
        text_encoder=Qwen2_5_VLForConditionalGeneration(config),
        tokenizer=tokenizer,
        processor=build_qwen_processor(tokenizer),
        transformer=QwenImageTransformer2DModel(**QWEN_IMAGE_TRANSFORMER),
    )


@dataclass(frozen=True)
class Editor:
    """One instruction editor: its method, what it is, its architecture at full size and its tiny layout."""

    name: str  # the method (nonrigid.methods.run.RUNNERS)
    label: str
    architecture: Callable[[], Any]
    tiny: Callable[[], Any]


EDITORS = {
    "kontext": Editor("kontext", "FLUX.1 Kontext [dev]", kontext_architecture, build_tiny_kontext),
    "qwen-edit": Editor("qwen-edit", "Qwen-Image-Edit-2509", qwen_edit_2509_architecture,
                        lambda: build_tiny_qwen_edit_plus(version="2509")),
}


# ----------------------------------------------------------------------------------------------- building


def filled(shape: torch.Size, name: str, device: torch.device, dtype: torch.dtype,
           generator: torch.Generator) -> torch.Tensor:
    """A new random tensor for the parameter ``name``: biases zero, per-channel scales (one value per leading
    index: norm weights, gammas) one, other weights N(0, 1 / fan_in), so each layer keeps its input's scale."""
    tensor = torch.empty(shape, device=device, dtype=dtype)
    if "bias" in name:
        return tensor.zero_()
    if tensor.dim() < 2 or tensor.numel() == tensor.shape[0]:
        return tensor.fill_(1.0)
    return tensor.normal_(0.0, tensor[0].numel() ** -0.5, generator=generator)


def materialise(module: torch.nn.Module, device: torch.device, dtype: torch.dtype,
                generator: torch.Generator) -> torch.nn.Module:
    """``module`` built on the meta device, made real on ``device``: each parameter created there in ``dtype`` and
    filled by :func:`filled` (a parameter shared by two submodules stays shared), the buffers computed at
    construction moved there, frozen, in eval mode."""
    made: dict[int, torch.nn.Parameter] = {}
    for owner in module.modules():
        for name, param in list(owner.named_parameters(recurse=False)):
            if id(param) not in made:
                made[id(param)] = torch.nn.Parameter(filled(param.shape, name, device, dtype, generator),
                                                     requires_grad=False)
            setattr(owner, name, made[id(param)])
    return module.to(device).eval()


def empty_pipeline(editor: Editor, tiny: bool = False) -> Any:
    """``editor``'s pipeline (full size, or its tiny layout) with its parameters on the meta device: nothing
    allocated, no ``torch.nn.init`` run; buffers computed for real on the CPU; tied weights tied (transformers
    ties T5's token tables after construction, which the meta device skipped)."""
    with init_empty_weights():
        pipe = (editor.tiny if tiny else editor.architecture)()
    for network in networks(pipe):
        if hasattr(network, "tie_weights"):
            network.tie_weights()
    return pipe


def networks(pipe: Any) -> list[torch.nn.Module]:
    return [c for c in pipe.components.values() if isinstance(c, torch.nn.Module)]


def build(editor: Editor, device: torch.device, dtype: torch.dtype, tiny: bool, seed: int = 0) -> ModelFamily:
    """``editor``'s pipeline with random weights made directly on ``device`` in ``dtype`` (seconds for 29 B
    parameters on a GPU), as its model family (not configured yet: :func:`measure_editor` configures it)."""
    pipe = empty_pipeline(editor, tiny)
    generator = torch.Generator(device).manual_seed(seed)
    for network in networks(pipe):
        materialise(network, device, dtype, generator)
    pipe.set_progress_bar_config(disable=True)
    return family_of(pipe)


# ----------------------------------------------------------------------------------------------- measuring


class CallCounter(UNetCounter):
    """The benchmark's UNet counter on an editor's transformer, synchronising ``device``: under model CPU offload
    the transformer itself waits on the CPU, so its own device cannot say where to synchronise."""

    def __init__(self, network: torch.nn.Module, device: torch.device) -> None:
        super().__init__(network)
        self.device = device
        self._sync = device.type == "cuda"

    def _now(self) -> float:
        if self._sync:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def allocated(device: torch.device) -> int:
    """Memory in use now: ``torch.cuda.memory_allocated`` (the weights on the GPU), or the process's RSS."""
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else psutil.Process().memory_info().rss


def edit_once(family: ModelFamily, editor: Editor, picture, args: argparse.Namespace, details: dict) -> None:
    """One edit through the project's front door with the method's defaults (``--dry-run``: fewer steps); what the
    method reports of it (its timings, resolved parameters, sizes) goes into ``details``."""
    details["memory_before_bytes"] = allocated(family.device)
    params = {"num_steps": DRY_RUN_STEPS} if args.dry_run else None
    (result,) = run_edits(family, [EditRequest(picture, TARGET_PROMPT)], editor.name, params, seeds=(0,),
                          size=args.size)
    details["timings"] = dict(result.timings)
    details["params"] = json.loads(json.dumps(result.params, default=str))
    details["record"] = json.loads(json.dumps(result.record, default=str))


def measure_editor(editor: Editor, mode: str, args: argparse.Namespace, run: dict, save: Callable[[], None]) -> None:
    """Build ``editor`` for ``mode``, then its first and warm edits as sections ``EDITOR.MODE.first`` / ``.warm``,
    each saved as soon as it is measured."""
    started = time.perf_counter()
    family = build(editor, args.device, args.dtype, args.dry_run)
    configure_model(family, low_memory=mode == "low_memory")
    if args.device.type == "cuda":  # the random fill and the moves are queued kernels
        torch.cuda.synchronize(args.device)
    run["editors"].setdefault(editor.name, describe(editor, family))
    run["editors"][editor.name][f"{mode}_setup_seconds"] = time.perf_counter() - started
    run["editors"][editor.name][f"{mode}_offload"] = uses_cpu_offload(family, mode == "low_memory")
    picture = input_image(args.size)
    details: dict[str, dict] = {}

    def recorded(recorder: Recorder) -> None:
        for name, section in recorder.sections.items():
            run["sections"][name] = {**section.as_dict(), **details.get(name, {})}
        save()

    try:
        with CallCounter(family.network, args.device) as counter:
            recorder = Recorder(counter, args.device, recorded)
            for edit in EDITS:
                name = f"{editor.name}.{mode}.{edit}"
                recorder.measure(name, edit_once, family, editor, picture, args, details.setdefault(name, {}))
    finally:
        if hasattr(family.network, "_hf_hook"):  # accelerate's offload hooks hold every network
            family.pipe.remove_all_hooks()


def describe(editor: Editor, family: ModelFamily) -> dict:
    """What the block says of the model: its label, pipeline, description and parameters per network."""
    return {"label": editor.label, "pipeline": type(family.pipe).__name__, "family": family.describe(),
            "parameters": {name: parameter_count(module) for name, module in family.modules().items()}}


def plan(editors: list[str]) -> Iterator[tuple[Editor, str]]:
    """(editor, mode) in the order of their value under a time limit: every editor's default edits first (the
    headline numbers), then the offloaded ones."""
    for mode in MODES:
        for name in editors:
            yield EDITORS[name], mode


def environment(args: argparse.Namespace) -> dict:
    device = args.device
    cuda = device.type == "cuda"
    return {
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if cuda else platform.machine(),
        "device_memory_bytes": torch.cuda.get_device_properties(device).total_memory if cuda else None,
        "host_memory_bytes": psutil.virtual_memory().total, "dtype": str(args.dtype).removeprefix("torch."),
        "size": args.size, "torch": torch.__version__, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__, "python": platform.python_version(),
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M"), "dry_run": args.dry_run, "partial": True,
    }


def run_all(args: argparse.Namespace) -> dict:
    """Every (editor, mode) of :func:`plan`, saved after each section; an editor that fails (out of memory, a
    non-finite result) is recorded and the next one still runs."""
    run: dict[str, Any] = {"config": CONFIG, "environment": environment(args), "editors": {}, "sections": {},
                           "errors": {}}
    path = args.results / f"{CONFIG}.json"

    def save() -> None:  # whole or not at all: a run stopped mid-write keeps its previous save
        part = path.with_suffix(".json.part")
        part.write_text(json.dumps(run, indent=1, default=str))
        part.replace(path)

    save()
    for editor, mode in plan(args.editors):
        try:
            measure_editor(editor, mode, args, run, save)
        except Exception as error:  # one editor's failure must not cost the other's numbers
            run["errors"][f"{editor.name}.{mode}"] = f"{type(error).__name__}: {error}"
            traceback.print_exc()
        free(args.device)  # the model goes before the next is built: both at once would need about 92 GB
        save()
    run["environment"]["partial"] = False
    save()
    return run


# ----------------------------------------------------------------------------------------------- the page


MODE_LABELS = {"default": "default", "low_memory": "`--low-memory` (model CPU offload)"}
MODE_LABELS_CPU = {"default": "default", "low_memory": "`--low-memory` (no offload on the CPU)"}
EDIT_LABELS = {"first": "first edit (its first kernels, encoders included)", "warm": "second edit (warm)"}


def render_block(run: Mapping[str, Any]) -> str:
    """The ``bench:editors`` block: what ran where, then one row per measured edit."""
    env = run["environment"]
    lines = banner(env, run)
    lines += [f"- {editor_line(name, info, run)}" for name, info in run["editors"].items()]
    lines += [f"- Command: `{env['command']}`", "", *table(run), "", peak_note(env)]
    lines += [f"- **{name} failed**: {error}" for name, error in run.get("errors", {}).items()]
    return "\n".join(lines)


def banner(env: Mapping[str, Any], run: Mapping[str, Any]) -> list[str]:
    lines = []
    if env.get("dry_run"):
        lines.append("- **Dry run (`--dry-run`): the GPU run's code paths on the CPU with the tiny models (fp32, "
                     f"{env['size']} px, {DRY_RUN_STEPS} steps); it checks the script, it measures nothing.**")
    if env.get("partial"):
        lines.append(f"- **Partial: the run stopped (a time limit) after {len(run['sections'])} edits; the rows "
                     "below are the ones that finished.**")
    lines.append("- **Random weights**: the real architectures' speed and memory; the pictures are noise, so "
                 "nothing here says anything about edit quality.")
    memory = f", {env['device_memory_bytes'] / GB:.0f} GB" if env.get("device_memory_bytes") else ""
    lines.append(f"- Measured {env['date']} on {env['device_name']} ({env['device']}{memory}; host memory "
                 f"{env['host_memory_bytes'] / GB:.0f} GB), torch {env['torch']}, diffusers {env['diffusers']}, "
                 f"transformers {env['transformers']}; networks in {env['dtype']}; one seed, a {env['size']} x "
                 f"{env['size']} picture.")
    return lines


def editor_line(name: str, info: Mapping[str, Any], run: Mapping[str, Any]) -> str:
    """``name``'s model (parameters per network) and the settings its edits ran with."""
    sizes = ", ".join(f"{network} {billions(count)}" for network, count in info["parameters"].items())
    first = next((s for key, s in run["sections"].items() if key.startswith(f"{name}.")), None)
    if first is None:
        return f"`{name}`: {info['label']} ({info['pipeline']}; {sizes}): no edit finished."
    p = first["params"]
    knob = f"guidance {p['guidances']}" if "guidances" in p else f"true CFG {p['true_cfg']}"
    record = first["record"]
    reference = record.get("reference_vae_size", record.get("reference_size"))
    shown = f", the VL encoder's copy {record['reference_encoder_size']}" if "reference_encoder_size" in record else ""
    setup = ", ".join(f"{mode.replace('_', ' ')} {info[f'{mode}_setup_seconds']:.1f} s" for mode in MODES
                      if f"{mode}_setup_seconds" in info)
    offload = " (low memory: moving every network to the CPU for the offload included)" if info.get(
        "low_memory_offload") else ""
    return (f"`{name}`: {info['label']} ({info['pipeline']}; {sizes}); {p['num_steps']} steps, {knob}; output "
            f"{record['output_size']}, reference latents from {reference}{shown}; built with random weights and "
            f"configured in {setup}{offload}.")


def billions(count: int) -> str:
    return f"{count / 1e9:.2f} B" if count >= 1e9 else f"{count / 1e6:.1f} M"


def table(run: Mapping[str, Any]) -> list[str]:
    cpu = run["environment"]["device"] == "cpu"
    modes = MODE_LABELS_CPU if cpu else MODE_LABELS
    lines = ["| editor | memory mode | edit | wall s | encoding s | sampling s | decoding s | transformer calls "
             "| s per call | memory before | peak memory |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for key, s in run["sections"].items():
        editor, mode, edit = key.split(".")
        t = s["timings"]
        per_call = s["unet_seconds"] / s["unet_calls"] if s["unet_calls"] else 0.0
        lines.append(f"| {editor} | {modes[mode]} | {EDIT_LABELS[edit]} | {s['seconds']:.1f} | "
                     f"{t.get('encoding', 0):.1f} | {t.get('sampling', 0):.1f} | {t.get('decoding', 0):.1f} | "
                     f"{s['unet_calls']} | {per_call:.3f} | {s['memory_before_bytes'] / GB:.2f} GB | "
                     f"{s['peak_bytes'] / GB:.2f} GB |")
    return lines


def peak_note(env: Mapping[str, Any]) -> str:
    if env["device"] == "cpu":
        return "Memory is the process's RSS (weights included)."
    return ("Peak memory is `torch.cuda.max_memory_allocated` during the edit (reset before it); memory before is "
            "`torch.cuda.memory_allocated` as it starts (the weights on the GPU; none under offload). Transformer "
            "time per call is its forward between hooks, synchronised (under offload including the transfer that "
            "brings it to the GPU).")


def update_doc(doc: Path, results: Path) -> None:
    """Replace the ``bench:editors`` block of ``doc`` by the rendering of ``results/editors.json``, if there is
    one; a dry run's never goes into ``docs/PERFORMANCE.md``."""
    path = results / f"{CONFIG}.json"
    if not path.is_file():
        return
    run = json.loads(path.read_text())
    if run["environment"].get("dry_run") and doc.resolve() == DOC.resolve():
        print(f"not rendering {path} into {doc}: it is a dry run, not a measurement")
        return
    text = doc.read_text() if doc.is_file() else "# Performance\n"
    doc.write_text(replace_block(text, f"bench:{CONFIG}", render_block(run)))


# ----------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--editor", action="append", choices=list(EDITORS), default=None, dest="editors",
                   help="measure only this editor (repeatable; default: both)")
    p.add_argument("--dry-run", action="store_true",
                   help=f"the tiny models on the CPU in fp32 at {DRY_RUN_SIZE} px, {DRY_RUN_STEPS} steps: checks "
                   "the script, measures nothing; results to a temporary folder, the block to a copy of the page")
    p.add_argument("--size", type=int, default=None, help=f"picture side (default {SIZE}; {DRY_RUN_SIZE} dry)")
    p.add_argument("--results", type=Path, default=None,
                   help=f"folder for {CONFIG}.json (default: benchmarks/results; dry run: {DRY_RUN_RESULTS})")
    p.add_argument("--doc", default=None,
                   help="markdown file whose bench:editors block is updated ('' to skip; default: "
                   "docs/PERFORMANCE.md, or a scratch copy of it with --dry-run)")
    args = p.parse_args(argv)
    args.editors = list(dict.fromkeys(args.editors or EDITORS))
    if not args.dry_run and not torch.cuda.is_available():
        p.error("the editors' architectures need a CUDA GPU (about 34 and 58 GB in bf16); on the CPU: --dry-run")
    if args.dry_run:  # two threads on shared cores wait on each other: a tiny edit took 20x longer
        torch.set_num_threads(1)
    args.device = torch.device("cpu" if args.dry_run else "cuda")
    args.dtype = torch.float32 if args.dry_run else torch.bfloat16
    args.size = args.size or (DRY_RUN_SIZE if args.dry_run else SIZE)
    args.results = args.results or (DRY_RUN_RESULTS if args.dry_run else RESULTS)
    args.doc = scratch_page() if args.dry_run and args.doc is None else (DOC if args.doc is None else args.doc)
    args.doc = Path(args.doc) if args.doc else None
    return args


def scratch_page() -> Path:
    """A copy of ``docs/PERFORMANCE.md`` in a temporary folder, for a dry run's block."""
    page = Path(tempfile.mkdtemp(prefix="bench_editors-")) / DOC.name
    shutil.copy(DOC, page)
    return page


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.results.mkdir(parents=True, exist_ok=True)
    run = run_all(args)
    print(render_block(run))
    if args.doc is not None:
        update_doc(args.doc, args.results)
        print(f"\nwrote {args.results / f'{CONFIG}.json'} and updated {args.doc}")
    return 1 if run["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
