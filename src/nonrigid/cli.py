"""The ``nonrigid`` command: a thin shell over :func:`nonrigid.edit`.

Exit codes: 0 success, 2 bad usage (a bad flag, a missing or unreadable input, a model that cannot be found), 1 a
failure while running (e.g. NaN in a stage), 130 interrupted. Errors are one line on stderr; ``--debug`` shows the
traceback.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

from . import __version__
from .errors import NonrigidError, UsageError
from .options import DEFAULT_ETAS, DEFAULT_INJECT, DEFAULT_MODEL, INVERSION_METHODS

logger = logging.getLogger("nonrigid")


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
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"nonrigid {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    add_edit_parser(commands)
    add_mini_parser(commands)
    return parser


def add_edit_parser(commands) -> None:
    p = commands.add_parser(
        "edit",
        help="edit one image toward a target prompt",
        description="Edit IMAGE toward PROMPT. Runs (A) text optimization per seed, (B) one latent inversion and "
        "(C) timestep-aware text injection sampling for every seed x inject x eta, and writes input.png, one PNG "
        "per variant, grid.png (rows: seed x inject; columns: eta) and edit.json to --out. Stages A and B are "
        "cached, so trying other --eta/--inject values later takes seconds.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("image", help="input image (any format Pillow reads); center-cropped to a square")
    p.add_argument("prompt", help='target prompt, e.g. "A photo of a jumping dog."')
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: out/<image name>-<prompt>); an earlier edit there is replaced")
    p.add_argument("--source", default="", help="source prompt describing the input; empty is the paper's "
                   "recommended default (best structure preservation with NTI)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="hub id, local diffusers folder, single-file .safetensors checkpoint, or 'tiny' "
                   "(random weights, no download: output is noise, for smoke tests)")
    p.add_argument("--config", default=None,
                   help="for a single-file checkpoint: diffusers folder or hub id to read its configs from")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow loading pickle checkpoints (.ckpt/.bin), which can run arbitrary code")
    p.add_argument("--inversion", choices=INVERSION_METHODS, default="nti",
                   help="nti: null-text inversion at guidance 7.5; ddim: plain DDIM inversion at guidance 1")
    p.add_argument("--eta", type=float, nargs="+", default=list(DEFAULT_ETAS), metavar="ETA",
                   help="interpolation weights in [0, 1]: e = eta*target + (1-eta)*optimized; higher edits more")
    p.add_argument("--inject", type=float, nargs="+", default=list(DEFAULT_INJECT), metavar="RATIO",
                   help="share of sampling steps conditioned on the source prompt first, in [0, 1]; "
                   "the paper finds 0.1-0.4 works, higher keeps more structure")
    p.add_argument("--steps", type=int, default=50, help="DDIM sampling (and inversion) steps")
    p.add_argument("--opt-steps", type=int, default=200, help="text optimization steps (0 skips it)")
    p.add_argument("--opt-lr", type=float, default=1e-3, help="text optimization learning rate (Adam)")
    p.add_argument("--inner-steps", type=int, default=10, help="null-text inversion: Adam steps per sampling step")
    p.add_argument("--seed", type=int, nargs="+", default=[0], metavar="SEED",
                   help="one or more seeds; each is its own text optimization")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: 7.5 with nti, 1 with ddim)")
    p.add_argument("--size", type=int, default=512, help="working resolution in pixels (multiple of 64 for SD)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="most variants per UNet batch (default: all at once; lower it to save memory)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                   help="precision of the frozen networks (default: fp16 on CUDA, fp32 on CPU); embeddings, "
                   "losses and DDIM arithmetic always stay fp32")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="stage cache folder (default: $NONRIGID_CACHE_DIR or the user cache dir)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the stage cache")
    p.add_argument("--quiet", action="store_true", help="no progress bars or messages, only errors")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    p.set_defaults(func=run_edit)


def add_mini_parser(commands) -> None:
    from .mini.config import TrainConfig

    mini = commands.add_parser(
        "mini", help="the miniature world: train its model, write its benchmark",
        description="A procedural world with known identity and pose, and a small SD-1.x-layout model trained on "
        "it, so editing methods can be checked on any CPU (docs/MINIATURE.md).",
    )
    sub = mini.add_subparsers(dest="mini_command", metavar="COMMAND", parser_class=Parser, required=True)
    train = sub.add_parser(
        "train", help="train the miniature model (about 45 min on 2 CPU cores)",
        description="Train the VAE, then the UNet and text encoder, reproducibly from --seed. Resumable: run the "
        "same command again after an interruption and it continues from the last checkpoint in OUT/work.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    defaults = TrainConfig()
    train.add_argument("--out", type=Path, default=Path("runs/mini-train"), help="work folder")
    train.add_argument("--seed", type=int, default=defaults.seed, help="seed of data, initialisation and noise")
    train.add_argument("--vae-steps", type=int, default=defaults.vae_steps, help="VAE training steps")
    train.add_argument("--unet-steps", type=int, default=defaults.unet_steps, help="UNet training steps")
    train.add_argument("--dataset-size", type=int, default=defaults.dataset_size, help="scenes for the UNet")
    train.add_argument("--threads", type=int, default=defaults.threads, help="CPU threads (fixed, for reproducibility)")
    train.add_argument("--install", action="store_true",
                       help="copy the trained model into the package, where load_pipeline('mini') finds it")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    train.set_defaults(func=run_mini_train)

    judge = sub.add_parser("judge", help="train the pose classifier that scores edit success (about a minute)",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    judge.add_argument("--steps", type=int, default=400, help="training steps")
    judge.add_argument("--seed", type=int, default=0, help="seed")
    judge.add_argument("--out", type=Path, default=None, help="where to save it (default: the package's weights)")
    judge.set_defaults(func=run_mini_judge)

    data = sub.add_parser("dataset", help="write the world's benchmark in TEdBench's layout, with ground truth",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    data.add_argument("--out", type=Path, required=True, help="folder to write (originals/, input_list.json, "
                      "ground_truth.json)")
    data.add_argument("--count", type=int, default=24, help="number of scenes")
    data.add_argument("--edits-per-image", type=int, default=1, help="target poses per scene (1-3)")
    data.add_argument("--seed", type=int, default=0, help="seed of the scenes")
    data.set_defaults(func=run_mini_dataset)

    ev = sub.add_parser(
        "evaluate", help="run the method, NTI-only editing and the paper's ablations on a world dataset",
        description="Resumable: results are stored per pair in OUT/results and stage results in OUT/cache; run "
        "the same command again after an interruption and it continues. Then writes docs with --docs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ev.add_argument("--data", type=Path, required=True, help="a folder written by `nonrigid mini dataset`")
    ev.add_argument("--out", type=Path, default=Path("runs/mini-eval"), help="run folder")
    ev.add_argument("--limit", type=int, default=None, help="only the first N pairs")
    ev.add_argument("--steps", type=int, default=50, help="DDIM steps")
    ev.add_argument("--opt-steps", type=int, default=200, help="text optimization steps")
    ev.add_argument("--docs", type=Path, default=None, help="write MINIATURE.md and its figures into this folder")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")
    ev.set_defaults(func=run_mini_evaluate)


def run_mini_train(args: argparse.Namespace) -> int:
    import shutil

    from .mini.config import TrainConfig
    from .mini.model import weights_dir
    from .mini.train import Log, train

    for name in ("vae_steps", "unet_steps", "dataset_size", "threads"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    config = TrainConfig(seed=args.seed, vae_steps=args.vae_steps, unet_steps=args.unet_steps,
                         dataset_size=args.dataset_size, threads=args.threads)
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
    from .mini.evaluate import evaluate
    from .mini.judge import load_judge

    pairs = read_dataset(args.data)[: args.limit]
    quiet_libraries(args.quiet)
    from .loading import load_pipeline

    pipe = load_pipeline("mini", device="cpu", dtype="fp32")
    rows = evaluate(pipe, load_judge(), pairs, args.out, num_steps=args.steps, opt_steps=args.opt_steps,
                    progress=not args.quiet)
    if args.docs:
        from .mini.miniature_doc import write_miniature_doc

        write_miniature_doc(pipe, args.out, args.docs, command="nonrigid " + " ".join(sys.argv[1:]))
    logger.info(f"{len(rows)} rows in {args.out}")
    print(args.out)
    return 0


def default_out(image: Path, prompt: str) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:48] or "edit"
    return Path("out") / f"{image.stem}-{slug}"


def run_edit(args: argparse.Namespace) -> int:
    from .images import load_image
    from .options import EditSettings
    from .output import check_output_dir

    settings = dict(
        source_prompt=args.source, seeds=args.seed, etas=args.eta, inject=args.inject, num_steps=args.steps,
        opt_steps=args.opt_steps, opt_lr=args.opt_lr, inversion=args.inversion, guidance_scale=args.guidance,
        inner_steps=args.inner_steps, batch_size=args.batch_size,
    )
    EditSettings(target_prompt=args.prompt, **settings)  # validates before anything slow happens
    if args.size <= 0:
        raise UsageError(f"--size must be positive, got {args.size}")
    out = args.out or default_out(Path(args.image), args.prompt)
    check_output_dir(out)
    picture = load_image(args.image, args.size)

    from .cache import StageCache  # the heavy imports (torch, diffusers) only once the input is known good
    from .editing import describe_device, edit
    from .loading import load_pipeline
    from .output import save_edit

    quiet_libraries(args.quiet)
    say(args, f"loading model {args.model}")
    pipe = load_pipeline(args.model, args.device, args.dtype, allow_pickle=args.allow_pickle, config=args.config)
    cache = None if args.no_cache else StageCache(args.cache_dir)
    result = edit(pipe, picture, args.prompt, size=args.size, cache=cache, progress=not args.quiet, **settings)
    record = {
        "image": str(args.image),
        "model": args.model,
        "size": args.size,
        **describe_device(pipe),
        "cache_dir": None if cache is None else str(cache.root),
    }
    save_edit(result, out, record=record)
    say(args, f"{len(result.variants)} variants in {result.timings['total']:.1f} s "
              f"(text optimization {result.timings['text_optimization']:.1f} s, "
              f"inversion {result.timings['inversion']:.1f} s, sampling {result.timings['sampling']:.1f} s)")
    print(out)
    return 0


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
