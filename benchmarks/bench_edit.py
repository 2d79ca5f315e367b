"""Speed and memory of one default edit, per stage: the project's procedure vs the straightforward one.

    python benchmarks/bench_edit.py                     # CUDA config when a GPU is present, else the CPU config
    python benchmarks/bench_edit.py --config cpu        # mid-size SD-layout random model at 256 px (minutes)
    python benchmarks/bench_edit.py --config cuda       # SD v1.4 architecture, random weights, 512 px
    python benchmarks/bench_edit.py --config sdxl-cpu   # mid-size SDXL-layout random model at 256 px (minutes)
    python benchmarks/bench_edit.py --config sdxl       # SDXL base 1.0 architecture, random weights, 1024 px
    python benchmarks/bench_edit.py --config sd3        # SD3 medium architecture (no T5), random weights, 1024 px
    python benchmarks/bench_edit.py --config sd3-cpu --quick   # the SD3 path on the tiny SD3 model (a smoke run)
    python benchmarks/bench_edit.py --config flux       # FLUX.1-dev architecture, random weights, 1024 px
    python benchmarks/bench_edit.py --config flux-cpu --quick  # the FLUX path on the tiny FLUX model (a smoke run)

For every stage (A text optimization, B inversion, C sampling) and the whole edit it measures wall time, UNet work
(sample evaluations: a forward of one row counts 1, a forward + backward 2), the share of wall time spent inside
UNet calls and peak memory (RSS on CPU, ``torch.cuda.max_memory_allocated`` on CUDA), for

- **ours**: the stages as ``nonrigid.edit`` runs them (stage cache on; batched variants; the first K steps read from
  the stored reconstruction; one branch at guidance 1; on CUDA half precision and channels-last), then another
  eta from the cached stages, negative-prompt inversion, and on CUDA the ``--low-memory`` mode;
- **straightforward**: the reference's organisation of the same edit (``benchmarks/straightforward.py``): fp32,
  one seed and one variant per run, both guidance branches always, nothing shared between variants. SD 1.x
  configurations only: it calls the UNet the SD 1.x way (token embeddings, no pooled or size conditioning).

Everything model-specific goes through the model family (``nonrigid.models.registry.family_of``): prompts are
encoded and the UNet called by ``family.encode_prompt`` / ``family.predict``, and NTI and NPI invert for the
family's default guidance scale (7.5 for SD, 5 for SDXL, 7 for SD3), as ``nonrigid.edit`` does. "UNet" below means
the family's denoiser (``family.network``: SD3's MMDiT transformer).

Results go to ``benchmarks/results/<config>.json`` and into their block of ``docs/PERFORMANCE.md``. ``--quick``
shrinks every step count to check that the script runs: its results are marked as such, go to a scratch folder
(not ``benchmarks/results``) and are never rendered into ``docs/PERFORMANCE.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import platform
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import diffusers  # noqa: E402
import numpy as np  # noqa: E402
import straightforward  # noqa: E402
import torch  # noqa: E402
from docblocks import replace_block  # noqa: E402
from measure import Recorder, UNetCounter  # noqa: E402
from PIL import Image  # noqa: E402
from random_models import build_random_pipeline, parameter_count  # noqa: E402

from nonrigid import sample  # noqa: E402
from nonrigid.cli.common import LOW_MEMORY_BATCH_SIZE  # noqa: E402
from nonrigid.images import load_image  # noqa: E402
from nonrigid.methods.catalogue import DEFAULT_ETAS, FAST  # noqa: E402
from nonrigid.models.loading import configure_model, load_pipeline  # noqa: E402
from nonrigid.models.registry import build_tiny_pipeline, family_of  # noqa: E402
from nonrigid.stages import DEFAULT_GUIDANCE  # noqa: E402
from nonrigid.stages.cache import StageCache  # noqa: E402
from nonrigid.stages.cached import (  # noqa: E402
    InversionRequest,
    InversionSettings,
    TextRequest,
    TextSettings,
    cache_fields,
    inversion_stages,
    stages_a_and_b,
    text_stages,
)

RESULTS = ROOT / "benchmarks" / "results"
QUICK_RESULTS = Path(tempfile.gettempdir()) / "nonrigid-bench-quick"  # --quick's default: never the real results
DOC = ROOT / "docs" / "PERFORMANCE.md"
TEDBENCH_DOG = ROOT.parent / "shared" / "data" / "tedbench" / "originals" / "dog_01.jpeg"


@dataclass(frozen=True)
class Config:
    """One benchmark configuration: where it runs, which model family and layout, at what size."""

    name: str
    device: str  # "cpu" or "cuda"
    family: str  # "sd" (SD 1.x layouts), "sdxl", "sd3" or "flux"
    layout: str  # default model layout (``random_models``; "tiny"/"tiny-sdxl" for smoke runs)
    size: int  # default image side in pixels
    layouts: tuple[str, ...]  # layouts --layout may choose
    summary: str

    @property
    def baseline(self) -> bool:
        """Whether the straightforward procedure is measured too (it is written for SD 1.x's UNet call)."""
        return self.family == "sd"


# where a CUDA configuration's family runs on a CPU
CPU_CONFIG = {"sd": "cpu", "sdxl": "sdxl-cpu", "sd3": "sd3-cpu", "flux": "flux-cpu"}
SD_LAYOUTS = ("mid", "sd14", "tiny")
SDXL_LAYOUTS = ("sdxl-mid", "sdxl", "tiny-sdxl")
SD3_LAYOUTS = ("sd3", "tiny-sd3")
FLUX_LAYOUTS = ("flux", "tiny-flux")
DRY_RUN_LAYOUTS = {"sd": "tiny", "sdxl": "tiny-sdxl", "sd3": "tiny-sd3", "flux": "tiny-flux"}
CONFIGS = {
    "cpu": Config("cpu", "cpu", "sd", "mid", 256, SD_LAYOUTS, "mid-size SD-layout model at 256 px"),
    "cuda": Config("cuda", "cuda", "sd", "sd14", 512, SD_LAYOUTS, "SD v1.4 architecture at 512 px"),
    "sdxl-cpu": Config("sdxl-cpu", "cpu", "sdxl", "sdxl-mid", 256, SDXL_LAYOUTS,
                       "mid-size SDXL-layout model at 256 px"),
    "sdxl": Config("sdxl", "cuda", "sdxl", "sdxl", 1024, SDXL_LAYOUTS, "SDXL base 1.0 architecture at 1024 px"),
    "sd3-cpu": Config("sd3-cpu", "cpu", "sd3", "tiny-sd3", 64, SD3_LAYOUTS,
                      "tiny SD3-layout model at 64 px (a smoke run of the SD3 path, not a measurement)"),
    "sd3": Config("sd3", "cuda", "sd3", "sd3", 1024, SD3_LAYOUTS, "SD3 medium architecture (no T5) at 1024 px"),
    "flux-cpu": Config("flux-cpu", "cpu", "flux", "tiny-flux", 64, FLUX_LAYOUTS,
                       "tiny FLUX-layout model at 64 px (a smoke run of the FLUX path, not a measurement)"),
    "flux": Config("flux", "cuda", "flux", "flux", 1024, FLUX_LAYOUTS, "FLUX.1-dev architecture at 1024 px"),
}


@dataclass
class EditPlan:
    """The edit being measured: the issue's default edit unless ``--quick``."""

    target_prompt: str = "A photo of a sitting dog."
    source_prompt: str = ""
    seeds: tuple[int, ...] = (0,)
    etas: tuple[float, ...] = DEFAULT_ETAS
    inject: float = 0.2
    num_steps: int = 50
    opt_steps: int = 200
    opt_lr: float = 1e-3
    inner_steps: int = 10
    early_stop: float = 1e-5
    extra_eta: float = 0.7

    @property
    def inject_steps(self) -> int:
        return round(self.inject * self.num_steps)


def fast_plan(plan: EditPlan, quick: bool) -> EditPlan:
    """The edit with ours' fast preset (``--fast``: methods.catalogue.FAST); with ``--quick``, a few steps of it."""
    if quick:
        return replace(plan, num_steps=4, opt_steps=2, inner_steps=1)
    return replace(plan, **FAST)


# --------------------------------------------------------------------------------------------------- ours


def ours_text(pipe, picture, plan: EditPlan, cache, common: dict):
    ((texts, _),) = text_stages(family_of(pipe), [TextRequest(picture, plan.target_prompt, plan.seeds, common)],
                                TextSettings(plan.opt_steps, plan.opt_lr), cache)
    return texts


def inversion_guidance(pipe, method: str) -> float:
    """The guidance scale ``nonrigid.edit`` inverts for: the family's default with NTI and NPI (7.5 for SD, 5 for
    SDXL), 1 with DDIM; on FLUX (no unconditional branch) the distilled default, 3.5, with its plain inversion."""
    family = family_of(pipe)
    return DEFAULT_GUIDANCE[method] if method == "ddim" and family.classifier_free else family.defaults.guidance_scale


def default_inversion(pipe) -> str:
    """``nonrigid edit``'s default inversion: NTI, or on FLUX the plain inversion that stands in for it."""
    return "nti" if family_of(pipe).classifier_free else "ddim"


def ours_inversion(pipe, picture, plan: EditPlan, cache, common: dict, method: str | None = None):
    method = method or default_inversion(pipe)
    settings = InversionSettings(method, plan.num_steps, inversion_guidance(pipe, method), plan.inner_steps,
                                 plan.early_stop)
    ((inversion, _),) = inversion_stages(family_of(pipe), [InversionRequest(picture, plan.source_prompt, common)],
                                         settings, cache)
    return inversion


def ours_sampling(pipe, inversion, texts, etas, inject_steps: int, batch_size: int | None = None):
    """``sample(..., output_type="pil")`` split in two so the final latents can be compared."""
    latents = sample(pipe, inversion, texts, etas, (inject_steps,), output_type="latent", batch_size=batch_size)
    return family_of(pipe).decode(latents), latents


def ours_text_and_inversion(pipe, picture, plan: EditPlan, cache, common: dict):
    """Stages A and B as an edit runs them: A's rows riding along B's model calls (one sequential chain)."""
    method = default_inversion(pipe)
    ((texts, _),), ((inversion, _),) = stages_a_and_b(
        family_of(pipe), [TextRequest(picture, plan.target_prompt, plan.seeds, common)],
        TextSettings(plan.opt_steps, plan.opt_lr), [InversionRequest(picture, plan.source_prompt, common)],
        InversionSettings(method, plan.num_steps, inversion_guidance(pipe, method), plan.inner_steps,
                          plan.early_stop), cache)
    return texts, inversion


def ours_from_cache(pipe, picture, plan: EditPlan, cache, etas):
    """Another sweep for an image whose stages are cached: cache keys, both stages load, then only sampling runs."""
    common = cache_fields(family_of(pipe), picture)
    texts = ours_text(pipe, picture, plan, cache, common)
    inversion = ours_inversion(pipe, picture, plan, cache, common)
    return ours_sampling(pipe, inversion, texts, etas, plan.inject_steps)


# --------------------------------------------------------------------------------------------------- helpers


def warm_up(pipe, size: int) -> None:
    """First calls pay for kernel selection and allocator growth; neither side should be charged for that.
    The UNet is called through the family, with the empty prompt's conditioning (whatever tensors it has)."""
    family = family_of(pipe)
    h = w = size // pipe.vae_scale_factor
    channels = pipe.vae.config.latent_channels  # the seam's latents (FLUX packs them inside predict)
    empty = family.encode_prompt("")
    for rows, grad in ((1, False), (2, False), (1, True)):
        x = torch.randn(rows, channels, h, w, device=family.device)
        cond = empty.leaves() if grad else empty
        with torch.set_grad_enabled(grad):
            out = family.predict(x, 500, cond)
            if grad:
                out.square().mean().backward()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b.float().cpu()).abs().max())


def psnr(image: Image.Image, reference: Image.Image) -> float:
    a = np.asarray(image, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def input_image(size: int) -> Image.Image:
    """A TEdBench photo when the shared data is beside the project, else a smooth synthetic picture."""
    if TEDBENCH_DOG.is_file():
        return load_image(TEDBENCH_DOG, size)
    yy, xx = np.mgrid[0:size, 0:size] / size
    array = np.stack([xx, yy, 0.5 + 0.5 * np.sin(6 * xx * yy)], axis=-1)
    return Image.fromarray((array * 255).astype(np.uint8))


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def build_pipeline(layout: str, device: torch.device, dtype: torch.dtype = torch.float32):
    """The benchmark's model: a random-weight pipeline of ``layout`` (``random_models``) or a built-in tiny one."""
    if layout == "tiny":
        return build_tiny_pipeline().to(device)
    if layout in ("tiny-sdxl", "tiny-sd3", "tiny-flux"):  # through the loader (SDXL's Euler config becomes DDIM)
        return load_pipeline(layout, device=device, dtype=dtype)
    return build_random_pipeline(layout, device=device, dtype=dtype)


def cast_networks(pipe, dtype: torch.dtype) -> None:
    """Every network of the family to ``dtype``, the VAE to the family's choice (SDXL's stays fp32 under fp16).
    A network the pipeline was loaded without (SD3's T5) is skipped."""
    family = family_of(pipe)
    for name in family.networks:
        network = getattr(pipe, name, None)
        if network is not None:
            network.to(dtype=family.vae_dtype(dtype) if name == "vae" else dtype)


# --------------------------------------------------------------------------------------------------- runs


@dataclass
class Run:
    """Everything one benchmark configuration measured."""

    config: str
    environment: dict
    plan: dict
    sections: dict = field(default_factory=dict)
    checks: dict = field(default_factory=dict)
    inversions: dict = field(default_factory=dict)


def run_cpu(args, plan: EditPlan) -> Run:
    """Ours and (SD 1.x only) straightforward on one fp32 pipeline, stages interleaved so both see the same
    machine load."""
    config = CONFIGS[args.config]
    device = torch.device("cpu")
    torch.set_num_threads(args.threads)
    pipe = build_pipeline(args.layout, device)
    configure_model(family_of(pipe))
    picture = input_image(args.size)
    run = Run(config.name, environment(args, pipe, "fp32"), asdict(plan))
    load_before = os.getloadavg()
    warm_up(pipe, args.size)
    baseline = config.baseline
    with UNetCounter(family_of(pipe).network) as counter, tempfile.TemporaryDirectory() as folder:
        rec = Recorder(counter, device)
        cache = StageCache(folder)
        k = plan.inject_steps
        if baseline:
            base_texts = rec.measure("straightforward.A", straightforward.text_optimizations, pipe, picture,
                                     plan.target_prompt, plan.opt_steps, plan.opt_lr, plan.seeds)
        common = rec.measure("ours.keys", cache_fields, family_of(pipe), picture)
        texts, inversion = rec.measure("ours.AB", ours_text_and_inversion, pipe, picture, plan, cache, common)
        rec.measure("ours.A", ours_text, pipe, picture, plan, None, common)  # each stage alone, for comparison
        if baseline:
            base_inv = rec.measure("straightforward.B", straightforward.null_text_inversion, pipe, picture,
                                   plan.source_prompt, plan.num_steps, None, plan.inner_steps, plan.early_stop)
        rec.measure("ours.B", ours_inversion, pipe, picture, plan, None, common)
        _, latents = rec.measure("ours.C", ours_sampling, pipe, inversion, texts, plan.etas, k)
        if baseline:
            _, base_latents = rec.measure("straightforward.C", straightforward.sample_variants, pipe, base_inv,
                                          base_texts, plan.etas, (k,))
        _, cached_latents = rec.measure("ours.sweep_cached", ours_from_cache, pipe, picture, plan, cache, plan.etas)
        rec.measure("ours.extra_variant", ours_from_cache, pipe, picture, plan, cache, (plan.extra_eta,))
        npi = npi_inversion(rec, pipe, picture, plan, common)
        rec.total("ours.edit", ["ours.keys", "ours.AB", "ours.C"])
        if baseline:
            rec.total("straightforward.edit", ["straightforward.A", "straightforward.B", "straightforward.C"])
        run.sections = {name: s.as_dict() for name, s in rec.sections.items()}
    run.environment["load_average_before"] = load_before
    run.environment["load_average_after"] = os.getloadavg()
    if baseline:
        run.checks = agreement(texts, base_texts, inversion, base_inv, latents, base_latents)
    else:
        run.checks = cache_agreement(latents, cached_latents)
    run.inversions.update(inversion_errors(pipe, picture, inversion, npi))
    if args.mini and config.name == "cpu":  # the miniature model compared there has SD 1.x's layout
        run.inversions["mini"] = inversion_errors_on_mini(args.mini_scenes, plan.num_steps, plan.inner_steps)
    return run


def run_cuda(args, plan: EditPlan, device: torch.device | None = None, save=None) -> Run:
    """Ours (half precision, channels-last; then low-memory; then optionally compiled) and, for SD 1.x,
    straightforward (fp32), one after the other, each with only its own pipeline on the GPU so peak memory is its
    own. The sections the issue's targets need come first (the whole edit, one more variant, low memory), and
    ``save(run)`` is called after every section with what is measured so far (marked partial), so a run stopped at
    a time limit leaves its finished rows. ``device`` only serves smoke checks of this code path on another device
    (default: CUDA)."""
    config = CONFIGS[args.config]
    device = torch.device("cpu" if getattr(args, "dry_run", False) else "cuda") if device is None else device
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    baseline = config.baseline
    if baseline:
        reference = build_pipeline(args.layout, device, torch.float32)
        pipe = copy.deepcopy(reference)
        cast_networks(pipe, dtype)
        reference.to("cpu")
    else:  # no fp32 reference: built in fp32 on the device, then cast (the VAE as the family keeps it)
        pipe = build_pipeline(args.layout, device, torch.float32)
        cast_networks(pipe, dtype)
    free(device)
    configure_model(family_of(pipe))
    picture = input_image(args.size)
    run = Run(config.name, environment(args, pipe, args.dtype), asdict(plan))
    k = plan.inject_steps
    warm_up(pipe, args.size)
    sections: dict = {}
    after = partial_saver(run, sections, save)
    with UNetCounter(family_of(pipe).network) as counter, tempfile.TemporaryDirectory() as folder:
        rec = Recorder(counter, device, after)
        cache = StageCache(folder)
        common = rec.measure("ours.keys", cache_fields, family_of(pipe), picture)
        texts, inversion = rec.measure("ours.AB", ours_text_and_inversion, pipe, picture, plan, cache, common)
        _, latents = rec.measure("ours.C", ours_sampling, pipe, inversion, texts, plan.etas, k)
        rec.total("ours.edit", ["ours.keys", "ours.AB", "ours.C"])
        rec.measure("ours.extra_variant", ours_from_cache, pipe, picture, plan, cache, (plan.extra_eta,))
        if getattr(args, "fast", False):
            measure_edit(rec, "ours_fast", pipe, picture, fast_plan(plan, args.quick), common)

        configure_model(family_of(pipe), low_memory=True)
        free(device)
        _, low_inv = rec.measure("ours_low_memory.AB", ours_text_and_inversion, pipe, picture, plan, None, common)
        rec.measure("ours_low_memory.C", ours_sampling, pipe, low_inv, texts, plan.etas, k, LOW_MEMORY_BATCH_SIZE)
        rec.total("ours_low_memory.edit", ["ours_low_memory.AB", "ours_low_memory.C"])
        configure_model(family_of(pipe), low_memory=False)
        free(device)

        _, cached_latents = rec.measure("ours.sweep_cached", ours_from_cache, pipe, picture, plan, cache, plan.etas)
        npi = npi_inversion(rec, pipe, picture, plan, common)
        sections.update(rec.sections)
    run.inversions.update(inversion_errors(pipe, picture, inversion, npi))
    run.checks = cache_agreement(latents, cached_latents)
    if args.compile:
        configure_model(family_of(pipe), compile=True)
        with UNetCounter(family_of(pipe).network) as counter:
            rec = Recorder(counter, device, after)
            for name in ("ours_compiled_first", "ours_compiled"):  # the first run includes compilation
                _, comp_inv = rec.measure(f"{name}.AB", ours_text_and_inversion, pipe, picture, plan, None, common)
                rec.measure(f"{name}.C", ours_sampling, pipe, comp_inv, texts, plan.etas, k)
                rec.total(f"{name}.edit", [f"{name}.AB", f"{name}.C"])
            sections.update(rec.sections)
    if getattr(args, "cuda_graphs", False):
        measure_cuda_graphs(args, run, pipe, picture, plan, common, device, after, sections)
    pipe.to("cpu")
    del pipe
    free(device)

    if baseline:
        reference.to(device)
        warm_up(reference, args.size)
        with UNetCounter(reference.unet) as counter:
            rec = Recorder(counter, device, after)
            base_texts = rec.measure("straightforward.A", straightforward.text_optimizations, reference, picture,
                                     plan.target_prompt, plan.opt_steps, plan.opt_lr, plan.seeds)
            base_inv = rec.measure("straightforward.B", straightforward.null_text_inversion, reference, picture,
                                   plan.source_prompt, plan.num_steps, None, plan.inner_steps, plan.early_stop)
            _, base_latents = rec.measure("straightforward.C", straightforward.sample_variants, reference, base_inv,
                                          base_texts, plan.etas, (k,))
            rec.total("straightforward.edit", ["straightforward.A", "straightforward.B", "straightforward.C"])
            sections.update(rec.sections)
        run.checks = agreement(texts, base_texts, inversion, base_inv, latents, base_latents)
    run.sections = {name: s.as_dict() for name, s in sections.items()}
    run.environment.pop("partial", None)
    return run


def measure_edit(rec: Recorder, name: str, pipe, picture, plan: EditPlan, common: dict) -> None:
    """A whole edit without a cache as the sections ``NAME.AB``, ``NAME.C`` and ``NAME.edit``."""
    texts, inversion = rec.measure(f"{name}.AB", ours_text_and_inversion, pipe, picture, plan, None, common)
    rec.measure(f"{name}.C", ours_sampling, pipe, inversion, texts, plan.etas, plan.inject_steps)
    rec.total(f"{name}.edit", [f"{name}.AB", f"{name}.C"])


def measure_cuda_graphs(args, run: Run, pipe, picture, plan: EditPlan, common: dict, device, after, sections) -> None:
    """The edit (and the fast one) with CUDA graphs (``configure_model(cuda_graphs=True)``), the first run with its
    captures; on a device without CUDA (a dry run) recorded as not measured."""
    if device.type != "cuda":
        run.environment["cuda_graphs"] = "not measured: CUDA graphs need a CUDA device"
        return
    configure_model(family_of(pipe), cuda_graphs=True)
    with UNetCounter(family_of(pipe).network) as counter:
        rec = Recorder(counter, device, after)
        for name in ("ours_graphs_first", "ours_graphs"):  # the first run includes capturing the graphs
            measure_edit(rec, name, pipe, picture, plan, common)
        if getattr(args, "fast", False):
            measure_edit(rec, "ours_graphs_fast", pipe, picture, fast_plan(plan, args.quick), common)
        sections.update(rec.sections)


def partial_saver(run: Run, done: dict, save):
    """A :class:`Recorder` callback that hands ``save`` the run with every section recorded so far, marked
    partial (None when there is nothing to save to)."""
    if save is None:
        return None

    def after(recorder: Recorder) -> None:
        run.sections = {name: s.as_dict() for name, s in {**done, **recorder.sections}.items()}
        run.environment["partial"] = True
        save(run)

    return after


def npi_inversion(rec: Recorder, pipe, picture, plan: EditPlan, common: dict):
    """NPI measured as a section where the family has an unconditional branch (not FLUX: None)."""
    if not family_of(pipe).classifier_free:
        return None
    return rec.measure("ours.B_npi", ours_inversion, pipe, picture, plan, None, common, "npi")


def inversion_errors(pipe, picture, inversion, npi) -> dict:
    """NTI's and NPI's reconstruction errors on the random model (their cost is the point), where both ran."""
    if npi is None or inversion.reconstruction is None:  # FLUX: the plain inversion keeps no reconstruction
        return {}
    x0 = family_of(pipe).encode_image(picture)
    return {"random_model": {"nti_latent_error": relative_error(inversion.reconstruction[-1:], x0),
                             "npi_latent_error": relative_error(npi.reconstruction[-1:], x0)}}


def cache_agreement(latents: torch.Tensor, cached_latents: torch.Tensor) -> dict:
    """Where there is no straightforward run (SDXL): how far the sweep from the cached stages (every conditioning
    tensor saved and loaded) is from stage C's final latents (0 on the CPU)."""
    return {"cached_sweep_latent_max_diff": max_difference(cached_latents, latents),
            "cached_sweep_latent_relative_diff": relative_error(cached_latents, latents)}


def agreement(texts, base_texts, inversion, base_inv, latents, base_latents) -> dict:
    """How far ours is from the straightforward computation (0 up to float noise on the CPU; half precision on
    CUDA adds its rounding)."""
    return {
        "text_embedding_max_diff": max(max_difference(a.optimized_embedding, b.optimized_embedding)
                                       for a, b in zip(texts, base_texts, strict=True)),
        "null_embedding_max_diff": max_difference(inversion.null_embeddings, base_inv.null_embeddings),
        "null_embedding_relative_diff": relative_error(inversion.null_embeddings, base_inv.null_embeddings),
        "final_latent_max_diff": max_difference(latents, base_latents),
        "final_latent_relative_diff": relative_error(latents, base_latents),
    }


def inversion_errors_on_mini(scenes: int, num_steps: int = 50, inner_steps: int = 10) -> dict:
    """NTI vs NPI (and DDIM sampled at 7.5) on the trained miniature model, where reconstruction error means
    something: relative latent error of the guided reconstruction, PSNR of its decoding, UNet work and time."""
    from nonrigid.mini.world import random_scene, render
    from nonrigid.models.loading import load_pipeline
    from nonrigid.stages.text_optimization import TextOptimization

    pipe = load_pipeline("mini", device="cpu", dtype="fp32")
    family = family_of(pipe)
    rows: dict[str, dict[str, list[float]]] = {}
    with UNetCounter(pipe.unet) as counter:
        for seed in range(scenes):
            scene = random_scene(random.Random(seed))
            image = render(scene)
            x0 = family.encode_image(image)
            ceiling = family.decode(x0)[0]
            for source in (scene.caption, ""):
                for method in ("nti", "npi", "ddim"):
                    before = counter.snapshot()
                    started = time.perf_counter()
                    settings = InversionSettings(method, num_steps, 7.5, inner_steps, 1e-5)
                    ((inv, _),) = inversion_stages(family, [InversionRequest(image, source, {})], settings, None)
                    seconds = time.perf_counter() - started
                    work = counter.snapshot() - before
                    if inv.reconstruction is None:  # DDIM: sample the source back at 7.5 (not part of its cost)
                        keep = TextOptimization("", inv.source, inv.source, [], 0, 0, 0.0)
                        back = sample(pipe, inv, keep, (0.0,), (inv.num_steps,), output_type="latent",
                                      use_reconstruction=False)
                    else:
                        back = inv.reconstruction[-1:]
                    row = rows.setdefault(f"{method} ({'caption' if source else 'no'} source)", {})
                    decoded = family.decode(back)[0]
                    for key, value in (("latent_error", relative_error(back, x0)), ("psnr", psnr(decoded, image)),
                                       ("vae_psnr", psnr(ceiling, image)), ("unet_units", work.units),
                                       ("seconds", seconds)):
                        row.setdefault(key, []).append(value)
    return {name: {k: sum(v) / len(v) for k, v in row.items()} for name, row in rows.items()} | {
        "scenes": scenes}


DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def environment(args, pipe, dtype: str) -> dict:
    network = family_of(pipe).network
    device = network.device
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        with contextlib.suppress(OSError, StopIteration):
            name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                        if line.startswith("model name"))
    env = {
        "device": str(device), "device_name": name, "dtype": dtype, "layout": args.layout, "size": args.size,
        "threads": torch.get_num_threads() if device.type == "cpu" else None, "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
        "unet_parameters": parameter_count(network), "vae_parameters": parameter_count(pipe.vae),
        "text_encoder_parameters": parameter_count(pipe.text_encoder),
        "attention_processors": sorted({type(p).__name__ for p in network.attn_processors.values()}),
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    family = family_of(pipe)
    if family.name != "sd":  # only what SD 1.x runs do not have, so their records keep their keys
        env |= {"family": family.describe(), "guidance_scale": family.defaults.guidance_scale,
                "vae_dtype": DTYPE_NAMES.get(pipe.vae.dtype, str(pipe.vae.dtype)),
                "text_encoder_2_parameters": parameter_count(pipe.text_encoder_2)}
    if args.quick:
        env["quick"] = True
    if getattr(args, "dry_run", False):
        env["dry_run"] = True
    return env


# --------------------------------------------------------------------------------------------------- report


NOISE = 0.02  # run-to-run spread of one stage's wall time on the shared CPU (same code measured twice)


def verdict(ok: bool | str) -> str:
    return ok if isinstance(ok, str) else ("yes" if ok else "no")


def no_slower(ours: dict, base: dict) -> bool | str:
    """Ours no slower than straightforward; with equal UNet work, a difference within :data:`NOISE` is noise."""
    if ours["seconds"] <= base["seconds"]:
        return ours["unet_units"] <= base["unet_units"]
    if ours["unet_units"] == base["unet_units"] and ours["seconds"] <= base["seconds"] * (1 + NOISE):
        return f"equal within noise ({NOISE:.0%})"
    return False


def targets(run: Run) -> list[tuple[str, str, bool | str]]:
    """(target, measured, met) for the issue's targets that this configuration can answer."""
    s = run.sections
    plan = run.plan
    n, k = plan["num_steps"], round(plan["inject"] * plan["num_steps"])
    rows: list[tuple[str, str, bool | str]] = []
    full_run_units = 2 * n  # one straightforward 50-step sampling run: two guidance branches per step
    extra = s["ours.extra_variant"]["unet_units"]
    bound = (n - k) / n * full_run_units
    rows.append((f"another eta from cached stages: UNet work <= (N-K)/N of a full {n}-step run ({bound:g})",
                 f"{extra} ({extra / full_run_units:.2f} of {full_run_units})", extra <= bound))
    if run.config in ("sdxl-cpu", "sd3-cpu", "flux-cpu"):  # no straightforward run to compare with (SD 1.x only)
        o = s["ours.edit"]
        return [*rows, ("whole default edit: >= 90% of wall time inside UNet calls", f"{o['unet_share']:.1%}",
                        o["unet_share"] >= 0.9)]
    if run.config == "cpu":
        return rows + cpu_targets(s)
    return rows + gpu_targets(run.config, s, run.environment["size"], len(plan["etas"]))


def cpu_targets(s: dict) -> list[tuple[str, str, bool | str]]:
    """The CPU configuration's targets: ours against the straightforward procedure."""
    rows: list[tuple[str, str, bool | str]] = []
    base_c, ours_c = s["straightforward.C"], s["ours.sweep_cached"]
    rows.append(("default sweep from cached stages >= 2x faster than six straightforward sampling runs",
                 f"{base_c['seconds'] / ours_c['seconds']:.2f}x ({base_c['seconds']:.1f} s vs "
                 f"{ours_c['seconds']:.1f} s; by UNet work {base_c['unet_units']} / {ours_c['unet_units']} = "
                 f"{base_c['unet_units'] / ours_c['unet_units']:.2f}x)",
                 base_c["seconds"] / ours_c["seconds"] >= 2))
    for stage, label in (("A", "text optimization"), ("B", "inversion")):
        b, o = s[f"straightforward.{stage}"], s[f"ours.{stage}"]
        rows.append((f"{label}: no slower than straightforward, same UNet work by count",
                     f"{b['seconds'] / o['seconds']:.2f}x ({b['seconds']:.1f} s vs {o['seconds']:.1f} s); "
                     f"{o['unet_units']} vs {b['unet_units']} evaluations", no_slower(o, b)))
    ab, a, b = s["ours.AB"], s["straightforward.A"], s["straightforward.B"]
    rows.append(("A and B together: fewer sequential UNet calls than straightforward A then B",
                 f"{ab['unet_calls']} calls vs {a['unet_calls']} + {b['unet_calls']}; {ab['seconds']:.1f} s vs "
                 f"{a['seconds'] + b['seconds']:.1f} s", ab["unet_calls"] < a["unet_calls"] + b["unet_calls"]))
    b, o = s["straightforward.edit"], s["ours.edit"]
    rows.append(("whole default edit faster than straightforward", f"{b['seconds'] / o['seconds']:.2f}x "
                 f"({b['seconds']:.0f} s vs {o['seconds']:.0f} s)", o["seconds"] < b["seconds"]))
    rows.append(("whole default edit: >= 90% of wall time inside UNet calls", f"{o['unet_share']:.1%}",
                 o["unet_share"] >= 0.9))
    return rows


NOT_REACHED = "not measured (the run stopped before it)"
GPU_TARGETS = {  # config: (family name, edit seconds, variant seconds, peak GB, low-memory peak GB); None: no target
    "cuda": ("default", 10, 0.3, 16, 8),
    "sdxl": ("SDXL default", 25, None, 24, 12),
    "sd3": ("SD3 default", 20, None, None, None),  # the flow-model issue's SD3-medium target
    "flux": ("FLUX.1-dev default", None, None, None, 24),  # the flow-model issue's FLUX target: 24 GB, low memory
}
FAST_TARGETS = {"cuda": 3, "sdxl": 8}  # --fast edit seconds (the first-edit issue)


def gpu_targets(config: str, s: dict, size: int, variants: int) -> list[tuple[str, str, bool | str]]:
    """The CUDA configurations' targets, each judged from the sections it needs; a partial run's missing section
    leaves its target unmeasured rather than hiding the others."""
    label, edit_s, variant_s, peak_gb, low_gb = GPU_TARGETS[config]
    o, low = s.get("ours.edit"), s.get("ours_low_memory.edit")
    one = s.get("ours.extra_variant")
    sweep = s.get("ours.sweep_cached") or s.get("ours.C")  # a fresh stage C samples the same six variants
    gb = 1024**3

    def judged(target: str, section: dict | None, measure, bound, unit: str, fallback: str):
        if section is None:
            return (target, NOT_REACHED, "not measured")
        value = measure(section)
        return (target, f"{value:.2f} {unit}" if unit == "GB" else f"{value:.1f} {unit}",
                value <= bound if bound is not None else fallback)

    rows = [judged(f"{label} edit at {size} px" + (f" within {edit_s} s" if edit_s else " (no target)"),
                   o, lambda x: x["seconds"], edit_s, "s", "no target")]
    if sweep is None or one is None:
        rows.append(("each additional variant", NOT_REACHED, "not measured"))
    else:
        per_variant = (sweep["seconds"] - one["seconds"]) / (variants - 1)
        source = "a sweep from cached stages" if "ours.sweep_cached" in s else "stage C"
        rows.append((f"each additional variant{f' within {variant_s} s' if variant_s else ' (no target here)'}",
                     f"{per_variant:.2f} s per variant in {source}; {one['seconds']:.2f} s for one extra variant "
                     "alone", per_variant <= variant_s if variant_s else "no target"))
    rows.append(judged(f"peak GPU memory{f' within {peak_gb} GB' if peak_gb else ' (no target)'} (default)", o,
                       lambda x: x["peak_bytes"] / gb, peak_gb, "GB", "no target"))
    rows.append(judged(f"peak GPU memory{f' within {low_gb} GB' if low_gb else ' (no target)'} (--low-memory)", low,
                       lambda x: x["peak_bytes"] / gb, low_gb, "GB", "no target"))
    fast_s = FAST_TARGETS.get(config)
    for name, how in (("ours_fast.edit", ""), ("ours_graphs.edit", ", CUDA graphs"),
                      ("ours_graphs_fast.edit", ", CUDA graphs")):
        bound = fast_s if "fast" in name else edit_s
        if name in s:
            what = "--fast edit" if "fast" in name else f"{label} edit"
            rows.append(judged(f"{what}{how}" + (f" within {bound} s" if bound else " (no target)"), s[name],
                               lambda x: x["seconds"], bound, "s", "no target"))
    return rows

SECTION_LABELS = {
    "keys": "model fingerprint and image digest (cache keys)",
    "AB": "A and B together, as an edit runs them (A rides along B's calls)",
    "A": "A text optimization (alone)",
    "B": "B inversion (NTI, alone)",
    "C": "C sampling (6 etas)",
    "edit": "whole edit (keys+AB+C)",
    "sweep_cached": "default sweep from cached stages",
    "extra_variant": "one more eta from cached stages",
    "B_npi": "B inversion (NPI)",
}


def render_block(run: Run) -> str:
    env, plan = run.environment, run.plan
    mb = 1024**2
    vae = env.get("vae_dtype", env["dtype"])
    networks = env["dtype"] if vae == env["dtype"] else f"{env['dtype']} (the VAE in {vae}: force_upcast)"
    if "text_encoder_2_parameters" in env:
        encoders = (f"text encoders {env['text_encoder_parameters'] / 1e6:.1f} M + "
                    f"{env['text_encoder_2_parameters'] / 1e6:.1f} M")
    else:
        encoders = f"text encoder {env['text_encoder_parameters'] / 1e6:.1f} M"
    guidance = f", guidance {env['guidance_scale']:g}" if "guidance_scale" in env else ""
    lines = [
        f"- Measured {env['date']} on {env['device_name']} ({env['device']}"
        + (f", {env['threads']} thread(s), {env['cpu_count']} cores" if env["threads"] else "")
        + f"), torch {env['torch']}, diffusers {env['diffusers']}; networks in {networks} for ours.",
        f"- Model: `{env['layout']}` layout with random weights, UNet {env['unet_parameters'] / 1e6:.1f} M, VAE "
        f"{env['vae_parameters'] / 1e6:.1f} M, {encoders} "
        f"parameters; attention: {', '.join(env['attention_processors'])}; {env['size']} px.",
        f"- Edit: {plan['opt_steps']} text-optimization steps, seeds {list(plan['seeds'])}, "
        + (f"plain inversion (FLUX's stand-in for NTI; source prompt {plan['source_prompt']!r}{guidance}), "
           if env.get("family", "").startswith("FLUX") else
           f"NTI ({plan['inner_steps']} inner steps, source prompt {plan['source_prompt']!r}{guidance}), ")
        +
        f"{plan['num_steps']} steps, "
        f"etas {list(plan['etas'])}, inject {plan['inject']} (K = {round(plan['inject'] * plan['num_steps'])}).",
        f"- Command: `{env['command']}`",
    ]
    if env.get("partial"):
        lines.insert(0, f"- **Partial: the run stopped (a time limit) after {len(run.sections)} sections; the rows "
                        "below are the ones that finished, and a target whose section is missing is not judged.**")
    if env.get("cuda_graphs"):
        lines.append(f"- CUDA graphs: {env['cuda_graphs']}.")
    if env.get("dry_run"):
        lines.insert(0, "- **Dry run (`--dry-run`): this GPU configuration's code path on the CPU with a tiny model; "
                        "it checks the script, it measures nothing.**")
    elif env.get("quick"):
        lines.insert(0, "- **Quick check (`--quick`): a few steps of everything at the default edit's shapes (so its "
                        "peak memory is the default edit's), to see that the script runs. Not a "
                        "measurement of the default edit; not for docs/PERFORMANCE.md.**")
    if "load_average_before" in env:
        before, after = env["load_average_before"], env["load_average_after"]
        lines.append(f"- Machine load average (1/5/15 min) before: {before[0]:.1f}/{before[1]:.1f}/{before[2]:.1f}, "
                     f"after: {after[0]:.1f}/{after[1]:.1f}/{after[2]:.1f} (other processes shared the cores).")
    lines += ["", "| procedure | stage | wall s | UNet evaluations | UNet calls | inside UNet | peak memory |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    labels = SECTION_LABELS
    if env.get("family", "").startswith("FLUX"):  # no null text: the plain inversion stands in for NTI
        labels = {**SECTION_LABELS, "B": "B inversion (plain, FLUX's stand-in for NTI, alone)"}
    for name, s in run.sections.items():
        who, stage = name.split(".", 1)
        lines.append(f"| {who.replace('_', ' ')} | {labels.get(stage, stage)} | {s['seconds']:.1f} | "
                     f"{s['unet_units']} | {s['unet_calls']} | {s['unet_share']:.1%} | "
                     f"{s['peak_bytes'] / mb:,.0f} MB |")
    memory = ("process RSS, weights included" if env["device"] == "cpu"
              else "torch.cuda.max_memory_allocated")
    lines += ["", f"Peak memory is {memory}.", "", "| target | measured | met |", "| --- | --- | --- |"]
    try:
        lines += [f"| {t} | {m} | {verdict(ok)} |" for t, m, ok in targets(run)]
    except KeyError as missing:  # a partial run: the section a target needs was not reached
        lines.append(f"| the targets | not judged: section {missing} was not reached | not measured |")
    c = run.checks
    if "text_embedding_max_diff" in c:
        lines += ["", f"Agreement with the straightforward computation: optimized embedding max |diff| "
                  f"{c['text_embedding_max_diff']:.2e}, null embeddings max |diff| {c['null_embedding_max_diff']:.2e} "
                  f"(relative {c['null_embedding_relative_diff']:.2e}), final latents max |diff| "
                  f"{c['final_latent_max_diff']:.2e} (relative {c['final_latent_relative_diff']:.2e})."]
    elif c:
        lines += ["", "No straightforward run: `benchmarks/straightforward.py` calls the UNet the SD 1.x way "
                  "(token embeddings only, no pooled or size conditioning). The sweep from the cached stages "
                  "(token and pooled embeddings saved and loaded) against stage C: final latents max |diff| "
                  f"{c['cached_sweep_latent_max_diff']:.2e} (relative {c['cached_sweep_latent_relative_diff']:.2e})."]
    inv = run.inversions
    if "random_model" in inv:
        r = inv["random_model"]
        npi_s = run.sections["ours.B_npi"]
        nti_s = run.sections.get("ours.B")  # NTI alone: measured on the CPU; on a GPU it only runs alongside A
        nti_cost = (f"NTI {nti_s['seconds']:.1f} s, {nti_s['unet_units']} evaluations" if nti_s else
                    "NTI runs alongside stage A there (section AB)")
        lines += ["", "Negative-prompt vs null-text inversion on this model: NPI "
                  f"{npi_s['seconds']:.1f} s, {npi_s['unet_units']} UNet evaluations; {nti_cost}. "
                  "Reconstruction error (relative, latent; random weights, so "
                  f"only the cost is meaningful here): NPI {r['npi_latent_error']:.3f}, NTI "
                  f"{r['nti_latent_error']:.3f}."]
    if "mini" in inv:
        mini = inv["mini"]
        lines += ["", f"On the trained miniature model (64 px, {plan['num_steps']} steps, guidance 7.5, mean of "
                  f"{mini['scenes']} "
                  "scenes; the reconstruction is the guided sampling path an edit injects from):", "",
                  "| inversion | latent error | PSNR dB (VAE alone) | UNet evaluations | seconds |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for name, row in mini.items():
            if name == "scenes":
                continue
            lines.append(f"| {name} | {row['latent_error']:.4f} | {row['psnr']:.1f} ({row['vae_psnr']:.1f}) | "
                         f"{row['unet_units']:.0f} | {row['seconds']:.1f} |")
    return "\n".join(lines)


def update_doc(doc: Path, results: Path) -> None:
    """Replace each configuration's block in ``doc`` by the rendering of its latest results."""
    text = doc.read_text() if doc.is_file() else "# Performance\n"
    for config in CONFIGS:
        path = results / f"{config}.json"
        if not path.is_file():
            continue
        run = Run(**json.loads(path.read_text()))
        if run.environment.get("quick") and doc.resolve() == DOC.resolve():
            print(f"not rendering {path} into {doc}: it is a --quick check, not a measurement")
            continue
        text = replace_block(text, f"bench:{config}", render_block(run))
    doc.write_text(text)


# --------------------------------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", choices=("auto", *CONFIGS), default="auto",
                   help="\n".join(f"{c.name}: {c.summary} ({c.device})" for c in CONFIGS.values())
                   + "\nauto: cuda if a GPU is present, else cpu")
    p.add_argument("--layout", choices=SD_LAYOUTS + SDXL_LAYOUTS + SD3_LAYOUTS + FLUX_LAYOUTS, default=None,
                   help="model layout (default: the config's; tiny / tiny-sdxl / tiny-sd3 / tiny-flux for a smoke "
                   "run)")
    p.add_argument("--size", type=int, default=None, help="image size (default: the config's)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (1: on shared cores several threads per process wait on each other)")
    p.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16", help="CUDA: precision of ours' networks")
    p.add_argument("--compile", action="store_true", help="CUDA: also measure a torch.compile'd UNet")
    p.add_argument("--fast", action="store_true", help="CUDA: also measure an edit with ours' fast preset")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="CUDA: also measure the edit (and with --fast the fast one) with CUDA graphs")
    p.add_argument("--dry-run", action="store_true",
                   help="a CUDA configuration's code path on the CPU, with its tiny layout and --quick: checks a GPU "
                        "run's script without a GPU (CUDA graphs are then recorded as not measured)")
    p.add_argument("--quick", action="store_true",
                   help="a few steps of everything (checks the script runs); results are marked as a check, go to\n"
                        f"{QUICK_RESULTS} unless --results is given and never into {DOC.name}")
    p.add_argument("--no-mini", dest="mini", action="store_false", help="skip NTI vs NPI on the miniature model")
    p.add_argument("--mini-scenes", type=int, default=2, help="scenes for the miniature model comparison")
    p.add_argument("--results", type=Path, default=None, help="folder for <config>.json (default: benchmarks/results)")
    p.add_argument("--doc", default=None,
                   help="markdown file whose blocks are updated ('' to skip; default: docs/PERFORMANCE.md)")
    args = p.parse_args(argv)
    if args.config == "auto":
        args.config = "cuda" if torch.cuda.is_available() else "cpu"
    config = CONFIGS[args.config]
    if args.dry_run:
        if config.device != "cuda":
            p.error("--dry-run checks a CUDA configuration (cuda, sdxl, sd3, flux) on the CPU")
        args.quick, args.mini = True, False
        args.layout = args.layout or DRY_RUN_LAYOUTS[config.family]
        args.size = args.size or 64
        args.dtype = "fp32"  # the CPU's half-precision kernels are slow: the dry run checks paths, not precision
    elif config.device == "cuda" and not torch.cuda.is_available():
        sys.exit(f"bench_edit.py: --config {config.name} needs a CUDA GPU and torch.cuda.is_available() is False"
                 + f" (on the CPU: --config {CPU_CONFIG[config.family]})")
    args.layout = args.layout or config.layout
    if args.layout not in config.layouts:
        p.error(f"--config {config.name} takes --layout {' / '.join(config.layouts)}, not {args.layout}")
    args.size = args.size or config.size
    if args.results is None:
        args.results = QUICK_RESULTS if args.quick else RESULTS
    if args.doc is None:
        args.doc = None if args.quick else DOC
    else:
        args.doc = Path(args.doc) if args.doc else None
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    plan = EditPlan()
    if args.quick:
        # the default edit's shapes (six variants, one seed) with few steps: its peaks are the default edit's
        plan = EditPlan(num_steps=5, opt_steps=3, inner_steps=2, inject=0.4)
        args.mini_scenes = min(args.mini_scenes, 1)
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"{args.config}.json"

    def save(run: Run) -> None:  # whole or not at all: a run stopped mid-write keeps its previous save
        part = path.with_suffix(".json.part")
        part.write_text(json.dumps(asdict(run), indent=1))
        part.replace(path)

    run = run_cuda(args, plan, save=save) if CONFIGS[args.config].device == "cuda" else run_cpu(args, plan)
    save(run)
    print(render_block(run))
    if args.doc is not None:
        update_doc(args.doc, args.results)
        print(f"\nwrote {path} and updated {args.doc}")
    else:
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
