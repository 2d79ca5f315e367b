"""Evaluate editing settings on the miniature world's benchmark, resumably, and plot the results.

For every pair it runs stage A once (seed 0), the three inversions the paper ablates (DDIM; NTI with the source
caption; NTI without a source prompt), and then every setting as one batched sampling call per inversion:

- ``ours``: NTI without source prompt, injection 20%, eta swept;
- ``NTI-only``: NTI with the source caption, then the target prompt (eta 1, no injection, no text optimization);
- inversion ablation: DDIM / NTI-src / NTI-w/o-src at injection 20%, eta swept;
- injection ablation: NTI-w/o-src at 0, 10, ..., 50%, eta swept.

- the baselines (``BASELINES``, through :func:`nonrigid.methods.run.run_method`), each sweeping its main knob,
  with the source caption as source prompt (the reference codes are used that way).

Each pair's rows are written to ``OUT/results/<pair>.json`` (baselines: ``OUT/baselines/<pair>-<method>.json``)
atomically once done, and a rerun skips what is done, so an interrupted evaluation loses at most the job in
progress. Stage results go to the stage cache in ``OUT/cache``, so even that job's finished stages are not redone.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..methods.catalogue import DEFAULT_INJECT, INJECT_ABLATION
from ..methods.ours import edit_many
from ..stages.cache import StageCache, write_atomic
from ..stages.sampling import sample_many
from ..stages.text_optimization import TextOptimization
from .dataset import Pair
from .judge import SceneJudge, score_edit

ETAS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
INVERSIONS = {"DDIM": ("ddim", False), "NTI-src": ("nti", True), "NTI-w/o-src": ("nti", False)}

# baseline settings on the miniature model: each method's main knob swept over a range that spans "keeps the input"
# to "follows the text"; step counts as the references, except Imagic's fine-tuning (inside the paper's 50..400).
BASELINES: dict[str, dict] = {
    "imagic": {"alphas": (0.6, 0.8, 1.0, 1.2), "finetune_steps": 200},
    "masactrl": {"start_step": (4, 10, 20)},
    "edit-friendly": {"skip": (24, 36, 48, 60)},
    "dds": {"iterations": (25, 50, 100, 200)},
    "ledits": {"edit_guidance": (5.0, 10.0, 15.0)},
}


def evaluate(pipe, judge: SceneJudge, pairs: list[Pair], out: Path, *, num_steps: int = 50, opt_steps: int = 200,
             baselines: tuple[str, ...] = tuple(BASELINES), ablations: bool = True,
             progress: bool = True, pairs_per_batch: int = 1) -> list[dict]:
    """Run every setting and baseline on every pair (skipping what is already done) and return all rows.

    ``ablations=False`` runs ours and NTI-only editing alone (no DDIM inversion, no injection sweep): the
    comparison made for each further model family. ``pairs_per_batch`` pairs run their settings (ours, its
    ablations, NTI-only) as one model batch per step (:func:`nonrigid.methods.ours.edit_many`): same rows up to
    the last bits of batched products, several times the throughput at the miniature model's 16 x 16 latents."""
    if pairs_per_batch < 1:
        raise ValueError(f"pairs_per_batch must be >= 1, got {pairs_per_batch}")
    results = out / "results"
    results.mkdir(parents=True, exist_ok=True)
    cache = StageCache(out / "cache")
    if pairs:
        data = str(pairs[0].image.parent.parent.resolve())
        write_atomic(out / "meta.json", (json.dumps({"data": data}) + "\n").encode())
    todo = [(index, pair) for index, pair in enumerate(pairs) if not (results / f"{index:03d}.json").exists()]
    bar = tqdm(total=len(pairs), initial=len(pairs) - len(todo), desc="pairs", disable=not progress)
    for start in range(0, len(todo), pairs_per_batch):
        chunk = todo[start : start + pairs_per_batch]
        done = _evaluate_pairs(pipe, judge, chunk, cache, num_steps, opt_steps, ablations)
        for (index, _), (rows, strip) in zip(chunk, done, strict=True):
            strip.save(results / f"{index:03d}.png")
            write_atomic(results / f"{index:03d}.json", (json.dumps(rows) + "\n").encode())
        bar.update(len(chunk))
    bar.close()
    jobs = [(index, pair, method) for index, pair in enumerate(pairs) for method in baselines]
    (out / "baselines").mkdir(exist_ok=True)
    for index, pair, method in tqdm(jobs, desc="baselines", disable=not progress or not jobs):
        path = out / "baselines" / f"{index:03d}-{method}.json"
        if not path.exists():
            rows = _evaluate_baseline(pipe, judge, pair, index, method, cache, opt_steps, out / "baselines")
            write_atomic(path, (json.dumps(rows) + "\n").encode())
    return load_rows(out)


def load_rows(out: Path) -> list[dict]:
    paths = sorted((out / "results").glob("*.json")) + sorted((out / "baselines").glob("*.json"))
    return [row for path in paths for row in json.loads(path.read_text())]


def _evaluate_baseline(
    pipe, judge, pair: Pair, index: int, method: str, cache, opt_steps: int, folder: Path
) -> list[dict]:
    """One baseline on one pair: every value of its main knob, judged like the method's variants."""
    from ..methods.catalogue import method_info
    from ..methods.run import run_method

    params = dict(BASELINES[method])
    if method == "imagic":
        params["opt_steps"] = opt_steps  # the same stage A as ours: shared through the cache
    image = Image.open(pair.image).convert("RGB")
    result = run_method(pipe, image, pair.target_text, method, params, seeds=(0,), source_prompt=pair.source_text,
                        size=image.size[0], cache=cache)
    label = method_info(method).sweeps[0].label
    rows = []
    for variant in result.variants:
        knob = variant.knobs[label]
        row = _row(judge, pair, index, variant.image, "", float(knob), 0.0)
        rows.append({**row, "group": "methods", "setting": method, "knob": label})
        variant.image.save(folder / f"{index:03d}-{method}-{label}{knob:g}.png")
    return rows


def _evaluate_pairs(pipe, judge, chunk: list[tuple[int, Pair]], cache, num_steps: int, opt_steps: int,
                    ablations: bool = True) -> list[tuple[list[dict], Image.Image]]:
    """Every setting of ours and NTI-only on several pairs, each setting one batch over the pairs: each pair's
    rows and strip."""
    images = [Image.open(pair.image).convert("RGB") for _, pair in chunk]
    size = images[0].size[0]
    rows: list[list[dict]] = [[] for _ in chunk]
    galleries: list[dict[str, Image.Image]] = [{} for _ in chunk]
    inversions = INVERSIONS if ablations else {k: v for k, v in INVERSIONS.items() if k != "DDIM"}
    for name, (method, with_source) in inversions.items():
        injects = INJECT_ABLATION if name == "NTI-w/o-src" and ablations else DEFAULT_INJECT
        results = edit_many(
            pipe, images, [pair.target_text for _, pair in chunk], size=size, cache=cache,
            source_prompts=[pair.source_text if with_source else "" for _, pair in chunk], seeds=(0,), etas=ETAS,
            inject=injects, num_steps=num_steps, opt_steps=opt_steps, inversion=method,
        )
        for (index, pair), result, mine, gallery in zip(chunk, results, rows, galleries, strict=True):
            for variant in result.variants:
                row = _row(judge, pair, index, variant.image, name, variant.eta, variant.inject_ratio)
                if name != "NTI-w/o-src":
                    mine.append({**row, "group": "inversion", "setting": name})
                    continue
                mine.append({**row, "group": "injection", "setting": f"inject {round(variant.inject_ratio * 100)}%"})
                if variant.inject_ratio == 0.2:
                    mine.append({**row, "group": "inversion", "setting": name})
                    mine.append({**row, "group": "methods", "setting": "ours"})
                    gallery[f"ours eta {variant.eta:g}"] = variant.image
        if name == "NTI-src":
            edits = _nti_only(pipe, [r.inversion for r in results], [r.text_optimizations[0] for r in results])
            for (index, pair), nti_only, mine, gallery in zip(chunk, edits, rows, galleries, strict=True):
                mine.append({**_row(judge, pair, index, nti_only, name, 1.0, 0.0), "group": "methods",
                             "setting": "NTI-only"})
                gallery["NTI-only"] = nti_only
    return [(mine, _strip(image, pair, gallery))
            for (_, pair), image, mine, gallery in zip(chunk, images, rows, galleries, strict=True)]


def _nti_only(pipe, inversions: list, texts: list[TextOptimization]) -> list[Image.Image]:
    """Null-text inversion editing: the target prompt from x_T, no injection, no text optimization (one batch)."""
    plain = [[replace(text, optimized=text.target)] for text in texts]
    return [images[0] for images in sample_many(pipe, inversions, plain, (1.0,), (0,))]


def _row(judge, pair: Pair, index: int, image, inversion: str, eta: float, inject: float) -> dict:
    return {
        "pair": index, "image": pair.image.name, "target_pose": pair.target_pose, "inversion": inversion,
        "eta": eta, "inject": inject,
        **score_edit(judge, pair.scene, pair.target_pose, image),
    }


def _strip(image: Image.Image, pair: Pair, gallery: dict[str, Image.Image]) -> Image.Image:
    from .world import render

    ordered = [gallery[k] for k in gallery if k.startswith("ours")] + [gallery[k] for k in gallery if k == "NTI-only"]
    tiles = [image, render(pair.scene.with_pose(pair.target_pose)), *ordered]
    strip = Image.new("RGB", (64 * len(tiles), 64), "white")
    for i, tile in enumerate(tiles):
        strip.paste(tile.resize((64, 64)), (64 * i, 0))
    return strip


@torch.no_grad()
def summarize(rows: list[dict]) -> dict[tuple[str, str, float], dict[str, float]]:
    """Mean and standard error of each metric per (group, setting, eta)."""
    groups: dict[tuple[str, str, float], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["group"], row["setting"], row["eta"]), []).append(row)
    summary = {}
    for key, members in groups.items():
        stats = {"n": float(len(members))}
        for metric in ("identity_error", "background_error", "subject_error", "edit_success", "pose_correct"):
            values = torch.tensor([m[metric] for m in members], dtype=torch.float64)
            stats[metric] = float(values.mean())
            stats[metric + "_se"] = float(values.std() / len(values) ** 0.5) if len(values) > 1 else 0.0
        summary[key] = stats
    return summary


def plot(summary, group: str, title: str, path: Path) -> None:
    """Identity error (x, lower is better) against edit success (y, higher is better), one line per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    settings = sorted({s for g, s, _ in summary if g == group}, key=_setting_order)
    for setting in settings:
        points = sorted((eta, stats) for (g, s, eta), stats in summary.items() if g == group and s == setting)
        xs = [p[1]["identity_error"] for p in points]
        ys = [p[1]["edit_success"] for p in points]
        ax.errorbar(xs, ys, xerr=[p[1]["identity_error_se"] for p in points],
                    yerr=[p[1]["edit_success_se"] for p in points], marker="o", capsize=2, label=setting)
        if len(points) > 1:
            for eta, x, y in zip([p[0] for p in points], xs, ys, strict=True):
                ax.annotate(f"{eta:g}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.set_xlabel("identity error (lower is better)")
    ax.set_ylabel("edit success: P(target pose) (higher is better)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _setting_order(setting: str) -> tuple[int, str]:
    order = ["ours", "NTI-only", *BASELINES, "DDIM", "NTI-src", "NTI-w/o-src",
             *(f"inject {r}%" for r in range(0, 60, 10))]
    return (order.index(setting) if setting in order else len(order), setting)
