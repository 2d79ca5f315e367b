"""``nonrigid edit`` and ``nonrigid methods``: one image, any method, every variant in one folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UsageError
from ..methods.catalogue import INSTRUCTION_TEMPLATE, METHODS, fast_summary, method_info
from ..models.capabilities import describe
from .common import (
    PARAM_FLAGS,
    HelpFormatter,
    add_knob_flags,
    add_model_flags,
    add_output_flags,
    add_runtime_flags,
    load_model,
    say,
)


def add_edit_parser(commands) -> None:
    p = commands.add_parser(
        "edit",
        help="edit one image toward a target prompt (the paper's method or a baseline)",
        description="Edit IMAGE toward PROMPT. The default method (ours) runs (A) text optimization per seed, (B) "
        "one latent inversion and (C) timestep-aware text injection sampling for every seed x inject x eta. "
        "Every method writes input.png, one PNG per variant, grid.png (rows: seed x inject; columns: the "
        "input, then the method's main sweep, e.g. eta) and edit.json to --out. Stages are cached, so trying "
        "other --eta/--inject values later takes seconds. Baselines: --method "
        "nti|imagic|masactrl|edit-friendly|dds|ledits|flowedit, their knobs via --set key=value (list them with "
        "`nonrigid methods`). The instruction editors on their own models: --method kontext (--model "
        "black-forest-labs/FLUX.1-Kontext-dev) and --method qwen-edit (--model Qwen/Qwen-Image-Edit-2509), which "
        "follow --instruction, or else the instruction \"Change the picture so that it shows <PROMPT>, keeping "
        "everything else the same.\"",
        formatter_class=HelpFormatter,
    )
    p.add_argument("image", help="input image (any format Pillow reads); the whole picture at its own aspect ratio "
                   "(--crop square: center-cropped to a square)")
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
    p.add_argument("--instruction", default=None, metavar="TEXT",
                   help="kontext, qwen-edit: the instruction to follow, e.g. \"Make the dog jump.\" (default: "
                   "\"Change the picture so that it shows PROMPT, keeping everything else the same.\", with PROMPT's "
                   "final full stop dropped and its first letter lower-cased); recorded in edit.json")
    add_model_flags(p)
    add_knob_flags(p)
    p.add_argument("--seed", type=int, nargs="+", default=[0], metavar="SEED",
                   help="one or more seeds; each is its own text optimization (deterministic methods use the "
                   "first)")
    p.add_argument("--size", type=int, default=None,
                   help="working resolution: about SIZE x SIZE pixels at the picture's own aspect ratio, each side "
                   "rounded to the model's latent grid (with --crop square: the square's side); default: the "
                   "model's native size: 512 for SD 1.x and SD 2 base, 768 for SD 2.x v models, 1024 for SDXL, SD3 "
                   "and FLUX, 64 for the miniature models")
    p.add_argument("--fast", action="store_true",
                   help=f"ours' fast preset ({fast_summary()}; no worse than the default on the miniature world's "
                   "held-out test, docs/MINIATURE.md); flags you give win over it")
    p.add_argument("--crop", choices=("square",), default=None,
                   help="square: center-crop to a square, as the reference implementations do (default: keep the "
                   "whole picture)")
    p.add_argument("--mask", type=Path, default=None,
                   help="a picture of the image's size: white where the edit may change it, black where it must "
                   "stay (ours, nti, masactrl, edit-friendly, dds, flowedit; a mask of another size is resized)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="most variants per UNet batch (default: all at once; lower it to save memory)")
    add_runtime_flags(p)
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="stage cache folder (default: $NONRIGID_CACHE_DIR or the user cache dir)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the stage cache")
    add_output_flags(p)
    p.set_defaults(func=run_edit)

    methods = commands.add_parser(
        "methods", help="list the editing methods, their parameters and defaults",
        description="Each method's summary, reference and parameters (set them with `nonrigid edit --method M "
        "--set key=value`; sweep parameters take comma-separated values, one variant each).",
    )
    methods.add_argument("names", nargs="*", metavar="METHOD", help="only these methods")
    methods.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    methods.set_defaults(func=run_methods)


def run_methods(args: argparse.Namespace) -> int:
    print(describe_methods(args.names or None), end="")
    return 0


def default_out(image: Path, prompt: str, method: str = "ours") -> Path:
    from ..methods.output import slugify

    slug = slugify(prompt, 48, "edit")
    suffix = "" if method == "ours" else f"-{method}"
    return Path("out") / f"{image.stem}-{slug}{suffix}"


def method_params(args: argparse.Namespace) -> dict[str, object]:
    """The method's parameters the user set (--set and the dedicated flags), each checked against its table (no
    torch); the front door fills in the defaults once the model is known."""
    from ..methods.base import check_overrides
    from ..methods.catalogue import method_info
    from .common import parse_assignments

    info = method_info(args.method)
    if getattr(args, "fast", False) and "fast" not in info.presets:
        raise UsageError(f"--fast is a preset of ours; --method {args.method} has none")
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
    return check_overrides(info, params, shown_as)


def run_edit(args: argparse.Namespace) -> int:
    from ..images import open_image
    from ..methods.output import check_output_dir
    from ..models import check_model_name

    image = open_image(args.image)  # read once; a missing or broken image fails before torch is imported
    out = args.out or default_out(Path(args.image), args.prompt, args.method)
    check_output_dir(out)
    if args.size is not None and args.size <= 0:
        raise UsageError(f"--size must be positive, got {args.size}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not args.seed:
        raise UsageError("--seed needs at least one seed")
    check_model_name(args.model)  # a mistyped name, told before torch is imported
    params = method_params(args)  # validates before anything slow happens
    mask = read_cli_mask(args, image)
    instruction = read_instruction(args)
    method_info(args.method).check_model_source(args.model, args.config)

    from ..methods.output import save_result  # the heavy imports (torch, diffusers) once the input is known good
    from ..methods.run import EditRequest, run_edits
    from ..models.loading import describe_device
    from ..stages.cache import StageCache

    model = load_model(args)
    cache = None if args.no_cache else StageCache(args.cache_dir)
    request = EditRequest(image, args.prompt, args.source, mask, instruction)
    (result,) = run_edits(model, [request], args.method, params,
                          seeds=args.seed, size=args.size, crop=args.crop, cache=cache, batch_size=args.batch_size,
                          preset="fast" if args.fast else None, progress=not args.quiet)
    record = {
        "image": str(args.image),
        **({"mask_file": str(args.mask)} if args.mask else {}),
        "model": args.model,
        "model_family": model.describe(),
        **describe_device(model),
        "low_memory": args.low_memory,
        "compile": args.compile,
        **({"cuda_graphs": True} if args.cuda_graphs else {}),
        "cache_dir": None if cache is None else str(cache.root),
    }
    save_result(result, out, record=record)
    stages = ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in result.timings.items() if k != "total")
    say(args, f"{args.method}: {len(result.variants)} variants in {result.timings['total']:.1f} s ({stages})")
    print(out)
    return 0


def read_instruction(args: argparse.Namespace) -> str | None:
    """``--instruction``, for a method that takes one (None without it); refused in one line for the others, which
    would ignore it."""
    if args.instruction is None:
        return None
    if not method_info(args.method).instructions:
        takers = ", ".join(name for name, info in METHODS.items() if info.instructions)
        raise UsageError(f"--instruction does not apply to --method {args.method}: only {takers} follow an "
                         "instruction; the other methods edit toward PROMPT")
    if not args.instruction.strip():
        raise UsageError("--instruction is empty; give the instruction, or leave the flag out to make one from "
                         "PROMPT")
    return args.instruction


def read_cli_mask(args: argparse.Namespace, image):
    """The --mask as floats at the upright image's size, checked before torch is imported (None without one); a
    method that takes no mask is refused here too."""
    if args.mask is None:
        return None
    from PIL import ImageOps

    from ..images import read_mask
    from ..methods.catalogue import method_info

    info = method_info(args.method)
    if not info.masks:
        raise UsageError(f"--mask does not apply to --method {args.method}: {info.why_no_mask}")
    values, note = read_mask(args.mask, ImageOps.exif_transpose(image).size)
    if note:
        say(args, note)
    return values


def describe_methods(names: list[str] | None = None) -> str:
    """The ``nonrigid methods`` listing: each method, what it does, its parameters with defaults."""
    lines: list[str] = []
    for name in names or list(METHODS):
        info = method_info(name)
        lines.append(f"{info.name}: {info.summary}")
        if info.reference:
            lines.append(f"  reference: {info.reference}")
        if not info.seeded:
            lines.append("  deterministic: the seed does not change its result (one run serves every seed)")
        if info.memory:
            lines.append(f"  memory: {info.memory}")
        if info.requires:
            lines.append(f"  needs: {describe(info.requires)}")
        if info.instructions:
            lines.append("  follows an instruction: --instruction TEXT, else \"" + INSTRUCTION_TEMPLATE.format(
                target="<PROMPT>") + "\" (benchmarks: PIE-Bench's editing_instruction)")
        for guidance, settings in _distinct(info.settings_by_guidance):
            shown = ", ".join(f"{name}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
                              for name, v in settings.items())
            lines.append(f"  defaults on models with {guidance} (the reference's settings there): {shown}")
        for p in info.params:
            default = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in p.default) if p.is_sweep \
                else ("none" if p.default is None else p.default)
            sweep = " (sweep: one variant per value)" if p.is_sweep else ""
            lines.append(f"  --set {p.name}={default}  {p.help}{sweep}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _distinct(by_guidance) -> list[tuple[str, dict]]:
    """Settings shared by several kinds of guidance, listed once with the kinds joined ("distilled guidance or no
    guidance")."""
    kinds: dict[str, list[str]] = {}
    values: dict[str, dict] = {}
    for guidance, settings in by_guidance.items():
        key = repr(sorted(settings.items()))
        kinds.setdefault(key, []).append(guidance)
        values[key] = dict(settings)
    return [(" or ".join(GUIDANCE_WORDS.get(g, g) for g in kinds[key]), values[key]) for key in kinds]


GUIDANCE_WORDS = {"classifier-free": "classifier-free guidance", "distilled": "distilled guidance",
                  "none": "no guidance"}
