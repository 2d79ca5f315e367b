"""Every CUDA block of docs/PERFORMANCE.md in one call of at most 10 minutes on a lent GPU.

A lent device gives a session 15 minutes in all, starting and stopping included, so everything it should measure
is one prepared command (``bash benchmarks/gpu_all.sh``) tried first on the CPU (``--dry-run``: the same code
paths with tiny models, measuring nothing). It runs the configurations one after the other, each in its own
process (its own CUDA context, so each peak is its own), in the order the issues need them. Each runs under a
deadline: the sum of its own and its predecessors' limits (never past the budget), so a configuration that
finishes early leaves its unused seconds to the next one, and the last one may use whatever is left of the budget
(with ``--only`` one configuration gets the whole budget). The benchmarks save their sections as they finish, so a
configuration stopped at its deadline still leaves its finished rows, marked partial; the page's blocks are
rewritten after every configuration.

- ``cuda`` (SD 1.x architecture at 512 px, ``bench_edit.py``): the default edit (the first-edit issue's 10 s;
  61 s on the H200 before stage A rode along stage B), one more variant, ``--fast`` (3 s), then low memory; CUDA
  graphs come after those and are reached only with time to spare.
- ``sdxl`` (1024 px): default (25 s) and ``--fast`` (8 s), low-memory peak. Trimmed the most: its default edit
  alone took 187 s on the H200 (on the page already), more than one shared call can give it, so here it keeps
  only its first sections (and whatever ``cuda`` leaves); its ``--fast`` rows need a call of their own
  (``--only sdxl`` gets the whole budget).
- ``sd3`` (SD3 medium architecture, 1024 px): default (20 s; 48 s on the H200).
- ``flux`` (FLUX.1-dev architecture, 1024 px) with ``--quick``: the default edit's shapes with a few steps, for the
  peaks (the 24 GB low-memory target), not its time: short and bounded.
- ``editors`` (``bench_editors.py``: FLUX.1 Kontext [dev] and Qwen-Image-Edit-2509 at 1024 px through the
  ``kontext`` and ``qwen-edit`` methods): first and warm edits and peaks, by default and with ``--low-memory``
  (model CPU offload). **Last, by value**: it is the block never measured and the one whose later sections (the
  offloaded Qwen edits, about 58 GB to the GPU and back each) a fixed limit would cut; every configuration before it is
  bounded by its own deadline, so none can take its share, and in last place it also gets every second the
  others leave. ``flux``'s quick peaks, worth less (its target is known to need the transformer offloaded), go
  before it.

The models are the architectures with random weights, built on the device (nothing to download).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOC = HERE.parent / "docs" / "PERFORMANCE.md"
BUDGET_S = 570  # one device call may run 600 s

# (configuration, its flags, its seconds), in the order the issues need them; the seconds add up to BUDGET_S
PLAN: list[tuple[str, list[str], int]] = [
    ("cuda", ["--fast", "--cuda-graphs"], 150),
    ("sdxl", ["--fast"], 80),
    ("sd3", [], 70),
    ("flux", ["--quick", "--dtype", "bf16"], 60),
    ("editors", [], 210),
]
SCRIPTS = {"editors": "bench_editors.py"}  # the others are bench_edit.py --config NAME


def script(config: str) -> list[str]:
    """The benchmark script (and its configuration argument) that measures ``config``."""
    if config in SCRIPTS:
        return [str(HERE / SCRIPTS[config])]
    return [str(HERE / "bench_edit.py"), "--config", config]


def commands(dry_run: bool, results: Path, only: list[str] | None) -> list[tuple[str, list[str], int]]:
    """Each chosen configuration's command line and seconds."""
    return [(config, [sys.executable, *script(config), *flags, *(["--dry-run"] if dry_run else []),
                      "--results", str(results), "--doc", ""], limit)
            for config, flags, limit in PLAN if only is None or config in only]


def deadlines(limits: list[int], budget: int) -> list[int]:
    """Seconds from the start by which each configuration must end: its and its predecessors' limits added up
    (unused seconds pass on), never past ``budget``, and the last one's the budget itself."""
    ends, total = [], 0
    for limit in limits:
        total += limit
        ends.append(min(total, budget))
    return [*ends[:-1], budget] if ends else []


def update_pages(doc: Path, results: Path) -> None:
    """Every benchmark's blocks of ``doc`` rewritten from ``results``."""
    import bench_edit
    import bench_editors

    bench_edit.update_doc(doc, results)
    bench_editors.update_doc(doc, results)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true",
                   help="the same configurations on the CPU with tiny models (checks the script, measures nothing); "
                   "the blocks go to a copy of the page, printed at the end")
    p.add_argument("--only", action="append", choices=[c for c, _, _ in PLAN], default=None,
                   help="run only this configuration (repeatable)")
    p.add_argument("--budget", type=int, default=BUDGET_S, help=f"seconds for everything (default {BUDGET_S})")
    p.add_argument("--results", type=Path, default=None,
                   help="folder for the runs' JSON (default: benchmarks/results, or a temporary one with --dry-run)")
    args = p.parse_args(argv)
    sys.path.insert(0, str(HERE))
    import bench_edit

    scratch = Path(tempfile.mkdtemp(prefix="gpu_all-")) if args.dry_run else None
    results = args.results or (scratch / "results" if scratch else bench_edit.RESULTS)
    results.mkdir(parents=True, exist_ok=True)
    doc = scratch / "PERFORMANCE.md" if scratch else DOC
    if scratch:
        shutil.copy(DOC, doc)
    planned = commands(args.dry_run, results, args.only)
    started = time.monotonic()
    failed = []
    for (config, command, _), deadline in zip(planned, deadlines([c[2] for c in planned], args.budget),
                                              strict=True):
        allowed = deadline - (time.monotonic() - started)
        if allowed < 20:
            print(f"gpu_all: no time left for {config}", file=sys.stderr)
            failed.append(config)
            continue
        print(f"gpu_all: {config} (at most {allowed:.0f} s): {' '.join(command[1:])}", file=sys.stderr, flush=True)
        try:
            done = subprocess.run(command, timeout=allowed, check=False)
            if done.returncode != 0:
                failed.append(config)
        except subprocess.TimeoutExpired:
            print(f"gpu_all: {config} stopped at its deadline; its finished sections are kept", file=sys.stderr)
        update_pages(doc, results)
    print(f"gpu_all: {time.monotonic() - started:.0f} s; blocks written to {doc}", file=sys.stderr)
    if args.dry_run:
        print(doc.read_text())
    if failed:
        print(f"gpu_all: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
