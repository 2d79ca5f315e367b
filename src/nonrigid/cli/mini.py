"""``nonrigid mini ...``: the miniature world's model, judge, dataset and evaluation."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path

from ..errors import UsageError
from .common import HelpFormatter, Parser, quiet_libraries

logger = logging.getLogger("nonrigid")


def add_mini_parser(commands) -> None:
    from ..mini.config import TrainConfig

    mini = commands.add_parser(
        "mini", help="the miniature world: train its model, write its benchmark",
        description="A procedural world with known identity and pose, and a small SD-1.x-layout model trained on "
        "it, so editing methods can be checked on any CPU (docs/MINIATURE.md).",
    )
    sub = mini.add_subparsers(dest="mini_command", metavar="COMMAND", parser_class=Parser, required=True)
    train = sub.add_parser(
        "train", help="train the miniature model (under 60 min on 2 CPU cores)",
        description="Train the VAE, then the UNet and text encoder, reproducibly from --seed. Resumable: run the "
        "same command again after an interruption and it continues from the last checkpoint in OUT/work.",
        formatter_class=HelpFormatter,
    )
    defaults = TrainConfig()
    train.add_argument("--out", type=Path, default=Path("runs/mini-train"), help="work folder")
    train.add_argument("--seed", type=int, default=defaults.seed, help="seed of data, initialisation and noise")
    train.add_argument("--vae-steps", type=int, default=defaults.vae_steps, help="VAE training steps")
    train.add_argument("--unet-steps", type=int, default=None,
                       help=f"UNet training steps (default {defaults.unet_steps}; v: 600, xl: 2500)")
    train.add_argument("--unet-batch", type=int, default=defaults.unet_batch,
                       help="UNet batch size (the recipe benchmark found 32 better than 64 for the same samples)")
    train.add_argument("--snr-gamma", type=float, default=defaults.snr_gamma,
                       help="min-SNR loss weighting gamma; 0 gives the plain loss")
    train.add_argument("--dataset-size", type=int, default=defaults.dataset_size, help="scenes for the UNet")
    train.add_argument("--threads", type=int, default=defaults.threads, help="CPU threads (fixed, for reproducibility)")
    train.add_argument("--install", action="store_true",
                       help="copy the trained model into the package, where load_pipeline('mini') finds it")
    train.add_argument("--variant", choices=("sd", "v", "xl", "flow"), default="sd",
                       help="which miniature model: sd (the SD-1.x-layout model, 'mini'), v (its v-prediction "
                       "fine-tune, a LoRA, 'mini-v'; needs 'mini'), xl (the SDXL-layout model, 'mini-xl'; needs "
                       "'mini' for its VAE and tokenizer), flow (the SD3-layout rectified-flow model, 'mini-flow'; "
                       "needs 'mini' for its VAE, tokenizer and as its teacher). v, xl and flow take --seed, "
                       "--threads, --dataset-size and --unet-steps (default 600 for v, 2500 for xl and flow)")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    train.set_defaults(func=run_mini_train)

    judge = sub.add_parser("judge", help="train the classifier of pose, kind and colour that scores edits and samples "
                           "(about three minutes)",
                           formatter_class=HelpFormatter)
    judge.add_argument("--steps", type=int, default=600, help="training steps")
    judge.add_argument("--seed", type=int, default=0, help="seed")
    judge.add_argument("--out", type=Path, default=None, help="where to save it (default: the package's weights)")
    judge.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    judge.set_defaults(func=run_mini_judge)

    data = sub.add_parser("dataset", help="write the world's benchmark in TEdBench's layout, with ground truth",
                          formatter_class=HelpFormatter)
    data.add_argument("--out", type=Path, required=True, help="folder to write (originals/, input_list.json, "
                      "ground_truth.json)")
    data.add_argument("--count", type=int, default=24, help="number of scenes")
    data.add_argument("--edits-per-image", type=int, default=1, help="target poses per scene (1-3)")
    data.add_argument("--seed", type=int, default=0, help="seed of the scenes")
    data.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    data.set_defaults(func=run_mini_dataset)

    ev = sub.add_parser(
        "evaluate", help="run the method, NTI-only editing and the paper's ablations on a world dataset",
        description="Resumable: results are stored per pair in OUT/results and stage results in OUT/cache; run "
        "the same command again after an interruption and it continues. Then writes docs with --docs. "
        "With several --data folders (worlds of different seeds) each runs into OUT/world-SEED, and the page "
        "tests the paper's claims with paired intervals over all of them, choosing operating points on the "
        "first world and testing them on the others.",
        formatter_class=HelpFormatter,
    )
    ev.add_argument("--data", type=Path, required=True, nargs="+", metavar="DIR",
                    help="one or more folders written by `nonrigid mini dataset` (give worlds of different seeds)")
    ev.add_argument("--out", type=Path, default=Path("runs/mini-eval"), help="run folder")
    ev.add_argument("--limit", type=int, default=None, help="only the first N pairs")
    ev.add_argument("--steps", type=int, default=50, help="DDIM steps")
    ev.add_argument("--opt-steps", type=int, default=200, help="text optimization steps")
    ev.add_argument("--seeds", type=int, default=1, metavar="N",
                    help="text-optimization seeds per pair (0..N-1; the paper uses 5)")
    ev.add_argument("--ablation-seeds", type=int, default=None, metavar="N",
                    help="how many of the --seeds the inversion and injection ablations sample (default: all); "
                    "each seed costs a sampling per eta and setting")
    ev.add_argument("--etas", type=_floats, default=None, metavar="E,E,...",
                    help="ours' eta sweep (default 0,0.2,...,1)")
    ev.add_argument("--ablation-etas", type=_floats, default=None, metavar="E,E,...",
                    help="the etas (among --etas) at which the inversion and injection ablations are sampled "
                    "(default: all of --etas); each costs a sampling per seed and setting")
    ev.add_argument("--no-ablations", action="store_true",
                    help="run ours and NTI-only editing only, not the inversion and injection ablations (the "
                    "comparisons made for the further families, and the presets' and masks' runs)")
    ev.add_argument("--set", dest="ours", action="append", default=[], metavar="KEY=VALUE",
                    help="a parameter of ours that differs from the paper's (e.g. --set inversion=npi --set "
                    "opt_steps=100): a candidate preset, whose rows a comparison pairs with a run at the defaults")
    ev.add_argument("--ours-only", action="store_true",
                    help="with --no-ablations: ours alone, without NTI-only editing")
    ev.add_argument("--masked", action="store_true",
                    help="with --ours-only: ours edits inside a mask of each pair, the box the subject covers in any "
                    "pose widened by 4 px, as a user would paint it (its rows pair with a run without masks)")
    ev.add_argument("--pairs-per-batch", type=int, default=8, metavar="N",
                    help="pairs whose stages run as one UNet batch (ours, its ablations, NTI-only, DDS, "
                    "Edit-friendly); results equal "
                    "to one pair at a time up to float rounding, several times faster at 16 x 16 latents")
    ev.add_argument("--baselines", default=None,
                    help="comma-separated baselines to run besides NTI-only editing ('none' for none); default: "
                    "imagic,masactrl,edit-friendly,dds,ledits with --model mini, flowedit with mini-flow, none with "
                    "mini-v and mini-xl")
    ev.add_argument("--model", choices=("mini", "mini-v", "mini-xl", "mini-flow"), default="mini",
                    help="which miniature model: mini (SD 1.x layout: the full evaluation), mini-v (v prediction), "
                    "mini-xl (SDXL layout) or mini-flow (SD3 layout, rectified flow; also FlowEdit): ours against "
                    "NTI-only editing, written as that model's section of MINIATURE.md with --docs")
    ev.add_argument("--docs", type=Path, default=None, help="write MINIATURE.md and its figures into this folder")
    ev.add_argument("--report-only", action="store_true",
                    help="run nothing: write --docs from the pairs the run folders already hold (a long run's "
                    "results so far; the page says how many pairs it rests on)")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    ev.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    ev.set_defaults(func=run_mini_evaluate)

    cmp = sub.add_parser(
        "compare", help="a cheaper preset or masked edits against ours at the defaults, pair by pair",
        description="Paired 95% intervals (over pairs; per pair the mean over seeds and etas) of a candidate's "
        "ours minus the default's, per world: edit success, identity error and sky shift, with the fast preset's "
        "margins (at most 0.05 less edit success, 0.005 more identity error); with --masks the background error "
        "too, without margins. The runs come from `nonrigid mini evaluate --no-ablations --ours-only` (with --set "
        "or --masked for the candidate).")
    cmp.add_argument("--default", dest="defaults", type=Path, action="append", required=True, metavar="RUN",
                     help="an evaluation at the paper's defaults (repeat for each world)")
    cmp.add_argument("--candidate", action="append", required=True, metavar="NAME=RUN",
                     help="a candidate's evaluation, named (repeat; the same name for several worlds pools them)")
    cmp.add_argument("--masks", action="store_true", help="the candidates are masked edits: no margins, background "
                     "error added")
    cmp.add_argument("--docs", type=Path, default=None,
                     help="write the table as a section of MINIATURE.md in this folder (the presets' or the masks')")
    cmp.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    cmp.set_defaults(func=run_mini_compare)


def mini_train_config(args: argparse.Namespace):
    """The ``TrainConfig`` that ``nonrigid mini train`` flags describe, after checking them."""
    from ..mini.config import TrainConfig

    for name in ("vae_steps", "unet_steps", "unet_batch", "dataset_size", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not math.isfinite(args.snr_gamma) or args.snr_gamma < 0:
        raise UsageError(f"--snr-gamma must be 0 (plain loss) or positive, got {args.snr_gamma}")
    unet_steps = TrainConfig.unet_steps if args.unet_steps is None else args.unet_steps
    return TrainConfig(seed=args.seed, vae_steps=args.vae_steps, unet_steps=unet_steps,
                       unet_batch=args.unet_batch, snr_gamma=args.snr_gamma,
                       dataset_size=args.dataset_size, threads=args.threads)


def variant_config(args: argparse.Namespace):
    """The ``VariantConfig`` of ``nonrigid mini train --variant v|xl``, after checking the flags."""
    from dataclasses import replace

    from ..mini.config import VariantConfig
    from ..mini.flow import flow_config
    from ..mini.xl import xl_config

    base = {"xl": xl_config, "flow": flow_config}.get(args.variant, VariantConfig)()
    steps = base.steps if args.unet_steps is None else args.unet_steps
    return replace(base, seed=args.seed, threads=args.threads, steps=steps, dataset_size=args.dataset_size)


def run_mini_train(args: argparse.Namespace) -> int:
    import shutil

    config = mini_train_config(args)  # the flags, before torch is imported
    from ..mini.train import Log, train
    from ..models.loading import mini_weights_dir

    log = Log(args.out / "train_log.txt", echo=None if args.quiet else logger.info)
    log("command: nonrigid " + " ".join(sys.argv[1:]))
    if args.variant != "sd":
        return _train_variant(args, log)
    model = train(args.out, config, progress=not args.quiet, log=log)
    if args.install:
        target = mini_weights_dir()
        for part in model.iterdir():  # replace the model's parts, keep what else lives there (the judge)
            if (target / part.name).is_dir():
                shutil.rmtree(target / part.name)
        shutil.copytree(model, target, dirs_exist_ok=True)
        shutil.copy(args.out / "train_log.txt", target / "train_log.txt")
        log(f"installed into {target}")
    print(model)
    return 0


def _train_variant(args: argparse.Namespace, log) -> int:
    """``mini-v``, ``mini-xl`` or ``mini-flow``: trained into OUT/model, with --install copied to the package's
    weights/v, /xl or /flow."""
    import shutil

    from ..mini.flow import train_flow
    from ..mini.variants import train_v
    from ..mini.xl import train_xl
    from ..models.loading import mini_weights_dir

    trainer = {"xl": train_xl, "flow": train_flow, "v": train_v}[args.variant]
    model = trainer(args.out, variant_config(args), progress=not args.quiet, log=log)
    if args.install:
        target = mini_weights_dir() / args.variant
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(model, target)
        shutil.copy(args.out / "train_log.txt", target / "train_log.txt")
        log(f"installed into {target}")
    print(model)
    return 0


def run_mini_judge(args: argparse.Namespace) -> int:
    if args.steps < 1:  # before torch is imported
        raise UsageError(f"--steps must be positive, got {args.steps}")
    from ..mini.judge import save_judge, train_judge
    from ..models.loading import mini_weights_dir

    judge = train_judge(args.steps, seed=args.seed, log=logger.info)
    path = args.out or mini_weights_dir() / "judge.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_judge(judge, path)
    print(path)
    return 0


def run_mini_dataset(args: argparse.Namespace) -> int:
    from ..mini.dataset import write_dataset

    print(write_dataset(args.out, args.count, args.edits_per_image, args.seed))
    return 0


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from err
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def evaluation_protocol(args: argparse.Namespace, world: int | None, family_run: bool):
    """The :class:`Protocol` the ``mini evaluate`` flags describe, after checking them."""
    from ..mini.protocol import ETAS, Protocol

    for name in ("steps", "opt_steps", "seeds", "pairs_per_batch"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    etas = args.etas or ETAS
    ablations = not (family_run or getattr(args, "no_ablations", False))
    ours = ours_overrides(getattr(args, "ours", []))
    if (ours or getattr(args, "ours_only", False)) and ablations:
        raise UsageError("--set and --ours-only change ours alone: give --no-ablations too")
    masked = getattr(args, "masked", False)
    if masked and not getattr(args, "ours_only", False):
        raise UsageError("--masked masks ours alone: give --ours-only (and --no-ablations) too")
    return Protocol(num_steps=args.steps, opt_steps=args.opt_steps, seeds=tuple(range(args.seeds)), etas=etas,
                    ablation_etas=args.ablation_etas or etas, ablation_seeds=args.ablation_seeds,
                    ablations=ablations, world=world, ours=ours, nti_only=not getattr(args, "ours_only", False),
                    masked=masked)


def ours_overrides(assignments: list[str]) -> tuple:
    """``--set`` values of ours' parameters, checked against its table (torch-free); the protocol's own knobs
    (steps, text-optimization steps, etas) have flags of their own."""
    from ..methods.base import check_overrides, parse_key_values
    from ..methods.catalogue import OURS

    given = dict(parse_key_values(assignments, "--set"))
    own = {"num_steps": "--steps", "opt_steps": "--opt-steps", "etas": "--etas", "inject": "the protocol"}
    for name in given:
        if name in own:
            raise UsageError(f"--set {name}: use {own[name]}")
    return tuple(check_overrides(OURS, given).items())


def run_mini_evaluate(args: argparse.Namespace) -> int:
    from ..mini.protocol import BASELINES, FLOW_BASELINES

    allowed = FLOW_BASELINES if args.model == "mini-flow" else BASELINES if args.model == "mini" else {}
    chosen = ",".join(allowed) if args.baselines is None else args.baselines
    baselines = tuple(b for b in chosen.split(",") if b and b != "none")
    unknown = [b for b in baselines if b not in allowed]
    if unknown:
        raise UsageError(f"--baselines: {', '.join(unknown)} not for --model {args.model}; choose from "
                         f"{', '.join(allowed) or 'none (it compares ours with NTI-only editing)'}")
    family_run = args.model != "mini"
    if family_run and len(args.data) > 1:
        raise UsageError(f"--model {args.model} takes one --data folder")
    if args.report_only and not args.docs:
        raise UsageError("--report-only writes the page: give --docs")
    evaluation_protocol(args, None, family_run)  # the flags, before any folder is read or torch imported
    from ..mini.dataset import read_dataset, world_seed
    from ..mini.evaluate import evaluate
    from ..mini.judge import load_judge

    worlds = [(data, world_seed(data)) for data in args.data]
    seeds = [seed for _, seed in worlds]
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"the --data folders must be worlds of different seeds, got seeds {seeds}")
    runs = [(data, seed, args.out if len(worlds) == 1 else args.out / f"world-{seed}") for data, seed in worlds]
    jobs = [(read_dataset(data)[: args.limit], evaluation_protocol(args, seed, family_run), out)
            for data, seed, out in runs]
    quiet_libraries(args.quiet)
    from ..models.loading import load_model

    model = load_model(args.model, device="cpu", dtype="fp32")
    judge = load_judge()
    count = 0
    for pairs, protocol, out in jobs:
        if args.report_only:
            from ..mini.evaluate import load_rows

            count += len(load_rows(out))
            continue
        logger.info(f"world {protocol.world}: {len(pairs)} pairs into {out}")
        count += len(evaluate(model, judge, pairs, out, baselines=baselines, progress=not args.quiet,
                              pairs_per_batch=args.pairs_per_batch, protocol=protocol))
    if args.report_only and count == 0:
        raise UsageError(f"no results in {args.out} yet: run the evaluation first (without --report-only)")
    # the page shows the command that runs (and resumes) the evaluation, which also writes the page
    command = "nonrigid " + " ".join(a for a in sys.argv[1:] if a != "--report-only")
    if args.docs and family_run:
        from ..mini.family_doc import write_family_section

        path = write_family_section(model, args.model, args.out, args.docs / "MINIATURE.md", command=command,
                                    judge=judge)
        logger.info(f"{args.model} section written to {path}")
    elif args.docs:
        from ..mini.doc import write_miniature_doc

        write_miniature_doc(model, [out for _, _, out in runs], args.docs, command=command, judge=judge,
                            planned=sum(len(pairs) for pairs, _, _ in jobs))
    logger.info(f"{count} rows in {args.out}")
    print(args.out)
    return 0


def run_mini_compare(args: argparse.Namespace) -> int:
    """``nonrigid mini compare``: the table, printed and (with --docs) written into MINIATURE.md."""
    from ..mini.evaluate import load_rows
    from ..mini.studies import MASK_METRICS, METRICS, compare, comparisons_table, run_settings, study_section

    candidates: dict[str, list[Path]] = {}
    for given in args.candidate:
        name, sep, path = given.partition("=")
        if not (sep and name.strip() and path.strip()):
            raise UsageError(f"--candidate {given!r}: write NAME=RUN, e.g. fast=runs/fast/world-0")
        candidates.setdefault(name.strip(), []).append(Path(path.strip()))
    for run in [*args.defaults, *(path for paths in candidates.values() for path in paths)]:
        if not (run / "results").is_dir():
            raise UsageError(f"{run} holds no evaluation (no results folder): run `nonrigid mini evaluate` into it")
    defaults = [row for run in args.defaults for row in load_rows(run)]
    metrics, margins = (MASK_METRICS, {}) if args.masks else (METRICS, None)
    comparisons, settings = [], {}
    for name, paths in candidates.items():
        rows = [row for path in paths for row in load_rows(path)]
        comparisons += compare(defaults, rows, name, metrics, margins)
        settings[name] = run_settings(paths[0])
    table = comparisons_table(comparisons, settings)
    print(table)
    if args.docs:
        from ..mini.family_doc import replace_block

        kind = "masks" if args.masks else "presets"
        if args.masks:
            from ..mini.studies import mask_gallery

            mask_gallery(args.defaults[0], next(iter(candidates.values()))[0], args.docs / "mini-masks.png")
        command = "nonrigid " + " ".join(sys.argv[1:])
        replace_block(args.docs / "MINIATURE.md", f"study:{kind}", study_section(kind, table, command),
                      "## Cheaper settings and masks, tested")
    return 0

