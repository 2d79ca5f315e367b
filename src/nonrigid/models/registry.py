"""The model families, in one list, and the questions loading asks of them: which family a loaded pipeline, a
``model_index.json`` class name or a single file's model type belongs to, and which tiny models exist.

A new family is one module (a :class:`~nonrigid.models.family.ModelFamily` subclass that declares its pipeline
classes, single-file types and tiny models) plus one entry in :data:`FAMILIES`.
"""

from __future__ import annotations

from typing import Any

from ..errors import UsageError
from .family import ModelFamily
from .flux import Flux
from .kontext import FluxKontext
from .qwen_edit import QwenImageEdit
from .sd import StableDiffusion
from .sd3 import StableDiffusion3
from .sdxl import StableDiffusionXL

FAMILIES: list[type[ModelFamily]] = [StableDiffusion, StableDiffusionXL, StableDiffusion3, Flux, FluxKontext,
                                     QwenImageEdit]


def family_of(pipe: Any) -> ModelFamily:
    """The family of a loaded pipeline (a family is returned as it is). Called once per command, page request or
    public API call; everything below takes the family."""
    if isinstance(pipe, ModelFamily):
        return pipe
    for family in FAMILIES:
        if family.matches(pipe):
            return family(pipe)
    raise UsageError(f"{type(pipe).__name__} belongs to no supported model family ({supported()})")


def supported() -> str:
    """What the registered families cover, for messages ("SD 1.x, SD 2.x (...), SDXL base-layout, ... models")."""
    return ", ".join(family.label or family.name for family in FAMILIES) + " models"


def family_for_class(class_name: str) -> type[ModelFamily] | None:
    """The family whose pipeline class a ``model_index.json`` names (``"StableDiffusionXLPipeline"``)."""
    for family in FAMILIES:
        for cls in family.pipeline_classes:
            if cls.__name__ == class_name:
                return family
    return None


def pipeline_class(class_name: str) -> type | None:
    """The supported diffusers pipeline class of that name."""
    family = family_for_class(class_name)
    return None if family is None else next(c for c in family.pipeline_classes if c.__name__ == class_name)


def family_for_file_type(model_type: str | None) -> type[ModelFamily] | None:
    """The family that reads single files of diffusers' inferred ``model_type`` (``"xl_base"``, ``"flux-dev"``)."""
    for family in FAMILIES:
        if model_type in family.single_file_types:
            return family
    return None


def tiny_model_names() -> tuple[str, ...]:
    """Every built-in random-weight model, family by family."""
    return tuple(name for family in FAMILIES for name in family.tiny_models)


def build_tiny_pipeline(seed: int = 0, kind: str = "tiny") -> Any:
    """A tiny pipeline with random weights in the layout ``kind`` names (``tiny``, ``tiny-sdxl``, ...), built
    without any download; its output is noise (for tests and smoke runs). The weights depend only on ``seed``;
    the global RNG is left as it was."""
    for family in FAMILIES:
        if kind in family.tiny_models:
            return family.tiny_models[kind](seed)
    raise ValueError(f"unknown tiny model {kind!r}; choose one of {', '.join(tiny_model_names())}")
