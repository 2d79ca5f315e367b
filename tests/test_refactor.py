"""A restructuring changes no result: the same commands give the same images, manifests and rows as before it.

``fixtures/refactor/expected`` was written by ``fixtures/refactor/make.py`` with the code before issue 12's
restructuring (commit c2d7573): the default edit of the miniature model, every method on the tiny and the
miniature model, and a benchmark on each. Here the same commands run with today's code, in this process, and every
image must be equal pixel for pixel and every manifest field and result row equal. Measured after the
restructuring: all bit-identical (no float reordering needed a tolerance).

Regenerated once since, on purpose, for issue 27 (stage A's text optimization riding along stage B's null-text
inversion calls, and NTI's conditional prediction sharing a call): the joint calls batch the same arithmetic
differently, so results moved by float rounding only. Measured against the fixtures before it with the same
commands: 32 of 93 images differed, each by at most one grey level; metrics by at most 3e-5 (LPIPS 2.8e-5,
CLIP-T 2.2e-5, aesthetic 5.7e-6); the miniature edit's final text-optimization loss by 1.5e-8; every other field
unchanged. The square inputs here also show that issue 28's aspect-preserving sizes leave square pictures alone.

Two columns are excepted, each for a reason of its own: ``lpips`` of benchmarks run with ``--metrics tiny`` (the
tiny LPIPS network is now the ``lpips`` package's own architecture with random weights, not a narrow hand-written
one; real LPIPS is checked against the package in test_metrics.py), and the manifests' and rows' ``params`` gain
fields the restructuring added (checked: every earlier field keeps its value). Rows also gained PIE-Bench's
columns (issue 15), which must stay empty on these TEdBench runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SHARED
from PIL import Image

HERE = Path(__file__).resolve().parent / "fixtures" / "refactor"
sys.path.insert(0, str(HERE))
import make  # noqa: E402

from nonrigid.evaluation.protocol import PIE_METRIC_NAMES  # noqa: E402

ADDED_ROW_COLUMNS = {*PIE_METRIC_NAMES, "edit_type"}

EXCEPTED_ROW_COLUMNS = ("lpips",)


@pytest.fixture(scope="module")
def produced(tmp_path_factory, model):
    if not make.DOG.is_file():
        pytest.skip(f"TEdBench not found at {SHARED}")
    from nonrigid.cli import main

    workdir = tmp_path_factory.mktemp("refactor")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # what the fixtures were made with: float reductions on the CPU depend on it
    out = workdir / "produced"

    def run_here(args: list[str], folder: Path) -> None:
        mp = pytest.MonkeyPatch()
        mp.setenv("NONRIGID_CACHE_DIR", str(folder / "cache"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.chdir(folder)
        try:
            quiet = ["--quiet"] if args[0] in ("edit", "bench") else []
            assert main([*args, *quiet]) == 0, args
        finally:
            mp.undo()

    try:
        make.produce(workdir, out, run=run_here)
    finally:
        torch.set_num_threads(threads)
    return out


CASES = sorted(p.name for p in (HERE / "expected").iterdir() if p.is_dir())


def test_every_case_of_the_fixture_maker_is_in_the_fixtures():
    names = {name for name, _ in make.cases()} | {"bench-tiny", "bench-mini"}
    assert names == set(CASES)


def assert_same_images(expected: Path, produced: Path) -> None:
    names = sorted(p.relative_to(expected) for p in expected.rglob("*.png"))
    assert names == sorted(p.relative_to(produced) for p in produced.rglob("*.png"))
    for name in names:
        before, after = np.asarray(Image.open(expected / name)), np.asarray(Image.open(produced / name))
        assert before.shape == after.shape and np.array_equal(before, after), f"{name} differs"


def assert_fields_kept(before: dict, after: dict, where: str) -> None:
    for key, value in before.items():
        assert key in after, f"{where}: {key} is gone"
        if isinstance(value, dict) and isinstance(after[key], dict):
            assert_fields_kept(value, after[key], f"{where}.{key}")
        else:
            assert after[key] == value, f"{where}: {key} was {value!r}, is {after[key]!r}"


@pytest.mark.parametrize("case", CASES)
def test_the_same_command_gives_the_same_result(produced, case):
    expected, now = HERE / "expected" / case, produced / case
    assert_same_images(expected, now)
    if case.startswith("bench-"):
        before = json.loads((expected / "rows.json").read_text())
        after = json.loads((now / "rows.json").read_text())
        assert len(before) == len(after)
        for old, new in zip(before, after, strict=True):
            for key in EXCEPTED_ROW_COLUMNS:
                old.pop(key), new.pop(key)
            for column in ("params", "knobs", "record"):
                assert_fields_kept(json.loads(old.pop(column)), json.loads(new.pop(column)), f"{new['image']} {column}")
            for column in set(new) - set(old):  # PIE-Bench's columns, added since: empty on a TEdBench run
                assert column in ADDED_ROW_COLUMNS and new.pop(column) is None, column
            assert old == new
    else:
        assert_fields_kept(json.loads((expected / "edit.json").read_text()),
                           json.loads((now / "edit.json").read_text()), case)
