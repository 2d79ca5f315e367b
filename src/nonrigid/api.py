"""The Python API's front door: the README's functions, taking a loaded model (the :class:`ModelFamily` that
:func:`~nonrigid.models.loading.load_model` returns, or the diffusers pipeline of
:func:`~nonrigid.models.loading.load_pipeline`), resolving its family once, and calling the batched stages or the
methods' front door with a batch of one.

Everything below this module is written once, for a batch; a call here is one image (:func:`only` takes the one
result out).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import torch
from PIL import Image

from .images import MaskLike
from .methods.base import EditResult
from .methods.run import EditRequest, run_edits
from .models.family import ModelFamily
from .models.registry import family_of
from .progress import Progress
from .stages.cache import StageCache
from .stages.inversion import Inversion, invert_images
from .stages.sampling import sample_variants
from .stages.text_optimization import TextJob, TextOptimization, optimize_texts

T = TypeVar("T")
Model = Any  # a ModelFamily, or a diffusers pipeline of a supported family


def only(results: Sequence[T]) -> T:
    """The one result of a batch of one."""
    (result,) = results
    return result


def optimize_text(
    pipe: Model, image: Image.Image, target_prompt: str, steps: int = 200, lr: float = 1e-3, seed: int = 0, *,
    progress: Progress = False,
) -> TextOptimization:
    """Stage A: optimise ``tau(target_prompt)`` toward ``image`` for ``steps`` Adam steps (the paper: 200, lr 1e-3).
    The seed fixes the latent sample drawn from the VAE posterior and every step's timestep and noise."""
    return only(optimize_texts(family_of(pipe), [TextJob(image, target_prompt, int(seed))], steps, lr,
                               progress=progress))


def optimize_text_batch(
    pipe: Model, image: Image.Image, target_prompt: str, steps: int = 200, lr: float = 1e-3,
    seeds: Sequence[int] = (0,), *, progress: Progress = False,
) -> list[TextOptimization]:
    """Stage A for several seeds at once, one model batch per step; the same results as one by one."""
    jobs = [TextJob(image, target_prompt, int(seed)) for seed in seeds]
    return optimize_texts(family_of(pipe), jobs, steps, lr, progress=progress)


def invert(
    pipe: Model, image: Image.Image, source_prompt: str = "", method: str = "nti", num_steps: int = 50,
    guidance_scale: float | None = None, inner_steps: int = 10, early_stop: float = 1e-5, *,
    progress: Progress = False,
) -> Inversion:
    """Stage B: invert ``image`` with ``method`` ("nti", "ddim" or "npi") over ``num_steps`` steps
    (:func:`~nonrigid.stages.inversion.invert_images` says what each does and costs)."""
    return only(invert_images(family_of(pipe), [image], [source_prompt], method, num_steps, guidance_scale,
                              inner_steps, early_stop, progress=progress))


def sample(
    pipe: Model, inversion: Inversion, text_optimization: TextOptimization | Sequence[TextOptimization],
    etas: Sequence[float] = (0.0,), inject_steps: Sequence[int] = (10,), output_type: str = "pil", *,
    batch_size: int | None = None, use_reconstruction: bool = True, progress: Progress = False,
) -> list[Image.Image] | torch.Tensor:
    """Stage C: every (eta, K) variant of every given text optimization from ``inversion``, batched; PIL images, or
    the final latents with ``output_type="latent"``, in the order text optimization, then K, then eta."""
    texts = [text_optimization] if isinstance(text_optimization, TextOptimization) else list(text_optimization)
    return only(sample_variants(family_of(pipe), [inversion], [texts], etas, inject_steps, output_type,
                                batch_size=batch_size, use_reconstruction=use_reconstruction, progress=progress))


def run_method(
    pipe: Model,
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
    crop: str | None = None,
    mask: MaskLike | None = None,
    preset: str | None = None,
) -> EditResult:
    """Edit ``image`` toward ``target_prompt`` with ``method``; ``params`` override the method's defaults (see
    :func:`~nonrigid.methods.run.run_edits`). The picture keeps its aspect ratio unless ``crop="square"``;
    ``mask`` (white: may change) limits the edit; ``preset`` (``"fast"``) sets what ``params`` leave unset."""
    request = EditRequest(image, target_prompt, source_prompt, mask)
    return only(run_edits(family_of(pipe), [request], method, params, seeds=seeds, size=size, crop=crop, cache=cache,
                          batch_size=batch_size, preset=preset, progress=progress))


def edit(
    pipe: Model,
    image: str | os.PathLike | Image.Image,
    target_prompt: str,
    *,
    size: int | None = None,
    cache: StageCache | None = None,
    progress: Progress = False,
    **settings: Any,
) -> EditResult:
    """The paper's method on ``image``: text optimization per seed, one inversion, every variant.

    Keyword ``settings`` are ``source_prompt``, ``seeds``, ``batch_size``, ``crop``, ``mask``, ``preset`` (as
    :func:`run_method` takes them) and the parameters of ``ours`` (``etas``, ``inject`` ratios, ``num_steps``,
    ``opt_steps``, ``inversion``, ``guidance_scale`` …; ``nonrigid methods ours`` lists them). With a ``cache``,
    stage results are read from and written to it; ``result.stages`` holds them (text optimizations and
    inversion)."""
    options = {name: settings.pop(name) for name in ("source_prompt", "seeds", "batch_size", "crop", "mask", "preset")
               if name in settings}
    return run_method(pipe, image, target_prompt, "ours", settings, size=size, cache=cache, progress=progress,
                      **options)


__all__ = ["ModelFamily", "edit", "invert", "only", "optimize_text", "optimize_text_batch", "run_method", "sample"]
