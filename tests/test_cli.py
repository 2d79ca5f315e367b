"""The CLI as a user calls it, on a real TEdBench image with the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

FAST = ["--model", "tiny", "--size", "64", "--steps", "5", "--opt-steps", "3", "--inner-steps", "2"]


def run_cli(args, cwd, cache):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NONRIGID_CACHE_DIR": str(cache)}
    return subprocess.run([sys.executable, "-m", "nonrigid.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "cache").mkdir()
    return tmp_path


def test_edit_writes_the_layout_and_a_second_run_reuses_the_cache(workdir, tedbench):
    image = tedbench / "originals" / "cat.jpeg"
    out = workdir / "out" / "cat-sit"
    first = run_cli(["edit", str(image), "A photo of a sitting cat.", "--out", str(out), "--seed", "0", "1",
                     "--eta", "0", "0.5", *FAST], workdir, workdir / "cache")
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == str(out)
    manifest = json.loads((out / "edit.json").read_text())
    files = {v["file"] for v in manifest["variants"]}
    assert len(files) == 4  # 2 seeds x 1 inject x 2 etas
    assert {p.name for p in out.iterdir()} == files | {"input.png", "grid.png", "edit.json"}
    for name in files | {"input.png"}:
        assert Image.open(out / name).size == (64, 64)
    grid = Image.open(out / "grid.png")
    assert grid.width >= 2 * 64 and grid.height >= 2 * 64  # 2 rows (seeds x inject) by 2 columns (etas)
    assert manifest["seeds"] == [0, 1] and manifest["etas"] == [0.0, 0.5] and manifest["inject_steps"] == [1]
    assert manifest["model"] == "tiny" and manifest["nonrigid_version"]
    assert set(manifest["timings_s"]) >= {"text_optimization_and_inversion", "sampling", "total"}
    assert manifest["cache"] == {"text_optimization": [], "inversion": False}

    second = run_cli(["edit", str(image), "A photo of a sitting cat.", "--out", str(out), "--seed", "0", "1",
                      "--eta", "0.3", "--inject", "0.4", *FAST], workdir, workdir / "cache")
    assert second.returncode == 0, second.stderr
    assert "reusing cached text optimization" in second.stderr
    assert "reusing cached nti inversion" in second.stderr
    manifest2 = json.loads((out / "edit.json").read_text())
    assert manifest2["cache"] == {"text_optimization": [0, 1], "inversion": True}
    assert [v["eta"] for v in manifest2["variants"]] == [0.3, 0.3]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [v["file"] for v in manifest2["variants"]] + ["input.png", "grid.png", "edit.json"]
    ), "the earlier edit's files are replaced, not mixed in"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "no staging folders left behind"


def test_quiet_prints_only_the_output_path(workdir, tedbench):
    out = workdir / "q"
    result = run_cli(["edit", str(tedbench / "originals" / "dog_01.jpeg"), "A jumping dog", "--out", str(out),
                      "--eta", "0.2", "--quiet", "--no-cache", *FAST], workdir, workdir / "cache")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.strip() == str(out)
    assert not any((workdir / "cache").iterdir()), "--no-cache writes nothing"


def test_help_explains_every_flag_with_its_default(workdir):
    result = run_cli(["edit", "--help"], workdir, workdir / "cache")
    assert result.returncode == 0
    for flag in ("--source", "--model", "--inversion", "--eta", "--inject", "--steps", "--opt-steps", "--seed",
                 "--guidance", "--size", "--device", "--dtype", "--out", "--quiet", "--cache-dir", "--no-cache",
                 "--allow-pickle", "--debug"):
        assert flag in result.stdout
    text = " ".join(result.stdout.split())
    assert "(default: 0.2)" in text and "(default: 0 0.1 0.2 0.3 0.4 0.5)" in text
    top = run_cli(["--help"], workdir, workdir / "cache")
    assert top.returncode == 0 and "edit" in top.stdout


def test_bench_help_groups_its_options():
    """``bench --help`` (some 60 options) in sections a reader can skip: every option in exactly one, in the
    order data, methods, knobs, model and runtime, metrics, output, scale-out."""
    import argparse

    from nonrigid.cli.main import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    bench = commands.choices["bench"]
    groups = {g.title: [a for a in g._group_actions if a.option_strings] for g in bench._action_groups}
    assert [t for t in groups if groups[t]] == ["options", "data", "methods", "knobs", "model and runtime",
                                               "metrics", "output", "scale-out"]
    assert [a.dest for a in groups["options"]] == ["help"]  # nothing left in the flat list
    where = {flag: title for title, actions in groups.items() for a in actions for flag in a.option_strings}
    assert [where[f] for f in ("--data", "--sweep", "--eta", "--size", "--clip-model", "--out", "--ray")] == [
        "data", "methods", "knobs", "model and runtime", "metrics", "output", "scale-out"]
    text = bench.format_help()
    assert text.index("\ndata:\n") < text.index("\nmethods:\n") < text.index("\nscale-out:\n")
