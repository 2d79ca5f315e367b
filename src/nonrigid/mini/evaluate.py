"""Evaluate editing settings on the miniature world's benchmark, resumably, and plot the results.

For every pair it runs stage A once per text-optimization seed (the :class:`Protocol`'s seeds; one, seed 0, by
default), the three inversions the paper ablates (DDIM; NTI with the source caption; NTI without a source prompt),
and then every setting as batched sampling calls over the pairs:

- ``ours``: NTI without source prompt, injection 20%, eta swept (every seed);
- ``NTI-only``: NTI with the source caption, then the target prompt (eta 1, no injection, no text optimization:
  no seed);
- inversion ablation: DDIM / NTI-src / NTI-w/o-src at injection 20%, at the protocol's ablation etas;
- injection ablation: NTI-w/o-src at 0, 10, ..., 50%, at the ablation etas.

- the baselines (``BASELINES``, through :func:`nonrigid.methods.run.run_edits`), each sweeping its main
  knob, with the source caption as source prompt (the reference codes are used that way); ``pairs_per_batch``
  pairs at a time as one model batch where the method batches across images (DDS, Edit-friendly), one by one
  otherwise (Imagic fine-tunes a UNet per pair; MasaCtrl and LEDITS++ run one image per call).

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

from ..errors import UsageError
from ..images import open_image
from ..methods.catalogue import DEFAULT_INJECT, INJECT_ABLATION
from ..methods.run import EditRequest, run_edits
from ..stages.cache import StageCache, write_atomic
from ..stages.sampling import sample_variants
from ..stages.text_optimization import TextOptimization
from .dataset import Pair
from .judge import SceneJudge, score_edit
from .protocol import BASELINES, FLOW_BASELINES, Protocol
from .world import subject_region

INVERSIONS = {"DDIM": ("ddim", False), "NTI-src": ("nti", True), "NTI-w/o-src": ("nti", False)}


def evaluate(model, judge: SceneJudge, pairs: list[Pair], out: Path, *, num_steps: int = 50, opt_steps: int = 200,
             baselines: tuple[str, ...] = tuple(BASELINES), ablations: bool = True,
             progress: bool = True, pairs_per_batch: int = 1, protocol: Protocol | None = None) -> list[dict]:
    """Run every setting and baseline on every pair (skipping what is already done) and return all rows.

    ``ablations=False`` runs ours and NTI-only editing alone (no DDIM inversion, no injection sweep): the
    comparison made for each further model family. ``protocol`` (seeds, etas, world) replaces ``num_steps``,
    ``opt_steps`` and ``ablations`` when given. ``pairs_per_batch`` pairs run their settings (ours, its
    ablations, NTI-only) as one model batch per step (:func:`nonrigid.methods.run.run_edits`): same rows up to
    the last bits of batched products, several times the throughput at the miniature model's 16 x 16 latents;
    the baselines that batch across images run that many pairs per batch too.
    A run folder keeps its protocol (``meta.json``): resuming it with another one is refused."""
    if pairs_per_batch < 1:
        raise ValueError(f"pairs_per_batch must be >= 1, got {pairs_per_batch}")
    if protocol is None:
        protocol = Protocol(num_steps=num_steps, opt_steps=opt_steps, ablations=ablations)
    results = out / "results"
    results.mkdir(parents=True, exist_ok=True)
    cache = StageCache(out / "cache")
    if pairs:
        _check_meta(out, str(pairs[0].image.parent.parent.resolve()), protocol)
    todo = [(index, pair) for index, pair in enumerate(pairs) if not (results / f"{index:03d}.json").exists()]
    bar = tqdm(total=len(pairs), initial=len(pairs) - len(todo), desc="pairs", disable=not progress)
    for start in range(0, len(todo), pairs_per_batch):
        chunk = todo[start : start + pairs_per_batch]
        done = _evaluate_pairs(model, judge, chunk, cache, protocol)
        for (index, _), (rows, strip) in zip(chunk, done, strict=True):
            strip.save(results / f"{index:03d}.png")
            write_atomic(results / f"{index:03d}.json", (json.dumps(rows) + "\n").encode())
        bar.update(len(chunk))
    bar.close()
    _evaluate_baselines(model, judge, pairs, baselines, out / "baselines", cache, protocol, pairs_per_batch, progress)
    return load_rows(out)


def _evaluate_baselines(model, judge, pairs: list[Pair], baselines: tuple[str, ...], folder: Path, cache,
                        protocol: Protocol, pairs_per_batch: int, progress: bool) -> None:
    """Every baseline on every pair whose rows are not written yet: ``pairs_per_batch`` pairs at a time, as one
    model batch where the method batches across images (``MethodInfo.batches_images``), one by one otherwise;
    each (pair, method) written once done."""
    from ..methods.catalogue import method_info

    folder.mkdir(exist_ok=True)
    if not baselines:
        return
    todo = [(index, pair, method) for index, pair in enumerate(pairs) for method in baselines
            if not (folder / f"{index:03d}-{method}.json").exists()]
    bar = tqdm(total=len(pairs) * len(baselines), initial=len(pairs) * len(baselines) - len(todo), desc="baselines",
               disable=not progress or not baselines)
    for start in range(0, len(todo), pairs_per_batch * len(baselines)):
        window = todo[start : start + pairs_per_batch * len(baselines)]
        for method in baselines:
            items = [(index, pair) for index, pair, m in window if m == method]
            groups = [items] if method_info(method).batches_images else [[item] for item in items]
            for group in (g for g in groups if g):
                for (index, _), rows in zip(group, _evaluate_baseline(model, judge, group, method, cache, protocol,
                                                                      folder), strict=True):
                    write_atomic(folder / f"{index:03d}-{method}.json", (json.dumps(rows) + "\n").encode())
                bar.update(len(group))
    bar.close()


def _check_meta(out: Path, data: str, protocol: Protocol) -> None:
    """Write the run's data folder and protocol, or refuse to resume a run made with other ones."""
    meta = out / "meta.json"
    wanted = {"data": data, "protocol": protocol.to_dict()}
    if meta.exists():
        found = json.loads(meta.read_text())
        if "protocol" in found and found != wanted:
            raise UsageError(f"{out} was made with {json.dumps(found)}; resume it with the same data and "
                             "settings, or use another run folder")
    write_atomic(meta, (json.dumps(wanted) + "\n").encode())


def load_rows(out: Path) -> list[dict]:
    paths = sorted((out / "results").glob("*.json")) + sorted((out / "baselines").glob("*.json"))
    return [row for path in paths for row in json.loads(path.read_text())]


def _evaluate_baseline(model, judge, items: list[tuple[int, Pair]], method: str, cache, protocol: Protocol,
                       folder: Path) -> list[list[dict]]:
    """One baseline on some pairs (one model batch where the method batches across images): each pair's rows,
    every value of the method's main knob, judged like the method's variants (the protocol's first seed: a
    baseline's randomness is not the paper's text-optimization seed)."""
    from ..methods.catalogue import method_info

    params = dict({**BASELINES, **FLOW_BASELINES}[method])
    if method == "imagic":
        params["opt_steps"] = protocol.opt_steps  # the same stage A as ours: shared through the cache
    images = [open_image(pair.image).convert("RGB") for _, pair in items]
    requests = [EditRequest(image, pair.target_text, pair.source_text) for image, (_, pair) in zip(images, items,
                                                                                                   strict=True)]
    results = run_edits(model, requests, method, params, seeds=protocol.seeds[:1], size=images[0].size[0],
                        cache=cache)
    label = method_info(method).sweeps[0].label
    found = []
    for (index, pair), result in zip(items, results, strict=True):
        rows = []
        for variant in result.variants:
            knob = variant.knobs[label]
            row = _row(judge, pair, index, variant.image, "", float(knob), 0.0)
            rows.append({**row, "seed": variant.seed, "world": protocol.world, "group": "methods",
                         "setting": method, "knob": label})
            variant.image.save(folder / f"{index:03d}-{method}-{label}{knob:g}.png")
        found.append(rows)
    return found


def _evaluate_pairs(model, judge, chunk: list[tuple[int, Pair]], cache, protocol: Protocol
                    ) -> list[tuple[list[dict], Image.Image]]:
    """Every setting of ours, its ablations and NTI-only on several pairs, each setting one batch over the pairs:
    each pair's rows and strip."""
    images = [open_image(pair.image).convert("RGB") for _, pair in chunk]
    rows: list[list[dict]] = [[] for _ in chunk]
    galleries: list[dict[str, Image.Image]] = [{} for _ in chunk]

    def add(variants: list[list], name: str, groups) -> None:
        for (index, pair), mine, gallery, found in zip(chunk, rows, galleries, variants, strict=True):
            for variant in found:
                eta, inject = variant.params["etas"], variant.params["inject"]
                row = {**_row(judge, pair, index, variant.image, name, eta, inject), "seed": variant.seed,
                       "world": protocol.world}
                for group, setting in groups(variant):
                    mine.append({**row, "group": group, "setting": setting})
                if variant.seed == protocol.seeds[0] and inject == DEFAULT_INJECT[0] and name == "NTI-w/o-src":
                    gallery[f"ours eta {eta:g}"] = variant.image

    ablation_etas, ablation_seeds = protocol.ablation_etas, protocol.seeds_of_ablations

    def in_ablations(variant) -> bool:
        return variant.params["etas"] in ablation_etas and variant.seed in ablation_seeds

    ours, results = _sweep(model, images, chunk, cache, protocol, "NTI-w/o-src", protocol.etas, DEFAULT_INJECT,
                           protocol.seeds)
    add(ours, "NTI-w/o-src", lambda v: [("methods", "ours")]
        + ([("inversion", "NTI-w/o-src")] if in_ablations(v) else [])
        + ([("injection", f"inject {round(v.params['inject'] * 100)}%")] if protocol.ablations and in_ablations(v)
           else []))
    if protocol.ablations:
        others = tuple(r for r in INJECT_ABLATION if r not in DEFAULT_INJECT)
        injected, _ = _sweep(model, images, chunk, cache, protocol, "NTI-w/o-src", ablation_etas, others,
                             ablation_seeds)
        add(injected, "NTI-w/o-src", lambda v: [("injection", f"inject {round(v.params['inject'] * 100)}%")])
    for name in ("DDIM", "NTI-src") if protocol.ablations else ("NTI-src",) if protocol.nti_only else ():
        found, results = _sweep(model, images, chunk, cache, protocol, name, ablation_etas, DEFAULT_INJECT,
                                ablation_seeds)
        add(found, name, lambda v, name=name: [("inversion", name)])
        if name == "NTI-src":
            edits = _nti_only(model, [r.stages.inversion for r in results],
                              [r.stages.text_optimizations[0] for r in results])
            for (index, pair), nti_only, mine, gallery in zip(chunk, edits, rows, galleries, strict=True):
                mine.append({**_row(judge, pair, index, nti_only, name, 1.0, 0.0), "seed": None,
                             "world": protocol.world, "group": "methods", "setting": "NTI-only"})
                gallery["NTI-only"] = nti_only
    return [(mine, _strip(image, pair, gallery))
            for (_, pair), image, mine, gallery in zip(chunk, images, rows, galleries, strict=True)]


def _sweep(model, images, chunk, cache, protocol: Protocol, name: str, etas, injects, seeds: tuple[int, ...]
           ) -> tuple[list[list], list]:
    """Each pair's variants of one inversion over ``etas`` x ``injects`` x ``seeds``.

    At eta 1 the conditioning is the target text's whatever the seed (``e_eta = e_tgt``), so it is sampled for the
    first seed only: the seeds' copies would differ by float rounding alone."""
    method, with_source = INVERSIONS[name]
    variants: list[list] = [[] for _ in chunk]
    results: list = []
    seeded = tuple(e for e in etas if e != 1.0)
    for these_etas, these_seeds in ((seeded, seeds), ((1.0,) if 1.0 in etas else (), seeds[:1])):
        if not these_etas:
            continue
        requests = [EditRequest(image, pair.target_text, pair.source_text if with_source else "",
                                subject_region(pair.scene) if protocol.masked else None)
                    for image, (_, pair) in zip(images, chunk, strict=True)]
        params = {"etas": these_etas, "inject": injects, "num_steps": protocol.num_steps,
                  "opt_steps": protocol.opt_steps, "inversion": method}
        if name == "NTI-w/o-src":  # ours: a candidate preset's parameters replace the paper's
            params.update(protocol.ours)
        results = run_edits(model, requests, "ours", params, seeds=these_seeds, size=images[0].size[0], cache=cache)
        for mine, result in zip(variants, results, strict=True):
            mine.extend(result.variants)
    return variants, results


def _nti_only(model, inversions: list, texts: list[TextOptimization]) -> list[Image.Image]:
    """Null-text inversion editing: the target prompt from x_T, no injection, no text optimization (one batch)."""
    plain = [[replace(text, optimized=text.target)] for text in texts]
    return [images[0] for images in sample_variants(model, inversions, plain, (1.0,), (0,))]


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
    """Mean and standard error of each metric per (group, setting, eta), over pairs: a pair's seeds are averaged
    first (:func:`nonrigid.mini.claims.pair_means`), so ``n`` counts pairs and the error bars do not shrink with
    seeds that share a pair."""
    from .claims import pair_means

    metrics = ("identity_error", "background_error", "subject_error", "edit_success", "pose_correct")
    means = pair_means(rows, metrics)
    summary = {}
    for key in dict.fromkeys((r["group"], r["setting"], float(r["eta"])) for r in rows):  # first-seen order
        stats: dict[str, float] = {}
        for metric in metrics:
            values = torch.tensor([pair[key][metric] for pair in means.values() if key in pair], dtype=torch.float64)
            stats["n"] = float(len(values))
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
