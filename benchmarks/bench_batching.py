"""Batching across pairs: seconds per pair of the paper's method (or a baseline) on the miniature model at 1, 4 and
8 pairs per model batch, and how far each batched pair's images are from its run alone.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_batching.py --pairs 8 --batches 1,4,8
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/bench_batching.py --method dds --pairs 10 --batches 1,10

A baseline runs with the miniature evaluation's settings (``nonrigid.mini.protocol.BASELINES``, its full step
counts), through ``run_edits`` as the evaluation calls it.

The pairs are the miniature world's benchmark pairs (``write_dataset``, seed 0); every setting is the miniature
evaluation's ``ours`` (NTI without a source prompt, injection 20%, six etas, seed 0) with fewer steps by default
so that three passes over 8 pairs fit in minutes on one core. No stage cache: every pass computes every stage.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nonrigid.methods.run import EditRequest, run_edits
from nonrigid.mini.dataset import read_dataset, write_dataset
from nonrigid.mini.protocol import ETAS
from nonrigid.models.loading import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--batches", default="1,4,8", help="pairs per batch to time, comma-separated")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps (the evaluation: 50)")
    parser.add_argument("--opt-steps", type=int, default=50, help="text optimization steps (the evaluation: 200)")
    parser.add_argument("--inner-steps", type=int, default=10, help="NTI inner steps (the paper: 10)")
    parser.add_argument("--method", default="ours", help="ours, or a baseline that batches across pairs "
                        "(dds, edit-friendly) with the miniature evaluation's settings")
    args = parser.parse_args()
    if args.method != "ours":
        return bench_baseline(args)

    model = load_model("mini", device="cpu", dtype="fp32")
    with tempfile.TemporaryDirectory() as folder:
        write_dataset(Path(folder), count=args.pairs)
        pairs = read_dataset(Path(folder))[: args.pairs]
        requests = [EditRequest(Image.open(p.image).convert("RGB"), p.target_text) for p in pairs]
    settings = {"etas": ETAS, "inject": (0.2,), "num_steps": args.steps, "opt_steps": args.opt_steps,
                "inner_steps": args.inner_steps}
    run_edits(model, requests[:1], "ours", {**settings, "num_steps": 2, "opt_steps": 2}, size=64)  # warm up

    print(f"torch threads: {torch.get_num_threads()}; {args.pairs} pairs, {args.steps} DDIM steps, "
          f"{args.opt_steps} text-optimization steps, {args.inner_steps} NTI inner steps, {len(ETAS)} etas\n")
    time_batches(lambda chunk: run_edits(model, [requests[i] for i in chunk], "ours", settings, size=64),
                 len(requests), args.batches)


def bench_baseline(args: argparse.Namespace) -> None:
    """The baseline's rows of the table, run as the miniature evaluation runs it (seed 0, source captions)."""
    from nonrigid.methods.catalogue import method_info
    from nonrigid.mini.protocol import BASELINES

    if not method_info(args.method).batches_images:
        raise SystemExit(f"{args.method} does not batch across pairs")
    model = load_model("mini", device="cpu", dtype="fp32")
    with tempfile.TemporaryDirectory() as folder:
        write_dataset(Path(folder), count=args.pairs)
        pairs = read_dataset(Path(folder))[: args.pairs]
        requests = [EditRequest(Image.open(p.image).convert("RGB"), p.target_text, p.source_text) for p in pairs]
    params = BASELINES[args.method]
    print(f"torch threads: {torch.get_num_threads()}; {args.pairs} pairs, {args.method} {params}\n")
    time_batches(lambda chunk: run_edits(model, [requests[i] for i in chunk], args.method, params, size=64),
                 len(requests), args.batches)


def time_batches(run_chunk, count: int, batches: str) -> None:
    """Print the table: ``run_chunk(indices)`` (results with ``variants``) over ``count`` pairs, that many at a
    time for each of the comma-separated ``batches``, timed; images compared with the first batch size's."""
    print("| pairs per batch | seconds | seconds per pair | speed-up | max pixel difference to batch 1 |")
    print("| --- | --- | --- | --- | --- |")
    reference, base = None, None
    for size in (int(b) for b in batches.split(",")):
        tick = time.perf_counter()
        results = []
        for start in range(0, count, size):
            results += run_chunk(list(range(start, min(start + size, count))))
        seconds = time.perf_counter() - tick
        pixels = [np.asarray(v.image, dtype=int) for r in results for v in r.variants]
        reference = pixels if reference is None else reference
        base = seconds if base is None else base
        diff = max(int(np.abs(a - b).max()) for a, b in zip(pixels, reference, strict=True))
        print(f"| {size} | {seconds:.1f} | {seconds / count:.2f} | {base / seconds:.2f}x | {diff} |", flush=True)

if __name__ == "__main__":
    main()
