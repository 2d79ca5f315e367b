"""How ``nonrigid bench`` runs in this process: each method's model (``--model``, or its own with
``--method-model``) loaded once and let go before the next, the metrics loaded once, the stages' chatter held back
while the progress bar runs; and the metrics' identity a run folder keeps (also ``nonrigid score``'s).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import UsageError
from ..evaluation.protocol import DEFAULT_CLIP, DEFAULT_DINO
from .common import say

logger = logging.getLogger("nonrigid")


def read_method_models(args: argparse.Namespace, methods: list[str]) -> dict[str, str]:
    """``--method-model METHOD=MODEL`` as {method: model}, each method one of the run's, each model's name and
    source checked (torch-free); every method's model must suit it as a source (a Qwen-Image-Edit single file is
    refused, a Kontext file needs --config) before anything loads."""
    from ..methods.base import parse_key_values
    from ..methods.catalogue import method_info
    from ..models import check_model_name

    if args.method_model and args.ray:
        raise UsageError("--method-model loads one model after another in this process; with --ray each worker "
                         "loads --model alone: leave one of them out")
    given: dict[str, str] = {}
    for method, model in parse_key_values(args.method_model, "--method-model"):
        method = method.replace("_", "-")
        if method not in methods:
            raise UsageError(f"--method-model {method}: {method} is not among the run's methods "
                             f"({', '.join(methods)})")
        check_model_name(model)
        given[method] = model
    for method in methods:
        method_info(method).check_model_source(given.get(method, args.model), args.config)
    return given


def run_serially(args: argparse.Namespace, spec, run, piebench: bool = False):
    """The pending jobs model by model (``--model``, then each ``--method-model``): each model is loaded once,
    runs its methods' jobs, and is let go before the next one loads; the metrics are loaded once."""
    from ..evaluation.bench import BenchStats, pending_jobs, run_benchmark
    from ..methods.catalogue import method_info, methods_for

    metrics = load_metrics_for(args, run, piebench)
    stats = BenchStats()
    by_model: dict[str, set[str]] = {}
    for job in pending_jobs(spec, run):
        by_model.setdefault(spec.model_for(job.method), set()).add(job.method)
    fingerprints: dict[str, str] = {}
    for name, methods in by_model.items():
        model = load_model_for(args, run, name, fingerprints, methods)
        for method in sorted(methods):  # a method this model cannot run: one line before any of its jobs
            method_info(method).check_family(model, methods_for(model))
        with only_warnings(args.debug):
            done = run_benchmark(spec, run, model, metrics, progress=not args.quiet,
                                 pairs_per_batch=args.pairs_per_batch, methods=methods)
        stats.ran, stats.edits = stats.ran + done.ran, stats.edits + done.edits
        del model
        _free_memory()
    return stats


def load_model_for(args: argparse.Namespace, run, name: str, fingerprints: dict[str, str], methods: set[str]):
    """Model ``name`` (the run's flags otherwise), its fingerprint recorded in the run's ``meta`` for its
    methods (``model_fingerprint`` for --model's, ``model_fingerprints`` by method for every model)."""
    from ..models.fingerprint import model_fingerprint
    from ..models.loading import describe_device
    from .common import load_model

    model = load_model(argparse.Namespace(**{**vars(args), "model": name}))
    fingerprint = model_fingerprint(model)
    fingerprints.update(dict.fromkeys(sorted(methods), fingerprint))
    main = {"model_fingerprint": fingerprint, **describe_device(model)} if name == args.model else {}
    run.set_meta(**main, **({"model_fingerprints": dict(fingerprints)} if args.method_model else {}))
    return model


def load_metrics_for(args: argparse.Namespace, run, piebench: bool = False):
    """The metrics on the device the models run on, recorded in the run's ``meta``."""
    from ..models.loading import resolve_device
    from .common import quiet_libraries

    quiet_libraries(args.quiet)
    metrics = load_metrics_on(args, resolve_device(args.device), piebench)
    run.set_meta(metrics=describe_metrics(metrics), cache_dir=str(run.cache.root))
    return metrics


def _free_memory() -> None:
    """Give a model's memory back before the next one loads (its GPU memory too)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def metric_options(args: argparse.Namespace, piebench: bool = False) -> dict[str, str | None]:
    """The metrics' identity in run.json: a run is only continued with the same networks (PIE-Bench's only in
    PIE-Bench runs, so that older TEdBench runs keep their identity)."""
    if args.metrics == "tiny":
        return {"kind": "tiny"}

    def path(p: Path | None) -> str | None:
        if p is None:
            return None
        if not p.is_file():
            raise UsageError(f"{p} does not exist")
        return str(p.resolve())

    options = {"kind": "default", "clip_model": args.clip_model or DEFAULT_CLIP,
               "lpips_weights": path(args.lpips_weights), "vgg_weights": path(args.vgg_weights),
               "aesthetic_head": path(args.aesthetic_head)}
    if piebench:
        options |= {"dino_model": getattr(args, "dino_model", None) or DEFAULT_DINO,
                    "squeezenet_weights": path(getattr(args, "squeezenet_weights", None))}
    return options


def describe_metrics(metrics) -> dict:
    describe = getattr(metrics, "describe", None)
    return describe() if callable(describe) else {}


def load_metrics_on(args: argparse.Namespace, device, piebench: bool = False):
    from ..evaluation.bench import load_metrics

    say(args, "loading metrics" + (" (tiny random backbones: numbers are meaningless)" if args.metrics == "tiny"
                                    else ""))
    options = metric_options(args, piebench)
    return load_metrics(args.metrics, clip_model=args.clip_model, lpips_weights=options.get("lpips_weights"),
                        vgg_weights=options.get("vgg_weights"), aesthetic_head=options.get("aesthetic_head"),
                        device=device, piebench=piebench, dino_model=options.get("dino_model"),
                        squeezenet_weights=options.get("squeezenet_weights"))


@contextmanager
def only_warnings(debug: bool) -> Iterator[None]:
    """The stages' per-job messages ("reusing cached ...") would scroll the progress bar away: warnings only."""
    previous = logger.level
    if not debug:
        logger.setLevel(max(previous, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(previous)
