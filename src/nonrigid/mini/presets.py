"""A cheaper setting of ours against the paper's default, pair by pair: is it as good, within stated margins?

A candidate preset is run on the miniature world like ours (``nonrigid mini evaluate --no-ablations --ours-only
--set KEY=VALUE``) on the same pairs and seeds as a run at the paper's defaults. Per pair the metric is averaged
over the seeds and over the whole eta sweep (the grid a user sees), and the candidate's mean minus the default's
gets a paired 95% bootstrap interval (:mod:`.claims`). A candidate is chosen on one world and tested on another.

It *holds* where the interval lies inside the margin (:data:`MARGINS`: at most 0.05 less edit success, at most
0.005 more identity error) or on the better side of zero; it *fails* where it reaches past the margin. Sky shift
has no margin: it is reported.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .claims import bootstrap, differences, etas_of, pair_means

# how much worse a cheaper preset may be, per metric (lower is better for identity error and sky shift)
MARGINS = {"edit_success": 0.05, "identity_error": 0.005}
METRICS = ("edit_success", "identity_error", "sky_shift")
HIGHER_IS_BETTER = {"edit_success": True, "identity_error": False, "sky_shift": False}


@dataclass(frozen=True)
class Comparison:
    """A candidate minus the default in one metric, over ``n`` pairs of a world."""

    candidate: str
    world: int | None
    metric: str
    n: int
    mean: float
    low: float
    high: float

    @property
    def verdict(self) -> str:
        """``better``, ``holds`` (inside the margin), ``fails`` (past it) or, without a margin, ``reported``."""
        good = HIGHER_IS_BETTER[self.metric]
        if (self.low > 0) if good else (self.high < 0):
            return "better"
        margin = MARGINS.get(self.metric)
        if margin is None:
            return "reported"
        inside = self.low >= -margin if good else self.high <= margin
        return "holds" if inside else "fails"


def compare(default_rows: Iterable[dict], candidate_rows: Iterable[dict], candidate: str) -> list[Comparison]:
    """The candidate's ours against the default's ours, per world and metric (mean over seeds and etas)."""
    rows = [r for r in default_rows if r["group"] == "methods" and r["setting"] == "ours"]
    rows += [{**r, "setting": candidate} for r in candidate_rows if r["group"] == "methods" and r["setting"] == "ours"]
    means = pair_means(rows)
    etas = sorted(set(etas_of(means, "methods", "ours")) & set(etas_of(means, "methods", candidate)))
    found = []
    for world in sorted({w for w, _ in means}, key=str):
        for metric in METRICS:
            diffs = differences(means, [("methods", candidate, e) for e in etas],
                                [("methods", "ours", e) for e in etas], metric, {world})
            found.append(Comparison(candidate, world, metric, len(diffs), *bootstrap(diffs)))
    return found


def holds(comparisons: Iterable[Comparison]) -> bool:
    """Whether every comparison with a margin holds (or is better)."""
    return all(c.verdict in ("better", "holds", "reported") for c in comparisons)


def comparisons_table(comparisons: Iterable[Comparison], calls: dict[str, int], default_calls: int) -> str:
    """Markdown: one row per (candidate, world, metric)."""
    lines = [f"| preset | sequential UNet calls (default: {default_calls}) | world | metric | pairs | "
             "minus the default [95% CI] | margin | verdict |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in comparisons:
        margin = MARGINS.get(c.metric)
        shown = "—" if margin is None else f"{'-' if HIGHER_IS_BETTER[c.metric] else '+'}{margin:g}"
        lines.append(f"| {c.candidate} | {calls.get(c.candidate, '?')} | {c.world} | {c.metric.replace('_', ' ')} | "
                     f"{c.n} | {c.mean:+.3f} [{c.low:+.3f}, {c.high:+.3f}] | {shown} | **{c.verdict}** |")
    return "\n".join(lines)
