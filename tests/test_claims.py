"""The miniature evaluation's claims: paired bootstrap intervals, verdicts, operating points chosen on one world and
tested on another, seeds averaged within a pair, the sky metric, and the multi-seed protocol on the mini model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from nonrigid.errors import UsageError
from nonrigid.mini.claims import all_claims, bootstrap, differences, matched_claims, pair_means, verdict


def test_bootstrap_interval_is_the_mean_for_constant_differences_and_covers_a_known_mean():
    assert bootstrap(np.full(30, 0.25)) == pytest.approx((0.25, 0.25, 0.25))
    draws = np.random.default_rng(1).normal(0.5, 1.0, 400)
    mean, low, high = bootstrap(draws)
    assert mean == pytest.approx(draws.mean())
    assert low < 0.5 < high and low > 0  # covers the true mean, excludes zero
    assert high - low == pytest.approx(2 * 1.96 / 20, rel=0.15)  # the normal theory width, 2 * 1.96 sd / sqrt(n)
    assert bootstrap(draws) == bootstrap(draws)  # seeded: a regenerated page says the same


@pytest.mark.parametrize(
    "low, high, direction, expected",
    [(0.1, 0.2, 1, "supported"), (0.1, 0.2, -1, "contradicted"), (-0.1, 0.2, 1, "undecided"),
     (-0.3, -0.1, -1, "supported"), (-0.3, -0.1, 0, "differs"), (-0.3, 0.1, 0, "no difference found")],
)
def test_verdict_reads_the_interval_against_the_predicted_side(low, high, direction, expected):
    assert verdict(low, high, direction) == expected


def _row(world, pair, setting, eta, seed=0, group="methods", **metrics):
    base = {"identity_error": 0.1, "edit_success": 0.5, "background_error": 0.1, "subject_error": 0.1,
            "sky_shift": 0.0}
    return {"world": world, "pair": pair, "group": group, "setting": setting, "eta": eta, "seed": seed,
            **base, **metrics}


def test_seeds_are_averaged_within_a_pair_so_pairs_are_the_unit():
    rows = []
    for pair in range(2):
        for seed in range(5):
            rows.append(_row(0, pair, "ours", 0.0, seed, edit_success=0.1 * seed + pair))
        rows.append(_row(0, pair, "NTI-only", 1.0, None, edit_success=0.0))
    means = pair_means(rows)
    diffs = differences(means, ("methods", "ours", 0.0), ("methods", "NTI-only", 1.0), "edit_success")
    assert diffs.tolist() == pytest.approx([0.2, 1.2])  # one value per pair: the mean over its five seeds


def test_operating_point_is_chosen_on_one_world_and_tested_on_the_other():
    """World 0 matches NTI-only's identity at eta 0.5; world 1 would match at eta 1. The claim fitted on world 0
    must compare eta 0.5 on world 1's pairs only, and the other way round."""
    identity = {0: {0.0: 0.02, 0.5: 0.10, 1.0: 0.30}, 1: {0.0: 0.02, 0.5: 0.05, 1.0: 0.10}}
    success = {0: {0.0: 0.1, 0.5: 0.2, 1.0: 0.3}, 1: {0.0: 0.1, 0.5: 0.6, 1.0: 0.9}}
    rows = []
    for world in (0, 1):
        for pair in range(20):
            jitter = 0.01 * (pair % 3)
            rows.append(_row(world, pair, "NTI-only", 1.0, None, identity_error=0.10, edit_success=0.4 + jitter))
            for eta in (0.0, 0.5, 1.0):
                rows.append(_row(world, pair, "ours", eta, identity_error=identity[world][eta],
                                 edit_success=success[world][eta] + jitter))
    claims = [c for c in matched_claims(pair_means(rows), ()) if c.metric == "edit_success"]
    fitted_on_0, fitted_on_1 = claims
    assert "eta 0.5" in fitted_on_0.comparison and "chosen on world 0, tested on world 1" in fitted_on_0.comparison
    assert fitted_on_0.n == 20 and fitted_on_0.mean == pytest.approx(0.6 - 0.4)  # world 1's values at eta 0.5
    assert fitted_on_0.verdict == "supported"
    assert "eta 1" in fitted_on_1.comparison and fitted_on_1.mean == pytest.approx(0.3 - 0.4)  # world 0 at eta 1
    assert fitted_on_1.verdict == "contradicted"


def test_a_baseline_that_never_reaches_ours_identity_is_compared_at_its_closest_setting_and_said_so():
    """DDS reaches ours' identity error at 100 iterations (its best edit there is chosen); Imagic's every alpha
    keeps identity worse than ours, so its closest alpha is taken and the comparison says no alpha gets there."""
    rows = []
    for world in (0, 1):
        for pair in range(10):
            rows.append(_row(world, pair, "NTI-only", 1.0, None, identity_error=0.10, edit_success=0.5))
            rows.append(_row(world, pair, "ours", 1.0, identity_error=0.08, edit_success=0.8))
            for knob, identity, success in ((50, 0.06, 0.6), (100, 0.08, 0.85), (200, 0.12, 0.9)):
                rows.append(_row(world, pair, "dds", knob, None, identity_error=identity, edit_success=success))
            for alpha, identity in ((0.8, 0.13), (1.2, 0.15)):
                rows.append(_row(world, pair, "imagic", alpha, identity_error=identity, edit_success=0.9))
    claims = [c for c in matched_claims(pair_means(rows), ("dds", "imagic")) if c.metric == "edit_success"]
    dds = [c for c in claims if c.topic == "ours vs dds"]
    imagic = [c for c in claims if c.topic == "ours vs imagic"]
    assert len(dds) == len(imagic) == 2
    for c in dds:
        assert "dds at 100" in c.comparison and "closest" not in c.comparison
    for c in imagic:
        assert "imagic at 0.8" in c.comparison
        assert "no imagic setting gets down to ours' identity error there, this is the closest" in c.comparison


def test_all_claims_cover_the_ablations_eta_and_sky_with_their_predicted_sides():
    rows = []
    for pair in range(12):
        noise = 0.002 * (pair % 4)
        rows += [_row(0, pair, "NTI-only", 1.0, None), _row(1, pair, "NTI-only", 1.0, None)]
        for world in (0, 1):
            for eta in (0.0, 1.0):
                rows.append(_row(world, pair, "ours", eta, edit_success=0.3 + 0.4 * eta + noise,
                                 identity_error=0.05 + 0.05 * eta + noise, sky_shift=0.05 if eta == 0 else 0.01))
                for name, ide in (("DDIM", 0.02), ("NTI-src", 0.12), ("NTI-w/o-src", 0.08)):
                    rows.append(_row(world, pair, name, eta, group="inversion", identity_error=ide + noise,
                                     edit_success=0.1 if name == "DDIM" else 0.6 + noise))
                for ratio in (0, 20, 50):
                    rows.append(_row(world, pair, f"inject {ratio}%", eta, group="injection",
                                     identity_error=0.1 - ratio / 1000 + noise, edit_success=0.7 - ratio / 100))
    claims, spread = all_claims(rows)
    found = {(c.topic, c.comparison.split(" (")[0], c.metric): c.verdict for c in claims}
    assert found[("inversion", "NTI-src minus NTI-w/o-src", "identity_error")] == "supported"
    assert found[("inversion", "NTI-w/o-src minus DDIM", "edit_success")] == "supported"
    assert found[("injection", "inject 0% minus 20%", "identity_error")] == "supported"
    assert found[("injection", "inject 0% minus 50%", "edit_success")] == "supported"
    assert found[("eta", "ours at eta 1 minus eta 0", "edit_success")] == "supported"
    assert found[("sky", "ours at eta 0", "sky_shift")] == "differs"  # the text optimization moves the sky here
    assert spread["edit_success"]["n"] == 24 and spread["edit_success"]["mean"] == pytest.approx(0.4)
    assert spread["identity_error"]["mean"] == pytest.approx(0.05) and spread["identity_error"]["share_over"] == 1.0


def test_sky_shift_measures_a_change_of_sky_colour_and_ignores_the_ground():
    import random
    from dataclasses import replace

    from nonrigid.mini.judge import identity_errors
    from nonrigid.mini.world import random_scene, render

    scene = random_scene(random.Random(3))
    assert identity_errors(scene, scene.pose, render(scene))["sky_shift"] == 0.0
    bluer = replace(scene, sky=tuple(min(255, c + 30) if i == 2 else c for i, c in enumerate(scene.sky)))
    shift = identity_errors(scene, scene.pose, render(bluer))["sky_shift"]
    moved = min(255, scene.sky[2] + 30) - scene.sky[2]
    assert shift == pytest.approx(moved / 255 / 3 * 0.92, rel=0.1)  # one channel of three, times the sky's gradient
    other_ground = replace(scene, ground="snow" if scene.ground != "snow" else "grass")
    assert identity_errors(scene, scene.pose, render(other_ground))["sky_shift"] < 0.002


def test_protocol_refuses_ablation_etas_outside_the_sweep_and_repeated_seeds():
    from nonrigid.mini.protocol import Protocol

    with pytest.raises(UsageError, match="ablation etas"):
        Protocol(etas=(0.0, 1.0), ablation_etas=(0.5,))
    with pytest.raises(UsageError, match="distinct"):
        Protocol(seeds=(0, 0))


def test_eta_one_is_the_target_text_whatever_the_seed():
    """Why the evaluation samples eta 1 for one seed only: e_1 = e_tgt bit for bit, every tensor of it."""
    import torch

    from nonrigid.models.family import Conditioning
    from nonrigid.stages.sampling import interpolate
    from nonrigid.stages.text_optimization import TextOptimization

    def random_conditioning(seed: int) -> Conditioning:
        g = torch.Generator().manual_seed(seed)
        return Conditioning({"tokens": torch.randn(1, 4, 8, generator=g), "pooled": torch.randn(1, 8, generator=g)})

    target = random_conditioning(0)
    mixed = [interpolate(TextOptimization("t", target, random_conditioning(seed), [], seed, 1, 1e-3), 1.0)
             for seed in (1, 2, 3)]
    for m in mixed:
        assert all(torch.equal(m.tensors[k], target.tensors[k]) for k in target.tensors)


def test_mini_evaluate_on_two_worlds_with_seeds(tmp_path, capsys):
    """`nonrigid mini evaluate --data A B --seeds 2 --ablation-seeds 1`: each world runs into OUT/world-SEED; seeds
    reach stage A (ours' rows differ by seed at eta 0), eta 1 is sampled once, the ablations sample the first seed
    only, every setting's rows are there and carry their world; the
    claims pick the operating point on one world and test it on the other; a run folder refuses to resume under
    another protocol, and two folders of one world are refused."""
    from nonrigid.cli import main
    from nonrigid.mini.claims import all_claims
    from nonrigid.mini.dataset import write_dataset
    from nonrigid.mini.doc import claims_text
    from nonrigid.mini.evaluate import load_rows

    for seed in (11, 12):
        write_dataset(tmp_path / f"data{seed}", count=1, seed=seed)
    args = ["mini", "evaluate", "--data", str(tmp_path / "data11"), str(tmp_path / "data12"), "--out",
            str(tmp_path / "run"), "--steps", "10", "--opt-steps", "2", "--seeds", "2", "--etas", "0,1",
            "--ablation-etas", "0,1", "--ablation-seeds", "1", "--baselines", "none", "--quiet", "--pairs-per-batch",
            "2"]
    assert main(args) == 0, capsys.readouterr().err
    expected = sorted(
        [("methods", "ours", 0.0, 0), ("methods", "ours", 0.0, 1), ("methods", "ours", 1.0, 0),
         ("methods", "NTI-only", 1.0, -1)]
        + [("inversion", name, eta, 0) for name in ("DDIM", "NTI-src", "NTI-w/o-src") for eta in (0.0, 1.0)]
        + [("injection", f"inject {r}%", eta, 0) for r in (0, 10, 20, 30, 40, 50) for eta in (0.0, 1.0)])
    rows = []
    for seed in (11, 12):
        run = tmp_path / "run" / f"world-{seed}"
        mine = load_rows(run)
        keys = sorted((r["group"], r["setting"], r["eta"], -1 if r["seed"] is None else r["seed"]) for r in mine)
        assert keys == expected
        assert {r["world"] for r in mine} == {seed}
        by_seed = {r["seed"]: r for r in mine if r["setting"] == "ours" and r["eta"] == 0.0}
        assert by_seed[0]["identity_error"] != by_seed[1]["identity_error"]  # the seed changed stage A
        assert json.loads((run / "meta.json").read_text())["protocol"]["seeds"] == [0, 1]
        strip = Image.open(run / "results" / "000.png")
        assert strip.size[0] == 64 * (2 + 2 + 1)  # input, ideal edit, ours at 2 etas, NTI-only
        rows += mine
    claims, _ = all_claims(rows)
    held_out = [c.comparison for c in claims if c.topic == "ours vs NTI-only" and c.metric == "edit_success"]
    assert len(held_out) == 2 and "chosen on world 11, tested on world 12" in held_out[0]
    assert "chosen on world 12, tested on world 11" in held_out[1]
    protocol = json.loads((tmp_path / "run" / "world-11" / "meta.json").read_text())["protocol"]
    page = claims_text(rows, [tmp_path / "run" / "world-11", tmp_path / "run" / "world-12"], protocol, planned=4)
    assert "rests on 2 of the 4 pairs" in page and "first 1 seed(s) only" in page
    assert page.count("| ours vs NTI-only |") == 4 and "Worlds 11, 12 are pooled" in page

    capsys.readouterr()
    other_seeds = [("3" if previous == "--seeds" else a) for previous, a in zip(["", *args[:-1]], args, strict=True)]
    assert main(other_seeds) == 2
    assert "resume it with the same" in capsys.readouterr().err
    assert main(["mini", "evaluate", "--data", str(tmp_path / "data11"), str(tmp_path / "data11"), "--out",
                 str(tmp_path / "other"), "--quiet"]) == 2
    assert "different seeds" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_the_baseline_gallery_puts_each_method_under_its_label(tmp_path):
    """Columns of `docs/mini-baselines.png`: input, ideal edit, ours at eta 0.4, NTI-only, then each baseline at
    its gallery knob, each under a header naming it; rows name their pair."""
    from nonrigid.mini.doc import GALLERY_KNOBS, _baseline_gallery
    from nonrigid.mini.protocol import ETAS

    run = tmp_path / "run"
    (run / "results").mkdir(parents=True)
    (run / "baselines").mkdir()
    strip_colours = [(10 * i, 0, 0) for i in range(2 + len(ETAS) + 1)]  # input, ideal, ours at each eta, NTI-only
    strip = Image.new("RGB", (64 * len(strip_colours), 64))
    for i, colour in enumerate(strip_colours):
        strip.paste(colour, (64 * i, 0, 64 * (i + 1), 64))
    strip.save(run / "results" / "007.png")
    method_colours = {method: (0, 40 * (i + 1), 0) for i, method in enumerate(GALLERY_KNOBS)}
    for method, knob in GALLERY_KNOBS.items():
        Image.new("RGB", (64, 64), method_colours[method]).save(run / "baselines" / f"007-{method}-{knob}.png")
    _baseline_gallery(run, [7], tmp_path / "gallery.png")

    grid = np.asarray(Image.open(tmp_path / "gallery.png").convert("RGB"))
    expected = [strip_colours[0], strip_colours[1], strip_colours[2 + ETAS.index(0.4)], strip_colours[-1],
                *method_colours.values()]
    left = grid.shape[1] - 128 * len(expected)
    top = grid.shape[0] - 128
    for column, colour in enumerate(expected):
        assert tuple(grid[top + 64, left + 128 * column + 64]) == colour, column
        header = grid[:top, left + 128 * column : left + 128 * (column + 1)]
        assert (header.sum(axis=2) < 200).any(), f"column {column} has no label"
    assert (grid[top:, :left].sum(axis=2) < 200).any()  # the row's label
