"""Every CUDA block of docs/PERFORMANCE.md in one call of at most 10 minutes on a lent GPU.

A lent device gives a session 15 minutes in all, starting and stopping included, so everything it should measure
is one prepared command (``bash benchmarks/gpu_all.sh``) tried first on the CPU (``--dry-run``: the same code
paths with tiny models, measuring nothing). It runs ``bench_edit.py``'s CUDA configurations one after the other,
each in its own process (its own CUDA context, so each peak is its own), in the order the issues need them, each
with at most its share of the time that is left. ``bench_edit.py`` saves its sections as they finish, so a
configuration stopped at its limit still leaves its finished rows, marked partial; the page's blocks are rewritten
after every configuration.

- ``cuda`` (SD 1.x architecture at 512 px): the default edit (the first-edit issue's 10 s), ``--fast`` (3 s), CUDA
  graphs, low-memory peak, and the straightforward procedure for comparison.
- ``sdxl`` (1024 px): default (25 s) and ``--fast`` (8 s), low-memory peak.
- ``sd3`` (SD3 medium architecture, 1024 px): default (20 s).
- ``flux`` (FLUX.1-dev architecture, 1024 px) with ``--quick``: the default edit's shapes with a few steps, for the
  peaks (the 24 GB low-memory target), not its time.

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

# (configuration, its flags, the most seconds it may take), in the order the issues need them
PLAN: list[tuple[str, list[str], int]] = [
    ("cuda", ["--fast", "--cuda-graphs"], 190),
    ("sdxl", ["--fast"], 180),
    ("sd3", [], 110),
    ("flux", ["--quick", "--dtype", "bf16"], 90),
]


def commands(dry_run: bool, results: Path, only: list[str] | None) -> list[tuple[str, list[str], int]]:
    """Each chosen configuration's ``bench_edit.py`` command line and time limit."""
    return [(config, [sys.executable, str(HERE / "bench_edit.py"), "--config", config, *flags,
                      *(["--dry-run"] if dry_run else []), "--results", str(results), "--doc", ""], limit)
            for config, flags, limit in PLAN if only is None or config in only]


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
    started = time.monotonic()
    failed = []
    for config, command, limit in commands(args.dry_run, results, args.only):
        left = args.budget - (time.monotonic() - started)
        if left < 20:
            print(f"gpu_all: no time left for {config}", file=sys.stderr)
            failed.append(config)
            continue
        print(f"gpu_all: {config} (at most {min(limit, left):.0f} s): {' '.join(command[1:])}", file=sys.stderr,
              flush=True)
        try:
            done = subprocess.run(command, timeout=min(limit, left), check=False)
            if done.returncode != 0:
                failed.append(config)
        except subprocess.TimeoutExpired:
            print(f"gpu_all: {config} stopped at its limit; its finished sections are kept", file=sys.stderr)
        bench_edit.update_doc(doc, results)
    print(f"gpu_all: {time.monotonic() - started:.0f} s; blocks written to {doc}", file=sys.stderr)
    if args.dry_run:
        print(doc.read_text())
    if failed:
        print(f"gpu_all: failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
