"""The sections of ``docs/MINIATURE.md`` on the miniature models of the further model families (``mini-v``,
``mini-xl``, ``mini-flow``): what the model is, how well it reconstructs and draws, and ours against NTI-only
editing on it (and, on the flow model, against FlowEdit).

Each section sits between ``<!-- family:NAME:start -->`` and ``<!-- family:NAME:end -->`` markers and is replaced
in place when regenerated (appended the first time), so the SD-1.x page and each family's section are written by
their own evaluation runs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from PIL import Image

from ..models.capabilities import FLOW
from ..models.family import ModelFamily
from ..models.loading import mini_weights_dir
from ..stages.cache import write_atomic
from .dataset import read_dataset
from .doc import _best_at, reconstruction_errors
from .evaluate import load_rows, summarize
from .fidelity import sample_fidelity
from .protocol import ETAS

TITLES = {
    "mini-v": "v prediction: `mini-v` (SD 2.x's 768 px models)",
    "mini-xl": "SDXL layout: `mini-xl`",
    "mini-flow": "Rectified flow, SD3 layout: `mini-flow`",
}
FOLDERS = {"mini-v": "v", "mini-xl": "xl", "mini-flow": "flow"}
FLOWEDIT_REFERENCE = 33.0  # the authors' n_max for SD3 at 50 steps: the gallery's FlowEdit column
WHAT = {
    "mini-v": "The miniature model fine-tuned to predict `v = sqrt(abar) eps - sqrt(1 - abar) x0`, as a rank-32 "
    "LoRA over every linear and convolution of its UNet (text encoder, VAE and tokenizer are the miniature model's, "
    "unchanged), 600 steps on the world's latents. The regression target is the miniature model's own prediction "
    "converted to v, `(eps - sqrt(1 - abar) x_t) / sqrt(abar)`, not each example's sampled v: a first recipe with "
    "the sampled v (min-SNR weights `min(SNR, 5) / (SNR + 1)`, 1000 steps) reached a DDIM round trip of 0.060 "
    "(the SD 1.x miniature: 0.039) on the six scenes of the quality test. `load_pipeline(\"mini-v\")` fuses the "
    "LoRA into the UNet and sets the scheduler's `prediction_type` to `v_prediction`.",
    "mini-xl": "SDXL's component classes at the miniature world's size, trained from scratch on the miniature VAE's "
    "latents: two 3-layer CLIP text encoders (32 wide each; tokens are both penultimate states side by side, 64 "
    "wide; the pooled embedding is the second encoder's projected end-of-text state), a UNet with SDXL's "
    "`text_time` added conditioning (pooled embedding + Fourier features of the size conditioning), SDXL's Euler "
    "scheduler config (DDIM at load), and the miniature model's VAE and tokenizer, shared. Captions dropped 10% "
    "of the time to zero embeddings (SDXL's unconditional). Every training scene is 64 x 64 and uncropped, so the "
    "size conditioning is constant: the model has the input, not a learned use of it.",
    "mini-flow": "SD3's component classes at the miniature world's size (`nonrigid.mini.flow`): an "
    "`SD3Transformer2DModel` (4 joint-attention layers, 3 heads of 32, over 2 x 2 patches of the 16 x 16 latents), "
    "two 3-layer CLIP text encoders with projections (tokens: both penultimate states side by side, 64 wide, then "
    "the 256 zero rows diffusers puts where T5 would be; pooled: both projected end-of-text states, 64 wide), a "
    "`FlowMatchEulerDiscreteScheduler` with shift 1 (SD3 uses 3 at 1024 px; the shift grows with resolution), and "
    "the miniature model's VAE and tokenizer, shared. Trained from scratch on the flow-matching objective (velocity "
    "`noise - x0` at `x_s = (1 - s) x0 + s noise`), its target the SD 1.x miniature model's conditional expectation "
    "converted to a velocity where that model's noise levels reach (s up to about 0.94), the example's own velocity "
    "beyond; timesteps half logit-normal (SD3's), half uniform; captions dropped 10% of the time to the empty "
    "prompt (SD3's unconditional). Inversion is the Euler ODE walked backwards, NTI optimises the empty prompt's "
    "token and pooled embeddings per step (docs/FAMILIES.md).",
}


def write_family_section(model: ModelFamily, name: str, run: Path, doc: Path, command: str, judge) -> Path:
    """Write ``name``'s section into ``doc`` from the evaluation run folder ``run``; returns ``doc``."""
    rows = load_rows(run)
    summary = summarize(rows)
    pairs = sorted({r["pair"] for r in rows})
    data = Path(json.loads((run / "meta.json").read_text())["data"])
    first = read_dataset(data)[:3]
    guidance = guidance_for(model)
    recon = reconstruction_errors(model, [Image.open(p.image).convert("RGB") for p in first],
                                  [p.source_text for p in first], guidance)
    fidelity = sample_fidelity(model.pipe, judge, per_pose=8, steps=20, guidance=4.0, seed=3, progress=False)
    gallery = doc.parent / f"mini-{FOLDERS[name]}-gallery.png"
    flowedit = any(r["setting"] == "flowedit" for r in rows)
    _gallery(run, pairs[:6], gallery, flowedit)
    section = _section(model, name, summary, len(pairs), recon, fidelity.line(), gallery.name, command)
    _replace_section(doc, name, section)
    return doc


def guidance_for(model: ModelFamily) -> float:
    """The guidance the reconstruction is measured at: 7.5 for the UNet families (the paper's), the family's
    default for a flow model (SD3's 7), as its issue asks."""
    return model.defaults.guidance_scale if model.prediction == FLOW else 7.5


def _training_time(log: list[str]) -> str:
    """``done in 60.5 min (training 60.4 min)``, summed over the runs that finished (a resumed run logs only its
    own part: an install after training logs 0.1 min)."""
    parts = [re.match(r"done in ([0-9.]+) min \(training ([0-9.]+) min\)", line) for line in log]
    parts = [m for m in parts if m]
    if not parts:
        return ""
    total, training = (sum(float(m.group(i)) for m in parts) for i in (1, 2))
    runs = f" over {len(parts)} runs" if len(parts) > 1 else ""
    return f"done in {total:.1f} min (training {training:.1f} min){runs}"


def _section(model: ModelFamily, name: str, summary, count: int, recon: dict[str, float], fidelity: str,
             gallery: str, command: str) -> str:
    w = f"{guidance_for(model):g}"
    plain = "Plain (Euler) inversion" if model.prediction == FLOW else "DDIM"
    folder = mini_weights_dir() / FOLDERS[name]
    megabytes = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 1e6
    log = (folder / "train_log.txt").read_text().splitlines() if (folder / "train_log.txt").exists() else []
    done = _training_time(log)
    trained_with = next((line.removeprefix("command: ") for line in log if line.startswith("command: ")),
                        f"nonrigid mini train --variant {FOLDERS[name]}")
    lines = [
        f"### {TITLES[name]}",
        "",
        WHAT[name],
        "",
        f"Detected as: {model.describe()}. Package data: {megabytes:.1f} MB in `weights/{FOLDERS[name]}/`. "
        f"Training: {done or 'see its train_log.txt'} (`{trained_with}`, then "
        "installed into the package).",
        "",
        "Reconstruction (relative latent error, 50 steps, the scene's caption as source prompt, first 3 pairs): "
        f"{plain} round trip at guidance 1: {recon['ddim_g1']:.3f}; {plain} sampled back at {w}: "
        f"{recon[f'ddim_g{w}']:.3f}; NTI at {w}: {recon[f'nti_g{w}']:.3f}.",
        "",
        f"Samples (judge on 32 samples, 20 steps, guidance 4): {fidelity}.",
        "",
        f"Ours against NTI-only editing on {count} pairs (seed 0, 50 steps, text optimization 200 steps, injection "
        f"20%, guidance {model.defaults.guidance_scale:g}, the family's default; mean ± standard error):",
        "",
        "| setting | eta | identity error | P(target pose) |",
        "|---|---|---|---|",
    ]
    for eta in ETAS:
        stats = summary.get(("methods", "ours", eta))
        if stats:
            lines.append(f"| ours | {eta:g} | {stats['identity_error']:.3f} ± {stats['identity_error_se']:.3f} | "
                         f"{stats['edit_success']:.3f} ± {stats['edit_success_se']:.3f} |")
    nti = summary.get(("methods", "NTI-only", 1.0))
    if nti:
        lines.append(f"| NTI-only | – | {nti['identity_error']:.3f} ± {nti['identity_error_se']:.3f} | "
                     f"{nti['edit_success']:.3f} ± {nti['edit_success_se']:.3f} |")
    flowedit = sorted((eta, stats) for (group, setting, eta), stats in summary.items()
                      if group == "methods" and setting == "flowedit")
    for n_max, stats in flowedit:
        lines.append(f"| FlowEdit, n_max {n_max:g} | – | {stats['identity_error']:.3f} ± "
                     f"{stats['identity_error_se']:.3f} | {stats['edit_success']:.3f} ± "
                     f"{stats['edit_success_se']:.3f} |")
    for label, stats in ([("NTI-only", nti)] if nti else []) + [
            (f"FlowEdit at n_max {n_max:g} (the reference's)", stats) for n_max, stats in flowedit
            if n_max == FLOWEDIT_REFERENCE]:
        best = _best_at(summary, "methods", "ours", round(stats["identity_error"], 2))
        lines += ["", f"At the identity error of {label} (rounded to 0.01) or lower, ours reaches "
                  + (f"P(target pose) {best[0]:.3f} (eta {best[1]:g})" if best else "no eta")
                  + f", against its {stats['edit_success']:.3f}."]
    if nti:
        lines += ["", f"With {count} pairs the standard errors above say how much of a difference is noise."]
    columns = "input, ideal edit, ours at eta 0, 0.2, ..., 1, NTI-only" + (
        f", FlowEdit at n_max {FLOWEDIT_REFERENCE:g}" if flowedit else "")
    lines += ["", f"![{name} gallery]({gallery})", "", f"Rows: pairs; columns: {columns}.", "",
              f"Made with `{command}`."]
    return "\n".join(lines)


def _gallery(run: Path, pairs: list[int], path: Path, flowedit: bool = False) -> None:
    strips = [Image.open(run / "results" / f"{p:03d}.png") for p in pairs]
    if not strips:
        return
    if flowedit:  # FlowEdit's image at the reference n_max appended to each pair's strip
        extended = []
        for p, strip in zip(pairs, strips, strict=True):
            wide = Image.new("RGB", (strip.width + 64, strip.height), "white")
            wide.paste(strip, (0, 0))
            edit = run / "baselines" / f"{p:03d}-flowedit-nmax{FLOWEDIT_REFERENCE:g}.png"
            if edit.exists():
                wide.paste(Image.open(edit).convert("RGB"), (strip.width, 0))
            extended.append(wide)
        strips = extended
    gallery = Image.new("RGB", (strips[0].width, 64 * len(strips)), "white")
    for i, strip in enumerate(strips):
        gallery.paste(strip, (0, 64 * i))
    gallery.resize((gallery.width * 2, gallery.height * 2), Image.Resampling.NEAREST).save(path)


def _replace_section(doc: Path, name: str, section: str) -> None:
    heading = ("## Further model families\n\nThe stages and methods run unchanged on every family behind the model "
               "seam (docs/FAMILIES.md); each further case has its own miniature model so that quality, not only "
               "plumbing, is tested.")
    replace_block(doc, f"family:{name}", section, heading)


def replace_block(doc: Path, marker: str, section: str, heading: str) -> None:
    """Write ``section`` between ``<!-- MARKER:start -->`` and ``<!-- MARKER:end -->`` in ``doc``: in place of the
    block there, or appended at the end under ``heading`` (added once, if the page lacks it). Everything after
    MINIATURE.md's "Further model families" heading survives a rewrite of the main page."""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    text = doc.read_text() if doc.exists() else ""
    block = f"{start}\n{section}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        if heading.splitlines()[0] not in text:
            text = text.rstrip() + f"\n\n{heading}\n"
        text = text.rstrip() + "\n\n" + block + "\n"
    write_atomic(doc, text.encode())
