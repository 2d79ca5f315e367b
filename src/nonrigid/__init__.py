"""nonrigid: training-free non-rigid image editing with Stable Diffusion.

The method of "Latent Inversion with Timestep-aware Sampling" in three stages, each a function with explicit
inputs and outputs: :func:`optimize_text` (A), :func:`invert` (B) and :func:`sample` (C); :func:`edit` runs them
for one or more seeds with an on-disk cache.

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
    "EditResult": "methods.ours",
    "EditSettings": "methods.ours",
    "Variant": "methods.ours",
    "edit": "methods.ours",
    "NonFiniteError": "errors",
    "NonrigidError": "errors",
    "UsageError": "errors",
    "Inversion": "stages.inversion",
    "invert": "stages.inversion",
    "build_tiny_pipeline": "models.tiny",
    "load_image": "images",
    "load_pipeline": "models.loading",
    "model_fingerprint": "models.fingerprint",
    "run_method": "methods.run",
    "save_result": "methods.output",
    "sample": "stages.sampling",
    "TextOptimization": "stages.text_optimization",
    "optimize_text": "stages.text_optimization",
    "optimize_text_batch": "stages.text_optimization",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'nonrigid' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
