"""The front door of an edit: every caller (the command line, the page, the benchmark, the Python API) resolves a
method's parameters once and prepares its images once here, then the method runs (:func:`run_edits`).

Below this point everything takes the model's :class:`~nonrigid.models.family.ModelFamily`, the inputs as
:class:`~.base.EditInput` and the parameters resolved; every method returns :class:`~.base.EditResult`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageOps

from ..errors import UsageError
from ..images import MaskLike, load_image, load_mask, mask_digest, open_image
from ..models.family import ModelFamily
from ..models.fingerprint import model_fingerprint
from ..progress import Progress
from ..stages.cache import StageCache
from ..stages.cached import cache_fields
from ..timing import Stopwatch
from . import dds, edit_friendly, flowedit, imagic, kontext, ledits, masactrl, nti, ours, qwen_edit
from .base import EditInput, EditResult, MethodContext, MethodInfo, Variant, resolve_params
from .catalogue import method_info, methods_for

logger = logging.getLogger("nonrigid")

# each method's ``run(model, edits, ctx) -> list[EditResult]``, by name
RUNNERS: dict[str, Callable[..., list[EditResult]]] = {
    "ours": ours.run, "nti": nti.run, "imagic": imagic.run, "masactrl": masactrl.run,
    "edit-friendly": edit_friendly.run, "dds": dds.run, "ledits": ledits.run, "flowedit": flowedit.run,
    "kontext": kontext.run, "qwen-edit": qwen_edit.run,
}


@dataclass(frozen=True)
class EditRequest:
    """One image to edit: the image (a path or a picture), its prompts and, optionally, a mask of where the edit
    may change it (white; black is kept: a path, a picture or an array of the image's size) and an instruction
    for the methods that take one (``MethodInfo.instructions``: kontext, qwen-edit; None: made from the target
    prompt by the catalogue's template; the other methods ignore it), with where it came from ("given", or
    "benchmark" for a dataset's own)."""

    image: str | os.PathLike | Image.Image
    target_prompt: str
    source_prompt: str = ""
    mask: MaskLike | None = None
    instruction: str | None = None
    instruction_source: str = "given"


def run_edits(
    model: ModelFamily,
    requests: Sequence[EditRequest],
    method: str = "ours",
    params: Mapping[str, Any] | None = None,
    *,
    seeds: Sequence[int] = (0,),
    size: int | None = None,
    crop: str | None = None,
    cache: StageCache | None = None,
    batch_size: int | None = None,
    preset: str | None = None,
    progress: Progress = False,
) -> list[EditResult]:
    """Edit every request with ``method``, the same parameters for all; ``params`` override the method's defaults.

    Every method gets the same inputs and returns the same result (variants in grid order, every parameter
    resolved, timings, cache hits), so results can be saved, scored and compared alike. A method whose result does
    not depend on the seed (``MethodInfo.seeded`` false) runs once, for the first seed. ``size`` defaults to the
    model's native size and a method's classifier-free guidance scale to its family's unless ``params`` set them.
    The picture keeps its aspect ratio at about ``size`` x ``size`` pixels, or with ``crop="square"`` is
    center-cropped to a square (:func:`~nonrigid.images.load_image`). A ``preset`` (``"fast"``) sets the method's
    parameters that ``params`` leave unset. A request's mask limits the edit to its white part, for the methods
    that can (``MethodInfo.masks``).
    A method that batches across images (``MethodInfo.batches_images``) edits all requests as one model batch, each
    result equal to the image's own edit up to the last bits of batched products, its timings its share of the
    batch; the others edit one image per call.
    """
    info = method_info(method)
    info.check_family(model, methods_for(model))
    if not info.masks and any(request.mask is not None for request in requests):
        raise UsageError(f"method {method!r} takes no mask: {info.why_no_mask}")
    resolved = resolve_params(info, params or {}, model, preset=preset)
    seeds = tuple(dict.fromkeys(int(s) for s in seeds))
    if not seeds:
        raise UsageError("give at least one seed")
    if batch_size is not None and batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    edits = prepare_inputs(model, requests, size, crop)
    ctx = MethodContext(info, resolved, seeds if info.seeded else seeds[:1], cache, progress, batch_size)
    run = RUNNERS[method]
    groups = [list(edits)] if info.batches_images else [[edit] for edit in edits]
    results = []
    for group in groups:
        watch = Stopwatch()
        found = run(model, group, ctx)
        for result, edit in zip(found, group, strict=True):
            result.timings["total"] = watch.total() / len(group)
            result.variants = [with_params(info, v) for v in result.variants]
            result.record.update(edit.record)
            if preset is not None:
                result.record["preset"] = preset
        results.extend(found)
    return results


def prepare_inputs(model: ModelFamily, requests: Sequence[EditRequest], size: int | None = None,
                   crop: str | None = None) -> list[EditInput]:
    """Each request's image as every method sees it (read once, at the working size: ``size``, default the
    model's native size, with the sides rounded to the model's latent grid; see :func:`run_edits`), its mask
    prepared alike, and its cache fields."""
    size = model.defaults.size if size is None else size
    multiple = model.latent_multiple
    if size <= 0 or (crop == "square" and size % multiple):
        raise UsageError(f"size must be a positive multiple of {multiple} for this model, got {size}")
    fingerprint = model_fingerprint(model)
    edits = []
    for request in requests:
        raw = request.image if isinstance(request.image, Image.Image) else open_image(request.image)
        upright = ImageOps.exif_transpose(raw)
        picture = load_image(upright, size, crop, multiple)
        record = {"size": size, "input_size": list(upright.size), "working_size": list(picture.size),
                  **({"crop": crop} if crop else {})}
        mask = None
        if request.mask is not None:
            mask, note = load_mask(request.mask, upright.size, size, crop, multiple)
            record |= {"mask": mask_digest(mask), **({"mask_note": note} if note else {})}
            if note:
                logger.warning("%s", note)
        edits.append(EditInput(picture, request.target_prompt, request.source_prompt,
                               cache_fields(model, picture, fingerprint), mask, record, request.instruction,
                               request.instruction_source))
    return edits


def with_params(info: MethodInfo, variant: Variant) -> Variant:
    """``variant`` with every sweep parameter's value by name: the method's own, else its knob's value."""
    by_label = {p.label: p.name for p in info.sweeps}
    found = {by_label[label]: value for label, value in variant.knobs.items() if label in by_label}
    variant.params = {**found, **variant.params}
    return variant
