"""nonrigid: training-free non-rigid image editing with Stable Diffusion.

The method of "Latent Inversion with Timestep-aware Sampling" in three stages, each a function with explicit
inputs and outputs: :func:`optimize_text` (A), :func:`invert` (B) and :func:`sample` (C); :func:`edit` runs them
for one or more seeds with an on-disk cache.
"""

__version__ = "0.1.0"

from .cache import StageCache
from .editing import DEFAULT_ETAS, EditResult, EditSettings, Variant, edit
from .errors import NonFiniteError, NonrigidError, UsageError
from .inversion import Inversion, invert
from .loading import DEFAULT_MODEL, build_tiny_pipeline, load_image, load_pipeline, model_fingerprint
from .output import save_edit
from .sampling import sample
from .text_optimization import TextOptimization, optimize_text, optimize_text_batch

__all__ = [
    "DEFAULT_ETAS",
    "DEFAULT_MODEL",
    "EditResult",
    "EditSettings",
    "Inversion",
    "NonFiniteError",
    "NonrigidError",
    "StageCache",
    "TextOptimization",
    "UsageError",
    "Variant",
    "build_tiny_pipeline",
    "edit",
    "invert",
    "load_image",
    "load_pipeline",
    "model_fingerprint",
    "optimize_text",
    "optimize_text_batch",
    "sample",
    "save_edit",
]
