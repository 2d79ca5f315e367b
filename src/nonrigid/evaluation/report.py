"""The report of one or more benchmark runs: Figure 6, a summary table, ablation plots and an HTML gallery.

``write_report(runs, out)`` writes into ``out``:

    figure6-clip.png/.svg        mean CLIP-T per LPIPS bin, one line per method, standard-error bars (Figure 6)
    figure6-aesthetic.png/.svg   the same for the aesthetic score
    figure6.csv                  the binned numbers behind both plots
    summary.csv, summary.md      per run, method, setting and knob values: n, mean and standard error of every
                                 metric, wall time per edit
    piebench.csv, piebench.md    runs over PIE-Bench: its metrics per editing type and overall (mean ± standard
                                 error, Table 1's scaling in the .md), with the count of empty-region edits
    ablation-<run>.png/.svg      for each preset run: each metric per ablation setting (one line per eta), and
                                 CLIP-T against LPIPS per setting
    gallery.html, gallery/       the plots, the table, and for every pair the input beside each method's edit
                                 closest to the same LPIPS; thumbnails are copied, so it opens with no server

Figure 6 and the gallery compare the methods of the runs made without a preset (every knob value of a method
pooled, as the paper does); when every run is a preset run, they compare its ablation settings instead.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UsageError
from ..methods.catalogue import METHODS
from .gallery import write_gallery
from .protocol import METRIC_NAMES
from .tables import (
    BinPoint,
    RunData,
    bin_edges,
    comparison_rows,
    csv_value,
    figure6_points,
    knob_text,
    load_runs,
    mean_and_se,
    piebench_table,
    summarize,
    write_piebench_table,
    write_summary,
)

METRIC_TITLES = {"clip_t": "CLIP-T", "lpips": "LPIPS", "aesthetic": "aesthetic score"}
METRIC_AXES = {
    "clip_t": "CLIP-T to the target text (higher is better)",
    "lpips": "LPIPS to the input (lower: more of it kept)",
    "aesthetic": "aesthetic score (higher is better)",
}
logger = logging.getLogger("nonrigid")


# --------------------------------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, stem: Path) -> list[Path]:
    paths = [stem.with_suffix(".png"), stem.with_suffix(".svg")]
    fig.savefig(paths[0], dpi=150)
    fig.savefig(paths[1])
    _pyplot().close(fig)
    return paths


def plot_figure6(points: Sequence[BinPoint], metric: str, edges: np.ndarray, stem: Path, title: str) -> list[Path]:
    """Mean ``metric`` against mean LPIPS per bin, one line per series, standard-error bars both ways."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for edge in edges:
        ax.axvline(edge, color="0.9", linewidth=0.8, zorder=0)
    for series in dict.fromkeys(p.series for p in points):
        mine = [p for p in points if p.series == series]
        ax.errorbar([p.lpips for p in mine], [p.mean for p in mine], xerr=[_nan0(p.lpips_se) for p in mine],
                    yerr=[_nan0(p.se) for p in mine], marker="o", markersize=4, capsize=3, linewidth=1.4,
                    label=series)
    ax.set_xlabel(METRIC_AXES["lpips"])
    ax.set_ylabel(METRIC_AXES[metric])
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if points:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no LPIPS bin holds enough edits", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    return _save(fig, stem)


def _nan0(value: float) -> float:
    return 0.0 if math.isnan(value) else value


def plot_ablation(run: RunData, stem: Path) -> list[Path]:
    """A preset run: CLIP-T, LPIPS and aesthetic score per ablation setting (one line per value of the other
    knobs, e.g. eta), and CLIP-T against LPIPS with one line per setting."""
    preset = run.preset
    assert preset is not None
    info = METHODS[preset.method]
    axis_label = info.param(preset.axis).label if preset.axis else None
    settings = [s for s in preset.order() if any(preset.setting_of(r) == s for r in run.rows)]
    settings += sorted({preset.setting_of(r) for r in run.rows} - set(settings))

    def line_of(row: dict[str, Any]) -> str:
        return knob_text({k: v for k, v in (row["knobs"] or {}).items() if k != axis_label}) or "all"

    lines = list(dict.fromkeys(line_of(r) for r in sorted(run.rows, key=lambda r: list((r["knobs"] or {}).values()))))
    plt = _pyplot()
    colours = plt.get_cmap("viridis")(np.linspace(0, 0.9, max(len(lines), 1)))
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, metric in zip(axes.flat[:3], METRIC_NAMES, strict=True):
        for colour, line in zip(colours, lines, strict=False):
            stats = [mean_and_se(r.get(metric) for r in run.rows if preset.setting_of(r) == s and line_of(r) == line)
                     for s in settings]
            ax.errorbar(range(len(settings)), [s[0] for s in stats], yerr=[_nan0(s[1]) for s in stats], marker="o",
                        markersize=4, capsize=3, color=colour, label=line)
        ax.set_xticks(range(len(settings)), settings, rotation=20, fontsize=8)
        ax.set_ylabel(METRIC_AXES[metric], fontsize=9)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7, title="other knobs", title_fontsize=7)
    trade = axes.flat[3]
    for setting in settings:
        xs, ys, xe, ye = [], [], [], []
        for line in lines:
            members = [r for r in run.rows if preset.setting_of(r) == setting and line_of(r) == line]
            if not members:
                continue
            x, x_se, _ = mean_and_se(r.get("lpips") for r in members)
            y, y_se, _ = mean_and_se(r.get("clip_t") for r in members)
            xs, ys, xe, ye = [*xs, x], [*ys, y], [*xe, _nan0(x_se)], [*ye, _nan0(y_se)]
        trade.errorbar(xs, ys, xerr=xe, yerr=ye, marker="o", markersize=4, capsize=3, label=setting)
    trade.set_xlabel(METRIC_AXES["lpips"], fontsize=9)
    trade.set_ylabel(METRIC_AXES["clip_t"], fontsize=9)
    trade.set_title("trade-off: each point one value of the other knobs", fontsize=9)
    trade.grid(alpha=0.3)
    trade.legend(fontsize=7)
    fig.suptitle(f"Ablation (Sec. 5.4): {preset.title} - run {run.name}, mean ± s.e. over pairs and seeds",
                 fontsize=10)
    fig.tight_layout()
    return _save(fig, stem)


# --------------------------------------------------------------------------------------------------- the report


def write_report(
    runs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    bins: int = 8,
    binning: str = "fixed",
    min_per_bin: int = 2,
    gallery_lpips: Sequence[float] | None = None,
    thumb: int = 192,
    log: Callable[[str], None] | None = None,
) -> dict[str, list[Path]]:
    """Write every part of the report into ``out``; returns the files by part."""
    if min_per_bin < 1:
        raise UsageError(f"min_per_bin must be >= 1, got {min_per_bin}")
    data = load_runs(runs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, list[Path]] = {}
    labelled = comparison_rows(data)
    pairs = [(series, row) for series, _, row in labelled]
    lpips = [row["lpips"] for _, row in pairs if row.get("lpips") is not None]
    if not lpips:
        raise UsageError("the runs' edits have no LPIPS scores; nothing to plot")
    edges = bin_edges(lpips, bins, binning)
    points = [p for metric in ("clip_t", "aesthetic") for p in figure6_points(pairs, metric, edges, min_per_bin)]
    missing = sorted({series for series, _ in pairs} - {p.series for p in points})
    if missing:  # say why a method is absent from Figure 6 rather than leave the reader guessing
        logger.warning("not in Figure 6 (no LPIPS bin holds %d of its edits; fewer bins or a lower minimum per bin "
                       "would show it): %s", min_per_bin, ", ".join(missing))
    written["figure6"] = []
    for metric, letter, name in (("clip_t", "a", "figure6-clip"), ("aesthetic", "b", "figure6-aesthetic")):
        title = f"Figure 6 ({letter}): {METRIC_TITLES[metric]} per LPIPS bin ({binning} bins, mean ± s.e.)"
        written["figure6"] += plot_figure6([p for p in points if p.metric == metric], metric, edges, out / name,
                                           title)
    written["figure6"].append(_write_points(points, out / "figure6.csv"))
    summary = summarize(data)
    written["summary"] = list(write_summary(summary, out))
    pie = piebench_table(data)
    written["piebench"] = list(write_piebench_table(pie, out)) if pie else []
    written["ablation"] = []
    for run in data:
        if run.preset is not None and run.rows:
            written["ablation"] += plot_ablation(run, out / f"ablation-{run.name}")
    levels = list(gallery_lpips) if gallery_lpips else [float(np.median(lpips))]
    figures = written["figure6"] + written["ablation"]
    written["gallery"] = [write_gallery(out, labelled, levels, figures, summary, thumb, piebench=pie)]
    if log is not None:
        log(f"report of {sum(len(r.rows) for r in data)} edits from {len(data)} run(s) in {out}")
    return written


def _write_points(points: Sequence[BinPoint], path: Path) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["metric", "series", "bin", "low", "high", "n", "lpips", "lpips_se", "mean", "se"])
        for p in points:
            writer.writerow([p.metric, p.series, p.bin, *(csv_value(v) for v in (p.low, p.high)), p.n,
                             *(csv_value(v) for v in (p.lpips, p.lpips_se, p.mean, p.se))])
    return path

