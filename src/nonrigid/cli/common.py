"""What every ``nonrigid`` command shares: the one-line-error parser, help formatting, the runtime and model flags,
logging, and turning library errors into command-line ones.

The library names its parameters in errors (``size must be ...``); only this layer speaks of flags.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Sequence

from ..methods.catalogue import DEFAULT_ETAS, DEFAULT_INJECT
from ..models import DEFAULT_MODEL
from ..stages import INVERSION_METHODS

logger = logging.getLogger("nonrigid")

# Variants per sampling batch in low-memory mode when no --batch-size is given (each variant is two UNet rows under
# classifier-free guidance).
LOW_MEMORY_BATCH_SIZE = 2

# library parameters and the flags that set them: errors name the parameter, the command line shows the flag
FLAGS = {"allow_pickle": "--allow-pickle", "batch_size": "--batch-size", "size": "--size", "device": "--device",
         "dtype": "--dtype", "out": "--out", "pairs": "--pairs", "limit": "--limit", "types": "--types",
         "sources": "--sources", "squeezenet_weights": "--squeezenet-weights", "cpus_per_worker": "--ray-cpus",
         "pairs_per_batch": "--pairs-per-batch", "cuda_graphs": "--cuda-graphs", "model": "--model",
         "config": "--config"}


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


def add_runtime_flags(p: argparse.ArgumentParser) -> None:
    """Where and how the networks run: device, precision, memory and compilation."""
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default=None,
                   help="precision of the frozen networks (default: fp16 on CUDA, bf16 for FLUX.1 Kontext and "
                   "Qwen-Image-Edit as their model cards run them, fp32 on CPU); embeddings, losses and DDIM "
                   "arithmetic always stay fp32")
    p.add_argument("--low-memory", action="store_true",
                   help="VAE slicing and tiling, UNet gradient checkpointing and 2 variants per sampling batch "
                   "(unless --batch-size says otherwise): slower, for small GPUs; on FLUX.1 Kontext and "
                   "Qwen-Image-Edit (CUDA): diffusers' model CPU offload, each network on the GPU only while it runs")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet (CUDA: faster after a one-time compilation of about a minute)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="CUDA: capture the denoiser's calls, backward passes included, as CUDA graphs "
                   "(torch.compile reduce-overhead): fewer launch costs per call after a one-time capture")


# flags that set a method parameter (in `edit`: of the chosen method; in `bench`: of every method that has it), and
# that parameter's name; each is a shorthand of --set NAME=VALUE
PARAM_FLAGS = {
    "eta": "etas", "inject": "inject", "steps": "num_steps", "opt_steps": "opt_steps", "opt_lr": "opt_lr",
    "inner_steps": "inner_steps", "inversion": "inversion", "guidance": "guidance_scale",
}


def add_knob_flags(p: argparse.ArgumentParser) -> None:
    """The flags of :data:`PARAM_FLAGS`: the knobs of the paper's method and of the baselines that share them."""
    p.add_argument("--inversion", choices=INVERSION_METHODS, default=None,
                   help="ours: nti (null-text inversion at guidance 7.5, default), ddim (guidance 1) or npi "
                   "(negative-prompt inversion: fast, no optimization); on FLUX (no unconditional branch) the "
                   "default is ddim at the distilled guidance, the stand-in for nti")
    p.add_argument("--eta", type=float, nargs="+", default=None, metavar="ETA",
                   help="ours: interpolation weights in [0, 1]: e = eta*target + (1-eta)*optimized; higher edits "
                   f"more (default: {' '.join(f'{e:g}' for e in DEFAULT_ETAS)})")
    p.add_argument("--inject", type=float, nargs="+", default=None, metavar="RATIO",
                   help="ours: share of sampling steps conditioned on the source prompt first, in [0, 1]; the paper "
                   f"finds 0.1-0.4 works, higher keeps more structure (default: {DEFAULT_INJECT[0]:g})")
    p.add_argument("--steps", type=int, default=None,
                   help="steps of inversion and sampling (DDIM; Euler on flow models; default: the method's, 50 "
                   "for ours, 4 on FLUX schnell)")
    p.add_argument("--opt-steps", type=int, default=None, help="ours/imagic: text optimization steps (0 skips it; "
                   "default: 200 for ours)")
    p.add_argument("--opt-lr", type=float, default=None, help="ours/imagic: text optimization learning rate "
                   "(default: 1e-3)")
    p.add_argument("--inner-steps", type=int, default=None,
                   help="null-text inversion: Adam steps per sampling step (default: 10)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: the method's; ours: 7.5 with nti/npi, 1 with ddim)")


def add_model_flags(p: argparse.ArgumentParser) -> None:
    """Which model to load, and how."""
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="SD 1.x, SD 2.x, SDXL, SD3 / SD3.5, FLUX.1, FLUX.1 Kontext or Qwen-Image-Edit (-2509, "
                   "-2511): hub id, local diffusers folder or single-file .safetensors checkpoint (the family is "
                   "detected from the model; a Kontext file needs --config); or built in, offline: 'mini', "
                   "'mini-v', 'mini-xl', 'mini-flow' (the trained miniature models, 64 px) or 'tiny', 'tiny-sd2', "
                   "'tiny-sd2-v', 'tiny-sdxl', 'tiny-sd3', 'tiny-sd35', 'tiny-flux', 'tiny-flux-schnell', "
                   "'tiny-kontext', 'tiny-qwen-edit', 'tiny-qwen-edit-plus' (random weights, output is noise, for "
                   "smoke tests)")
    p.add_argument("--config", default=None,
                   help="for a single-file checkpoint: diffusers folder or hub id of the same model to read its "
                        "configs from, and the components the file lacks (a FLUX file holds the transformer only: "
                        "VAE, text encoders and tokenizers come from here)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow loading pickle checkpoints (.ckpt/.bin), which can run arbitrary code")
    p.add_argument("--no-t5", action="store_true",
                   help="SD3: load without the T5 text encoder (4.7 B parameters; its token rows become zeros)")


def load_model(args: argparse.Namespace):
    """The model (its family) the model flags and the runtime flags describe (imports torch: call it after every
    check). The family is resolved here, once per command."""
    from ..models import loading

    quiet_libraries(args.quiet)
    say(args, f"loading model {args.model}")
    model = loading.load_model(args.model, args.device, args.dtype, allow_pickle=args.allow_pickle,
                               config=args.config, t5=not getattr(args, "no_t5", False))
    return configure_from_args(model, args)


def configure_from_args(model, args: argparse.Namespace):
    """Apply --low-memory / --compile (and channels-last on CUDA); in low-memory mode sample
    :data:`LOW_MEMORY_BATCH_SIZE` variants at a time unless --batch-size says otherwise."""
    from ..models.loading import configure_model

    if hasattr(args, "batch_size"):
        args.batch_size = effective_batch_size(args)
    return configure_model(model, low_memory=args.low_memory, compile=args.compile,
                           cuda_graphs=getattr(args, "cuda_graphs", False))


def effective_batch_size(args: argparse.Namespace) -> int | None:
    """``--batch-size``, or :data:`LOW_MEMORY_BATCH_SIZE` under ``--low-memory`` when none is given."""
    given = getattr(args, "batch_size", None)
    return LOW_MEMORY_BATCH_SIZE if given is None and getattr(args, "low_memory", False) else given


def parse_assignments(assignments: Sequence[str]) -> dict[str, str]:
    """``["alpha=0.8,1.0", "skip=36"]`` -> ``{"alpha": "0.8,1.0", "skip": "36"}`` (the benchmark's parser: each
    key once, every value given)."""
    from ..methods.base import parse_key_values

    return dict(parse_key_values(assignments, "--set"))


def add_output_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars or messages, only errors and warnings")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")


def for_the_command_line(message: str) -> str:
    """A library error as the command line says it: parameter names become the flags that set them
    (``size must`` -> ``--size must``, ``allow_pickle=True`` -> ``--allow-pickle``, ``dtype=fp32`` -> ``--dtype
    fp32``)."""
    names = "|".join(FLAGS)
    message = re.sub(rf"(?<![\w-])({names})=True\b", lambda m: FLAGS[m.group(1)], message)
    message = re.sub(rf"(?<![\w-])({names})=(?=\w)", lambda m: FLAGS[m.group(1)] + " ", message)
    return re.sub(rf"(?<![\w-])({names})(?= must)", lambda m: FLAGS[m.group(1)], message)


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


