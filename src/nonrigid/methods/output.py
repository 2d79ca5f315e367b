"""Writing an edit to a folder a person can look at: input.png, one PNG per variant, grid.png and edit.json.

The folder appears whole or not at all: everything is written into a hidden sibling folder that is renamed into
place at the end, so an interrupted or failed run leaves no half-written output.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..errors import UsageError

MANIFEST = "edit.json"


def check_output_dir(out: Path) -> None:
    """Refuse an output path that is a file, or a non-empty folder that is not an earlier edit's output."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"output path {out} is a file: out must be a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise UsageError(f"output folder {out} is not empty and holds no earlier edit: out must be a new folder or "
                         "an earlier edit's")


def slugify(text: str, limit: int = 60, empty: str = "x") -> str:
    """File-name-safe lower-case words joined by '-' (``empty`` when nothing is left)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:limit] or empty


def format_knob(label: str, value: int | float) -> str:
    """A sweep value as it appears in file names and grid labels: ``K10``, ``eta0.20``."""
    return f"{label}{value:02d}" if isinstance(value, int) else f"{label}{value:.2f}"


def variant_filename(seed: int, knobs: dict[str, int | float]) -> str:
    """``seed0_K10_eta0.20.png``: the seed, then each sweep value in the method's order."""
    return "_".join([f"seed{seed}", *(format_knob(k, v) for k, v in knobs.items())]) + ".png"


def write_folder_atomically(out: Path, files: dict[str, bytes | Image.Image]) -> None:
    """Write ``files`` (name -> PNG image or bytes) as the folder ``out``, replacing an earlier edit there."""
    check_output_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging_folder(out)
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


def _staging_folder(out: Path) -> Path:
    """A new hidden sibling of ``out`` to write into, with the mode a plain mkdir gives (the umask's), since it
    becomes ``out``: ``tempfile.mkdtemp``'s would be 0700, an edit nobody else could read."""
    while True:
        staging = out.parent / f".{out.name}.partial-{secrets.token_hex(4)}"
        try:
            staging.mkdir()
        except FileExistsError:
            continue
        return staging


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


def save_result(result, out: str | Path, *, record: dict | None = None) -> Path:
    """Write an :class:`~nonrigid.methods.base.EditResult` to ``out``: input.png, one PNG per variant, grid.png
    (rows: seed x every sweep but the last; columns: the input, then the last sweep) and edit.json. ``record``
    adds fields."""
    from .. import __version__

    out = Path(out)
    files: dict[str, bytes | Image.Image] = {"input.png": result.input_image}
    variants = []
    for v in result.variants:
        name = variant_filename(v.seed, v.knobs)
        files[name] = v.image
        variants.append({"file": name, "seed": v.seed, **v.knobs, **v.record})
    files["grid.png"] = _grid(result)
    params = {k: list(v) if isinstance(v, tuple) else v for k, v in result.params.items()}
    manifest = {
        "nonrigid_version": __version__,
        **(record or {}),
        "method": result.method,
        "model_fingerprint": result.model_fingerprint,
        "target_prompt": result.target_prompt,
        "source_prompt": result.source_prompt,
        "seeds": list(result.seeds),
        **params,
        **result.record,
        "variants": variants,
        "timings_s": {k: round(v, 3) for k, v in result.timings.items()},
        "cache": result.cache,
    }
    files[MANIFEST] = manifest_bytes(manifest)
    write_folder_atomically(out, files)
    return out


def _grid(result) -> Image.Image:
    """Rows: seed x the values of every sweep but the last; columns: the input, then the last sweep's values (or
    one column), so that every row shows what it was made from."""
    rows: dict[tuple, list] = {}
    columns: dict[object, str] = {"input": "input"}
    for v in result.variants:
        knobs = list(v.knobs.items())
        row_key = (v.seed, *knobs[:-1])
        column = knobs[-1] if knobs else None
        columns.setdefault(column, f"{column[0]} {column[1]:g}" if column else result.method)
        rows.setdefault(row_key, [result.input_image]).append(v.image)
    labels = [", ".join([f"seed {key[0]}", *(f"{k}={val:g}" for k, val in key[1:])]) for key in rows]
    return make_grid(list(rows.values()), labels, list(columns.values()))
