"""Models: loading pipelines (hub ids, diffusers folders, single-file checkpoints, the built-in ``tiny`` and
``mini`` models), the model-family seam the stages reach every network through (:mod:`.family`, :mod:`.registry`,
:mod:`.sd`), and weight fingerprints. This module itself is torch-free."""

from __future__ import annotations

import difflib
from pathlib import Path

from ..errors import UsageError

DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"
# the models built in (loading.MINI_MODELS, tiny.TINY_KINDS), named here without importing torch
BUILT_IN_NAMES = ("mini", "mini-v", "mini-xl", "mini-flow", "tiny", "tiny-sd2", "tiny-sd2-v", "tiny-sdxl", "tiny-sd3",
                  "tiny-sd35", "tiny-flux", "tiny-flux-schnell", "tiny-kontext", "tiny-qwen-edit",
                  "tiny-qwen-edit-plus")
MODEL_FILE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".safetensors")


def check_model_name(model: str | Path) -> None:
    """Refuse a model that is neither built in, nor a file or folder that exists, nor shaped like a hub id
    (``owner/name``), naming the closest built-in model: a mistyped name (``mini-xll``) is told at once, not after
    the seconds it takes to import torch and diffusers."""
    name = str(model)
    if name in BUILT_IN_NAMES or Path(name).expanduser().exists() or _hub_id_shaped(name):
        return
    built_in = f"built in: {', '.join(BUILT_IN_NAMES)}"
    close = difflib.get_close_matches(name, BUILT_IN_NAMES, n=1)
    if close:
        raise UsageError(f"model {name} is not built in and no file or folder has that name; did you mean "
                         f"{close[0]}? ({built_in})")
    raise UsageError(f"model path {name} does not exist (a model is a hub id owner/name, a diffusers folder, a "
                     f".safetensors file or {built_in})")


def _hub_id_shaped(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not name.endswith(MODEL_FILE_SUFFIXES)
