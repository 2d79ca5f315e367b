"""The evaluation commands: ``nonrigid bench``, ``nonrigid score`` and ``nonrigid report``.

Same conventions as the other commands (:mod:`.common`): one-line errors (:class:`~nonrigid.errors.UsageError`),
arguments validated before torch is imported, ``--quiet`` and ``--debug`` on every command, progress bars on stderr
and the output folder as the only line on stdout.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..errors import UsageError
from ..evaluation.protocol import DEFAULT_CLIP, DEFAULT_DINO, PROTOCOL_SIZES
from ..methods.catalogue import METHODS, fast_summary
from .bench_run import (
    describe_metrics,
    load_metrics_on,
    metric_options,
    only_warnings,
    read_method_models,
    run_serially,
)
from .common import (
    PARAM_FLAGS,
    HelpFormatter,
    add_knob_flags,
    add_model_flags,
    add_output_flags,
    add_runtime_flags,
    effective_batch_size,
    say,
)

logger = logging.getLogger("nonrigid")

DEFAULT_METHOD = "ours"


def add_bench_parsers(commands) -> None:
    """Add ``bench``, ``score`` and ``report`` to the ``nonrigid`` subcommands."""
    add_bench_parser(commands)
    add_score_parser(commands)
    add_report_parser(commands)


def add_bench_parser(commands) -> None:
    from ..evaluation.plan import PRESETS

    presets = "; ".join(f"{name}: {p.summary}" for name, p in PRESETS.items())
    p = commands.add_parser(
        "bench", help="run methods over TEdBench or PIE-Bench (or any folder in their layouts) and score every edit",
        description="Run every (pair, seed, setting) of DATA (TEdBench's input_list.json + originals/, or PIE-Bench's "
        "mapping_file.json + annotation_images/) with each --method, save every edited image and store one row per "
        "edit (pair, method, seed, every parameter, CLIP-T, LPIPS, aesthetic score, timings, image path; on "
        "PIE-Bench also its structure distance, unedited-region PSNR, LPIPS, MSE and SSIM, and CLIP scores of the "
        "whole edit and its edited region) in OUT/results.sqlite. Resumable: after an interruption (even a "
        "kill) run the same command again and it continues where it stopped, redoing no finished job; a different "
        "command on an existing OUT is refused. A method's own sweep parameters (ours: eta, inject) run in one job "
        "per pair and share its stages; sweeping any other parameter multiplies the jobs.",
        epilog=f"presets: {presets}",
        formatter_class=HelpFormatter,
    )
    data = p.add_argument_group("data", "the benchmark and its pairs")
    data.add_argument("--data", type=Path, required=True, help="TEdBench-layout folder (input_list.json, originals/) "
                      "or PIE-Bench's (mapping_file.json, annotation_images/)")
    data.add_argument("--pairs", default=None, metavar="LIST",
                      help="only these pairs: indices into input_list.json or mapping_file.json (0-based), ranges "
                      "3-7, image names or stems (PIE-Bench: ids)")
    data.add_argument("--limit", type=int, default=None, help="only the first N (selected) pairs")
    data.add_argument("--types", default=None, metavar="LIST",
                      help="PIE-Bench only: editing types by id (5: change pose), range (4-7) or name (pose, color, "
                      "attribute = 4-7, ...), comma-separated; default: all ten")
    data.add_argument("--masks", default=None, metavar="FOLDER|piebench",
                      help="edit only inside a mask per pair (for the methods that take one): a folder of masks named "
                      "like the images (<image stem>.png; white: may change), or piebench for PIE-Bench's own "
                      "edited-region masks; default: none, the whole picture")
    data.add_argument("--sources", type=Path, default=None,
                      help="JSON object image name -> caption, the source prompt of settings with source=pair (e.g. "
                      "the inversion preset's NTI-src); default: the source_text of input_list.json's entries, else "
                      "one made from the file name")
    methods = p.add_argument_group("methods", "what runs on every pair")
    methods.add_argument("--method", action="append", choices=list(METHODS), default=None,
                         help="method to run; repeatable (default: ours); `nonrigid methods` lists their parameters")
    methods.add_argument("--preset", choices=list(PRESETS), default=None,
                         help="a paper ablation (Sec. 5.4) with the method ours: inversion type or injection ratio")
    methods.add_argument("--fast", action="store_true",
                         help=f"ours' fast preset ({fast_summary()}) where --set and --sweep leave its values")
    methods.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 per edit (the paper: 5); deterministic "
                         "methods run once")
    methods.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                         help="values of a parameter, by name or label (eta, inject, opt_steps, ...), applied to every "
                         "method that has it (or METHOD.KEY); source=none,pair sweeps the source prompt; repeatable")
    methods.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                         help="fix a parameter of every method that has it, e.g. --set opt_steps=100; source=pair uses "
                         "each pair's caption as the source prompt (default: empty, the paper's choice); repeatable")
    knobs = p.add_argument_group("knobs", "as in `nonrigid edit`; each sets that parameter of every method "
                                 "that has it, like --set")
    add_knob_flags(knobs)
    model = p.add_argument_group("model and runtime")
    add_model_flags(model)
    model.add_argument("--method-model", action="append", default=[], metavar="METHOD=MODEL",
                       help="run METHOD on its own model (the instruction editors: kontext=black-forest-labs/"
                       "FLUX.1-Kontext-dev, qwen-edit=Qwen/Qwen-Image-Edit-2509), the others on --model; repeatable. "
                       "Each model is loaded once, its methods' jobs run, and it is let go before the next loads")
    model.add_argument("--size", type=int, default=None,
                       help="working resolution in pixels (default: as in `nonrigid edit`, the model's native size: "
                       "512 for SD 1.x, 768 for SD 2.x v models, 1024 for SDXL, 64 for the miniature models; on "
                       "PIE-Bench 512, its protocol's)")
    model.add_argument("--crop", choices=("square", "none"), default="square",
                       help="square: center-crop every input to a square, the benchmarks' protocol; none: the whole "
                       "picture at its own aspect ratio")
    model.add_argument("--batch-size", type=int, default=None,
                       help="most variants per UNet batch (default: all of a job at once)")
    add_runtime_flags(model)
    metrics = p.add_argument_group("metrics", "the networks every edit is scored with")
    add_metric_flags(metrics)
    output = p.add_argument_group("output", "the run folder")
    output.add_argument("--out", type=Path, required=True, help="run folder (created, or resumed if it exists)")
    output.add_argument("--cache-dir", type=Path, default=None,
                        help="stage cache folder of the run (default: OUT/cache); a resumed run only reads the entries "
                        "its own finished jobs wrote there")
    output.add_argument("--dry-run", action="store_true", help="list what would run (jobs, edits, done) and stop")
    add_output_flags(output)
    scale = p.add_argument_group("scale-out", "several pairs per batch, or Ray workers")
    scale.add_argument("--pairs-per-batch", type=int, default=1, metavar="N",
                       help="run N pairs' jobs of a method that batches across images (ours, dds, edit-friendly) as "
                       "one UNet batch, same setting; results equal to one pair at a time up to float rounding")
    scale.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                       help="run the jobs on Ray workers, one per GPU (or per --ray-cpus cores without GPUs), each "
                       "loading the model once; alone: a local Ray instance; 'auto' or an address: join that cluster "
                       "(needs pip install 'nonrigid[ray]'). Rows and images are a serial run's")
    scale.add_argument("--ray-cpus", type=int, default=1, metavar="N",
                       help="cores per Ray worker on a cluster without GPUs")
    p.set_defaults(func=run_bench)


def add_score_parser(commands) -> None:
    p = commands.add_parser(
        "score", help="score a folder of edits made elsewhere, for the same plots",
        description="Score FOLDER's images, named <image name>-<target text>.png like TEdBench's published Imagic "
        "results (case, spaces, underscores and punctuation do not matter; a trailing _N is a seed), against "
        "DATA's originals. Both are center-cropped and resized to --size as the editor does. Rows go into "
        "OUT/results.sqlite like `nonrigid bench` rows; files that match no pair are listed as warnings.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("folder", type=Path, help="folder of edited images")
    p.add_argument("--data", type=Path, required=True, help="TEdBench-layout folder the edits were made from")
    p.add_argument("--method-name", default=None, help="method name in tables and plots (default: FOLDER's name)")
    p.add_argument("--out", type=Path, default=None, help="run folder (default: runs/<method name>)")
    p.add_argument("--size", type=int, default=512, help="resolution both images are scored at")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    add_metric_flags(p)
    add_output_flags(p)
    p.set_defaults(func=run_score)


def add_report_parser(commands) -> None:
    from ..evaluation.tables import BINNINGS

    p = commands.add_parser(
        "report", help="plots, tables and an HTML gallery from benchmark runs",
        description="Write to --out: Figure 6 (CLIP-T and aesthetic score per LPIPS bin, one line per method, "
        "standard-error bars; PNG and SVG), summary.csv/.md (mean and standard error of every metric and wall time "
        "per edit, per method and setting), an ablation plot per preset run, and gallery.html (each pair's input "
        "beside every method's edit at matched LPIPS), which opens in a browser without a server.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run folders of `nonrigid bench` or `score`")
    p.add_argument("--out", type=Path, default=Path("report"), help="report folder")
    p.add_argument("--bins", type=int, default=8, help="LPIPS bins of Figure 6")
    p.add_argument("--binning", choices=BINNINGS, default="fixed",
                   help="fixed: equal-width bins over the LPIPS range; quantile: equally many edits per bin")
    p.add_argument("--min-per-bin", type=int, default=2, help="leave out bins with fewer edits of a method")
    p.add_argument("--gallery-lpips", type=float, nargs="+", default=None, metavar="LPIPS",
                   help="LPIPS levels the gallery matches edits at (default: the median LPIPS of all edits)")
    add_output_flags(p)
    p.set_defaults(func=run_report)


def add_metric_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--clip-model", default=None,
                   help=f"CLIP for CLIP-T and the aesthetic score: hub id or local folder (default: {DEFAULT_CLIP})")
    p.add_argument("--lpips-weights", type=Path, default=None,
                   help="local LPIPS v0.1 linear-layer weights, vgg.pth (default: the copy inside the lpips "
                   "package)")
    p.add_argument("--vgg-weights", type=Path, default=None,
                   help="local torchvision VGG16 weights for LPIPS (default: the torch hub cache)")
    p.add_argument("--aesthetic-head", type=Path, default=None,
                   help="LAION aesthetic predictor head, e.g. sac+logos+ava1-l14-linearMSE.pth (default: the "
                   "metrics module's own)")
    p.add_argument("--dino-model", default=None,
                   help=f"PIE-Bench's structure distance: DINO ViT-B/8, hub id or local folder "
                   f"(default: {DEFAULT_DINO})")
    p.add_argument("--squeezenet-weights", type=Path, default=None,
                   help="PIE-Bench's LPIPS: local torchvision SqueezeNet 1.1 weights (default: the torch hub cache)")
    p.add_argument("--metrics", choices=("default", "tiny"), default="default",
                   help="tiny: random-weight backbones, meaningless numbers, for tests only")


# --------------------------------------------------------------------------------------------------- bench


def run_bench(args: argparse.Namespace) -> int:
    from ..evaluation.bench import pending_jobs
    from ..evaluation.data import select_pairs
    from ..evaluation.piebench import parse_types, read_dataset
    from ..evaluation.plan import PRESETS, BenchSpec, plan_settings, uses_source_captions
    from ..evaluation.runfolder import opened
    from ..models import check_model_name

    if args.preset and args.method:
        raise UsageError(f"--preset {args.preset} runs {PRESETS[args.preset].method} itself; leave out --method")
    check_bench_args(args)
    check_model_name(args.model)  # a mistyped name, told before torch is imported
    check_ray(args)
    methods = [PRESETS[args.preset].method] if args.preset else (args.method or [DEFAULT_METHOD])
    method_models = read_method_models(args, methods)
    settings = plan_settings(methods, args.sweep, with_knobs(args, methods), args.preset, fast=args.fast)
    dataset, pairs = read_dataset(args.data, args.sources, args.types)
    pairs = select_pairs(pairs, args.pairs, args.limit)
    guessed = [p for p in pairs if p.source_origin == "file name"]
    if guessed and uses_source_captions(settings):
        logger.warning(f"warning: {len(guessed)} pairs have no caption for a source prompt; using one made from the "
                       f"file name (e.g. {guessed[0].source_text!r}); give --sources FILE for real captions")
    runtime = {"device": args.device, "dtype": args.dtype, "batch_size": effective_batch_size(args),
               **{k: getattr(args, k) for k in ("low_memory", "compile", "cuda_graphs") if getattr(args, k, False)}}
    size = PROTOCOL_SIZES.get(dataset) if args.size is None else args.size  # None: the model's native size
    spec = BenchSpec(args.data, pairs, settings, tuple(range(args.seeds)), model=args.model, size=size,
                     runtime=runtime, metrics=metric_options(args, dataset == "piebench"), preset=args.preset,
                     dataset=dataset, types=parse_types(args.types) if dataset == "piebench" else (),
                     crop=None if args.crop == "none" else args.crop, masks=args.masks, method_models=method_models)
    jobs = spec.jobs()
    if args.dry_run:
        print(describe_plan(spec, args.out))
        return 0
    with opened(args.out, spec.identity(), ["nonrigid", *sys.argv[1:]], cache_dir=args.cache_dir) as run:
        todo = pending_jobs(spec, run)
        if todo and len(todo) < len(jobs):
            say(args, f"resuming {args.out}: {len(jobs) - len(todo)} of {len(jobs)} jobs already done")
        if todo:
            piebench = dataset == "piebench"
            stats = run_on_ray(args, spec, run, piebench) if args.ray else run_serially(args, spec, run, piebench)
            say(args, f"{stats.edits} edits in {stats.ran} jobs written to {args.out / 'results.sqlite'}")
        else:
            say(args, f"all {len(jobs)} jobs are done")
    print(args.out)
    return 0


def run_on_ray(args: argparse.Namespace, spec, run, piebench: bool = False):
    """The jobs on Ray workers that load the model and metrics themselves, from the same flags."""
    from ..evaluation.distributed import WorkerSetup, connect, run_distributed

    setup = WorkerSetup(args.model, args.device, args.dtype, allow_pickle=args.allow_pickle, config=args.config,
                        low_memory=args.low_memory, compile=args.compile, cuda_graphs=args.cuda_graphs,
                        metrics=metric_options(args, piebench), piebench=piebench)
    where = "starting a local Ray instance" if args.ray == "local" else f"joining the Ray cluster at {args.ray}"
    say(args, f"{where}; each worker loads model {args.model}")
    started = connect(args.ray)
    try:
        with only_warnings(args.debug):
            return run_distributed(spec, run, setup, cpus_per_worker=args.ray_cpus, progress=not args.quiet)
    finally:
        if started:
            import ray

            ray.shutdown()


def check_ray(args: argparse.Namespace) -> None:
    """``--ray`` needs Ray importable, said before anything else runs."""
    if args.ray_cpus < 1:
        raise UsageError(f"--ray-cpus must be >= 1, got {args.ray_cpus}")
    if args.ray and args.pairs_per_batch != 1:
        raise UsageError("--pairs-per-batch batches a serial run's pairs; with --ray each worker runs one job at a "
                         "time: leave one of them out")
    if args.ray:
        try:
            import ray  # noqa: F401
        except ImportError:
            raise UsageError("--ray needs Ray: pip install 'nonrigid[ray]'") from None


def check_bench_args(args: argparse.Namespace) -> None:
    """The numbers of ``nonrigid bench``, checked before anything is read (the library would say the same of its
    parameters, without the flags)."""
    if args.seeds < 1:
        raise UsageError(f"--seeds must be >= 1 (seeds 0..N-1), got {args.seeds}")
    if args.size is not None and args.size <= 0:
        raise UsageError(f"--size must be positive, got {args.size}")
    for flag, value in (("--batch-size", args.batch_size), ("--limit", args.limit), ("--steps", args.steps),
                        ("--pairs-per-batch", args.pairs_per_batch)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")


def with_knobs(args: argparse.Namespace, methods: list[str]) -> list[str]:
    """``--set`` with the knob flags (``--steps N``, ``--eta 0 0.5``, ...) as ``name=value`` assignments, first,
    where ``--set`` would put them; refused when --set or --sweep also names that parameter."""
    from ..evaluation.plan import param_for
    from ..methods.base import parse_key_values
    from ..methods.catalogue import method_info

    given = {flag: value for flag, value in ((f, getattr(args, f)) for f in PARAM_FLAGS) if value is not None}
    for knob in given:
        if not any(param_for(method_info(m), PARAM_FLAGS[knob]) for m in methods):
            raise UsageError(f"--{knob.replace('_', '-')} does not apply to {', '.join(methods)}; see `nonrigid "
                             f"methods {' '.join(methods)}` for their parameters")
    for flag, items in (("--set", args.assignments), ("--sweep", args.sweep)):
        for key, _ in parse_key_values(items, flag):
            for knob in given:
                name = PARAM_FLAGS[knob]
                if any((p := param_for(method_info(m), key)) is not None and p.name == name for m in methods):
                    raise UsageError(f"--{knob.replace('_', '-')} and {flag} {key} both set {name}; give one of them")
    knobs = [f"{PARAM_FLAGS[flag]}={','.join(map(str, value)) if isinstance(value, list) else value}"
             for flag, value in given.items()]
    return [*knobs, *args.assignments]


def describe_plan(spec, out: Path) -> str:
    """What a run would compute: settings per method, jobs, edits, and how many jobs ``out`` holds already."""
    from ..evaluation.plan import expected_edits
    from ..evaluation.runfolder import done_job_keys

    lines = [f"{len(spec.pairs)} pairs, seeds {', '.join(map(str, spec.seeds))}"]
    for method, settings in spec.settings.items():
        for setting in settings:
            extra = f" (source prompt: {setting.source})" if setting.source != "none" else ""
            extra += f" (model: {spec.method_models[method]})" if method in spec.method_models else ""
            lines.append(f"  {method} [{setting.label}]{extra}: {_format_overrides(setting.params)}")
    jobs = spec.jobs()
    done = done_job_keys(out) & {job.key for job in jobs}
    lines.append(f"{len(jobs)} jobs, {sum(expected_edits(job) for job in jobs)} edits; {len(done)} jobs done in {out}")
    return "\n".join(lines)


def _format_overrides(params: dict) -> str:
    if not params:
        return "defaults"
    return " ".join(f"{k}={','.join(f'{x:g}' for x in v) if isinstance(v, tuple) else v}" for k, v in params.items())


# --------------------------------------------------------------------------------------------------- score


def run_score(args: argparse.Namespace) -> int:
    from ..evaluation.data import read_pairs
    from ..evaluation.runfolder import opened
    from ..evaluation.score import match_edits, outside_files, score_folder, score_identity
    from ..images import check_image
    from ..methods.output import slugify

    if args.size <= 0:
        raise UsageError(f"--size must be positive, got {args.size}")
    pairs = read_pairs(args.data)
    edits, warnings = match_edits(outside_files(args.folder), pairs)
    for warning in warnings:
        logger.warning("warning: %s", warning)
    if not edits:
        raise UsageError(f"no image in {args.folder} matches a pair of {args.data / 'input_list.json'}; name them "
                         "<image name>-<target text>.png")
    for edit in edits:  # a decompression bomb or an over-size edit: refused before the metrics load
        check_image(edit.file)
    method = args.method_name or args.folder.resolve().name
    out = args.out or Path("runs") / slugify(method)
    identity = score_identity(args.folder, args.data, method, args.size, metric_options(args))
    with opened(out, identity, ["nonrigid", *sys.argv[1:]]) as run:
        from ..models.loading import resolve_device
        from .common import quiet_libraries

        quiet_libraries(args.quiet)
        metrics = load_metrics_on(args, resolve_device(args.device))
        run.set_meta(metrics=describe_metrics(metrics))
        with only_warnings(args.debug):
            stats = score_folder(edits, run, method, args.size, metrics, progress=not args.quiet)
        say(args, f"{method}: {stats.ran} images scored ({stats.done_before} earlier), {len(warnings)} skipped")
    print(out)
    return 0


# --------------------------------------------------------------------------------------------------- report


def run_report(args: argparse.Namespace) -> int:
    from ..evaluation.report import write_report

    for flag, value in (("--bins", args.bins), ("--min-per-bin", args.min_per_bin)):
        if value < 1:
            raise UsageError(f"{flag} must be >= 1, got {value}")
    write_report(args.runs, args.out, bins=args.bins, binning=args.binning, min_per_bin=args.min_per_bin,
                 gallery_lpips=args.gallery_lpips, log=None if args.quiet else logger.info)
    print(args.out)
    return 0
