"""What a model family can do, named once (torch-free: the method catalogue and the command line read it).

A family declares these facts about itself (:meth:`nonrigid.models.family.ModelFamily.capabilities`); a method
lists the ones it needs (``MethodInfo.requires``), and is refused in one line, with the reason, on a family that
lacks one. Nothing outside ``models/`` matches family names: a new family that declares the same facts gets the
same methods.
"""

from __future__ import annotations

UNET = "unet"  # the denoiser is a UNet (self-attention layers MasaCtrl can rewire)
TRANSFORMER = "transformer"  # the denoiser is a transformer (MMDiT, FLUX)
EPSILON = "epsilon"  # predicts the noise
V = "v"  # predicts v = sqrt(abar) noise - sqrt(1 - abar) x0
FLOW = "flow"  # predicts a rectified-flow velocity
DDPM = "ddpm"  # a DDPM noise schedule (epsilon or v prediction): DDIM, DDPM sampling, noise estimates at t
CLASSIFIER_FREE = "classifier-free"  # guidance combines a conditional and an unconditional branch
DISTILLED = "distilled"  # the guidance value is an input of the denoiser (FLUX.1-dev): no unconditional branch
NO_GUIDANCE = "none"  # distilled for sampling without guidance (FLUX.1-schnell); not a capability
ATTENTION_MAPS = "attention-maps"  # cross-attention maps of the prompt's words can be read at 1/4 resolution
LEDITS = "ledits"  # diffusers ships a LEDITS++ pipeline for the family
# the prompt has a conditioning of its own, without the image: what the stages optimise, interpolate and invert
# with (every text-to-image family; not Qwen-Image-Edit, whose prompt encoder reads the input image with the text)
TEXT_CONDITIONING = "text-conditioning"
KONTEXT = "kontext"  # FLUX.1 Kontext: an instruction editor that attends to the reference image's latents
QWEN_EDIT = "qwen-edit"  # Qwen-Image-Edit (-2509, -2511): an instruction editor over a vision-language encoding

# why a family with this capability loads from no single file (one line)
NO_SINGLE_FILE = {
    QWEN_EDIT: "Qwen-Image-Edit has no single-file loading in diffusers 0.42: pass the hub id (e.g. "
               "Qwen/Qwen-Image-Edit-2509) or a diffusers folder",
}

DESCRIPTIONS = {
    UNET: "a UNet denoiser",
    TRANSFORMER: "a transformer denoiser",
    EPSILON: "noise (epsilon) prediction",
    V: "v prediction",
    FLOW: "a rectified-flow (velocity) model",
    DDPM: "a DDPM noise schedule (epsilon or v prediction)",
    CLASSIFIER_FREE: "classifier-free guidance (an unconditional branch)",
    DISTILLED: "distilled guidance",
    ATTENTION_MAPS: "readable cross-attention maps",
    LEDITS: "a LEDITS++ pipeline in diffusers (SD and SDXL UNets)",
    TEXT_CONDITIONING: "a text-only prompt conditioning (a text-to-image model)",
    KONTEXT: "a FLUX.1 Kontext model",
    QWEN_EDIT: "a Qwen-Image-Edit model",
}


def describe(capabilities: tuple[str, ...]) -> str:
    """``("unet", "ddpm")`` -> "a UNet denoiser and a DDPM noise schedule (epsilon or v prediction)"."""
    parts = [DESCRIPTIONS[c] for c in capabilities]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
