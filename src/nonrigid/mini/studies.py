"""Variants of ours against ours at the paper's defaults, pair by pair: a cheaper preset (is it as good, within
stated margins?) and masked edits (what does a mask keep, and what does it cost the edit?).

A candidate is run on the miniature world like ours (``nonrigid mini evaluate --no-ablations --ours-only`` with
``--set KEY=VALUE`` or ``--masked``) on the same pairs and seeds as a run at the defaults. Per pair the metric is
averaged over the seeds and over the whole eta sweep (the grid a user sees), and the candidate's mean minus the
default's gets a paired 95% bootstrap interval (:mod:`.claims`). A preset is chosen on one world and tested on
another.

A preset *holds* where the interval lies inside the margin (:data:`MARGINS`: at most 0.05 less edit success, at
most 0.005 more identity error) or on the better side of zero; it *fails* where it reaches past the margin. Sky
shift has no margin, and masked edits none at all: their differences are reported.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .claims import bootstrap, differences, etas_of, pair_means

# how much worse a cheaper preset may be, per metric (lower is better for the errors and sky shift)
MARGINS = {"edit_success": 0.05, "identity_error": 0.005}
METRICS = ("edit_success", "identity_error", "sky_shift")
MASK_METRICS = ("edit_success", "background_error", "identity_error", "sky_shift")
HIGHER_IS_BETTER = {"edit_success": True, "identity_error": False, "background_error": False, "sky_shift": False}


@dataclass(frozen=True)
class Comparison:
    """A candidate minus the default in one metric, over ``n`` pairs of a world; ``margin`` is how much worse it may
    be (None: no margin, the difference is reported)."""

    candidate: str
    world: int | None
    metric: str
    n: int
    mean: float
    low: float
    high: float
    margin: float | None = None
    default_level: float = float("nan")  # the default's mean over the same pairs (seeds and etas averaged)
    candidate_level: float = float("nan")

    @property
    def verdict(self) -> str:
        """``better`` (the interval on the better side of zero); with a margin ``holds`` (inside it) or ``fails``
        (past it); without one ``worse`` (on the worse side of zero) or ``no difference found``."""
        good = HIGHER_IS_BETTER[self.metric]
        if (self.low > 0) if good else (self.high < 0):
            return "better"
        if self.margin is None:
            return "worse" if ((self.high < 0) if good else (self.low > 0)) else "no difference found"
        inside = self.low >= -self.margin if good else self.high <= self.margin
        return "holds" if inside else "fails"


def compare(default_rows: Iterable[dict], candidate_rows: Iterable[dict], candidate: str,
            metrics: Iterable[str] = METRICS, margins: dict[str, float] | None = None) -> list[Comparison]:
    """The candidate's ours against the default's ours, per world and metric (mean over seeds and etas).
    ``margins``: how much worse each metric may be (default :data:`MARGINS`; ``{}``: none, differences reported)."""
    margins = MARGINS if margins is None else margins
    metrics = tuple(metrics)
    rows = [r for r in default_rows if r["group"] == "methods" and r["setting"] == "ours"]
    rows += [{**r, "setting": candidate} for r in candidate_rows if r["group"] == "methods" and r["setting"] == "ours"]
    means = pair_means(rows, metrics)
    etas = sorted(set(etas_of(means, "methods", "ours")) & set(etas_of(means, "methods", candidate)))
    found = []
    for world in sorted({w for w, _ in means}, key=str):
        for metric in metrics:
            ours, theirs = [("methods", "ours", e) for e in etas], [("methods", candidate, e) for e in etas]
            diffs = differences(means, theirs, ours, metric, {world})
            if len(diffs):
                levels = [_level(means, settings, metric, world) for settings in (ours, theirs)]
                found.append(Comparison(candidate, world, metric, len(diffs), *bootstrap(diffs), margins.get(metric),
                                        *levels))
    return found


def _level(means, settings: list, metric: str, world) -> float:
    """The mean of ``metric`` over the pairs of ``world`` that have every setting of ``settings`` (each pair's
    mean over them): the level a difference starts from."""
    values = [np.mean([found[s][metric] for s in settings]) for (w, _), found in means.items()
              if w == world and all(s in found and metric in found[s] for s in settings)]
    return float(np.mean(values)) if values else float("nan")


def holds(comparisons: Iterable[Comparison]) -> bool:
    """Whether every comparison with a margin holds (or is better)."""
    return all(c.verdict in ("better", "holds") for c in comparisons if c.margin is not None)


def comparisons_table(comparisons: Iterable[Comparison], settings: dict[str, str] | None = None) -> str:
    """Markdown: one row per (candidate, world, metric); ``settings`` describes each candidate."""
    settings = settings or {}
    lines = ["| candidate | its settings | world | metric | pairs | default | candidate | minus the default [95% CI] | "
             "margin | verdict |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in comparisons:
        shown = "—" if c.margin is None else f"{'-' if HIGHER_IS_BETTER[c.metric] else '+'}{c.margin:g}"
        lines.append(f"| {c.candidate} | {settings.get(c.candidate, '')} | {c.world} | "
                     f"{c.metric.replace('_', ' ')} | {c.n} | {c.default_level:.3f} | {c.candidate_level:.3f} | "
                     f"{c.mean:+.3f} [{c.low:+.3f}, {c.high:+.3f}] | {shown} | **{c.verdict}** |")
    return "\n".join(lines)


def run_settings(run: Path) -> str:
    """What a run's ours differs in from the paper's defaults, from its meta.json (``steps 25, inner_steps 3``)."""
    protocol = json.loads((run / "meta.json").read_text()).get("protocol", {})
    parts = [f"steps {protocol['num_steps']}"] if protocol.get("num_steps", 50) != 50 else []
    parts += [f"opt_steps {protocol['opt_steps']}"] if protocol.get("opt_steps", 200) != 200 else []
    parts += [f"{key} {value:g}" if isinstance(value, float) else f"{key} {value}"
              for key, value in protocol.get("ours", {}).items()]
    parts += ["masked"] if protocol.get("masked") else []
    return ", ".join(parts) or "the defaults"


def study_section(kind: str, table: str, command: str) -> str:
    """MINIATURE.md's section on the presets (``kind`` "presets") or on masked edits ("masks")."""
    if kind == "presets":
        intro = ("Cheaper settings of ours against the paper's defaults on the same pairs and seeds, paired 95% "
                 "intervals over pairs (per pair the mean over 5 seeds and the whole eta sweep). A candidate is chosen "
                 "on world 0 and tested on world 7919; it ships as the fast preset only if every held-out interval "
                 "lies inside the margins (or is better). Sky shift has no margin.")
        title = "### A fast preset"
    else:
        intro = ("Ours edited inside a mask (the box the subject covers in any pose, widened by 4 px, as a user "
                 "would paint it) against ours without one, on the same pairs, seeds and cached stages A and B. "
                 "Background error is measured away from the subject in both poses, so it reads what the mask keeps.")
        title = "### Masks"
        table += ("\n\nThe first pairs: the input, the mask (outside darkened), ours at eta 1 without a mask, and "
                  "with it:\n\n![masks](mini-masks.png)")
    return f"{title}\n\n{intro}\n\n```bash\n{command}\n```\n\n{table}"


def mask_gallery(default_run: Path, masked_run: Path, path: Path, count: int = 6, eta_tile: int = 7) -> None:
    """The first ``count`` pairs side by side, 2x: the input, the mask over it (outside darkened), ours without a
    mask and ours with it (both at eta 1, the strongest edit of the sweep: tile ``eta_tile`` of each run's strip)."""
    import numpy as np
    from PIL import Image

    from .dataset import read_dataset
    from .world import subject_region

    pairs = read_dataset(Path(json.loads((masked_run / "meta.json").read_text())["data"]))
    strips = sorted((masked_run / "results").glob("*.png"))[:count]
    sheet = Image.new("RGB", (4 * 64, 64 * len(strips)), "white")
    for row, masked in enumerate(strips):
        index = int(masked.stem)
        plain = Image.open(default_run / "results" / masked.name)
        picture = np.asarray(_tile(plain, 0)).copy()
        outside = subject_region(pairs[index].scene) == 0
        picture[outside] = picture[outside] // 3
        for column, image in enumerate((_tile(plain, 0), Image.fromarray(picture), _tile(plain, eta_tile),
                                        _tile(Image.open(masked), eta_tile))):
            sheet.paste(image, (64 * column, 64 * row))
    sheet.resize((sheet.width * 2, sheet.height * 2), Image.Resampling.NEAREST).save(path)


def _tile(strip, index: int):
    """Tile ``index`` (64 x 64) of an evaluation's strip (input, ideal, ours at each eta, ...)."""
    return strip.crop((64 * index, 0, 64 * (index + 1), 64))

