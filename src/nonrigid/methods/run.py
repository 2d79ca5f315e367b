"""Run any method by name: validate its parameters, prepare the image and cache keys, time it, wrap the result."""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from ..errors import UsageError
from ..images import load_image
from ..models.registry import family_of
from ..progress import Progress
from ..stages import DEFAULT_GUIDANCE
from ..stages.cache import StageCache
from ..stages.cached import cache_fields
from ..timing import Stopwatch
from .base import MethodContext, MethodInfo, MethodResult, MethodVariant, resolve_params
from .catalogue import MODULES, method_info


def prepare_image(pipe, image: str | os.PathLike | Image.Image, size: int | None = None) -> Image.Image:
    """The input as every method sees it: read, center-cropped and resized to ``size`` (default: the model's
    native size, e.g. 512 px for SD 1.x, 1024 for SDXL), which the model's latent grid must divide."""
    family = family_of(pipe)
    size = family.defaults.size if size is None else size
    multiple = family.latent_multiple
    if size <= 0 or size % multiple:
        raise UsageError(f"size must be a positive multiple of {multiple} for this model, got {size}")
    return load_image(image, size)


def run_method(
    pipe,
    image: str | os.PathLike | Image.Image,
    target_prompt: str,
    method: str = "ours",
    params: Mapping[str, Any] | None = None,
    *,
    seeds: Sequence[int] = (0,),
    source_prompt: str = "",
    size: int | None = None,
    cache: StageCache | None = None,
    batch_size: int | None = None,
    progress: Progress = False,
) -> MethodResult:
    """Edit ``image`` toward ``target_prompt`` with ``method``; ``params`` override the method's defaults.

    Every method gets the same inputs and returns the same kind of result (variants in grid order, every
    parameter resolved, timings, cache hits), so results can be saved, scored and compared alike. A method whose
    result does not depend on the seed (``MethodInfo.seeded`` false) runs once, for the first seed. ``size``
    defaults to the model's native size and a method's classifier-free guidance scale to its family's (7.5 for
    SD, 5 for SDXL) unless ``params`` set them.
    """
    request = EditRequest(image, target_prompt, source_prompt)
    return run_method_many(pipe, [request], method, params, seeds=seeds, size=size, cache=cache,
                           batch_size=batch_size, progress=progress)[0]


@dataclass(frozen=True)
class EditRequest:
    """One image to edit in :func:`run_method_many`: the image and its prompts."""

    image: str | os.PathLike | Image.Image
    target_prompt: str
    source_prompt: str = ""


def batches_pairs(method: str) -> bool:
    """Whether ``method`` runs several images as one model batch (its module has ``run_many``)."""
    method_info(method)
    return hasattr(importlib.import_module(f".{MODULES[method]}", __package__), "run_many")


def run_method_many(
    pipe,
    requests: Sequence[EditRequest],
    method: str = "ours",
    params: Mapping[str, Any] | None = None,
    *,
    seeds: Sequence[int] = (0,),
    size: int | None = None,
    cache: StageCache | None = None,
    batch_size: int | None = None,
    progress: Progress = False,
) -> list[MethodResult]:
    """:func:`run_method` for several images with the same method and parameters. A method that batches across
    images (a module-level ``run_many``: ours) runs them as one model batch, each result equal to the image's own
    run up to the last bits of batched products, its timings its share of the batch; others run one by one."""
    info = method_info(method)
    info.check_family(family_of(pipe))
    resolved = resolve_params(info, with_family_defaults(info, pipe, params or {}))
    seeds = tuple(dict.fromkeys(int(s) for s in seeds))
    if not seeds:
        raise UsageError("give at least one seed")
    if batch_size is not None and batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    module = importlib.import_module(f".{MODULES[method]}", __package__)
    pictures = [prepare_image(pipe, request.image, size) for request in requests]
    fields = [cache_fields(pipe, picture) for picture in pictures]
    ctxs = [MethodContext(seeds=seeds if info.seeded else seeds[:1], source_prompt=request.source_prompt,
                          cache=cache, cache_fields=field_set, progress=progress, batch_size=batch_size)
            for request, field_set in zip(requests, fields, strict=True)]
    targets = [request.target_prompt for request in requests]
    watch = Stopwatch()
    if hasattr(module, "run_many") and len(requests) > 1:
        outputs = module.run_many(pipe, pictures, targets, resolved, ctxs)
        totals = [watch.total() / len(requests)] * len(requests)
    else:
        outputs, totals = [], []
        for picture, target, ctx in zip(pictures, targets, ctxs, strict=True):
            single = Stopwatch()
            outputs.append(module.run(pipe, picture, target, resolved, ctx))
            totals.append(single.total())
    return [
        MethodResult(
            method=method, input_image=picture, target_prompt=target, source_prompt=ctx.source_prompt,
            seeds=ctx.seeds, params={**resolved, **output.chosen},
            variants=[with_params(info, v) for v in output.variants],
            knob_labels=tuple(p.label for p in info.sweeps), timings={**output.timings, "total": total},
            cache=output.cache, record=output.record, model_fingerprint=field_set["model"], stages=output.stages,
        )
        for picture, target, ctx, output, total, field_set in zip(pictures, targets, ctxs, outputs, totals, fields,
                                                                   strict=True)
    ]


def with_family_defaults(info: MethodInfo, pipe, params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` with the model family's guidance scale where the method has a plain classifier-free guidance
    scale the caller left unset (not for ours with DDIM inversion, which samples at guidance 1).

    On a family without an unconditional branch (FLUX), ours' inversion, when unset, is the plain inversion (the
    stand-in for NTI there: inverting and sampling at the same distilled guidance walk one vector field both
    ways, docs/FAMILIES.md), and its guidance the family's distilled value. A family made for another number of
    steps (FLUX schnell: 4) sets ``num_steps`` when unset; step-counting defaults (FlowEdit's ``n_max``) follow.
    A method's reference settings for the family (FlowEdit on FLUX: 28 steps, ``n_max`` 24, guidance 1.5 / 5.5)
    fill what the caller left unset."""
    params = dict(params)
    names = {p.name for p in info.params}
    family = family_of(pipe)
    if "inversion" in names and params.get("inversion") is None and not family.classifier_free:
        params["inversion"] = "ddim"
    if "num_steps" in names and params.get("num_steps") is None and family.default_steps is not None:
        params["num_steps"] = family.default_steps  # FLUX schnell: the few steps it is distilled for
    params = _with_reference_settings(info, family.name, params)
    if "guidance_scale" not in names or params.get("guidance_scale") is not None:
        return params
    inversion = params.get("inversion", info.param("inversion").default) if "inversion" in names else None
    if inversion == "ddim" and family.classifier_free:
        return params
    own = DEFAULT_GUIDANCE[inversion] if inversion else info.param("guidance_scale").default
    guidance = family.defaults.guidance_scale
    if guidance != own:  # the method's own default stays (and stays unset in the record) where the family agrees
        params["guidance_scale"] = guidance
    return params


def _with_reference_settings(info: MethodInfo, family_name: str, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with the method's reference settings for this family (``MethodInfo.family_settings``) where
    unset; a step-counting one (FlowEdit's ``n_max``, 24 of FLUX's 28 steps) scaled to the steps run."""
    reference = info.family_settings.get(family_name, {})
    steps = int(params.get("num_steps") or reference.get("num_steps", 0))
    for name, value in reference.items():
        if params.get(name) is not None:
            continue
        if info.param(name).per_steps is not None and "num_steps" in reference:
            value = tuple(dict.fromkeys(max(1, round(v * steps / reference["num_steps"])) for v in value))
        params[name] = value
    return params


def with_params(info: MethodInfo, variant: MethodVariant) -> MethodVariant:
    """``variant`` with every sweep parameter's value by name: the method's own, else its knob's value."""
    by_label = {p.label: p.name for p in info.sweeps}
    found = {by_label[label]: value for label, value in variant.knobs.items() if label in by_label}
    variant.params = {**found, **variant.params}
    return variant
