"""Writes docs/MINIATURE.md from an evaluation run: the world, the model's samples, its inversion quality, and
the identity-vs-edit-success curves of the method, NTI-only editing and the paper's ablations."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from ..methods.catalogue import method_info
from ..methods.output import make_grid
from ..models.family import ModelFamily
from ..models.loading import mini_weights_dir
from ..stages.inversion import invert_images
from ..stages.sampling import sample_variants
from ..stages.text_optimization import TextOptimization
from .dataset import read_dataset
from .evaluate import load_rows, plot, summarize
from .fidelity import Fidelity, render_accuracy, sample_fidelity
from .judge import FACTORS, load_judge
from .protocol import BASELINES, ETAS
from .world import COLOURS, KINDS, POSES, caption, random_scene, render


def reconstruction_errors(model: ModelFamily, images: list[Image.Image], captions: list[str],
                          guidance_scale: float = 7.5) -> dict[str, float]:
    """Relative latent error of: DDIM round trip at guidance 1; DDIM and NTI inversions sampled back at
    ``guidance_scale`` (keys ``ddim_g7.5`` and ``nti_g7.5`` at the default 7.5), all with the scene's caption as
    source prompt (with an empty one, guidance would change nothing: cond = uncond). On a flow model "DDIM" is the
    plain inversion (the Euler ODE walked backwards)."""
    w = f"{guidance_scale:g}"
    errors: dict[str, list[float]] = {"ddim_g1": [], f"ddim_g{w}": [], f"nti_g{w}": []}
    for image, source in zip(images, captions, strict=True):
        x0 = model.encode_image(image)[0]
        for key, method, guidance in (("ddim_g1", "ddim", 1.0), (f"ddim_g{w}", "ddim", guidance_scale),
                                      (f"nti_g{w}", "nti", guidance_scale)):
            (inversion,) = invert_images(model, [image], [source], method=method, guidance_scale=guidance)
            keep = TextOptimization("", inversion.source, inversion.source, [], 0, 0, 0.0)
            ((back,),) = sample_variants(model, [inversion], [[keep]], (0.0,), (inversion.num_steps,),
                                         output_type="latent", use_reconstruction=False)
            errors[key].append(float((back - x0).norm() / x0.norm()))
    return {k: sum(v) / len(v) for k, v in errors.items()}


def _best_at(summary, group: str, setting: str, budget: float) -> tuple[float, float] | None:
    """Highest edit success among a setting's etas whose identity error is within ``budget``."""
    points = [(s["edit_success"], eta) for (g, st, eta), s in summary.items()
              if g == group and st == setting and s["identity_error"] <= budget]
    return max(points) if points else None


def _mean_over_etas(summary, group: str) -> dict[str, tuple[float, float]]:
    """Per setting of a group: (identity error, edit success) averaged over its eta values."""
    settings: dict[str, list[dict[str, float]]] = {}
    for (g, setting, _), stats in summary.items():
        if g == group:
            settings.setdefault(setting, []).append(stats)
    return {setting: (sum(s["identity_error"] for s in members) / len(members),
                      sum(s["edit_success"] for s in members) / len(members))
            for setting, members in settings.items()}


def ablation_findings(summary) -> list[str]:
    """The paper's two ablation claims next to what this run measured (averaged over eta), whichever way it
    points: written from the numbers, so a regenerated page cannot keep a stale conclusion."""
    lines = []
    inversion = _mean_over_etas(summary, "inversion")
    if inversion:
        measured = "; ".join(f"{name} {ide:.3f} / {succ:.3f}" for name, (ide, succ) in sorted(inversion.items()))
        nti = {k: v for k, v in inversion.items() if k.startswith("NTI")}
        keeps = min(nti, key=lambda k: nti[k][0]) if nti else None
        edits = max(nti, key=lambda k: nti[k][1]) if nti else None
        lines.append(
            "- Inversion type. The paper (Fig. 7): NTI without a source prompt preserves structure best; DDIM "
            f"inversion stays close to the input but barely edits. Measured (identity error / P(target pose), mean "
            f"over eta): {measured}."
            + (f" Of the NTI variants, {keeps} keeps identity best here"
               + (" and also edits most." if edits == keeps else ", at a lower edit success.")
               if keeps else ""))
    injection = _mean_over_etas(summary, "injection")
    if injection:
        ordered = sorted(injection.items(), key=lambda kv: int(kv[0].split()[1].rstrip("%")))
        measured = "; ".join(f"{name.split()[1]} {ide:.3f} / {succ:.3f}" for name, (ide, succ) in ordered)
        (low_name, (low_id, low_succ)), (high_name, (high_id, high_succ)) = ordered[0], ordered[-1]
        lines.append(
            "- Injection ratio. The paper: more injection keeps more of the input's structure, and 10-40% edits "
            f"well. Measured (identity error / P(target pose), mean over eta): {measured}. From "
            f"{low_name.split()[1]} to {high_name.split()[1]}, identity error goes {low_id:.3f} -> {high_id:.3f} and "
            f"edit success {low_succ:.3f} -> {high_succ:.3f}.")
    return lines


# each baseline at its reference default, for the gallery
GALLERY_KNOBS = {"imagic": "alpha1.2", "masactrl": "step4", "edit-friendly": "skip36", "dds": "iter200",
                 "ledits": "edit5"}


def _baseline_gallery(run: Path, pairs: list[int], path: Path) -> None:
    """Rows: pairs; columns: input, ideal edit, ours (eta 0.4, inject 20%), NTI-only, each baseline's default."""
    rows = []
    for pair in pairs:
        strip = Image.open(run / "results" / f"{pair:03d}.png")
        tiles = [strip.crop((64 * i, 0, 64 * (i + 1), 64)) for i in (0, 1, 2 + ETAS.index(0.4), strip.width // 64 - 1)]
        for method, knob in GALLERY_KNOBS.items():
            file = run / "baselines" / f"{pair:03d}-{method}-{knob}.png"
            tiles.append(Image.open(file).convert("RGB") if file.exists() else Image.new("RGB", (64, 64), "white"))
        rows.append([tile.resize((128, 128), Image.Resampling.NEAREST) for tile in tiles])
    if not rows:
        return
    columns = ["input", "ideal edit", "ours, eta 0.4", "NTI-only",
               *(f"{method} {_knob_words(knob)}" for method, knob in GALLERY_KNOBS.items())]
    make_grid(rows, [f"pair {pair}" for pair in pairs], columns).save(path)


def _knob_words(knob: str) -> str:
    """A gallery knob as a column label: ``alpha1.2`` -> ``alpha 1.2``."""
    split = next(i for i, ch in enumerate(knob) if ch.isdigit())
    return f"{knob[:split]} {knob[split:]}"


FIDELITY_GUIDANCES = (1.0, 4.0, 7.5)


def fidelity_table(model: ModelFamily, judge, per_pose: int = 32) -> str:
    """Markdown table: the judge's accuracy on rendered scenes (the ceiling) and on samples at several guidances."""
    rows: list[tuple[str, Fidelity]] = [("rendered scenes (ceiling)", render_accuracy(judge, per_pose))]
    for guidance in FIDELITY_GUIDANCES:
        rows.append((f"samples, guidance {guidance:g}", sample_fidelity(model.pipe, judge, per_pose=per_pose,
                                                                      guidance=guidance, progress=False)))
    chance = " | ".join(f"{1 / len(values):.2f}" for values in FACTORS.values())
    lines = [f"| images | {' | '.join(FACTORS)} |", "| --- |" + " --- |" * len(FACTORS), f"| chance | {chance} |"]
    lines += [f"| {name} | {' | '.join(f'{f.accuracy[k]:.2f}' for k in FACTORS)} |" for name, f in rows]
    return "\n".join(lines)


def write_miniature_doc(model: ModelFamily, runs: Path | list[Path], docs: Path, command: str, judge=None,
                        planned: int | None = None) -> Path:
    """MINIATURE.md from one evaluation run or several (one per world seed, pooled; the first gives the galleries
    and the inversion table). ``planned``: the pairs the runs were asked for, so that a page written from an
    unfinished run says so."""
    runs = [runs] if isinstance(runs, Path) else list(runs)
    run = runs[0]
    docs.mkdir(parents=True, exist_ok=True)
    judge = judge if judge is not None else load_judge()
    render_grid(docs / "mini-world.png")
    sample_grid(model, docs / "mini-samples.png")
    fidelity = fidelity_table(model, judge)
    rows = [row for path in runs for row in load_rows(path)]
    table = write_plots_and_tables(rows, docs)
    summary = summarize(rows)
    pairs = sorted({r["pair"] for r in load_rows(run)})
    strips = [Image.open(run / "results" / f"{p:03d}.png") for p in pairs[:8]]
    gallery = Image.new("RGB", (strips[0].width, 64 * len(strips)), "white")
    for i, strip in enumerate(strips):
        gallery.paste(strip, (0, 64 * i))
    gallery.resize((gallery.width * 2, gallery.height * 2), Image.Resampling.NEAREST).save(docs / "mini-gallery.png")
    meta = json.loads((run / "meta.json").read_text()) if (run / "meta.json").exists() else {}
    data = Path(meta["data"]) if "data" in meta else None
    protocol = meta.get("protocol", {})
    first = read_dataset(data)[:3] if data else []
    images = [Image.open(p.image).convert("RGB") for p in first]
    recon = reconstruction_errors(model, images, [p.source_text for p in first]) if images else {}
    log_path = mini_weights_dir() / "train_log.txt"
    log = log_path.read_text().splitlines() if log_path.exists() else []
    params = {n: sum(p.numel() for p in module.parameters()) for n, module in model.modules().items()}
    pair_count = len({(r.get("world"), r["pair"]) for r in rows})
    claims_section = claims_text(rows, runs, protocol, planned if planned and planned > pair_count else None)
    seeds = len(protocol.get("seeds", [0]))
    ours_vs = []
    nti = next((s for (g, st, _), s in summary.items() if g == "methods" and st == "NTI-only"), None)
    if nti is not None:  # one point: NTI-only has no knob
        best = _best_at(summary, "methods", "ours", round(nti["identity_error"], 2))
        ours_vs.append(f"- NTI-only editing: identity error {nti['identity_error']:.3f}, P(target pose) "
                       f"{nti['edit_success']:.3f}. Ours at the same or lower identity error: "
                       + (f"P(target pose) {best[0]:.3f} (eta {best[1]:g})." if best else "no eta reaches it."))
    for method in BASELINES:
        points = sorted((eta, s) for (g, st, eta), s in summary.items() if g == "methods" and st == method)
        if not points:
            continue
        knob, top = max(points, key=lambda p: p[1]["edit_success"])
        best = _best_at(summary, "methods", "ours", round(top["identity_error"], 3))
        label = method_info(method).sweeps[0].label
        ours_vs.append(f"- {method}: best P(target pose) {top['edit_success']:.3f} at identity error "
                       f"{top['identity_error']:.3f} ({label} {knob:g}). Ours at the same or lower identity error: "
                       + (f"{best[0]:.3f} (eta {best[1]:g})." if best else "no eta reaches it."))
    baseline_pairs = sorted({r["pair"] for r in load_rows(run) if r["setting"] in BASELINES})
    if baseline_pairs:
        _baseline_gallery(run, baseline_pairs[:8], docs / "mini-baselines.png")
    baselines_gallery = (
        "The baselines on the same pairs: input, ideal edit, ours (eta 0.4, inject 20%), NTI-only, then Imagic (alpha\n"
        "1.2), MasaCtrl (start step 4), Edit-friendly (skip 36), DDS (200 iterations), LEDITS++ (edit guidance 5) — "
        "each at\nits reference default:\n\n![baselines](mini-baselines.png)"
        if baseline_pairs else "(No baseline ran in this evaluation.)")
    text = f"""# The miniature world

A world small enough to train a text-to-image model on two CPU cores, in which the quantities the paper argues
about are known exactly: **identity** (the animal's kind and colour, its position, size and facing; the ground's
material and colour, the sky, the horizon and an uncaptioned ground texture) and **pose** (standing, sitting,
jumping, lying). A non-rigid edit should change the pose and keep everything else. Code: `src/nonrigid/mini/`.

Regenerate this page (after writing each `--data` folder with `nonrigid mini dataset --out DIR --count 50 --seed S`;
here S = {' and '.join(str(w) for w in sorted({r.get('world') for r in rows}, key=str))}):

    {command}

It resumes where it stopped. At 100 pairs and 5 seeds it is long: about 2.7 hours on 2 CPU cores, one world per
core, summed from its parts (what each part costs, and why batching cannot bring it to an hour there:
docs/PERFORMANCE.md, "What the whole miniature evaluation costs on 2 cores").

## The world

Rows are identities, columns the four poses, as rendered (64 x 64, shown at 2x):

![renders](mini-world.png)

Captions name kind, colour, pose and ground: "a photo of a red dog sitting on grass".

## The model

Stable Diffusion 1.x's component classes at miniature size, loaded with `load_pipeline("mini")`: AutoencoderKL
(64 px -> 16 x 16 x 4 latents, {params['vae'] / 1e6:.2f} M parameters), UNet2DConditionModel with cross-attention
({params['unet'] / 1e6:.2f} M), a 2-layer CLIP text encoder ({params['text_encoder'] / 1e6:.2f} M) over a
tokenizer that makes every word of the world one token, and SD's DDIM scheduler. Trained with
`nonrigid mini train --install` (log: `src/nonrigid/mini/weights/train_log.txt`; first and last lines below);
stored in fp16 (the package-data budget), run in fp32.

```
{chr(10).join([*log[:2], '...', *log[-4:]])}
```

The recipe (`TrainConfig`'s defaults) was chosen by `benchmarks/mini_recipe.py`, which trains variants for the
same number of training samples on one finished run's VAE and lets the judge read their samples (96, guidance
4). At 12 minutes of UNet training each: the plain epsilon loss at batch 64 (400 steps) reached pose 0.22, kind
0.39, colour 0.62; min-SNR-5 weighting, 0.26 / 0.47 / 0.73; min-SNR-5 at batch 32 (800 steps), 0.54 / 0.51 /
0.89. More, smaller steps matter most on two cores, so the model trains 2500 steps of batch 32 with min-SNR-5
(the previous recipe, 1200 plain steps of batch 64 in 55 minutes, reached 0.65 / 0.55 / 0.99). The knobs are
`nonrigid mini train` flags: `--unet-batch 64 --snr-gamma 0` trains with the plain loss at batch 64.

Samples (50 DDIM steps, guidance 4; rows: kind x colour, columns: the captioned pose):

![samples](mini-samples.png)

Do the samples show what their captions say? The judge (`nonrigid mini judge`: a small CNN trained on rendered,
degraded scenes only) reads pose, kind and colour back from 128 samples (32 captions per pose with random kind,
colour and ground; 25 DDIM steps), as the share it names right:

{fidelity}

## Inversion quality

Relative latent error ||x_rec - x_0|| / ||x_0|| on {len(images)} benchmark images (50 steps, the scene's caption as
source prompt):

| inversion, sampled back at | relative error |
| --- | --- |
| DDIM, guidance 1 | {recon.get('ddim_g1', float('nan')):.4f} |
| DDIM, guidance 7.5 | {recon.get('ddim_g7.5', float('nan')):.4f} |
| NTI, guidance 7.5 | {recon.get('nti_g7.5', float('nan')):.4f} |

## Editing: the method, the baselines and the paper's ablations

{claims_section}

Two variants of ours are compared with it pair by pair further down, with paired 95% intervals on both worlds: a
cheaper preset (the fast preset) and edits inside a mask ("Cheaper settings and masks, tested").

### The curves

{pair_count} pairs (scene, target pose) from {len(runs)} world(s), {seeds} text-optimization seed(s) per pair,
{protocol.get('num_steps', 50)} DDIM steps, {protocol.get('opt_steps', 200)} text-optimization steps; the
ablations sampled at eta {', '.join(f'{e:g}' for e in protocol.get('ablation_etas', ETAS))}.
Metrics from the renderer's ground truth: **identity error** = mean of the background error (mean absolute pixel
difference to the input over pixels that are background in both the input and the ideal edit) and the subject
colour error (the mean colour of whatever departs from the scene's known empty background, against the animal's
colour: keeping the old pose is a failed edit, not an identity loss);
**edit success** = the pose judge's probability of the target pose (a small CNN trained on
rendered, degraded scenes: `nonrigid mini judge`). Points are eta values (0 = optimized embedding, 1 = target
text); error bars are standard errors over pairs. The baselines run through `nonrigid.methods` with the source caption
as source prompt, each sweeping its main knob (points are labelled with its value: Imagic's alpha, MasaCtrl's
start step, Edit-friendly's skip, DDS's iterations, LEDITS++'s edit guidance); Imagic fine-tunes 200 steps
(inside the paper's 50..400 sweep); MasaCtrl controls the last 3 of the model's 7 self-attention layers (10 of 16
on SD 1.x).

![methods](mini-methods.png)
![inversion](mini-inversion.png)
![injection](mini-injection.png)

Read off the pooled curves (in-sample, no interval: the claims table above is the test):

{chr(10).join(ours_vs)}

The paper's ablations, as hypotheses:

{chr(10).join(ablation_findings(summary))}

Gallery (first pairs): input, ideal edit (renderer), ours at eta {', '.join(f'{e:g}' for e in ETAS)},
NTI-only:

![gallery](mini-gallery.png)

{baselines_gallery}

### All numbers

{table}
"""
    path = docs / "MINIATURE.md"
    families = "\n## Further model families"  # written by each family's own run (mini/family_doc.py): kept
    old = path.read_text() if path.exists() else ""
    if families in old:
        text = text.rstrip() + "\n" + old[old.index(families):]
    path.write_text(text)
    return path


@torch.no_grad()
def sample_grid(model: ModelFamily, path: Path, seed: int = 0, steps: int = 50, guidance: float = 4.0) -> list[str]:
    """Generated samples (rows: kinds x colours; columns: poses) beside nothing else: look at them."""
    rng = random.Random(seed)
    prompts = []
    for kind in KINDS:
        for colour in rng.sample(sorted(COLOURS), 2):
            ground = rng.choice(["grass", "sand", "snow", "dirt"])
            prompts.extend(caption(kind, colour, pose, ground) for pose in POSES)
    generator = torch.Generator().manual_seed(seed)
    images = model.pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=generator,
                        height=64, width=64).images
    cols = len(POSES)
    grid = Image.new("RGB", (cols * 64, len(prompts) // cols * 64 + 14), "white")
    draw = ImageDraw.Draw(grid)
    for c, pose in enumerate(POSES):
        draw.text((c * 64 + 4, 2), pose, fill="black")
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * 64, 14 + (i // cols) * 64))
    grid.resize((grid.width * 2, grid.height * 2), Image.Resampling.NEAREST).save(path)
    return prompts


def render_grid(path: Path, seed: int = 0, count: int = 6) -> None:
    """The renderer's ground truth: rows are identities, columns poses."""
    rng = random.Random(seed)
    grid = Image.new("RGB", (len(POSES) * 64, count * 64))
    for r in range(count):
        scene = random_scene(rng)
        for c, pose in enumerate(POSES):
            grid.paste(render(scene.with_pose(pose)), (c * 64, r * 64))
    grid.resize((grid.width * 2, grid.height * 2), Image.Resampling.NEAREST).save(path)


def write_plots_and_tables(rows: list[dict], docs: Path) -> str:
    """The three identity-vs-success plots and a Markdown table of every (group, setting, eta)."""
    summary = summarize(rows)
    titles = {"methods": "The method vs the baselines", "inversion": "Ablation: inversion type (inject 20%)",
              "injection": "Ablation: source injection ratio (NTI w/o source)"}
    for group, title in titles.items():
        plot(summary, group, title, docs / f"mini-{group}.png")
    lines = ["| group | setting | eta | n | identity error | background | subject | P(target pose) | pose acc. |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (group, setting, eta), s in sorted(summary.items(), key=lambda kv: (list(titles).index(kv[0][0]),
                                                                           kv[0][1], kv[0][2])):
        lines.append(
            f"| {group} | {setting} | {eta:g} | {int(s['n'])} | {s['identity_error']:.3f} ± "
            f"{s['identity_error_se']:.3f} | {s['background_error']:.3f} | {s['subject_error']:.3f} | "
            f"{s['edit_success']:.3f} ± {s['edit_success_se']:.3f} | {s['pose_correct']:.2f} |"
        )
    (docs / "mini-results.json").write_text(json.dumps(
        [{"group": g, "setting": s, "eta": e, **v} for (g, s, e), v in summary.items()], indent=1))
    return "\n".join(lines)


def claims_text(rows: list[dict], runs: list[Path], protocol: dict, planned: int | None = None) -> str:
    """The page's first editing section: every claim the rows can test, with its paired interval and verdict, and
    what they do and do not settle (``planned``: the pairs asked for, when the runs hold fewer)."""
    from .claims import all_claims, claims_table

    claims, spread = all_claims(rows, BASELINES)
    if not claims:
        return ""
    counts = {verdict: sum(c.verdict == verdict for c in claims if c.direction) for verdict in
              ("supported", "contradicted", "undecided")}
    worlds = sorted({r.get("world") for r in rows}, key=str)
    success, identity = spread["edit_success"], spread["identity_error"]
    spread_line = (f"Across eta, ours' P(target pose) on a pair ranges by {success['mean']:.3f} on average "
                   f"[{success['low']:.3f}, {success['high']:.3f}] ({success['n']} pairs; "
                   f"{success['share_over'] * 100:.0f}% of pairs range over {success['large']:g}); its identity "
                   f"error by {identity['mean']:.3f} [{identity['low']:.3f}, {identity['high']:.3f}] "
                   f"({identity['share_over'] * 100:.0f}% of pairs over {identity['large']:g})."
                   if success["n"] else "")
    pairs = len({(r.get("world"), r["pair"]) for r in rows})
    unfinished = (f"**This page rests on {pairs} of the {planned} pairs the evaluation was asked for: the run is "
                  "not finished, and the same command resumes it.**\n\n" if planned else "")
    ablation_seeds = protocol.get("ablation_seeds")
    seeds_line = (f" The inversion and injection ablations sample the first {ablation_seeds} seed(s) only (at eta 1 "
                  "the seed does not matter: e_1 is the target text's embedding)." if ablation_seeds else "")
    return f"""## The paper's claims, with paired 95% intervals

{unfinished}Each row is a paired comparison: per pair (scene, target pose) the difference between two settings (each the
mean over the pair's text-optimization seeds: {len(protocol.get('seeds', [0]))}), averaged over pairs, with a 95%
percentile-bootstrap interval over pairs (10,000 resamplings, `nonrigid.mini.claims`). Worlds {', '.join(map(str,
worlds))} are pooled, except where an operating point is chosen from the data (ours' eta with the highest edit
success among those whose identity error is no higher than NTI-only's; a baseline's knob likewise against ours): it
is chosen on one world and tested on the other. A claim is **supported** when its interval lies on the side the
paper predicts, **contradicted** when on the other side, **undecided** when it contains zero. Questions (no
prediction) say whether a difference was found.{seeds_line}
Identity error and sky shift: lower is closer to the input; edit success: P(target pose), higher is better
(defined under the curves below).

{claims_table(claims)}

Verdicts on the paper's predictions: {counts['supported']} supported, {counts['contradicted']} contradicted,
{counts['undecided']} undecided. {spread_line}

{sky_reading(claims)}
"""


def sky_reading(claims) -> str:
    """Which stage the sky's colour moves with, read from the sky questions' intervals."""
    sky = [c for c in claims if c.topic == "sky" and not c.claim.startswith("(question) does ours")]
    if not sky:
        return ""
    names = {"the inversion without a source prompt?": "the inversion without a source prompt",
             "the injection switch?": "injecting the source prompt for the first 20% of steps",
             "the text optimization?": "the text optimization (eta 0 against eta 1)"}
    moved, still = [], []
    for c in sky:
        name = names.get(c.claim.removeprefix("(question) "))
        if name is None:
            continue
        effect = f"{name} ({c.mean:+.3f} [{c.low:+.3f}, {c.high:+.3f}])"
        (moved if c.verdict == "differs" else still).append(effect)
    return ("Where the sky's colour changes (sky shift: positive = the first setting moves it more): it moves with "
            + ("; ".join(moved) if moved else "no stage tested") + ". No difference found for: "
            + ("; ".join(still) if still else "none") + ".")
