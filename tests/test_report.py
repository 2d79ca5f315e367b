"""The report of small benchmark runs: Figure 6, the summary table, ablation plots and the HTML gallery."""

from __future__ import annotations

import csv
import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nonrigid.cli import main
from nonrigid.evaluation.bench import run_benchmark
from nonrigid.evaluation.data import read_pairs, select_pairs
from nonrigid.evaluation.gallery import gallery_choices
from nonrigid.evaluation.plan import BenchSpec, plan_settings
from nonrigid.evaluation.runfolder import opened, read_rows
from nonrigid.evaluation.tables import bin_edges, bin_index, comparison_rows, figure6_points, knob_text, load_runs
from nonrigid.models.registry import family_of

FAST = ["num_steps=3", "inner_steps=1", "opt_steps=1"]


def bench(root: Path, name: str, pipe, metrics, pairs, settings, seeds, preset=None) -> Path:
    spec = BenchSpec(Path("."), pairs, settings, seeds, model="tiny", size=64, metrics={"kind": "tiny"},
                     preset=preset)
    with opened(root / name, spec.identity()) as run:
        run_benchmark(spec, run, family_of(pipe), metrics)
    return root / name


@pytest.fixture(scope="module")
def runs(tiny_pipe, tedbench, tmp_path_factory):
    """A method comparison (ours over two etas, nti; 2 pairs x 2 seeds) and the two ablation presets (1 pair)."""
    from nonrigid.evaluation.metrics import Metrics

    root = tmp_path_factory.mktemp("runs")
    metrics = Metrics.tiny()
    pairs = select_pairs(read_pairs(tedbench), "0,5")
    methods = bench(root, "methods", tiny_pipe, metrics, pairs, plan_settings(["ours", "nti"], ["eta=0,0.5"], FAST),
                    (0, 1))
    injection = bench(root, "injection", tiny_pipe, metrics, pairs[:1],  # 10 steps: six distinct K
                      plan_settings(["ours"], ["eta=0,0.5"], [*FAST[1:], "num_steps=10"], "injection"), (0,),
                      "injection")
    inversion = bench(root, "inversion", tiny_pipe, metrics, pairs[:1],
                      plan_settings(["ours"], ["eta=0,0.5"], FAST, "inversion"), (0,), "inversion")
    return {"methods": methods, "injection": injection, "inversion": inversion}


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report"
    assert main(["report", str(runs["methods"]), str(runs["injection"]), str(runs["inversion"]), "--out", str(out),
                 "--bins", "4", "--min-per-bin", "1", "--quiet"]) == 0
    return out


def test_the_plots_are_valid_images(report):
    stems = ["figure6-clip", "figure6-aesthetic", "ablation-injection", "ablation-inversion"]
    for stem in stems:
        with Image.open(report / f"{stem}.png") as png:
            png.verify()
        with Image.open(report / f"{stem}.png") as png:
            assert png.format == "PNG" and png.width >= 600 and png.height >= 400
            assert len(np.unique(np.asarray(png.convert("L")))) > 20, "a plot, not a blank page"
        assert ET.parse(report / f"{stem}.svg").getroot().tag.endswith("svg")
    assert not list(report.glob("ablation-methods.*")), "no ablation plot for a run without a preset"


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_the_summary_has_one_line_per_method_setting_and_knobs_with_mean_and_standard_error(runs, report):
    lines = read_csv(report / "summary.csv")
    keys = [(line["run"], line["method"], line["setting"], line["knobs"], int(line["n"])) for line in lines]
    assert keys[:3] == [("methods", "ours", "default", "K=1 eta=0", 4),
                        ("methods", "ours", "default", "K=1 eta=0.5", 4), ("methods", "nti", "default", "", 2)]
    assert keys[3:15] == [("injection", "ours", "injection", f"K={k} eta={eta:g}", 1)
                          for k in range(6) for eta in (0.0, 0.5)]
    assert keys[15:] == [("inversion", "ours", label, f"K=1 eta={eta:g}", 1)
                         for label in ("DDIM", "NTI-src", "NTI-w/o-src") for eta in (0.0, 0.5)]
    rows = read_rows(runs["methods"])
    for line in lines[:3]:
        members = [r for r in rows if r["method"] == line["method"] and knob_text(r["knobs"]) == line["knobs"]]
        assert len(members) == int(line["n"])
        for metric in ("clip_t", "lpips", "aesthetic"):
            values = np.array([m[metric] for m in members])
            assert float(line[metric]) == pytest.approx(values.mean(), rel=1e-5)
            assert float(line[f"{metric}_se"]) == pytest.approx(values.std(ddof=1) / math.sqrt(len(values)), rel=1e-5)
        assert float(line["seconds_per_edit"]) == pytest.approx(np.mean([m["seconds_per_edit"] for m in members]),
                                                                rel=1e-5)
    markdown = (report / "summary.md").read_text().splitlines()
    assert len(markdown) == 2 + len(lines) and markdown[2].startswith("| methods | ours | default | K=1 eta=0 | 4 |")
    assert " ± " in markdown[2]


def test_figure6_bins_every_edit_once_per_method(runs, report):
    data = load_runs([runs["methods"]])
    labelled = [(series, row) for series, _, row in comparison_rows(data)]
    assert {series for series, _ in labelled} == {"ours", "nti"}
    edges = bin_edges([row["lpips"] for _, row in labelled], 4)
    points = read_csv(report / "figure6.csv")
    for metric in ("clip_t", "aesthetic"):
        for series in ("ours", "nti"):
            mine = [p for p in points if p["metric"] == metric and p["series"] == series]
            assert sum(int(p["n"]) for p in mine) == sum(1 for s, _ in labelled if s == series)
            for p in mine:
                members = [r for s, r in labelled if s == series and bin_index(r["lpips"], edges) == int(p["bin"])]
                assert float(p["mean"]) == pytest.approx(np.mean([m[metric] for m in members]), rel=1e-5)
                assert float(p["lpips"]) == pytest.approx(np.mean([m["lpips"] for m in members]), rel=1e-5)


def test_binning_fixed_and_quantile():
    assert list(bin_edges([0.0, 0.2, 0.9, 1.0], 2)) == [0.0, 0.5, 1.0]
    assert [bin_index(v, np.array([0.0, 0.5, 1.0])) for v in (0.0, 0.49, 0.5, 1.0)] == [0, 0, 1, 1]  # last closed
    quantile = bin_edges([0.1, 0.2, 0.3, 0.4, 0.8, 0.9], 3, "quantile")
    assert [sum(bin_index(v, quantile) == b for v in (0.1, 0.2, 0.3, 0.4, 0.8, 0.9)) for b in range(3)] == [2, 2, 2]
    rows = [("a", {"lpips": 0.1, "clip_t": 1.0}), ("a", {"lpips": 0.2, "clip_t": 3.0}),
            ("a", {"lpips": 0.95, "clip_t": 5.0}), ("b", {"lpips": 0.9, "clip_t": 2.0}),
            ("b", {"lpips": 1.0, "clip_t": 4.0})]
    points = figure6_points(rows, "clip_t", np.array([0.0, 0.5, 1.0]), min_per_bin=2)
    assert [(p.series, p.bin, p.n, p.mean) for p in points] == [("a", 0, 2, 2.0), ("b", 1, 2, 3.0)]
    assert points[0].se == pytest.approx(math.sqrt(2) / math.sqrt(2))  # std of (1, 3) over sqrt(2)
    assert points[0].lpips == pytest.approx(0.15)


def test_the_gallery_opens_without_a_server_and_shows_edits_at_matched_lpips(runs, report):
    page = (report / "gallery.html").read_text()
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert sources and all(not Path(s).is_absolute() and (report / s).is_file() for s in sources)
    for s in sources:
        with Image.open(report / s) as thumb:
            assert thumb.size[0] > 0
    assert "A photo of a sitting dog." in page and "A photo of a tomato in a blue tennis court." in page
    assert 'href="figure6-clip.png"' in page and "<table class=\"summary\">" in page

    data = load_runs([runs["methods"]])
    labelled = comparison_rows(data)
    level = float(np.median([row["lpips"] for _, _, row in labelled]))
    chosen = gallery_choices(labelled, [level])
    assert sorted(chosen) == [0, 5]
    for pair, by_level in chosen.items():
        for series, (_, row) in by_level[level].items():
            candidates = [r for s, _, r in labelled if s == series and r["pair"] == pair]
            assert abs(row["lpips"] - level) == min(abs(r["lpips"] - level) for r in candidates)
            thumb = f"{row['lpips']:.3f}"
            assert f"LPIPS {thumb}" in page


def test_report_usage_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "run.json" in err
