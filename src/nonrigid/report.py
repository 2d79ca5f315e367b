"""The report of one or more benchmark runs: Figure 6, a summary table, ablation plots and an HTML gallery.

``write_report(runs, out)`` writes into ``out``:

    figure6-clip.png/.svg        mean CLIP-T per LPIPS bin, one line per method, standard-error bars (Figure 6)
    figure6-aesthetic.png/.svg   the same for the aesthetic score
    figure6.csv                  the binned numbers behind both plots
    summary.csv, summary.md      per run, method, setting and knob values: n, mean and standard error of every
                                 metric, wall time per edit
    ablation-<run>.png/.svg      for each preset run: each metric per ablation setting (one line per eta), and
                                 CLIP-T against LPIPS per setting
    gallery.html, gallery/       the plots, the table, and for every pair the input beside each method's edit
                                 closest to the same LPIPS; thumbnails are copied, so it opens with no server

Figure 6 and the gallery compare the methods of the runs made without a preset (every knob value of a method
pooled, as the paper does); when every run is a preset run, they compare its ablation settings instead.
"""

from __future__ import annotations

import csv
import hashlib
import html
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .bench import METRIC_NAMES, PRESETS, Preset, read_config, read_rows
from .errors import UsageError
from .methods import METHODS

METRIC_TITLES = {"clip_t": "CLIP-T", "lpips": "LPIPS", "aesthetic": "aesthetic score"}
METRIC_AXES = {
    "clip_t": "CLIP-T to the target text (higher is better)",
    "lpips": "LPIPS to the input (lower: more of it kept)",
    "aesthetic": "aesthetic score (higher is better)",
}
BINNINGS = ("fixed", "quantile")

logger = logging.getLogger("nonrigid")


@dataclass
class RunData:
    """A run folder's rows and config; ``name`` labels it in tables and plots."""

    name: str
    path: Path
    config: dict[str, Any]
    rows: list[dict[str, Any]]

    @property
    def preset(self) -> Preset | None:
        name = self.config.get("preset")
        return PRESETS.get(name) if name else None


def load_runs(paths: Sequence[str | os.PathLike]) -> list[RunData]:
    """Each folder's rows; folders with the same name get ``name``, ``name-2``, ..."""
    runs: list[RunData] = []
    seen: dict[str, int] = {}
    for path in map(Path, paths):
        name = path.resolve().name
        seen[name] = seen.get(name, 0) + 1
        label = name if seen[name] == 1 else f"{name}-{seen[name]}"
        runs.append(RunData(label, path, read_config(path), read_rows(path)))
    if not any(run.rows for run in runs):
        raise UsageError("the runs hold no edits yet; run `nonrigid bench` (or `nonrigid score`) first")
    return runs


# --------------------------------------------------------------------------------------------------- statistics


def mean_and_se(values: Iterable[float | None]) -> tuple[float, float, int]:
    """Mean, standard error of the mean (NaN for fewer than two values) and count of the values given."""
    finite = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if finite.size == 0:
        return math.nan, math.nan, 0
    se = float(finite.std(ddof=1) / math.sqrt(finite.size)) if finite.size > 1 else math.nan
    return float(finite.mean()), se, int(finite.size)


def comparison_rows(runs: Sequence[RunData]) -> list[tuple[str, RunData, dict[str, Any]]]:
    """(series label, run, row) for Figure 6 and the gallery: the methods of the runs without a preset (a method
    in several runs is labelled with its run), or, if all runs are preset runs, their ablation settings."""
    plain = [run for run in runs if run.preset is None]
    if plain:
        owners: dict[str, set[str]] = {}
        for run in plain:
            for row in run.rows:
                owners.setdefault(row["method"], set()).add(run.name)
        return [(row["method"] if len(owners[row["method"]]) == 1 else f"{row['method']} ({run.name})", run, row)
                for run in plain for row in run.rows]
    prefix = len(runs) > 1
    return [(f"{run.name}: {run.preset.setting_of(row)}" if prefix else run.preset.setting_of(row), run, row)
            for run in runs for row in run.rows]


def bin_edges(values: Sequence[float], bins: int, binning: str = "fixed") -> np.ndarray:
    """``bins`` equal-width bins over the values' range, or bins holding equal shares of them (quantile)."""
    if bins < 1:
        raise UsageError(f"--bins must be >= 1, got {bins}")
    if binning not in BINNINGS:
        raise UsageError(f"--binning must be one of {', '.join(BINNINGS)}, got {binning!r}")
    data = np.asarray(values, dtype=np.float64)
    if binning == "quantile":
        edges = np.unique(np.quantile(data, np.linspace(0, 1, bins + 1)))
    else:
        edges = np.linspace(data.min(), data.max(), bins + 1)
    if edges.size < 2 or edges[-1] <= edges[0]:
        edges = np.array([data.min(), data.min() + 1e-9])
    return edges


def bin_index(value: float, edges: np.ndarray) -> int:
    """The bin of ``value``: bins are [low, high), the last one closed."""
    return int(np.clip(np.searchsorted(edges, value, side="right") - 1, 0, len(edges) - 2))


@dataclass
class BinPoint:
    series: str
    metric: str
    bin: int
    low: float
    high: float
    n: int
    lpips: float
    lpips_se: float
    mean: float
    se: float


def figure6_points(
    labelled: Sequence[tuple[str, dict[str, Any]]], metric: str, edges: np.ndarray, min_per_bin: int = 2,
) -> list[BinPoint]:
    """Per series and LPIPS bin: mean LPIPS and mean ``metric`` with standard errors; bins with fewer than
    ``min_per_bin`` edits of a series are left out (their mean says little)."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for series, row in labelled:
        if row.get("lpips") is None or row.get(metric) is None:
            continue
        groups.setdefault((series, bin_index(row["lpips"], edges)), []).append(row)
    points = []
    for (series, index), members in groups.items():
        if len(members) < min_per_bin:
            continue
        lpips, lpips_se, _ = mean_and_se(r["lpips"] for r in members)
        mean, se, n = mean_and_se(r[metric] for r in members)
        points.append(BinPoint(series, metric, index, float(edges[index]), float(edges[index + 1]), n, lpips,
                               lpips_se, mean, se))
    order = list(dict.fromkeys(series for series, _ in labelled))
    return sorted(points, key=lambda p: (order.index(p.series), p.bin))


def knob_text(knobs: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in knobs.items())


def summarize(runs: Sequence[RunData]) -> list[dict[str, Any]]:
    """One line per run, method, setting and knob values: n, mean and standard error of every metric, and the
    mean wall time per edit (a job's time over its edits; empty for scored outside edits). Lines follow the runs'
    order, the method catalogue's order, the order settings ran in, then the knob values."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    first_seen: dict[tuple[int, str], int] = {}
    for order, run in enumerate(runs):
        for row in run.rows:
            first_seen.setdefault((order, row["setting"]), len(first_seen))
            key = (order, row["method"], row["setting"], tuple((row["knobs"] or {}).items()))
            groups.setdefault(key, []).append(row)
    methods = list(METHODS)

    def position(key: tuple) -> tuple:
        order, method, setting, knobs = key
        return (order, methods.index(method) if method in methods else len(methods), method,
                first_seen[order, setting], tuple(v if isinstance(v, (int, float)) else str(v) for _, v in knobs))

    lines = []
    for key in sorted(groups, key=position):
        order, method, setting, knobs = key
        members = groups[key]
        line: dict[str, Any] = {"run": runs[order].name, "method": method, "setting": setting,
                                "knobs": knob_text(dict(knobs)), "n": len(members)}
        for metric in METRIC_NAMES:
            mean, se, _ = mean_and_se(r.get(metric) for r in members)
            line[metric], line[f"{metric}_se"] = mean, se
        line["seconds_per_edit"] = mean_and_se(r.get("seconds_per_edit") for r in members)[0]
        lines.append(line)
    return lines


SUMMARY_COLUMNS = ("run", "method", "setting", "knobs", "n", "clip_t", "clip_t_se", "lpips", "lpips_se", "aesthetic",
                   "aesthetic_se", "seconds_per_edit")


def write_summary(lines: Sequence[dict[str, Any]], out: Path) -> tuple[Path, Path]:
    """summary.csv (every number, NaN as empty) and summary.md (mean ± standard error)."""
    csv_path, md_path = out / "summary.csv", out / "summary.md"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(SUMMARY_COLUMNS)
        for line in lines:
            writer.writerow([_csv_value(line[c]) for c in SUMMARY_COLUMNS])
    md = ["| run | method | setting | knobs | n | CLIP-T | LPIPS | aesthetic | s / edit |",
          "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for line in lines:
        cells = [_md_escape(str(line[c])) for c in ("run", "method", "setting", "knobs")] + [str(line["n"])]
        cells += [_plus_minus(line[m], line[f"{m}_se"]) for m in METRIC_NAMES]
        seconds = line["seconds_per_edit"]
        cells.append("" if math.isnan(seconds) else f"{seconds:.2f}")
        md.append("| " + " | ".join(cells) + " |")
    md_path.write_text("\n".join(md) + "\n")
    return csv_path, md_path


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value


def _plus_minus(mean: float, se: float) -> str:
    if math.isnan(mean):
        return ""
    return f"{mean:.4f}" if math.isnan(se) else f"{mean:.4f} ± {se:.4f}"


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


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


# --------------------------------------------------------------------------------------------------- gallery


def gallery_choices(
    labelled: Sequence[tuple[str, RunData, dict[str, Any]]], levels: Sequence[float],
) -> dict[int, dict[float, dict[str, tuple[RunData, dict[str, Any]]]]]:
    """pair -> LPIPS level -> series -> the series' edit of that pair closest to the level (ties: first row)."""
    chosen: dict[int, dict[float, dict[str, tuple[RunData, dict[str, Any]]]]] = {}
    for series, run, row in labelled:
        if row.get("lpips") is None:
            continue
        for level in levels:
            slot = chosen.setdefault(row["pair"], {}).setdefault(level, {})
            best = slot.get(series)
            if best is None or abs(row["lpips"] - level) < abs(best[1]["lpips"] - level):
                slot[series] = (run, row)
    return dict(sorted(chosen.items()))


class Thumbnails:
    """Copies of images, shrunk, into ``out/gallery`` with stable names, so the HTML works without the runs."""

    def __init__(self, out: Path, size: int):
        self.folder = out / "gallery"
        self.folder.mkdir(parents=True, exist_ok=True)
        for old in self.folder.glob("*.png"):  # an earlier report's thumbnails (named by hash, as below)
            if re.fullmatch(r"[0-9a-f]{16}\.png", old.name):
                old.unlink()
        self.size = size
        self.done: dict[Path, str] = {}

    def __call__(self, path: Path) -> str | None:
        path = path.resolve()
        if path in self.done:
            return self.done[path]
        if not path.is_file():
            return None
        name = hashlib.sha256(str(path).encode()).hexdigest()[:16] + ".png"
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((self.size, self.size), Image.Resampling.LANCZOS)
            image.save(self.folder / name)
        self.done[path] = f"gallery/{name}"
        return self.done[path]


def write_gallery(
    out: Path,
    labelled: Sequence[tuple[str, RunData, dict[str, Any]]],
    levels: Sequence[float],
    figures: Sequence[Path],
    summary: Sequence[dict[str, Any]],
    thumb: int = 192,
) -> Path:
    """gallery.html: the plots, the summary table, then per pair the input and each series' edit nearest each
    LPIPS level (with its scores and knobs)."""
    thumbs = Thumbnails(out, thumb)
    series_names = list(dict.fromkeys(series for series, _, _ in labelled))
    parts = [_HTML_HEAD, "<h1>nonrigid benchmark report</h1>"]
    shown = list(dict.fromkeys(str(run.path) for _, run, _ in labelled))
    parts.append("<p>Runs: " + ", ".join(html.escape(path) for path in shown) + "</p>")
    parts.append('<div class="plots">' + "".join(
        f'<a href="{html.escape(p.name)}"><img src="{html.escape(p.name)}" alt="{html.escape(p.stem)}"></a>'
        for p in figures if p.suffix == ".png") + "</div>")
    parts.append("<h2>Summary</h2>" + _summary_html(summary))
    level_text = ", ".join(f"{v:.3f}" for v in levels)
    parts.append(f"<h2>Edits at matched LPIPS ({level_text})</h2><p>Each cell: the method's edit of that pair whose "
                 "LPIPS to the input is closest to the row's level.</p>")
    for pair, by_level in gallery_choices(labelled, levels).items():
        first = next(iter(next(iter(by_level.values())).values()))
        run, row = first
        parts.append(f"<h3>{pair}: {html.escape(row['image_name'])} &rarr; &ldquo;{html.escape(row['target_text'])}"
                     "&rdquo;</h3><table><tr><th>input</th><th>LPIPS level</th>"
                     + "".join(f"<th>{html.escape(s)}</th>" for s in series_names) + "</tr>")
        input_path = (row.get("record") or {}).get("input")
        input_thumb = thumbs(run.path / input_path) if input_path else None
        for i, (level, by_series) in enumerate(by_level.items()):
            cells = []
            if i == 0:
                cells.append(f'<td rowspan="{len(by_level)}">{_img(input_thumb, "input")}</td>')
            cells.append(f"<td>{level:.3f}</td>")
            for series in series_names:
                if series not in by_series:
                    cells.append("<td>&ndash;</td>")
                    continue
                run, edit = by_series[series]
                caption = (f"LPIPS {_fmt(edit.get('lpips'))} &middot; CLIP-T {_fmt(edit.get('clip_t'))} &middot; "
                           f"aes. {_fmt(edit.get('aesthetic'), 2)}<br>{html.escape(knob_text(edit['knobs'] or {}))} "
                           f"seed {edit['seed']}")
                cells.append(f"<td>{_img(thumbs(run.path / edit['image']), series)}<br>{caption}</td>")
            parts.append("<tr>" + "".join(cells) + "</tr>")
        parts.append("</table>")
    parts.append("</body></html>\n")
    path = out / "gallery.html"
    path.write_text("\n".join(parts))
    return path


def _img(src: str | None, alt: str) -> str:
    if src is None:
        return "(missing)"
    return f'<img src="{html.escape(src)}" alt="{html.escape(alt)}" loading="lazy">'


def _fmt(value: float | None, digits: int = 3) -> str:
    return "&ndash;" if value is None else f"{value:.{digits}f}"


def _summary_html(lines: Sequence[dict[str, Any]]) -> str:
    head = "".join(f"<th>{c}</th>" for c in ("run", "method", "setting", "knobs", "n", "CLIP-T", "LPIPS",
                                             "aesthetic", "s / edit"))
    body = []
    for line in lines:
        cells = [html.escape(str(line[c])) for c in ("run", "method", "setting", "knobs", "n")]
        cells += [_plus_minus(line[m], line[f"{m}_se"]) for m in METRIC_NAMES]
        seconds = line["seconds_per_edit"]
        cells.append("" if math.isnan(seconds) else f"{seconds:.2f}")
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f'<table class="summary"><tr>{head}</tr>{"".join(body)}</table>'


_HTML_HEAD = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>nonrigid benchmark report</title>
<style>
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
td, th { border: 1px solid #ddd; padding: 4px; font-size: 12px; text-align: center; vertical-align: top; }
table.summary td { text-align: right; } table.summary td:nth-child(-n+4) { text-align: left; }
.plots img { width: 480px; margin: 4px; border: 1px solid #eee; }
td img { width: 160px; }
</style></head><body>"""


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
        raise UsageError(f"--min-per-bin must be >= 1, got {min_per_bin}")
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
        logger.warning("not in Figure 6 (no LPIPS bin holds %d of its edits; lower --min-per-bin or --bins): %s",
                       min_per_bin, ", ".join(missing))
    written["figure6"] = []
    for metric, letter, name in (("clip_t", "a", "figure6-clip"), ("aesthetic", "b", "figure6-aesthetic")):
        title = f"Figure 6 ({letter}): {METRIC_TITLES[metric]} per LPIPS bin ({binning} bins, mean ± s.e.)"
        written["figure6"] += plot_figure6([p for p in points if p.metric == metric], metric, edges, out / name,
                                           title)
    written["figure6"].append(_write_points(points, out / "figure6.csv"))
    summary = summarize(data)
    written["summary"] = list(write_summary(summary, out))
    written["ablation"] = []
    for run in data:
        if run.preset is not None and run.rows:
            written["ablation"] += plot_ablation(run, out / f"ablation-{run.name}")
    levels = list(gallery_lpips) if gallery_lpips else [float(np.median(lpips))]
    figures = written["figure6"] + written["ablation"]
    written["gallery"] = [write_gallery(out, labelled, levels, figures, summary, thumb)]
    if log is not None:
        log(f"report of {sum(len(r.rows) for r in data)} edits from {len(data)} run(s) in {out}")
    return written


def _write_points(points: Sequence[BinPoint], path: Path) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["metric", "series", "bin", "low", "high", "n", "lpips", "lpips_se", "mean", "se"])
        for p in points:
            writer.writerow([p.metric, p.series, p.bin, *(_csv_value(v) for v in (p.low, p.high)), p.n,
                             *(_csv_value(v) for v in (p.lpips, p.lpips_se, p.mean, p.se))])
    return path

