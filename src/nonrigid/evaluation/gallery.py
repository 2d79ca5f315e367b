"""The report's HTML gallery: the plots, the summary table, and for every pair the input beside each series' edit
closest to the same LPIPS, with thumbnails copied next to it so that it opens without a server."""

from __future__ import annotations

import hashlib
import html
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from .protocol import METRIC_NAMES
from .tables import PIE_COLUMNS, RunData, knob_text, piebench_cells, plus_minus


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
    piebench: Sequence[dict[str, Any]] = (),
) -> Path:
    """gallery.html: the plots, the summary table (and PIE-Bench's, for runs over it), then per pair the input and
    each series' edit nearest each LPIPS level (with its scores and knobs)."""
    thumbs = Thumbnails(out, thumb)
    series_names = list(dict.fromkeys(series for series, _, _ in labelled))
    parts = [_HTML_HEAD, "<h1>nonrigid benchmark report</h1>"]
    shown = list(dict.fromkeys(str(run.path) for _, run, _ in labelled))
    parts.append("<p>Runs: " + ", ".join(html.escape(path) for path in shown) + "</p>")
    parts.append('<div class="plots">' + "".join(
        f'<a href="{html.escape(p.name)}"><img src="{html.escape(p.name)}" alt="{html.escape(p.stem)}"></a>'
        for p in figures if p.suffix == ".png") + "</div>")
    parts.append("<h2>Summary</h2>" + _summary_html(summary))
    if piebench:
        parts.append("<h2>PIE-Bench</h2><p>PnP Inversion's metrics per editing type, mean ± standard error (structure "
                     "distance and LPIPS x10³, MSE x10⁴, SSIM x10²); empty region: edits whose unedited region is "
                     "empty, left out of the background columns.</p>" + _piebench_html(piebench))
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
        cells += [plus_minus(line[m], line[f"{m}_se"]) for m in METRIC_NAMES]
        seconds = line["seconds_per_edit"]
        cells.append("" if math.isnan(seconds) else f"{seconds:.2f}")
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f'<table class="summary"><tr>{head}</tr>{"".join(body)}</table>'


def _piebench_html(lines: Sequence[dict[str, Any]]) -> str:
    heads = ("run", "method", "setting", "knobs", "editing type", "n", "empty region", *(h for _, h, _ in PIE_COLUMNS))
    head = "".join(f"<th>{html.escape(h)}</th>" for h in heads)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in piebench_cells(line)) + "</tr>"
                   for line in lines)
    return f'<table class="summary"><tr>{head}</tr>{body}</table>'


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
