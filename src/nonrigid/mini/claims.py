"""The paper's claims as paired comparisons on the miniature evaluation, each with a 95% bootstrap interval and a
verdict.

The unit is the pair (scene, target pose): every setting ran on the same pairs, so a comparison is the mean over
pairs of the per-pair difference, and the interval resamples pairs. A pair's value for a setting is the mean over
its text-optimization seeds (settings without a seed — NTI-only, or eta 1, where the conditioning is the target
text's whatever the seed — have one value). Pairs from every world are pooled, except where a comparison needs an
operating point chosen from the data (ours' eta at NTI-only's identity error, a baseline's knob at ours' identity
error: the best edit success at no higher identity error, :func:`matched_point`): the point is chosen on one world
and the difference measured on the others, so the choice cannot fit the noise it is tested on.

A claim names the direction the paper predicts; its verdict is **supported** when the interval lies on that side
of zero, **contradicted** when it lies on the other side, and **undecided** when it contains zero.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

METRICS = ("identity_error", "edit_success", "background_error", "subject_error", "sky_shift")
Setting = tuple[str, str, float]  # (group, setting, eta): what a row measured
PairKey = tuple[int | None, int]  # (world, pair)


def pair_means(rows: Iterable[dict], metrics: Iterable[str] = METRICS
               ) -> dict[PairKey, dict[Setting, dict[str, float]]]:
    """Per pair and setting, each of ``metrics`` averaged over the pair's seeds."""
    sums: dict[PairKey, dict[Setting, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(
        list)))
    for row in rows:
        values = sums[(row.get("world"), row["pair"])][(row["group"], row["setting"], float(row["eta"]))]
        for metric in metrics:
            if metric in row:
                values[metric].append(float(row[metric]))
    return {pair: {setting: {m: float(np.mean(v)) for m, v in metrics.items()} for setting, metrics in settings.items()}
            for pair, settings in sums.items()}


def bootstrap(diffs: np.ndarray, resamples: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of ``diffs`` and the 2.5th and 97.5th percentiles of the means of ``resamples`` resamplings with
    replacement (the percentile bootstrap; seeded, so a page regenerated from the same rows says the same)."""
    diffs = np.asarray(diffs, dtype=np.float64)
    if diffs.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, diffs.size, size=(resamples, diffs.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(diffs.mean()), float(low), float(high)


def verdict(low: float, high: float, direction: int) -> str:
    """``supported`` if the interval lies on the side of zero the claim predicts (``direction`` +1: positive,
    -1: negative), ``contradicted`` if on the other side, otherwise ``undecided``; ``direction`` 0 (a question, not
    a prediction) gives ``differs`` or ``no difference found``."""
    if np.isnan(low):
        return "no data"
    side = 1 if low > 0 else -1 if high < 0 else 0
    if direction == 0:
        return "differs" if side else "no difference found"
    return "undecided" if side == 0 else "supported" if side == direction else "contradicted"


@dataclass(frozen=True)
class Claim:
    """One comparison: ``a`` minus ``b`` in ``metric``, over pairs, with its interval and verdict."""

    topic: str
    claim: str  # what the paper says, in words
    comparison: str  # how it is measured here
    metric: str
    direction: int  # the sign of a - b the claim predicts (0: no prediction)
    n: int
    mean: float
    low: float
    high: float

    @property
    def verdict(self) -> str:
        return verdict(self.low, self.high, self.direction)


def differences(means, a: Setting | list[Setting], b: Setting | list[Setting], metric: str,
                worlds: set | None = None) -> np.ndarray:
    """Per pair (of ``worlds``, or all) that has both: mean over ``a``'s settings minus mean over ``b``'s."""
    a_list, b_list = ([a] if isinstance(a, tuple) else a), ([b] if isinstance(b, tuple) else b)
    out = []
    for (world, _), settings in sorted(means.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        if worlds is not None and world not in worlds:
            continue
        if all(s in settings and metric in settings[s] for s in (*a_list, *b_list)):
            out.append(np.mean([settings[s][metric] for s in a_list]) - np.mean([settings[s][metric] for s in b_list]))
    return np.asarray(out)


def claim(means, topic: str, text: str, comparison: str, a, b, metric: str, direction: int,
          worlds: set | None = None) -> Claim:
    diffs = differences(means, a, b, metric, worlds)
    return Claim(topic, text, comparison, metric, direction, len(diffs), *bootstrap(diffs))


def mean_of(means, setting: Setting, metric: str, worlds: set | None = None) -> float:
    values = [s[setting][metric] for (w, _), s in means.items()
              if setting in s and metric in s[setting] and (worlds is None or w in worlds)]
    return float(np.mean(values)) if values else float("nan")


def etas_of(means, group: str, setting: str) -> list[float]:
    return sorted({eta for settings in means.values() for (g, s, eta) in settings if g == group and s == setting})


def matched_point(means, group: str, setting: str, identity: float, worlds: set) -> float | None:
    """The knob value (eta, or a baseline's knob) of ``setting`` with the highest mean edit success on ``worlds``
    among those whose mean identity error there is no higher than ``identity``; if none is, the one closest to it.

    Not simply the closest identity error: where identity barely moves with the knob (ours' eta, in this world),
    the closest would be picked by noise, not by the trade-off the paper draws."""
    points = []
    for value in etas_of(means, group, setting):
        ide = mean_of(means, (group, setting, value), "identity_error", worlds)
        success = mean_of(means, (group, setting, value), "edit_success", worlds)
        if not np.isnan(ide):
            points.append((value, ide, success))
    if not points:
        return None
    within = [p for p in points if p[1] <= identity]
    if within:
        return max(within, key=lambda p: (p[2], -p[1]))[0]
    return min(points, key=lambda p: abs(p[1] - identity))[0]


def has(means, setting: Setting) -> bool:
    return any(setting in settings for settings in means.values())


def worlds_of(means) -> list:
    return sorted({world for world, _ in means}, key=str)


def matched_claims(means, baselines: Iterable[str]) -> list[Claim]:
    """Ours against NTI-only editing at NTI-only's identity error, and each baseline against ours at ours' matched
    operating point: each point chosen on one world and tested on the others (both ways round with two worlds)."""
    claims = []
    worlds = worlds_of(means)
    nti = ("methods", "NTI-only", 1.0)
    for fit in worlds:
        test = set(worlds) - {fit} or {fit}
        held_out = "held out" if test != {fit} else "the same world: no held-out world"
        where = f"eta chosen on world {fit}, tested on world {', '.join(map(str, sorted(test, key=str)))}"
        eta = matched_point(means, "methods", "ours", mean_of(means, nti, "identity_error", {fit}), {fit})
        if eta is None:
            continue
        ours = ("methods", "ours", eta)
        claims.append(claim(means, "ours vs NTI-only", "at the same identity, ours edits more",
                            f"ours at eta {eta:g} minus NTI-only ({where}; {held_out})", ours, nti, "edit_success",
                            +1, test))
        claims.append(claim(means, "ours vs NTI-only", "(the match: identity error about equal)",
                            f"ours at eta {eta:g} minus NTI-only ({where})", ours, nti, "identity_error", 0, test))
        for method in baselines:
            knob = matched_point(means, "methods", method, mean_of(means, ours, "identity_error", {fit}), {fit})
            if knob is None:
                continue
            other = ("methods", method, knob)
            ours_identity = mean_of(means, ours, "identity_error", {fit})
            unmatched = mean_of(means, other, "identity_error", {fit}) > ours_identity
            closest = f"; no {method} setting gets down to ours' identity error there, this is the closest" \
                if unmatched else ""
            claims.append(claim(means, f"ours vs {method}", f"ours edits more than {method} at the same identity",
                                f"ours at eta {eta:g} minus {method} at {knob:g} ({where}{closest})", ours, other,
                                "edit_success", +1, test))
            claims.append(claim(means, f"ours vs {method}", "(the match: identity error about equal)",
                                f"ours at eta {eta:g} minus {method} at {knob:g}", ours, other, "identity_error", 0,
                                test))
        if len(worlds) == 1:
            break
    return claims


def ablation_claims(means) -> list[Claim]:
    """The paper's inversion and injection ablations (Sec. 5.4, Fig. 7), each setting averaged over the etas at
    which the ablations were sampled, pooled over worlds."""
    claims = []
    etas = etas_of(means, "inversion", "DDIM") or etas_of(means, "inversion", "NTI-src")

    def at(group: str, setting: str) -> list[Setting]:
        return [(group, setting, eta) for eta in etas]

    over = f"mean over eta {', '.join(f'{e:g}' for e in etas)}"
    if etas_of(means, "inversion", "NTI-src"):
        claims.append(claim(means, "inversion", "NTI without a source prompt preserves structure better than with one",
                            f"NTI-src minus NTI-w/o-src ({over})", at("inversion", "NTI-src"),
                            at("inversion", "NTI-w/o-src"), "identity_error", +1))
    if etas_of(means, "inversion", "DDIM"):
        claims.append(claim(means, "inversion", "DDIM inversion barely edits",
                            f"NTI-w/o-src minus DDIM ({over})", at("inversion", "NTI-w/o-src"),
                            at("inversion", "DDIM"), "edit_success", +1))
        claims.append(claim(means, "inversion", "DDIM inversion stays close to the input",
                            f"NTI-w/o-src minus DDIM ({over})", at("inversion", "NTI-w/o-src"),
                            at("inversion", "DDIM"), "identity_error", +1))
    if etas_of(means, "injection", "inject 0%"):
        for low, high in ((0, 20), (20, 50)):
            claims.append(claim(means, "injection", "more injection keeps more of the input's structure",
                                f"inject {low}% minus {high}% ({over})", at("injection", f"inject {low}%"),
                                at("injection", f"inject {high}%"), "identity_error", +1))
        claims.append(claim(means, "injection", "more injection edits less (the trade-off 10-40% balances)",
                            f"inject 0% minus 50% ({over})", at("injection", "inject 0%"),
                            at("injection", "inject 50%"), "edit_success", +1))
    return claims


def eta_claims(means) -> list[Claim]:
    """Does eta do anything: ours at its largest eta against its smallest, per pair."""
    etas = etas_of(means, "methods", "ours")
    if len(etas) < 2:
        return []
    low, high = ("methods", "ours", etas[0]), ("methods", "ours", etas[-1])
    span = f"ours at eta {etas[-1]:g} minus eta {etas[0]:g}"
    return [claim(means, "eta", "larger eta edits more", span, high, low, "edit_success", +1),
            claim(means, "eta", "eta 0 (the optimized embedding) is closest to the input", span, high, low,
                  "identity_error", +1)]


# what counts as a large range across eta on one pair: a tenth of P(target pose); for identity error, about the
# smallest difference between settings that the page's intervals resolve
SPREAD_LARGE = {"edit_success": 0.1, "identity_error": 0.01}


def eta_spread(means, metric: str = "edit_success", large: float = 0.1) -> dict[str, float]:
    """Per pair, the range (max - min) of ours' ``metric`` across eta: its mean with an interval, and the share of
    pairs whose range exceeds ``large`` (``share_over``)."""
    etas = etas_of(means, "methods", "ours")
    spreads = []
    for settings in means.values():
        values = [settings[("methods", "ours", e)][metric] for e in etas if ("methods", "ours", e) in settings]
        if len(values) == len(etas) and len(values) > 1:
            spreads.append(max(values) - min(values))
    mean, low, high = bootstrap(np.asarray(spreads))
    return {"n": len(spreads), "mean": mean, "low": low, "high": high,
            "large": large, "share_over": float(np.mean(np.asarray(spreads) > large)) if spreads else float("nan")}


def sky_claims(means) -> list[Claim]:
    """Which stage moves the sky's colour: each comparison differs from the next in one stage only."""
    claims = []
    ours_etas = etas_of(means, "methods", "ours")
    abl = etas_of(means, "inversion", "NTI-src")
    if ours_etas and has(means, ("methods", "NTI-only", 1.0)):
        claims.append(claim(means, "sky", "(question) does ours move the sky more than NTI-only?",
                            "ours (mean over eta) minus NTI-only",
                            [("methods", "ours", e) for e in ours_etas], ("methods", "NTI-only", 1.0), "sky_shift", 0))
    if abl:
        claims.append(claim(means, "sky", "(question) the inversion without a source prompt?",
                            "NTI-w/o-src minus NTI-src (inject 20%, mean over ablation etas)",
                            [("inversion", "NTI-w/o-src", e) for e in abl], [("inversion", "NTI-src", e) for e in abl],
                            "sky_shift", 0))
    if etas_of(means, "injection", "inject 0%"):
        claims.append(claim(means, "sky", "(question) the injection switch?",
                            "NTI-w/o-src inject 20% minus inject 0% (mean over ablation etas)",
                            [("injection", "inject 20%", e) for e in abl], [("injection", "inject 0%", e) for e in abl],
                            "sky_shift", 0))
    if len(ours_etas) > 1:
        claims.append(claim(means, "sky", "(question) the text optimization?",
                            f"ours at eta {ours_etas[0]:g} (optimized embedding) minus eta {ours_etas[-1]:g} "
                            "(target text)", ("methods", "ours", ours_etas[0]), ("methods", "ours", ours_etas[-1]),
                            "sky_shift", 0))
    if has(means, ("methods", "NTI-only", 1.0)) and 1.0 in abl:
        claims.append(claim(means, "sky", "(question) NTI-only's own sky change against the input",
                            "NTI-only minus NTI-src at eta 1 inject 20% (the injection alone)",
                            ("methods", "NTI-only", 1.0), ("inversion", "NTI-src", 1.0), "sky_shift", 0))
    return claims


def all_claims(rows: list[dict], baselines: Iterable[str] = ()
               ) -> tuple[list[Claim], dict[str, dict[str, float]]]:
    """Every claim the rows can test, and ours' spread across eta per pair, of edit success and of identity
    error (:func:`eta_spread`, by metric)."""
    means = pair_means(rows)
    present = [b for b in baselines if any(s[1] == b for settings in means.values() for s in settings)]
    return ([*matched_claims(means, present), *eta_claims(means), *ablation_claims(means), *sky_claims(means)],
            {metric: eta_spread(means, metric, large) for metric, large in SPREAD_LARGE.items()})


def claims_table(claims: list[Claim]) -> str:
    """Markdown: one row per claim with its interval and verdict."""
    lines = ["| topic | the paper (or the question) | measured as | metric | pairs | mean difference [95% CI] | "
             "verdict |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for c in claims:
        lines.append(f"| {c.topic} | {c.claim} | {c.comparison} | {c.metric.replace('_', ' ')} | {c.n} | "
                     f"{c.mean:+.3f} [{c.low:+.3f}, {c.high:+.3f}] | **{c.verdict}** |")
    return "\n".join(lines)
