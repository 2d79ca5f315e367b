"""Variants of ours against the paper's defaults on the miniature world (``nonrigid mini compare``): the verdicts
read the paired intervals against the fast preset's margins, the levels are the means the differences start from,
several worlds of one candidate are compared world by world, the table lands in MINIATURE.md in place, and masked
evaluations measure what the mask keeps on the trained miniature model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nonrigid.mini.studies import MARGINS, compare, comparisons_table, holds

ETAS = (0.0, 0.5, 1.0)


def _rows(world: int, shift: dict[str, float], pairs: int = 30, seed: int = 0) -> list[dict]:
    """Rows of ours for ``pairs`` pairs of ``world`` (2 seeds, 3 etas): a per-pair level plus noise, moved by
    ``shift`` per metric (the same draws for every shift, so a candidate differs from the default by ``shift`` and
    by nothing else)."""
    rng = np.random.default_rng(seed + world)
    rows = []
    for pair in range(pairs):
        base = {"edit_success": rng.uniform(0.4, 0.9), "identity_error": rng.uniform(0.05, 0.1),
                "sky_shift": rng.uniform(0.02, 0.06), "background_error": rng.uniform(0.03, 0.06)}
        for seed_ in (0, 1):
            for eta in ETAS:
                row = {m: v + shift.get(m, 0.0) + rng.normal(0, 0.002) for m, v in base.items()}
                rows.append({**row, "pair": pair, "world": world, "seed": seed_, "eta": eta, "group": "methods",
                             "setting": "ours"})
    return rows


def test_verdicts_read_the_interval_against_the_margins_and_the_levels_are_the_means():
    default = _rows(0, {})
    better = compare(default, _rows(0, {"edit_success": 0.1, "identity_error": -0.01}), "better")
    by_metric = {c.metric: c for c in better}
    assert by_metric["edit_success"].verdict == "better" and by_metric["identity_error"].verdict == "better"
    assert by_metric["edit_success"].mean == pytest.approx(0.1, abs=0.002)
    assert by_metric["edit_success"].candidate_level - by_metric["edit_success"].default_level == pytest.approx(
        by_metric["edit_success"].mean)
    assert by_metric["sky_shift"].margin is None and by_metric["sky_shift"].verdict == "no difference found"
    assert holds(better)

    # a little worse, well inside the margins: holds; past them: fails, and the candidate does not hold
    inside = compare(default, _rows(0, {"edit_success": -0.02, "identity_error": 0.002}), "inside")
    assert {c.metric: c.verdict for c in inside if c.margin} == {"edit_success": "holds", "identity_error": "holds"}
    past = compare(default, _rows(0, {"edit_success": -(MARGINS["edit_success"] + 0.01)}), "past")
    assert {c.metric: c.verdict for c in past}["edit_success"] == "fails" and not holds(past)

    # without margins (masked edits) a worse side reads "worse"
    worse = compare(default, _rows(0, {"background_error": 0.02}), "worse", ("background_error",), {})
    assert [c.verdict for c in worse] == ["worse"]


def test_each_world_is_compared_on_its_own_pairs():
    default = _rows(0, {}) + _rows(7, {})
    candidate = _rows(0, {"edit_success": 0.05}) + _rows(7, {"edit_success": -0.2})
    found = {(c.world, c.metric): c for c in compare(default, candidate, "fast")}
    assert found[(0, "edit_success")].verdict == "better" and found[(7, "edit_success")].verdict == "fails"
    assert found[(0, "edit_success")].n == found[(7, "edit_success")].n == 30
    table = comparisons_table(found.values(), {"fast": "steps 25"})
    assert "| fast | steps 25 | 7 | edit success | 30 |" in table and "**fails**" in table


def _run(folder: Path, rows: list[dict], **protocol) -> Path:
    (folder / "results").mkdir(parents=True)
    for pair in sorted({r["pair"] for r in rows}):
        (folder / "results" / f"{pair:03d}.json").write_text(json.dumps([r for r in rows if r["pair"] == pair]))
    (folder / "meta.json").write_text(json.dumps({"data": str(folder), "protocol": {"num_steps": 50,
                                                                                    "opt_steps": 200, **protocol}}))
    return folder


def test_mini_compare_pools_a_candidates_worlds_and_writes_its_section_in_place(tmp_path, capsys):
    from nonrigid.cli import main

    defaults = [_run(tmp_path / f"base-{w}", _rows(w, {})) for w in (0, 7)]
    fast = [_run(tmp_path / f"fast-{w}", _rows(w, {"identity_error": -0.01}), num_steps=25, ours={"inner_steps": 3})
            for w in (0, 7)]
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "MINIATURE.md").write_text("# The miniature world\n\nintro\n")
    args = ["mini", "compare", *(a for d in defaults for a in ("--default", str(d))),
            *(a for f in fast for a in ("--candidate", f"fast={f}")), "--docs", str(docs)]
    assert main(args) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert printed.count("| fast | steps 25, inner_steps 3 |") == 6  # 2 worlds x 3 metrics
    page = (docs / "MINIATURE.md").read_text()
    assert "## Cheaper settings and masks, tested" in page and "### A fast preset" in page
    assert page.count("| fast |") == 6 and "intro" in page
    assert main(args) == 0  # written again: replaced, not appended
    assert (docs / "MINIATURE.md").read_text() == page


def test_mini_compare_refuses_bad_candidates_in_one_line(tmp_path, capsys):
    from nonrigid.cli import main

    base = _run(tmp_path / "base", _rows(0, {}))
    assert main(["mini", "compare", "--default", str(base), "--candidate", "fast"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "NAME=RUN" in err
    assert main(["mini", "compare", "--default", str(base), "--candidate", f"fast={tmp_path / 'nothing'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no evaluation" in err


def test_a_masked_evaluation_keeps_the_background_of_the_trained_miniature(tmp_path, capsys):
    """`nonrigid mini evaluate --masked` on one scene of the trained miniature model: the dataset's mask covers the
    subject in both poses, and inside the mask's complement the masked edit moves the picture less than the unmasked
    one (background error and sky shift), on the same cached stages A and B."""
    from PIL import Image

    from nonrigid.cli import main
    from nonrigid.mini.dataset import read_dataset, write_dataset
    from nonrigid.mini.evaluate import load_rows
    from nonrigid.mini.world import POSES, render_with_mask

    data = write_dataset(tmp_path / "data", count=1, seed=3)
    (pair,) = read_dataset(data)
    mask = np.asarray(Image.open(data / "masks" / Path(pair.image).name).convert("L")) > 127
    for pose in POSES:
        assert mask[render_with_mask(pair.scene.with_pose(pose))[1] > 0].all()  # the subject in any pose is inside
    assert 0.05 < mask.mean() < 0.8  # and the sky and much of the ground are not

    common = ["mini", "evaluate", "--data", str(data), "--steps", "10", "--opt-steps", "4", "--seeds", "1",
              "--etas", "1", "--no-ablations", "--ours-only", "--baselines", "none", "--quiet"]
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0, capsys.readouterr().err
    (tmp_path / "masked").mkdir()
    (tmp_path / "masked" / "cache").symlink_to(tmp_path / "plain" / "cache", target_is_directory=True)
    assert main([*common, "--out", str(tmp_path / "masked"), "--masked"]) == 0, capsys.readouterr().err
    plain, masked = ({r["setting"]: r for r in load_rows(tmp_path / run)}["ours"] for run in ("plain", "masked"))
    assert masked["background_error"] < 0.75 * plain["background_error"]  # 0.014 against 0.024 at 10 steps
    assert masked["sky_shift"] < plain["sky_shift"]
    assert json.loads((tmp_path / "masked" / "meta.json").read_text())["protocol"]["masked"] is True

    assert main(["mini", "evaluate", "--data", str(data), "--out", str(tmp_path / "x"), "--masked", "--quiet"]) == 2
    assert "--ours-only" in capsys.readouterr().err and not (tmp_path / "x").exists()
