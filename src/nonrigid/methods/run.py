"""The front door of an edit: every caller (the command line, the page, the benchmark, the Python API) resolves a
method's parameters once and prepares its images once here, then the method runs (:func:`run_edits`).

Below this point everything takes the model's :class:`~nonrigid.models.family.ModelFamily`, the inputs as
:class:`~.base.EditInput` and the parameters resolved; every method returns :class:`~.base.EditResult`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from ..errors import UsageError
from ..images import load_image
from ..models.family import ModelFamily
from ..models.fingerprint import model_fingerprint
from ..progress import Progress
from ..stages.cache import StageCache
from ..stages.cached import cache_fields
from ..timing import Stopwatch
from . import dds, edit_friendly, flowedit, imagic, ledits, masactrl, nti, ours
from .base import EditInput, EditResult, MethodContext, MethodInfo, Variant, resolve_params
from .catalogue import method_info

# each method's ``run(model, edits, ctx) -> list[EditResult]``, by name
RUNNERS: dict[str, Callable[..., list[EditResult]]] = {
    "ours": ours.run, "nti": nti.run, "imagic": imagic.run, "masactrl": masactrl.run,
    "edit-friendly": edit_friendly.run, "dds": dds.run, "ledits": ledits.run, "flowedit": flowedit.run,
}


@dataclass(frozen=True)
class EditRequest:
    """One image to edit: the image (a path or a picture) and its prompts."""

    image: str | os.PathLike | Image.Image
    target_prompt: str
    source_prompt: str = ""


def run_edits(
    model: ModelFamily,
    requests: Sequence[EditRequest],
    method: str = "ours",
    params: Mapping[str, Any] | None = None,
    *,
    seeds: Sequence[int] = (0,),
    size: int | None = None,
    cache: StageCache | None = None,
    batch_size: int | None = None,
    progress: Progress = False,
) -> list[EditResult]:
    """Edit every request with ``method``, the same parameters for all; ``params`` override the method's defaults.

    Every method gets the same inputs and returns the same result (variants in grid order, every parameter
    resolved, timings, cache hits), so results can be saved, scored and compared alike. A method whose result does
    not depend on the seed (``MethodInfo.seeded`` false) runs once, for the first seed. ``size`` defaults to the
    model's native size and a method's classifier-free guidance scale to its family's unless ``params`` set them.
    A method that batches across images (``MethodInfo.batches_images``) edits all requests as one model batch, each
    result equal to the image's own edit up to the last bits of batched products, its timings its share of the
    batch; the others edit one image per call.
    """
    info = method_info(method)
    info.check_family(model)
    resolved = resolve_params(info, params or {}, model)
    seeds = tuple(dict.fromkeys(int(s) for s in seeds))
    if not seeds:
        raise UsageError("give at least one seed")
    if batch_size is not None and batch_size < 1:
        raise UsageError(f"batch_size must be >= 1, got {batch_size}")
    edits = prepare_inputs(model, requests, size)
    ctx = MethodContext(info, resolved, seeds if info.seeded else seeds[:1], cache, progress, batch_size)
    run = RUNNERS[method]
    groups = [list(edits)] if info.batches_images else [[edit] for edit in edits]
    results = []
    for group in groups:
        watch = Stopwatch()
        found = run(model, group, ctx)
        for result in found:
            result.timings["total"] = watch.total() / len(group)
            result.variants = [with_params(info, v) for v in result.variants]
        results.extend(found)
    return results


def prepare_inputs(model: ModelFamily, requests: Sequence[EditRequest], size: int | None = None) -> list[EditInput]:
    """Each request's image as every method sees it (read once, center-cropped and resized to ``size``, default
    the model's native size, which the model's latent grid must divide) with its cache fields."""
    size = model.defaults.size if size is None else size
    multiple = model.latent_multiple
    if size <= 0 or size % multiple:
        raise UsageError(f"size must be a positive multiple of {multiple} for this model, got {size}")
    fingerprint = model_fingerprint(model)
    pictures = [load_image(request.image, size) for request in requests]
    return [EditInput(picture, request.target_prompt, request.source_prompt,
                      cache_fields(model, picture, fingerprint))
            for request, picture in zip(requests, pictures, strict=True)]


def with_params(info: MethodInfo, variant: Variant) -> Variant:
    """``variant`` with every sweep parameter's value by name: the method's own, else its knob's value."""
    by_label = {p.label: p.name for p in info.sweeps}
    found = {by_label[label]: value for label, value in variant.knobs.items() if label in by_label}
    variant.params = {**found, **variant.params}
    return variant
