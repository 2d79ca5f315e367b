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
    "StageCache": "cache",
    "DEFAULT_ETAS": "options",
    "DEFAULT_MODEL": "options",
    "EditResult": "editing",
    "EditSettings": "options",
    "Variant": "editing",
    "edit": "editing",
    "NonFiniteError": "errors",
    "NonrigidError": "errors",
    "UsageError": "errors",
    "Inversion": "inversion",
    "invert": "inversion",
    "build_tiny_pipeline": "loading",
    "load_image": "loading",
    "load_pipeline": "loading",
    "model_fingerprint": "loading",
    "save_edit": "output",
    "sample": "sampling",
    "TextOptimization": "text_optimization",
    "optimize_text": "text_optimization",
    "optimize_text_batch": "text_optimization",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'nonrigid' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
