"""The README's figures, measured on this machine and written into README.md's marked blocks.

    python benchmarks/readme_figures.py               # measure everything, rewrite README.md's blocks
    python benchmarks/readme_figures.py --browser     # also time slider moves in Chromium (another edit)
    python benchmarks/readme_figures.py --no-write    # print the blocks only

What it measures, each the way a new user meets it:

- the offline quick start: the README's two commands (``nonrigid mini dataset ...`` and ``nonrigid edit ...
  --model mini ...``) run as written, in an empty folder with an empty stage cache (a first run: every stage is
  computed), with this interpreter's ``nonrigid`` (``python -m nonrigid.cli``) and torch's default threads; then
  the edit again, fresh, with ``OMP_NUM_THREADS=1`` (on cores busy with other work, a process's threads wait on
  each other: one thread can be several times faster);
- the page: ``bench_ui.measure`` (the page served in this process and driven through its API, as a browser
  drives it): Edit to grid with the paper's defaults on the miniature model, then slider moves; with
  ``--browser`` also ``bench_ui.browser`` (slider moves timed in Chromium, from the mouse release);
- the test suite's size: the tests pytest collects (collected, not run: the suite takes 15 minutes and more).

Figures depend on the machine and on what else runs on it, so each block names the CPU, its cores and the load
average when the script started, before it ran anything (other processes' work: a load of 1 on 2 cores is one
core busy elsewhere). The blocks are rewritten whole by ``docblocks.replace_block``, as ``bench_edit.py`` writes
docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from docblocks import replace_block  # noqa: E402

README = ROOT / "README.md"
SCRIPT = "benchmarks/readme_figures.py"
WIDTH = 116  # the README's line length
# the offline quick start, exactly as the README gives it (after `nonrigid`)
DATASET = ["mini", "dataset", "--out", "mini-data", "--count", "4"]
EDIT = ["edit", "mini-data/originals/scene_003.png", "a photo of a red dog jumping on dirt", "--model", "mini",
        "--eta", "0", "0.2", "0.4", "0.6", "0.8", "1", "--out", "out/mini-jump"]


# --------------------------------------------------------------------------------------------------- the machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(load: float) -> str:
    """``2 CPU cores (AMD EPYC) shared with other work (load average 1.1 before the run)``."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    other = "with nothing else running" if load < 0.5 else "shared with other work"
    return f"{cores} CPU cores ({cpu_model()}) {other} (load average {load:.1f} before the run)"


# --------------------------------------------------------------------------------------------------- measurements


def nonrigid(args: list[str], cwd: Path, env: dict[str, str]) -> float:
    """Seconds one ``nonrigid`` command takes, run as a user runs it (a fresh process)."""
    tick = time.perf_counter()
    subprocess.run([sys.executable, "-m", "nonrigid.cli", *args], cwd=cwd, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - tick


def quick_start() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # the commands as written
        env["NONRIGID_CACHE_DIR"] = str(Path(tmp) / "cache")  # a first run: nothing cached
        work = Path(tmp) / "work"
        work.mkdir()
        found = {"dataset": nonrigid(DATASET, work, env), "edit": nonrigid(EDIT, work, env)}
        env.update(OMP_NUM_THREADS="1", NONRIGID_CACHE_DIR=str(Path(tmp) / "cache-one-thread"))
        found["edit_one_thread"] = nonrigid([*EDIT[:-1], "out/mini-jump-one-thread"], work, env)
        return found


def page(browser: bool) -> dict:
    import bench_ui
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        result = {"threads": torch.get_num_threads(), **bench_ui.measure("mini", Path(tmp) / "api")}
        if browser:
            result["browser"] = bench_ui.browser("mini", Path(tmp) / "browser", None)
    return result


def test_count() -> int:
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    return int(re.search(r"(\d+) tests? collected", out)[1])


# --------------------------------------------------------------------------------------------------- the blocks


def spread(values: list[float], digits: int = 1) -> str:
    low, high = min(values), max(values)
    return f"{low:.{digits}f} s" if f"{low:.{digits}f}" == f"{high:.{digits}f}" else \
        f"{low:.{digits}f}–{high:.{digits}f} s"


def quick_start_block(q: dict, load: float, day: str) -> str:
    return (f"Measured by `{SCRIPT}` on {day}, on {machine(load)}: the edit took **{q['edit']:.0f} s** as written "
            f"and **{q['edit_one_thread']:.0f} s** with `OMP_NUM_THREADS=1` in front of it, the dataset "
            f"{q['dataset']:.0f} s; each edit a first run, with an empty stage cache (a rerun reads stages A and B "
            "from the cache). On cores busy with other work the threads of one process wait on each other: there, "
            "give `nonrigid` one thread.")


def page_block(p: dict, load: float, day: str) -> str:
    moves = p["moves"]
    over = [m["server_seconds"] / m["unet_seconds"] - 1 for m in moves]
    calls = [m["unet_calls"] for m in moves]
    text = (f"Measured by `{SCRIPT}` on {day} (the page served by `benchmarks/bench_ui.py` and driven through its "
            f"API, as a browser drives it), on {machine(load)}, {p['threads']} torch threads, the miniature "
            "model with the paper's defaults (200 text-optimization steps, null-text inversion 50 x 10, six "
            f"etas): **Edit to grid {p['edit_seconds']:.0f} s**; "
            f"**a slider move {spread([m['seconds'] for m in moves])}** for {min(calls)}–{max(calls)} of the 50 "
            "UNet calls. "
            f"Inside the server a move is {min(over):.0%}–{max(over):.0%} over the UNet time of its steps (median "
            f"{statistics.median(over):.0%}; the target is 10%).")
    if "browser" in p:
        seen = [m["seconds"] / m["unet_seconds"] - 1 for m in p["browser"]]
        text += (f" Seen from the page, from the mouse release in Chromium to the new picture, a move is "
                 f"{min(seen):.0%}–{max(seen):.0%} over (median {statistics.median(seen):.0%}): the rest is the "
                 "queue, the HTTP round trips and the download, which weigh more beside the miniature UNet than "
                 "they would beside a full-size one.")
    return text


def tests_block(count: int, day: str) -> str:
    return f"It holds **{count} tests** (collected by pytest, counted by `{SCRIPT}` on {day})."


# --------------------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--browser", action="store_true", help="also time slider moves in Chromium")
    parser.add_argument("--no-write", dest="write", action="store_false", help="print the blocks, leave README.md")
    args = parser.parse_args()
    day = time.strftime("%Y-%m-%d")
    load = os.getloadavg()[0]  # before this script runs anything: other processes' work
    blocks = {"figures:quick-start": quick_start_block(quick_start(), load, day),
              "figures:page": page_block(page(args.browser), load, day),
              "figures:tests": tests_block(test_count(), day)}
    text = README.read_text()
    for key, block in blocks.items():
        block = textwrap.fill(block, WIDTH, break_on_hyphens=False)
        print(f"{key}:\n{block}\n")
        text = replace_block(text, key, block)
    if args.write:
        README.write_text(text)
        print(f"written into {README}")


if __name__ == "__main__":
    main()
