"""Every editing method behind one interface: the paper's method and the baselines it is compared with.

This module is the catalogue (torch-free, so ``nonrigid methods`` and usage errors answer at once): each method's
name, summary and parameter table with the reference defaults of method.md section 2. The algorithms live in one
module each (``ours``, ``nti``, ``imagic``, ``masactrl``, ``edit_friendly``, ``dds``, ``ledits``, ``flowedit``,
and the instruction editors on their own models, ``kontext`` and ``qwen_edit``) with the signature of
:mod:`nonrigid.methods.base`; :func:`nonrigid.methods.run.run_edits` dispatches to them. Each table is the one
place a method's parameters, defaults and bounds are written: the command line, the benchmark and the library all
validate against it. The instruction editors' template for an instruction made from a target prompt is here too
(:data:`INSTRUCTION_TEMPLATE`).
"""

from __future__ import annotations

from ..errors import UsageError
from ..models.capabilities import (
    CLASSIFIER_FREE,
    DDPM,
    DISTILLED,
    FLOW,
    KONTEXT,
    LEDITS,
    NO_GUIDANCE,
    NO_SINGLE_FILE,
    QWEN_EDIT,
    TEXT_CONDITIONING,
    UNET,
)
from ..stages import INVERSION_METHODS
from .base import EditInput, MethodInfo, Param

DEFAULT_ETAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)
DEFAULT_INJECT = (0.2,)
INJECT_ABLATION = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5)  # the paper's injection-ratio ablation (Sec. 5.4)

# ``--fast``: chosen on world 0 of the miniature world among cheaper settings, then tested against the paper's
# default on world 7919 with paired 95% intervals (docs/MINIATURE.md, "A fast preset"): held out, edit success
# +0.054 [+0.021, +0.088], identity error -0.004 [-0.010, +0.000]. 120 sequential UNet calls for a default edit
# instead of 640 (890 before A rode along B; both counted with NTI's early stop off). The text optimization's 75
# steps ride along the inversion's calls.
FAST = {"num_steps": 25, "inner_steps": 2, "opt_steps": 75, "opt_lr": 1e-3}


def sequential_calls(num_steps: int, inner_steps: int) -> int:
    """The most sequential UNet calls of ours' edit of one seed (NTI's early stop only skips some): the DDIM walk,
    NTI's inner calls and advancing call per step, and the sampling steps after the K injected ones; stage A rides
    along stage B's calls."""
    return num_steps + num_steps * (inner_steps + 1) + num_steps - round(DEFAULT_INJECT[0] * num_steps)


def fast_summary() -> str:
    """What ``--fast`` is, in one phrase, for the command's help and the page (from :data:`FAST` itself)."""
    return (f"{FAST['num_steps']} steps, {FAST['inner_steps']} NTI inner steps, {FAST['opt_steps']} "
            f"text-optimization steps: {sequential_calls(FAST['num_steps'], FAST['inner_steps'])} sequential UNet "
            f"calls instead of the default's {sequential_calls(*_default_steps())}")


def _default_steps() -> tuple[int, int]:
    """Ours' default (num_steps, inner_steps), from its parameters."""
    defaults = {param.name: param.default for param in OURS.params}
    return defaults["num_steps"], defaults["inner_steps"]

_NTI_PARAMS = (
    Param("num_steps", "int", 50, "steps of inversion and sampling (DDIM; Euler on flow models)", low=1, high=1000),
    Param("guidance_scale", "float", 7.5, "classifier-free guidance scale (NTI inverts for this scale)", low=1),
    Param("inner_steps", "int", 10, "null-text inversion: Adam steps per sampling step", low=0),
    Param("early_stop", "float", 1e-5, "null-text inversion: stop a step's inner loop below this loss", low=0),
)

OURS = MethodInfo(
    "ours",
    "The paper's method: text optimization (A), latent inversion (B), timestep-aware text injection sampling "
    "(C). The first K = inject x steps are conditioned on the source prompt, the rest on "
    "eta * e_tgt + (1 - eta) * e_opt.",
    (
        Param("etas", "floats", DEFAULT_ETAS, "interpolation weights: higher edits more", label="eta", low=0,
              high=1),
        Param("inject", "floats", DEFAULT_INJECT, "share of steps conditioned on the source prompt first "
              "(K = round(inject x steps))", label="K", low=0, high=1),
        Param("num_steps", "int", 50, "steps of inversion and sampling (DDIM; Euler on flow models)", low=1, high=1000),
        Param("opt_steps", "int", 200, "text optimization steps (0 skips it)", low=0),
        Param("opt_lr", "float", 1e-3, "text optimization learning rate (Adam)", low=0, open_low=True),
        Param("inversion", "str", "nti", "nti: null-text inversion at guidance 7.5; ddim: DDIM inversion at "
              "guidance 1; npi: negative-prompt inversion (source embedding as the null text, no optimization)",
              choices=INVERSION_METHODS),
        Param("guidance_scale", "float", None, "guidance scale (none: 7.5 with nti/npi, 1 with ddim)", low=1,
              optional=True),
        *_NTI_PARAMS[2:],
    ),
    seeded=True,
    reference="Latent Inversion with Timestep-aware Sampling (method.md section 1)",
    requires=(TEXT_CONDITIONING,),
    batches_images=True,
    masks=True,
    presets={"fast": FAST},
)

NTI = MethodInfo(
    "nti",
    "Null-text inversion editing: invert with NTI for the source prompt, then sample the target prompt from the "
    "inverted latent with the optimised null embeddings (no text optimization, no injection).",
    _NTI_PARAMS,
    seeded=False,
    requires=(TEXT_CONDITIONING, CLASSIFIER_FREE),
    why_not="it optimises the null text of classifier-free guidance, and this model has no unconditional branch "
            "(its guidance is distilled)",
    reference="Mokady et al., Null-text Inversion (CVPR 2023)",
    masks=True,
)

IMAGIC = MethodInfo(
    "imagic",
    "Imagic: optimise the text embedding (stage A), fine-tune the UNet on the image with it, then sample from "
    "random noise with alpha * e_tgt + (1 - alpha) * e_opt. The fine-tuned weights live only for this edit.",
    (
        Param("alphas", "floats", (0.8, 1.0, 1.2), "interpolation weights (reference default 1.2)", label="alpha",
              low=0, high=3),
        Param("opt_steps", "int", 500, "text optimization steps (stage A)", low=0),
        Param("opt_lr", "float", 1e-3, "text optimization learning rate", low=0, open_low=True),
        Param("finetune_steps", "int", 1000, "UNet fine-tuning steps (the paper's appendix sweeps 50..400)",
              low=0),
        Param("finetune_lr", "float", 2e-6, "UNet fine-tuning learning rate (Adam)", low=0, open_low=True),
        Param("guidance_scale", "float", 7.5, "classifier-free guidance scale", low=1),
        Param("num_steps", "int", 50, "DDIM sampling steps", low=1, high=1000),
    ),
    seeded=True,
    reference="Kawar et al., Imagic (CVPR 2023); SD re-implementation defaults",
    requires=(TEXT_CONDITIONING,),
    memory="fine-tunes a full fp32 copy of the UNet with Adam (about 14 GB on CUDA for SD 1.x and 2.x, over 41 GB "
    "for SDXL's 2.6 B-parameter UNet; the original weights wait on the CPU meanwhile)",
    why_no_mask="it samples from fresh noise with a fine-tuned UNet, so there is no path of the input to keep "
                "outside a mask",
)

MASACTRL = MethodInfo(
    "masactrl",
    "MasaCtrl: sample source (reconstruction) and target branches together from an NTI inversion; from "
    "start_step on, in self-attention layers from start_layer on, the target's queries attend to the source "
    "branch's keys and values.",
    (
        Param("start_step", "ints", (4, 10, 20), "first sampling step with mutual self-attention "
              "(reference 4; later keeps less of the source); the default is for 50 steps and scales with "
              "num_steps", label="step", low=0, per_steps=50),
        Param("start_layer", "int", None, "first self-attention layer with mutual attention, in forward order "
              "(none: 10 of 16 on SD 1.x as the reference, the same relative depth on other UNets: 44 of 70 on "
              "SDXL)", low=0,
              optional=True),
        *_NTI_PARAMS,
    ),
    seeded=False,
    reference="Cao et al., MasaCtrl (ICCV 2023), on a null-text inversion as in the paper",
    requires=(TEXT_CONDITIONING, UNET),
    why_not="it rewires a UNet's self-attention layers, and a flow transformer (MMDiT) has joint attention only",
    masks=True,
)

EDIT_FRIENDLY = MethodInfo(
    "edit-friendly",
    "Edit-friendly DDPM inversion: noise maps that make DDPM sampling (eta 1) reproduce the image exactly with "
    "the source prompt, then the same noise maps with the target prompt, starting skip steps in.",
    (
        Param("skip", "ints", (24, 36, 48), "first steps skipped when sampling the target (reference 36; more "
              "keeps more of the input); the default is for 100 steps and scales with num_steps", label="skip",
              low=0, per_steps=100),
        Param("num_steps", "int", 100, "DDPM steps", low=1, high=1000),
        Param("source_guidance", "float", 3.5, "guidance scale while extracting the noise maps", low=1),
        Param("target_guidance", "float", 15.0, "guidance scale while sampling the target", low=1),
    ),
    seeded=True,
    reference="Huberman-Spiegelglas et al., An Edit Friendly DDPM Noise Space (CVPR 2024)",
    requires=(TEXT_CONDITIONING, DDPM),
    batches_images=True,
    why_not="its noise maps belong to DDPM's stochastic sampler, and a flow model samples a deterministic ODE "
    "(on flow models use flowedit)",
    masks=True,
)

DDS = MethodInfo(
    "dds",
    "Delta Denoising Score: optimise the image latent with eps(z_t, t, target) - eps(x_t, t, source), same noise "
    "and t for both (guided), t ~ U[t_min, t_max], SGD; snapshots after the listed iteration counts.",
    (
        Param("iterations", "ints", (50, 100, 200), "snapshots after these many iterations (reference 200)",
              label="iter", low=0),
        Param("lr", "float", 0.1, "SGD learning rate", low=0, open_low=True),
        Param("guidance_scale", "float", 7.5, "guidance scale of both noise predictions", low=1),
        Param("t_min", "int", 50, "smallest timestep drawn", low=0, high=999),
        Param("t_max", "int", 950, "largest timestep drawn", low=1, high=999),
        Param("loss_scale", "float", 2000.0, "gradient scale: each step is lr * loss_scale / 4096 * delta at any "
              "image size (the reference's 2000 x loss at 512 px)", low=0),
    ),
    seeded=True,
    reference="Hertz et al., Delta Denoising Score (ICCV 2023)",
    requires=(TEXT_CONDITIONING, DDPM),
    batches_images=True,
    why_not="it distils noise estimates at DDPM timesteps; its flow-model counterpart is flowedit",
    masks=True,
)

LEDITS = MethodInfo(
    "ledits",
    "LEDITS++ (diffusers' LEditsPPPipelineStableDiffusion): edit-friendly inversion with a multistep solver, "
    "then semantic guidance toward the target prompt, masked to where it matters.",
    (
        Param("edit_guidance", "floats", (5.0, 10.0, 15.0), "edit guidance scale (diffusers default 5)",
              label="edit", low=0),
        Param("num_steps", "int", 50, "inversion and sampling steps", low=1, high=1000),
        Param("skip", "float", 0.15, "share of the first steps skipped", low=0, high=0.99),
        Param("source_guidance", "float", 3.5, "guidance scale of the inversion", low=1),
        Param("threshold", "float", 0.9, "edit mask threshold", low=0, high=1),
        Param("mask", "str", None, "where the edit applies: intersect (LEDITS++: cross-attention map and "
              "noise-estimate quantile), attention (cross-attention map only), noise (noise-estimate quantile "
              "only; works on any UNet); none: intersect, or noise on UNets without cross-attention at 1/4 of the "
              "latent resolution (like the tiny model)", choices=("intersect", "attention", "noise"), optional=True),
    ),
    seeded=True,
    reference="Brack et al., LEDITS++ (CVPR 2024), as shipped by diffusers",
    requires=(TEXT_CONDITIONING, LEDITS),
    why_not="diffusers ships LEDITS++ for SD and SDXL UNets only",
    why_no_mask="diffusers' LEDITS++ masks its edit itself (its intersect mask of attention and noise); use "
                "its threshold and mask parameters",
)

_FLOWEDIT_FLUX = {"num_steps": 28, "n_max": (24,), "source_guidance": 1.5, "target_guidance": 5.5}

FLOWEDIT = MethodInfo(
    "flowedit",
    "FlowEdit: no inversion; an ODE from the source latent to the target driven by the difference of the target's "
    "and the source's guided velocities at shared-noise points, over the last n_max of num_steps Euler steps.",
    (
        Param("n_max", "ints", (33,), "edit steps: the ODE starts n_max steps before the end (reference 33 of 50 "
              "for SD3, 24 of 28 for FLUX; more edits more); the default scales with num_steps", label="nmax",
              low=1, per_steps=50),
        Param("num_steps", "int", 50, "Euler steps of the model's sigma schedule (reference 50 for SD3, 28 for "
              "FLUX, the default on each)", low=1, high=1000),
        Param("n_min", "int", 0, "last steps sampled plainly with the target prompt (reference 0)", low=0),
        Param("n_avg", "int", 1, "noise draws averaged per step (reference 1)", low=1),
        Param("source_guidance", "float", 3.5, "guidance scale of the source velocity (reference 3.5 for SD3, "
              "1.5 for FLUX's distilled guidance, the default on each)", low=1),
        Param("target_guidance", "float", 13.5, "guidance scale of the target velocity (reference 13.5 for SD3, "
              "5.5 for FLUX's distilled guidance, the default on each)", low=1),
    ),
    seeded=True,
    reference="Kulikov et al., FlowEdit (ICCV 2025): the authors' SD3 settings, and on FLUX their FLUX settings",
    requires=(TEXT_CONDITIONING, FLOW),
    # the authors' FLUX settings, for flow models without an unconditional branch (dev: distilled guidance;
    # schnell: none, where the guidance values go unused and n_max scales to its 4 steps)
    settings_by_guidance={DISTILLED: _FLOWEDIT_FLUX, NO_GUIDANCE: _FLOWEDIT_FLUX},
    why_not="it integrates a rectified-flow velocity field over sigmas, and this model predicts DDPM noise",
    masks=True,
)

# ---- the instruction editors, each on its own model

# How an instruction is made from a target prompt where none is given (``instruction``) and the benchmark has
# none (TEdBench): the caption, its final full stop dropped and its first letter lower-cased unless it starts an
# acronym, in one sentence that asks for that picture and nothing else changed.
INSTRUCTION_TEMPLATE = "Change the picture so that it shows {target}, keeping everything else the same."
_EDITOR_NO_MASK = ("it regenerates the whole picture from the instruction (the input is a reference it attends to, "
                   "not a path to keep outside a mask)")

KONTEXT_METHOD = MethodInfo(
    "kontext",
    "FLUX.1 Kontext [dev] on its own model: the instruction edits the picture, which the transformer sees in context "
    "(its latents appended to the noisy ones); distilled guidance, one variant per guidance value and seed, at the "
    "working size and the picture's aspect ratio.",
    (
        Param("guidances", "floats", (2.5,), "distilled guidance (the model card's 2.5; higher follows the "
              "instruction more closely)", label="guidance", low=1, high=30),
        Param("num_steps", "int", 28, "Euler steps (diffusers' default 28; BFL's reference CLI 30)", low=1,
              high=1000),
    ),
    seeded=True,
    reference="Black Forest Labs, FLUX.1 Kontext (arXiv 2506.15742), as diffusers' FluxKontextPipeline runs it",
    memory="12 B transformer and T5-XXL: about 34 GB in bf16 (the default on CUDA); low-memory mode uses "
    "diffusers' model CPU offload",
    requires=(KONTEXT,),
    why_not="it runs FLUX.1 Kontext's own instruction editing, and this is not a Kontext model; load one, e.g. "
            "model=black-forest-labs/FLUX.1-Kontext-dev",
    why_no_mask=_EDITOR_NO_MASK,
    instructions=True,
    file_needs_config="a FLUX.1 Kontext single file has FLUX.1-dev's keys, so nothing in it says Kontext: give "
                      "config=black-forest-labs/FLUX.1-Kontext-dev (or a local Kontext diffusers folder) to read it "
                      "as Kontext",
)

QWEN_EDIT_METHOD = MethodInfo(
    "qwen-edit",
    "Qwen-Image-Edit (-2509, -2511) on its own model: Qwen2.5-VL reads the picture with the instruction, the "
    "transformer attends to the picture's latents; true classifier-free guidance against a negative prompt, one "
    "variant per true CFG value and seed, at the working size and the picture's aspect ratio.",
    (
        Param("true_cfg", "floats", (4.0,), "true CFG scale (the model cards' 4; 1: no negative branch, half the "
              "cost)", label="cfg", low=1, high=30),
        Param("num_steps", "int", 50, "Euler steps (the model cards': 50 for Qwen-Image-Edit, 40 for 2509 and "
              "2511, the default on each)", low=2, high=1000),
        Param("negative_prompt", "str", " ", "the negative prompt of true CFG (the model cards' single space)"),
        Param("positions_3d", "bool", False, "give the picture's tokens in the VL encoder Qwen2.5-VL's 3D rope "
              "positions (mm_token_type_ids), as the model was trained; false reproduces diffusers 0.42's "
              "pipelines, which leave them out (diffusers issue 14194)"),
    ),
    seeded=True,
    reference="Qwen team, Qwen-Image (arXiv 2508.02324), as diffusers' QwenImageEditPipeline and "
              "QwenImageEditPlusPipeline run it; model-card settings",
    memory="20 B transformer and the 8 B Qwen2.5-VL encoder: about 58 GB in bf16 (the default on CUDA); "
    "low-memory mode uses diffusers' model CPU offload",
    requires=(QWEN_EDIT,),
    why_not="it runs Qwen-Image-Edit's own instruction editing, and this is not a Qwen-Image-Edit model; load one, "
            "e.g. model=Qwen/Qwen-Image-Edit-2509",
    why_no_mask=_EDITOR_NO_MASK,
    instructions=True,
    why_no_single_file=NO_SINGLE_FILE[QWEN_EDIT],
)

METHODS: dict[str, MethodInfo] = {m.name: m for m in (OURS, NTI, IMAGIC, MASACTRL, EDIT_FRIENDLY, DDS, LEDITS,
                                                        FLOWEDIT, KONTEXT_METHOD, QWEN_EDIT_METHOD)}


def methods_for(family) -> list[str]:
    """The methods whose needs the model (its family) meets, in the catalogue's order: what the page offers."""
    capabilities = family.capabilities()
    return [name for name, info in METHODS.items() if set(info.requires) <= capabilities]


def template_instruction(target: str) -> str:
    """:data:`INSTRUCTION_TEMPLATE` filled with the target prompt: ``"A photo of a jumping dog."`` -> ``"Change the
    picture so that it shows a photo of a jumping dog, keeping everything else the same."``"""
    text = target.strip().rstrip(".!").strip()
    if len(text) > 1 and text[0].isupper() and not text[1].isupper():
        text = text[0].lower() + text[1:]
    return INSTRUCTION_TEMPLATE.format(target=text)


def instruction_of(edit: EditInput) -> tuple[str, str]:
    """The instruction an instruction editor follows for ``edit`` and where it came from: the request's own
    ("given", or "benchmark" for a dataset's), else :func:`template_instruction` of the target prompt
    ("template")."""
    if edit.instruction and edit.instruction.strip():
        return edit.instruction.strip(), edit.instruction_source
    return template_instruction(edit.target_prompt), "template"


def method_info(name: str) -> MethodInfo:
    if name not in METHODS:
        raise UsageError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]
