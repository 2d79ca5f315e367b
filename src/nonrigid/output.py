"""Writing an edit to a folder a person can look at: input.png, one PNG per variant, grid.png and edit.json.

The folder appears whole or not at all: everything is written into a hidden sibling folder that is renamed into
place at the end, so an interrupted or failed run leaves no half-written output.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from .errors import UsageError

MANIFEST = "edit.json"


def check_output_dir(out: Path) -> None:
    """Refuse an output path that is a file, or a non-empty folder that is not an earlier edit's output."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"output path {out} is a file; give a folder path with --out")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise UsageError(f"output folder {out} is not empty and holds no earlier edit; choose another --out")


def variant_filename(seed: int, inject_steps: int, eta: float) -> str:
    return f"seed{seed}_K{inject_steps:02d}_eta{eta:.2f}.png"


def write_folder_atomically(out: Path, files: dict[str, bytes | Image.Image]) -> None:
    """Write ``files`` (name -> PNG image or bytes) as the folder ``out``, replacing an earlier edit there."""
    check_output_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        for name, content in files.items():
            if isinstance(content, Image.Image):
                content.save(staging / name, format="PNG")
            else:
                (staging / name).write_bytes(content)
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            out.rename(old / "previous")
            staging.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def make_grid(
    rows: Sequence[Sequence[Image.Image]], row_labels: Sequence[str], col_labels: Sequence[str]
) -> Image.Image:
    """Images in a labelled grid: a header with the column labels, a left margin with the row labels."""
    cell = rows[0][0].size
    font = ImageFont.load_default(size=max(10, cell[1] // 16))
    margin_left = max(90, int(max((font.getlength(s) for s in row_labels), default=0)) + 12)
    margin_top = font.size + 12
    grid = Image.new("RGB", (margin_left + cell[0] * len(col_labels), margin_top + cell[1] * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for c, label in enumerate(col_labels):
        draw.text((margin_left + c * cell[0] + 4, 4), label, fill="black", font=font)
    for r, (row, label) in enumerate(zip(rows, row_labels, strict=True)):
        y = margin_top + r * cell[1]
        draw.text((4, y + cell[1] // 2 - font.size // 2), label, fill="black", font=font)
        for c, img in enumerate(row):
            grid.paste(img, (margin_left + c * cell[0], y))
    return grid


def manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2) + "\n").encode()


def save_edit(result, out: str | Path, *, record: dict | None = None) -> Path:
    """Write an :class:`~nonrigid.editing.EditResult` to ``out``; ``record`` adds fields to edit.json."""
    from . import __version__

    out = Path(out)
    settings = result.settings
    files: dict[str, bytes | Image.Image] = {"input.png": result.input_image}
    variants = []
    for v in result.variants:
        name = variant_filename(v.seed, v.inject_steps, v.eta)
        files[name] = v.image
        variants.append({"file": name, "seed": v.seed, "eta": v.eta, "inject_ratio": v.inject_ratio,
                         "inject_steps": v.inject_steps})
    steps = settings.inject_steps()
    seeds = list(dict.fromkeys(settings.seeds))
    by_key = {(v.seed, v.inject_steps, v.eta): v.image for v in result.variants}
    rows = [[by_key[(s, k, e)] for e in settings.etas] for s in seeds for k in steps]
    files["grid.png"] = make_grid(
        rows, [f"seed {s}, K={k}" for s in seeds for k in steps], [f"eta {e:g}" for e in settings.etas]
    )
    manifest = {
        "nonrigid_version": __version__,
        **(record or {}),
        "model_fingerprint": result.model_fingerprint,
        "target_prompt": settings.target_prompt,
        "source_prompt": settings.source_prompt,
        "seeds": seeds,
        "etas": list(settings.etas),
        "inject_ratios": list(settings.inject),
        "inject_steps": list(steps),
        "num_steps": settings.num_steps,
        "opt_steps": settings.opt_steps,
        "opt_lr": settings.opt_lr,
        "inversion": settings.inversion,
        "guidance_scale": settings.guidance,
        "nti_inner_steps": settings.inner_steps,
        "nti_early_stop": settings.early_stop,
        "variants": variants,
        "text_optimization_final_loss": {t.seed: (t.losses[-1] if t.losses else None)
                                         for t in result.text_optimizations},
        "timings_s": {k: round(v, 3) for k, v in result.timings.items()},
        "cache": result.cache,
    }
    files[MANIFEST] = manifest_bytes(manifest)
    write_folder_atomically(out, files)
    return out
