"""The numbers of a report: runs read back (:class:`RunData`), the series they compare, LPIPS bins and the
per-bin points of Figure 6, and the summary table (mean and standard error per run, method, setting and knobs)."""

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
