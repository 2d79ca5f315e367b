"""nonrigid: training-free non-rigid image editing with Stable Diffusion.

The method of "Latent Inversion with Timestep-aware Sampling" in three stages, each a function with explicit
inputs and outputs: :func:`optimize_text` (A), :func:`invert` (B) and :func:`sample` (C); :func:`edit` runs them
for one or more seeds with an on-disk cache, :func:`run_method` runs any method. :func:`load_model` loads a model
as its family, the currency of every stage and method.

Names are imported on first use, so that the command line answers ``--help`` and usage errors without first
importing torch and diffusers.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "StageCache": "stages.cache",
    "DEFAULT_ETAS": "methods.catalogue",
    "DEFAULT_MODEL": "models",
    "EditResult": "methods.base",
    "Variant": "methods.base",
    "EditStages": "methods.ours",
    "ModelFamily": "models.family",
    "NonFiniteError": "errors",
    "NonrigidError": "errors",
    "UsageError": "errors",
    "Inversion": "stages.inversion",
    "TextOptimization": "stages.text_optimization",
    "build_tiny_pipeline": "models.registry",
    "family_of": "models.registry",
    "load_image": "images",
    "load_model": "models.loading",
    "load_pipeline": "models.loading",
    "model_fingerprint": "models.fingerprint",
    "save_result": "methods.output",
    # the README's functions: a model or a pipeline in, the family resolved once (nonrigid/api.py)
    "edit": "api",
    "invert": "api",
    "optimize_text": "api",
    "optimize_text_batch": "api",
    "run_method": "api",
    "sample": "api",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'nonrigid' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
