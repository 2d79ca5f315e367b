"""The ``nonrigid`` command: a thin shell over :func:`nonrigid.edit`.

Exit codes: 0 success, 2 bad usage (a bad flag, a missing or unreadable input, a model that cannot be found), 1 a
failure while running (e.g. NaN in a stage), 130 interrupted. Errors are one line on stderr; ``--debug`` shows the
traceback.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import sys
from pathlib import Path

from . import __version__
from .errors import NonrigidError, UsageError
from .options import DEFAULT_ETAS, DEFAULT_INJECT, DEFAULT_MODEL, INVERSION_METHODS

logger = logging.getLogger("nonrigid")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except for flags whose default is "the method's" (None): their help says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit code 2), not a usage dump."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="nonrigid",
        description="Training-free non-rigid image editing with Stable Diffusion: change a subject's pose or "
        "action while its identity and background stay (text optimization, latent inversion, timestep-aware "
        "text injection sampling).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"nonrigid {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    add_edit_parser(commands)
    add_mini_parser(commands)
    add_bench_commands(commands)
    return parser


# flags of `edit` that set a method parameter, and that parameter's name (None: not given)
PARAM_FLAGS = {
    "eta": "etas", "inject": "inject", "steps": "num_steps", "opt_steps": "opt_steps", "opt_lr": "opt_lr",
    "inner_steps": "inner_steps", "inversion": "inversion", "guidance": "guidance_scale",
}


def add_bench_commands(commands) -> None:
    """``bench``, ``score`` and ``report`` (evaluation), defined in :mod:`nonrigid.cli_bench`."""
    try:
        from .cli_bench import add_bench_parsers
    except ImportError:  # pragma: no cover - while the evaluation commands are being written
        return
    add_bench_parsers(commands, Parser)


def add_edit_parser(commands) -> None:
    from .methods import METHODS

    p = commands.add_parser(
        "edit",
        help="edit one image toward a target prompt (the paper's method or a baseline)",
        description="Edit IMAGE toward PROMPT. The default method (ours) runs (A) text optimization per seed, (B) "
        "one latent inversion and (C) timestep-aware text injection sampling for every seed x inject x eta. "
        "Every method writes input.png, one PNG per variant, grid.png (rows: seed x inject; columns: the "
        "method's main sweep, e.g. eta) and edit.json to --out. Stages are cached, so trying other --eta/--inject "
        "values later takes seconds. Baselines: --method nti|imagic|masactrl|edit-friendly|dds|ledits, their "
        "knobs via --set key=value (list them with `nonrigid methods`).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("image", help="input image (any format Pillow reads); center-cropped to a square")
    p.add_argument("prompt", help='target prompt, e.g. "A photo of a jumping dog."')
    p.add_argument("--method", choices=list(METHODS), default="ours",
                   help="editing method; see `nonrigid methods` for what each does and its parameters")
    p.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                   help="set a method parameter, e.g. --set alpha=0.9,1.1 (sweeps take comma-separated lists); "
                   "repeatable; `nonrigid methods METHOD` lists them")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: out/<image name>-<prompt>[-method]); an earlier edit there is "
                   "replaced")
    p.add_argument("--source", default="", help="source prompt describing the input; empty is the paper's "
                   "recommended default (best structure preservation with NTI)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="hub id, local diffusers folder, single-file .safetensors checkpoint, 'mini' (the trained "
                   "miniature model, 64 px, offline) or 'tiny' (random weights, output is noise, for smoke tests)")
    p.add_argument("--config", default=None,
                   help="for a single-file checkpoint: diffusers folder or hub id to read its configs from")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow loading pickle checkpoints (.ckpt/.bin), which can run arbitrary code")
    p.add_argument("--inversion", choices=INVERSION_METHODS, default=None,
                   help="ours: nti (null-text inversion at guidance 7.5, default), ddim (guidance 1) or npi "
                   "(negative-prompt inversion: fast, no optimization)")
    p.add_argument("--eta", type=float, nargs="+", default=None, metavar="ETA",
                   help="ours: interpolation weights in [0, 1]: e = eta*target + (1-eta)*optimized; higher edits "
                   f"more (default: {' '.join(f'{e:g}' for e in DEFAULT_ETAS)})")
    p.add_argument("--inject", type=float, nargs="+", default=None, metavar="RATIO",
                   help="ours: share of sampling steps conditioned on the source prompt first, in [0, 1]; the paper "
                   f"finds 0.1-0.4 works, higher keeps more structure (default: {DEFAULT_INJECT[0]:g})")
    p.add_argument("--steps", type=int, default=None,
                   help="DDIM steps of inversion and sampling (default: the method's, 50 for ours)")
    p.add_argument("--opt-steps", type=int, default=None, help="ours/imagic: text optimization steps (0 skips it; "
                   "default: 200 for ours)")
    p.add_argument("--opt-lr", type=float, default=None, help="ours/imagic: text optimization learning rate "
                   "(default: 1e-3)")
    p.add_argument("--inner-steps", type=int, default=None,
                   help="null-text inversion: Adam steps per sampling step (default: 10)")
    p.add_argument("--seed", type=int, nargs="+", default=[0], metavar="SEED",
                   help="one or more seeds; each is its own text optimization (deterministic methods use the "
                   "first)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: the method's; ours: 7.5 with nti/npi, 1 with ddim)")
    p.add_argument("--size", type=int, default=512, help="working resolution in pixels (multiple of 64 for SD)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="most variants per UNet batch (default: all at once; lower it to save memory)")
    add_runtime_flags(p)
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="stage cache folder (default: $NONRIGID_CACHE_DIR or the user cache dir)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the stage cache")
    p.add_argument("--quiet", action="store_true", help="no progress bars or messages, only errors")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    p.set_defaults(func=run_edit)

    methods = commands.add_parser(
        "methods", help="list the editing methods, their parameters and defaults",
        description="Each method's summary, reference and parameters (set them with `nonrigid edit --method M "
        "--set key=value`; sweep parameters take comma-separated values, one variant each).",
    )
    methods.add_argument("names", nargs="*", metavar="METHOD", help="only these methods")
    methods.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    methods.set_defaults(func=run_methods)


def add_runtime_flags(p: argparse.ArgumentParser) -> None:
    """Where and how the networks run: device, precision, memory and compilation."""
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                   help="precision of the frozen networks (default: fp16 on CUDA, fp32 on CPU); embeddings, "
                   "losses and DDIM arithmetic always stay fp32")
    p.add_argument("--low-memory", action="store_true",
                   help="attention slicing, VAE tiling and model offload: slower, fits an 8 GB GPU")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet (CUDA: faster after a one-time compilation of about a minute)")


def run_methods(args: argparse.Namespace) -> int:
    from .methods import describe_methods

    print(describe_methods(args.names or None), end="")
    return 0


def add_mini_parser(commands) -> None:
    from .mini.config import TrainConfig

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
    train.add_argument("--unet-steps", type=int, default=defaults.unet_steps, help="UNet training steps")
    train.add_argument("--unet-batch", type=int, default=defaults.unet_batch,
                       help="UNet batch size (the recipe benchmark found 32 better than 64 for the same samples)")
    train.add_argument("--snr-gamma", type=float, default=defaults.snr_gamma,
                       help="min-SNR loss weighting gamma; 0 gives the plain loss")
    train.add_argument("--dataset-size", type=int, default=defaults.dataset_size, help="scenes for the UNet")
    train.add_argument("--threads", type=int, default=defaults.threads, help="CPU threads (fixed, for reproducibility)")
    train.add_argument("--install", action="store_true",
                       help="copy the trained model into the package, where load_pipeline('mini') finds it")
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
        "the same command again after an interruption and it continues. Then writes docs with --docs.",
        formatter_class=HelpFormatter,
    )
    ev.add_argument("--data", type=Path, required=True, help="a folder written by `nonrigid mini dataset`")
    ev.add_argument("--out", type=Path, default=Path("runs/mini-eval"), help="run folder")
    ev.add_argument("--limit", type=int, default=None, help="only the first N pairs")
    ev.add_argument("--steps", type=int, default=50, help="DDIM steps")
    ev.add_argument("--opt-steps", type=int, default=200, help="text optimization steps")
    ev.add_argument("--baselines", default="imagic,masactrl,edit-friendly,dds,ledits",
                    help="comma-separated baselines to run besides NTI-only editing ('none' for none)")
    ev.add_argument("--docs", type=Path, default=None, help="write MINIATURE.md and its figures into this folder")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    ev.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    ev.set_defaults(func=run_mini_evaluate)


def mini_train_config(args: argparse.Namespace):
    """The ``TrainConfig`` that ``nonrigid mini train`` flags describe, after checking them."""
    from .mini.config import TrainConfig

    for name in ("vae_steps", "unet_steps", "unet_batch", "dataset_size", "threads"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not math.isfinite(args.snr_gamma) or args.snr_gamma < 0:
        raise UsageError(f"--snr-gamma must be 0 (plain loss) or positive, got {args.snr_gamma}")
    return TrainConfig(seed=args.seed, vae_steps=args.vae_steps, unet_steps=args.unet_steps,
                       unet_batch=args.unet_batch, snr_gamma=args.snr_gamma,
                       dataset_size=args.dataset_size, threads=args.threads)


def run_mini_train(args: argparse.Namespace) -> int:
    import shutil

    from .mini.model import weights_dir
    from .mini.train import Log, train

    config = mini_train_config(args)
    log = Log(args.out / "train_log.txt", echo=None if args.quiet else logger.info)
    log("command: nonrigid " + " ".join(sys.argv[1:]))
    model = train(args.out, config, progress=not args.quiet, log=log)
    if args.install:
        target = weights_dir()
        for part in model.iterdir():  # replace the model's parts, keep what else lives there (the judge)
            if (target / part.name).is_dir():
                shutil.rmtree(target / part.name)
        shutil.copytree(model, target, dirs_exist_ok=True)
        shutil.copy(args.out / "train_log.txt", target / "train_log.txt")
        log(f"installed into {target}")
    print(model)
    return 0


def run_mini_judge(args: argparse.Namespace) -> int:
    from .mini.judge import save_judge, train_judge
    from .mini.model import weights_dir

    if args.steps < 1:
        raise UsageError(f"--steps must be positive, got {args.steps}")
    judge = train_judge(args.steps, seed=args.seed, log=logger.info)
    path = args.out or weights_dir() / "judge.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_judge(judge, path)
    print(path)
    return 0


def run_mini_dataset(args: argparse.Namespace) -> int:
    from .mini.benchmark import write_dataset

    print(write_dataset(args.out, args.count, args.edits_per_image, args.seed))
    return 0


def run_mini_evaluate(args: argparse.Namespace) -> int:
    from .mini.benchmark import read_dataset
    from .mini.evaluate import BASELINES, evaluate
    from .mini.judge import load_judge

    baselines = tuple(b for b in args.baselines.split(",") if b and b != "none")
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise UsageError(f"--baselines: unknown {', '.join(unknown)}; choose from {', '.join(BASELINES)}")
    pairs = read_dataset(args.data)[: args.limit]
    quiet_libraries(args.quiet)
    from .loading import load_pipeline

    pipe = load_pipeline("mini", device="cpu", dtype="fp32")
    judge = load_judge()
    rows = evaluate(pipe, judge, pairs, args.out, num_steps=args.steps, opt_steps=args.opt_steps,
                    baselines=baselines, progress=not args.quiet)
    if args.docs:
        from .mini.miniature_doc import write_miniature_doc

        write_miniature_doc(pipe, args.out, args.docs, command="nonrigid " + " ".join(sys.argv[1:]), judge=judge)
    logger.info(f"{len(rows)} rows in {args.out}")
    print(args.out)
    return 0


def default_out(image: Path, prompt: str, method: str = "ours") -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48] or "edit"
    suffix = "" if method == "ours" else f"-{method}"
    return Path("out") / f"{image.stem}-{slug}{suffix}"


def method_params(args: argparse.Namespace) -> dict[str, object]:
    """The method's parameters from --set and the dedicated flags, validated against its table (no torch)."""
    from .methods import method_info
    from .methods.base import parse_assignments, resolve_params

    info = method_info(args.method)
    params: dict[str, object] = {}
    labels = {p.label: p.name for p in info.params if p.label}
    for name, value in parse_assignments(args.assignments).items():
        params[labels.get(name, name)] = value
    known = {p.name for p in info.params}
    shown_as = {}
    for flag, name in PARAM_FLAGS.items():
        value = getattr(args, flag)
        if value is None:
            continue
        if name not in known:
            raise UsageError(f"--{flag.replace('_', '-')} does not apply to --method {args.method}; "
                             f"see `nonrigid methods {args.method}` for its parameters")
        params[name] = value
        shown_as[name] = f"--{flag.replace('_', '-')}"
    resolved = resolve_params(info, params, shown_as)
    if args.method == "ours":
        from .methods.ours import settings_from_params

        settings_from_params(args.prompt, resolved, args.source, args.seed, args.batch_size)  # validates
    return resolved


def run_edit(args: argparse.Namespace) -> int:
    from .images import load_image
    from .output import check_output_dir

    params = method_params(args)  # validates before anything slow happens
    if args.size <= 0:
        raise UsageError(f"--size must be positive, got {args.size}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    out = args.out or default_out(Path(args.image), args.prompt, args.method)
    check_output_dir(out)
    picture = load_image(args.image, args.size)

    from .cache import StageCache  # the heavy imports (torch, diffusers) only once the input is known good
    from .editing import describe_device
    from .loading import load_pipeline
    from .methods.run import run_method
    from .output import save_result

    quiet_libraries(args.quiet)
    say(args, f"loading model {args.model}")
    pipe = load_pipeline(args.model, args.device, args.dtype, allow_pickle=args.allow_pickle, config=args.config)
    pipe = _configure(pipe, args)
    cache = None if args.no_cache else StageCache(args.cache_dir)
    result = run_method(pipe, picture, args.prompt, args.method, params, seeds=args.seed, source_prompt=args.source,
                        size=args.size, cache=cache, batch_size=args.batch_size, progress=not args.quiet)
    record = {
        "image": str(args.image),
        "model": args.model,
        "size": args.size,
        **describe_device(pipe),
        "low_memory": args.low_memory,
        "compile": args.compile,
        "cache_dir": None if cache is None else str(cache.root),
    }
    save_result(result, out, record=record)
    stages = ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in result.timings.items() if k != "total")
    say(args, f"{args.method}: {len(result.variants)} variants in {result.timings['total']:.1f} s ({stages})")
    print(out)
    return 0


def _configure(pipe, args: argparse.Namespace):
    """Apply --low-memory / --compile (and channels-last on CUDA); in low-memory mode sample 2 variants at a time
    unless --batch-size says otherwise."""
    from .loading import LOW_MEMORY_BATCH_SIZE, configure_pipeline

    if args.low_memory and getattr(args, "batch_size", None) is None:
        args.batch_size = LOW_MEMORY_BATCH_SIZE
    return configure_pipeline(pipe, low_memory=args.low_memory, compile=args.compile)


def say(args: argparse.Namespace, message: str) -> None:
    if not args.quiet:
        logger.info(message)


def configure_logging(quiet: bool) -> None:
    """Our messages as ``nonrigid: ...`` on stderr (warnings only with --quiet)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("nonrigid: %(message)s"))
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.WARNING if quiet else logging.INFO)


def quiet_libraries(quiet: bool) -> None:
    """diffusers' and transformers' chatter and loading bars off (errors still show). Imports them: call it only
    once a command is about to use them."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    if quiet:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    configure_logging(getattr(args, "quiet", False))
    try:
        return args.func(args)
    except NonrigidError as err:
        if args.debug:
            raise
        print(f"nonrigid: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("nonrigid: interrupted; finished stages stay in the cache", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
