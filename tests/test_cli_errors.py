"""The ``nonrigid edit`` command fails the way a user can act on: run as a user runs it (a separate process), every
bad input exits with the documented code, prints one line on stderr that names the problem (no traceback unless
``--debug``) and leaves no output folder, half-written or otherwise.

Each run starts a fresh interpreter (importing torch and diffusers takes seconds), so the table's runs are started
together, a few at a time, by one module fixture; every test then checks its own run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import TEDBENCH, write_bomb_png

from nonrigid.models.registry import build_tiny_pipeline

ORIGINALS = TEDBENCH / "originals"
IMAGE = ORIGINALS / "cat.jpeg"
JPEG = ORIGINALS / "dog_01.jpeg"

needs_data = pytest.mark.skipif(not IMAGE.is_file() or not JPEG.is_file(), reason="TEdBench originals not present")

# Lines our logger prints at INFO before a late failure; everything else on stderr must be the error itself.
INFO_PREFIXES = ("nonrigid: loading model ",)


# ------------------------------------------------------------------------------------------------ helpers


def cli_env(cache_dir: Path, hf_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",  # no test may reach the network
        HF_HOME=str(hf_home),  # nor find a model someone downloaded on this machine
        NONRIGID_CACHE_DIR=str(cache_dir),
        OMP_NUM_THREADS="1",  # runs go side by side on a small machine
    )
    env.pop("PYTHONWARNINGS", None)
    return env


def run_cli(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nonrigid.cli", "edit", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )


def stderr_lines(stderr: str) -> list[str]:
    """Non-empty lines; a carriage return (a progress bar redrawing itself) also ends a line."""
    return [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()]


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under ``folder`` (hidden ones too) with its bytes; None for a folder."""
    return {
        str(p.relative_to(folder)): (None if p.is_dir() else p.read_bytes())
        for p in sorted(folder.rglob("*"))
    }


def partial_leftovers(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob(".*") if ".partial-" in p.name or ".old-" in p.name]


def assert_one_error_line(proc: subprocess.CompletedProcess, *fragments: str, allow_info: bool = True) -> str:
    """stderr is one ``nonrigid...`` line naming every fragment (after our own INFO lines, if allowed)."""
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = stderr_lines(proc.stderr)
    if allow_info:
        lines = [line for line in lines if not line.startswith(INFO_PREFIXES)]
    assert len(lines) == 1, f"expected one error line on stderr, got {len(lines)}:\n{proc.stderr}"
    line = lines[0]
    assert line.startswith("nonrigid"), line
    assert "error" in line, line
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not named in: {line}"
    return line


# ------------------------------------------------------------------------------------------------ the table


def write_text_as_png(work: Path) -> None:
    (work / "notes.png").write_bytes(b"these are my notes, not a picture\n" * 20)


def write_truncated_jpeg(work: Path) -> None:
    data = JPEG.read_bytes()
    (work / "half.jpeg").write_bytes(data[: len(data) // 2])


def write_bomb(work: Path) -> None:
    write_bomb_png(work / "bomb.png")  # the header claims 20,000 x 20,000 px


def write_pickle_checkpoint(work: Path) -> None:
    (work / "weights.ckpt").write_bytes(b"\x80\x04 any bytes: it must not even be opened")


def write_file_at_out(work: Path) -> None:
    (work / "taken.txt").write_text("not a folder\n")


def write_foreign_folder(work: Path) -> None:
    (work / "mine").mkdir()
    (work / "mine" / "thesis.tex").write_text("\\documentclass{article}\n")
    (work / "mine" / "data").mkdir()
    (work / "mine" / "data" / "table.csv").write_text("a,b\n1,2\n")


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]
    names: tuple[str, ...]  # what the error line must mention
    setup: Callable[[Path], None] | None = None
    exit_code: int = 2


IMG = str(IMAGE)
FAST = ("--steps", "4", "--opt-steps", "2", "--inner-steps", "1", "--eta", "0")

CASES = [
    Case("missing-image", ("missing.png", "a dog"), ("missing.png", "does not exist")),
    Case("not-an-image", ("notes.png", "a dog"), ("notes.png",), setup=write_text_as_png),
    Case("truncated-image", ("half.jpeg", "a dog"), ("half.jpeg",), setup=write_truncated_jpeg),
    Case("decompression-bomb", ("bomb.png", "a dog"), ("bomb.png", "over 10,000 px a side"), setup=write_bomb),
    Case("unknown-model-path", (IMG, "a dog", "--model", "./no/such/model"), ("no/such/model",)),
    Case("unknown-hub-id-offline", (IMG, "a dog", "--model", "someone/not-a-model"), ("someone/not-a-model",)),
    Case("pickle-without-opt-in", (IMG, "a dog", "--model", "weights.ckpt"), ("weights.ckpt", "--allow-pickle"),
         setup=write_pickle_checkpoint),
    Case("eta-above-one", (IMG, "a dog", "--eta", "1.5"), ("--eta", "1.5")),
    Case("eta-negative", (IMG, "a dog", "--eta", "-0.1"), ("--eta", "-0.1")),
    Case("inject-above-one", (IMG, "a dog", "--inject", "2"), ("--inject", "2")),
    Case("steps-zero", (IMG, "a dog", "--steps", "0"), ("--steps", "0")),
    Case("steps-negative", (IMG, "a dog", "--steps", "-3"), ("--steps", "-3")),
    Case("opt-steps-negative", (IMG, "a dog", "--opt-steps", "-1"), ("--opt-steps", "-1")),
    Case("size-zero", (IMG, "a dog", "--size", "0"), ("--size", "0")),
    Case("size-not-a-multiple", (IMG, "a dog", "--model", "tiny", "--size", "70", "--crop", "square", *FAST),
         ("--size", "70")),
    Case("out-is-a-file", (IMG, "a dog", "--out", "taken.txt"), ("taken.txt",), setup=write_file_at_out),
    Case("out-is-a-foreign-folder", (IMG, "a dog", "--out", "mine"), ("mine",), setup=write_foreign_folder),
    Case("unknown-flag", (IMG, "a dog", "--bogus-flag"), ("--bogus-flag",)),
]


@dataclass
class Run:
    proc: subprocess.CompletedProcess
    work: Path
    before: dict[str, bytes | None]


@pytest.fixture(scope="module")
def table_runs(tmp_path_factory) -> dict[str, Run]:
    """Every case of the table run once, a few processes at a time, each in its own working folder."""
    if not IMAGE.is_file() or not JPEG.is_file():
        pytest.skip("TEdBench originals not present")
    jobs = {}
    for case in CASES:
        root = tmp_path_factory.mktemp(case.id)
        work = root / "work"
        work.mkdir()
        if case.setup is not None:
            case.setup(work)
        env = cli_env(root / "cache", root / "hf")
        jobs[case.id] = (work, snapshot(work), env, list(case.args))
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        futures = {name: pool.submit(run_cli, args, work, env) for name, (work, _, env, args) in jobs.items()}
        return {name: Run(futures[name].result(), jobs[name][0], jobs[name][1]) for name in jobs}


@needs_data
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_fails_in_one_line_and_leaves_nothing(case: Case, table_runs):
    run = table_runs[case.id]
    proc = run.proc
    assert proc.returncode == case.exit_code, proc.stderr
    assert proc.stdout == "", proc.stdout
    assert_one_error_line(proc, *case.names)
    # No output folder (default out/<name> or --out), no hidden staging sibling, and what was there is untouched.
    assert snapshot(run.work) == run.before
    assert not partial_leftovers(run.work)


# ------------------------------------------------------------------------------------------------ --debug


def test_debug_shows_the_traceback(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    proc = run_cli(["missing.png", "a dog", "--debug"], work, cli_env(tmp_path / "cache", tmp_path / "hf"))
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr
    assert "UsageError" in proc.stderr and "missing.png" in proc.stderr
    assert list(work.iterdir()) == []


# ------------------------------------------------------------------------------------------------ NaN


@pytest.fixture(scope="module")
def nan_model(tmp_path_factory) -> Path:
    """The tiny pipeline as a diffusers folder, with one UNet weight NaN: every noise prediction is NaN."""
    pipe = build_tiny_pipeline()
    with torch.no_grad():
        pipe.unet.conv_out.bias[0] = float("nan")
    folder = tmp_path_factory.mktemp("nan-model")
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def nan_run(tmp_path_factory, nan_model) -> Run:
    if not IMAGE.is_file():
        pytest.skip("TEdBench originals not present")
    root = tmp_path_factory.mktemp("nan-run")
    work = root / "work"
    work.mkdir()
    args = [IMG, "a dog", "--model", str(nan_model), "--size", "64", *FAST, "--device", "cpu", "--quiet"]
    return Run(run_cli(args, work, cli_env(root / "cache", root / "hf")), work, {})


def test_nan_in_a_stage_names_the_stage_and_suggests_fp32(nan_run):
    proc = nan_run.proc
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in stderr_lines(proc.stderr) if "error" in line.lower()]
    assert len(errors) == 1, proc.stderr
    line = errors[0]
    assert line.startswith("nonrigid: error:"), line
    assert "text optimization" in line and "NaN" in line and "--dtype fp32" in line, line
    assert stderr_lines(proc.stderr)[-1] == line
    assert list(nan_run.work.iterdir()) == []  # neither out/ nor a staging folder


def test_quiet_failure_prints_only_the_error_line(nan_run):
    assert_one_error_line(nan_run.proc, "--dtype fp32", allow_info=False)


MINI_CASES = {
    "judge-steps-zero": (("mini", "judge", "--steps", "0"), ("--steps", "0")),
    "evaluate-unknown-baseline": (("mini", "evaluate", "--data", "nowhere", "--baselines", "foo"),
                                  ("--baselines", "foo")),
    "evaluate-seeds-zero": (("mini", "evaluate", "--data", "nowhere", "--seeds", "0"), ("--seeds", "0")),
    "evaluate-ablation-eta-not-swept": (("mini", "evaluate", "--data", "nowhere", "--ablation-etas", "0.3"),
                                        ("ablation etas", "0.3")),
    "evaluate-eta-out-of-range": (("mini", "evaluate", "--data", "nowhere", "--etas", "0,1.5"), ("etas", "1.5")),
    "evaluate-report-only-without-docs": (("mini", "evaluate", "--data", "nowhere", "--report-only"),
                                          ("--report-only", "--docs")),
    "train-steps-zero": (("mini", "train", "--unet-steps", "0"), ("--unet-steps", "0")),
    "train-gamma-nan": (("mini", "train", "--snr-gamma", "nan"), ("--snr-gamma", "nan")),
    "train-batch-negative": (("mini", "train", "--unet-batch", "-4"), ("--unet-batch", "-4")),
}


@pytest.fixture(scope="module")
def mini_runs(tmp_path_factory) -> dict[str, Run]:
    """Every ``nonrigid mini`` case run once, a few processes at a time, each in its own empty working folder."""
    jobs = {}
    for name, (args, _) in MINI_CASES.items():
        root = tmp_path_factory.mktemp(name)
        work = root / "work"
        work.mkdir()
        jobs[name] = (work, [sys.executable, "-m", "nonrigid.cli", *args], cli_env(root / "cache", root / "hf"))

    def run(work: Path, command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
        return subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=300, env=env)

    with ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1))) as pool:
        futures = {name: pool.submit(run, *job) for name, job in jobs.items()}
        return {name: Run(futures[name].result(), jobs[name][0], {}) for name in jobs}


@pytest.mark.parametrize("name", list(MINI_CASES))
def test_mini_commands_fail_in_one_line(name, mini_runs):
    run = mini_runs[name]
    assert run.proc.returncode == 2, run.proc.stderr
    assert_one_error_line(run.proc, *MINI_CASES[name][1])
    assert list(run.work.iterdir()) == [], "nothing written"


# ------------------------------------------------------------------------------------------------ model names


@pytest.mark.parametrize("command", [
    ("edit", str(IMAGE), "a dog"),
    ("bench", "--data", str(TEDBENCH), "--out", "run"),
    ("ui",),
])
def test_a_mistyped_model_name_is_told_with_the_closest_built_in_before_torch_is_imported(command, tmp_path):
    script = ("import sys; from nonrigid.cli import main; code = main(sys.argv[1:]); "
              "print('torch imported' if 'torch' in sys.modules else 'torch not imported'); sys.exit(code)")
    proc = subprocess.run([sys.executable, "-c", script, *command, "--model", "mini-xll"], cwd=tmp_path,
                          env=cli_env(tmp_path / "cache", tmp_path / "hf"), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    line = assert_one_error_line(proc, "mini-xll", "did you mean mini-xl?", "built in: mini, mini-v, mini-xl")
    assert "tiny-flux-schnell" in line  # every built-in name is listed
    assert proc.stdout.strip() == "torch not imported"
    assert list(tmp_path.iterdir()) == []


def test_a_hub_id_with_the_hub_unreachable_is_one_line_that_says_so(tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on: every connection is refused at once
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    env = {**cli_env(tmp_path / "cache", tmp_path / "hf"), "HF_ENDPOINT": closed}
    env.pop("HF_HUB_OFFLINE")
    work = tmp_path / "work"
    work.mkdir()
    proc = run_cli([str(IMAGE), "a dog", "--model", "someone/not-a-model"], work, env)
    assert proc.returncode == 2, proc.stderr
    assert "Retrying" not in proc.stderr  # huggingface_hub's retries (23 s) are never reached
    assert_one_error_line(proc, f"the Hugging Face hub ({closed}) cannot be reached to download model "
                          "someone/not-a-model", "local diffusers folder", "HF_HUB_OFFLINE=1")
    assert list(work.iterdir()) == []
