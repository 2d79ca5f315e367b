"""The numbers of a report: runs read back (:class:`RunData`), the series they compare, LPIPS bins and the
per-bin points of Figure 6, the summary table (mean and standard error per run, method, setting and knobs), and
PIE-Bench's table (the same per editing type and overall)."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UsageError
from ..methods.catalogue import METHODS
from .piebench import type_name
from .plan import PRESETS, Preset
from .protocol import METRIC_NAMES
from .runfolder import read_config, read_rows

BINNINGS = ("fixed", "quantile")


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
        raise UsageError(f"bins must be >= 1, got {bins}")
    if binning not in BINNINGS:
        raise UsageError(f"binning must be one of {', '.join(BINNINGS)}, got {binning!r}")
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
            writer.writerow([csv_value(line[c]) for c in SUMMARY_COLUMNS])
    md = ["| run | method | setting | knobs | n | CLIP-T | LPIPS | aesthetic | s / edit |",
          "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for line in lines:
        cells = [_md_escape(str(line[c])) for c in ("run", "method", "setting", "knobs")] + [str(line["n"])]
        cells += [plus_minus(line[m], line[f"{m}_se"]) for m in METRIC_NAMES]
        seconds = line["seconds_per_edit"]
        cells.append("" if math.isnan(seconds) else f"{seconds:.2f}")
        md.append("| " + " | ".join(cells) + " |")
    md_path.write_text("\n".join(md) + "\n")
    return csv_path, md_path


def csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value


def plus_minus(mean: float, se: float) -> str:
    if math.isnan(mean):
        return ""
    return f"{mean:.4f}" if math.isnan(se) else f"{mean:.4f} ± {se:.4f}"


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


# --------------------------------------------------------------------------------------------------- PIE-Bench

# (column, heading, factor): PnP Inversion's Table 1 shows structure distance and LPIPS x 10^3, MSE x 10^4, SSIM x 10^2
PIE_COLUMNS = (
    ("structure_distance", "Structure dist. x10³ ↓", 1e3), ("psnr_unedit_part", "PSNR ↑", 1.0),
    ("lpips_unedit_part", "LPIPS x10³ ↓", 1e3), ("mse_unedit_part", "MSE x10⁴ ↓", 1e4),
    ("ssim_unedit_part", "SSIM x10² ↑", 1e2), ("clip_similarity_target_image", "CLIP whole ↑", 1.0),
    ("clip_similarity_target_image_edit_part", "CLIP edited ↑", 1.0),
)
PIE_TABLE_COLUMNS = ("run", "method", "setting", "knobs", "type", "n", "empty_unedited", "empty_edited",
                     *(f"{c}{s}" for c, _, _ in PIE_COLUMNS for s in ("", "_se")))
OVERALL = "overall"


def piebench_table(runs: Sequence[RunData]) -> list[dict[str, Any]]:
    """PIE-Bench's table: per run, method, setting and knob values, one line per editing type and one ``overall``,
    each with n, the mean and standard error of every PIE-Bench metric, and how many edits had an empty unedited
    (or edited) region, whose metrics are NaN and left out of the means as the reference's "nan"s are. Only the
    rows of PIE-Bench pairs (those with a structure distance) count; no such row, no table."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for order, run in enumerate(runs):
        for row in run.rows:
            if row.get("structure_distance") is None:
                continue
            key = (order, row["method"], row["setting"], tuple((row["knobs"] or {}).items()))
            groups.setdefault(key, []).append(row)
    lines = []
    for (order, method, setting, knobs), members in groups.items():
        types = sorted({str(r.get("edit_type") or "") for r in members}, key=lambda t: (not t.isdigit(), t.zfill(3)))
        for edit_type in [*types, OVERALL]:
            chosen = members if edit_type == OVERALL else [r for r in members if str(r.get("edit_type") or "") ==
                                                           edit_type]
            line: dict[str, Any] = {"run": runs[order].name, "method": method, "setting": setting,
                                    "knobs": knob_text(dict(knobs)),
                                    "type": OVERALL if edit_type == OVERALL else type_name(edit_type),
                                    "n": len(chosen),
                                    "empty_unedited": sum(r.get("psnr_unedit_part") is None for r in chosen),
                                    "empty_edited": sum(r.get("clip_similarity_target_image_edit_part") is None
                                                        for r in chosen)}
            for column, _, _ in PIE_COLUMNS:
                line[column], line[f"{column}_se"], _ = mean_and_se(r.get(column) for r in chosen)
            lines.append(line)
    return lines


def write_piebench_table(lines: Sequence[dict[str, Any]], out: Path) -> tuple[Path, Path]:
    """piebench.csv (raw numbers, NaN as empty) and piebench.md (Table 1's scaling, mean ± standard error)."""
    csv_path, md_path = out / "piebench.csv", out / "piebench.md"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(PIE_TABLE_COLUMNS)
        for line in lines:
            writer.writerow([csv_value(line[c]) for c in PIE_TABLE_COLUMNS])
    head = ["run", "method", "setting", "knobs", "editing type", "n", "empty region", *(h for _, h, _ in PIE_COLUMNS)]
    md = ["PIE-Bench (PnP Inversion's metrics; mean ± standard error; 'empty region': edits whose unedited region is "
          "empty, left out of the background columns' means)", "",
          "| " + " | ".join(head) + " |", "| " + " | ".join(["---"] * 5 + ["---:"] * (len(head) - 5)) + " |"]
    md += ["| " + " | ".join(piebench_cells(line)) + " |" for line in lines]
    md_path.write_text("\n".join(md) + "\n")
    return csv_path, md_path


def piebench_cells(line: dict[str, Any]) -> list[str]:
    """A line of PIE-Bench's table as text cells, numbers in Table 1's scaling (for Markdown and HTML)."""
    cells = [_md_escape(str(line[c])) for c in ("run", "method", "setting", "knobs", "type")]
    cells += [str(line["n"]), str(line["empty_unedited"])]
    for column, _, factor in PIE_COLUMNS:
        mean, se = line[column] * factor, line[f"{column}_se"] * factor
        cells.append("" if math.isnan(mean) else f"{mean:.2f}" if math.isnan(se) else f"{mean:.2f} ± {se:.2f}")
    return cells
