"""FLUX.1 Kontext [dev] as a model family: FLUX.1-dev's architecture in ``FluxKontextPipeline``, an instruction
editor that attends to a reference image's latents (:mod:`.edit_models` has its computation).

Kontext's transformer *is* FLUX.1-dev's (the same blocks, the same guidance embedding), and
``FluxKontextPipeline(image=None)`` computes exactly ``FluxPipeline``'s text-to-image loop (tests show it bit for
bit). So this family is the FLUX family with Kontext's pipeline class: every stage call (prompt encoding, the
velocity without a reference, the schedule, the VAE) is FLUX.1-dev's, and the methods that run on FLUX.1-dev (ours,
FlowEdit) run on Kontext's weights the same way, without a reference image: a user can put the training-free
methods and Kontext's own instruction editing (the ``kontext`` method, capability "kontext") side by side on the
same weights. Whether those weights are good at text-to-image is an empirical question (BFL present Kontext [dev]
as an editing model); the computation is FLUX.1-dev's either way.

Differences from the FLUX family:

- **Loading.** A diffusers folder or hub id whose ``model_index.json`` names ``FluxKontextPipeline``. BFL's single
  file ``flux1-kontext-dev.safetensors`` has FLUX.1-dev's keys and shapes, so its keys alone say "flux-dev": it
  loads as Kontext only with a config of this family (``config="black-forest-labs/FLUX.1-Kontext-dev"`` or a local
  Kontext folder; ``config_file_types``).
- **Memory.** bf16 on CUDA by default, as the model card runs it; ``low_memory`` hands the pipeline to diffusers'
  model CPU offload (``text_encoder -> text_encoder_2 -> transformer -> vae``), as BFL's ``--offload`` does.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from diffusers import FluxKontextPipeline

from .capabilities import KONTEXT
from .flux import Flux
from .tiny_edit import build_tiny_kontext

KONTEXT_HUB_ID = "black-forest-labs/FLUX.1-Kontext-dev"


class FluxKontext(Flux):
    """FLUX.1 Kontext [dev] (and fine-tunes in its layout): the FLUX family's calls, Kontext's pipeline."""

    name = "flux-kontext"
    label = "FLUX.1 Kontext [dev]"
    pipeline_classes = (FluxKontextPipeline,)
    single_file_types = ()  # its files read as flux-dev by their keys: only a Kontext config makes them Kontext
    config_file_types = ("flux-dev",)
    tiny_models: ClassVar[dict] = {"tiny-kontext": lambda seed: build_small_kontext(seed)}
    editor_capabilities = (KONTEXT,)
    cuda_dtype = torch.bfloat16
    cpu_offload = True

    def describe(self) -> str:
        config = self.pipe.transformer.config
        return (f"FLUX.1 Kontext layout, {config.num_layers} + {config.num_single_layers} transformer layers, "
                f"distilled guidance, flow (velocity) prediction, dynamic shift, {self.defaults.size} px")


def build_small_kontext(seed: int = 0) -> FluxKontextPipeline:
    """``tiny-kontext``: :func:`~.tiny_edit.build_tiny_kontext` (tiny-flux's components in a Kontext pipeline) with a
    native size of 64 px, as ``tiny-flux`` has (``FluxKontextPipeline``'s own default is 1024 px)."""
    pipe = build_tiny_kontext(seed)
    pipe.default_sample_size = 8
    return pipe
