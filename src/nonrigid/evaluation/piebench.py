"""PIE-Bench (Ju et al., "PnP Inversion", ICLR 2024) as released in its home repository, cure-lab/PnPInversion:
the folder layout, the run-length masks, the editing types, and :func:`read_dataset`, which tells the two benchmark
layouts apart. Torch-free.

    DATA/mapping_file.json      {"<id>": {"image_path": "5_change_attribute_pose_40/1_artificial/1_animal/<id>.jpg",
                                          "original_prompt": "a [sitting] cat", "editing_prompt": "a [running] cat",
                                          "editing_instruction": ..., "editing_type_id": "5",
                                          "blended_word": "cat cat", "mask": [start, length, start, length, ...]},
                                 ...}
    DATA/annotation_images/<image_path>

As the reference's ``evaluation/evaluate.py`` does, the ``[ ]`` markers are stripped from both prompts:
``original_prompt`` is the source caption, ``editing_prompt`` the target text. The mask marks the region to edit
(1) as ``(start, length)`` runs over the row-major flattened 512 x 512 image; :func:`decode_mask` follows the
reference's ``mask_decode``, including its border convention: the outermost rows and columns are always set to 1
("to avoid annotation errors in boundary"), so they never count as unedited background.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import UsageError
from ..images import check_image
from .data import LISTING, Pair, read_pairs

MAPPING = "mapping_file.json"
IMAGES = "annotation_images"
MASK_SHAPE = (512, 512)  # PIE-Bench's images and masks

# editing_type_id -> name (PnPInversion's README, "PIE-Bench Benchmark"); folders are <id>_<name>_<count>
EDIT_TYPES = {
    "0": "random", "1": "change object", "2": "add object", "3": "delete object", "4": "change content",
    "5": "change pose", "6": "change color", "7": "change material", "8": "change background", "9": "change style",
}
# named selections for types=: one per type by its last word, and groups
TYPE_PRESETS: dict[str, tuple[str, ...]] = {
    **{name.split()[-1]: (key,) for key, name in EDIT_TYPES.items()},
    "add": ("2",), "delete": ("3",), "attribute": ("4", "5", "6", "7"), "all": tuple(EDIT_TYPES),
}
PIE_FIELDS = ("image_path", "original_prompt", "editing_prompt", "editing_type_id", "mask")


def layout_of(data: str | os.PathLike) -> str:
    """``"piebench"`` (a mapping_file.json), ``"tedbench"`` (an input_list.json), or a one-line error."""
    data = Path(data)
    if (data / MAPPING).is_file():
        return "piebench"
    if (data / LISTING).is_file():
        return "tedbench"
    if not data.is_dir():
        raise UsageError(f"data folder {data} does not exist")
    raise UsageError(f"{data} holds neither {LISTING} (TEdBench's layout: + originals/) nor {MAPPING} (PIE-Bench's: "
                     f"+ {IMAGES}/)")


def read_dataset(data: str | os.PathLike, sources: str | os.PathLike | None = None,
                 types: str | None = None) -> tuple[str, list[Pair]]:
    """The layout of ``data`` and its pairs. ``types`` (PIE-Bench only) selects editing types
    (:func:`parse_types`); ``sources`` (TEdBench only) gives source captions (:func:`~.data.read_pairs`)."""
    layout = layout_of(data)
    if layout == "tedbench":
        if types:
            raise UsageError(f"types must be left out: {data} is in TEdBench's layout (editing types are PIE-Bench's)")
        return layout, read_pairs(data, sources)
    if sources is not None:
        raise UsageError(f"sources must be left out: PIE-Bench's {MAPPING} gives every source caption")
    return layout, read_piebench(data, types)


def strip_markers(prompt: str) -> str:
    """A PIE-Bench prompt without its ``[ ]`` difference markers (the reference removes the brackets only)."""
    return prompt.replace("[", "").replace("]", "")


def parse_types(spec: str | None) -> tuple[str, ...]:
    """``"5"``, ``"4-7"``, ``"pose,color"``, ``"attribute"`` -> the editing_type_ids, sorted; None/empty: all."""
    if not spec:
        return tuple(EDIT_TYPES)
    chosen: set[str] = set()
    for token in (t.strip().lower().replace("_", " ") for t in spec.split(",")):
        if not token:
            continue
        if re.fullmatch(r"\d+(-\d+)?", token):
            low, _, high = token.partition("-")
            ids = [str(i) for i in range(int(low), int(high or low) + 1)]
            if not ids or any(i not in EDIT_TYPES for i in ids):
                raise UsageError(f"types must be PIE-Bench's editing type ids 0-9; got {token!r}")
            chosen.update(ids)
        elif token in TYPE_PRESETS or token in EDIT_TYPES.values():
            chosen.update(TYPE_PRESETS.get(token) or [k for k, v in EDIT_TYPES.items() if v == token])
        else:
            raise UsageError(f"types must be ids 0-9, ranges (4-7) or names ({', '.join(TYPE_PRESETS)}); got {token!r}")
    if not chosen:
        raise UsageError("types must name at least one editing type")
    return tuple(sorted(chosen, key=int))


def read_piebench(data: str | os.PathLike, types: str | None = None) -> list[Pair]:
    """The items of ``data/mapping_file.json`` (in the file's order; ``index`` is the place there) whose
    editing_type_id is among ``types``, each with its image in ``data/annotation_images/``."""
    data = Path(data)
    mapping_path = data / MAPPING
    try:
        mapping = json.loads(mapping_path.read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"{mapping_path} is not readable JSON ({err})") from None
    if not isinstance(mapping, dict) or not all(isinstance(v, dict) and set(PIE_FIELDS) <= set(v)
                                                for v in mapping.values()):
        raise UsageError(f"{mapping_path} must map ids to objects with {', '.join(PIE_FIELDS)}, as PIE-Bench's does")
    wanted = set(parse_types(types))
    pairs = []
    for index, (key, item) in enumerate(mapping.items()):
        edit_type = str(item["editing_type_id"])
        if edit_type not in wanted:
            continue
        image = data / IMAGES / item["image_path"]
        if not image.is_file():
            raise UsageError(f"{mapping_path} item {key} names {item['image_path']}, which is not in {data / IMAGES}")
        check_image(image)  # a decompression bomb or an over-size image: refused before any job runs
        mask = item["mask"]
        if not isinstance(mask, list) or len(mask) % 2 or not all(isinstance(v, int) and v >= 0 for v in mask):
            raise UsageError(f"{mapping_path} item {key}: mask must be a list of (start, length) integer pairs")
        pairs.append(Pair(index, str(item["image_path"]), image, strip_markers(str(item["editing_prompt"])),
                          strip_markers(str(item["original_prompt"])), "mapping file", edit_type, tuple(mask),
                          str(item.get("editing_instruction") or "").strip()))
    if not pairs:
        raise UsageError(f"{mapping_path} has no item of editing type {', '.join(sorted(wanted, key=int))}")
    return pairs


def type_name(edit_type: str) -> str:
    """``"5"`` -> ``"5 change pose"`` (the table's row label)."""
    return f"{edit_type} {EDIT_TYPES[edit_type]}" if edit_type in EDIT_TYPES else str(edit_type)


# --------------------------------------------------------------------------------------------------- masks


def decode_mask(encoded: Sequence[int], shape: tuple[int, int] = MASK_SHAPE, *, border: bool = True) -> np.ndarray:
    """The (H, W) float mask of a PIE-Bench run-length list, 1 where the image is to be edited.

    As the reference's ``mask_decode``: runs ``(start, length)`` over the row-major flattened image, a run cut at
    the image's end; then (``border``) the first and last row and column set to 1.
    """
    if len(encoded) % 2:
        raise UsageError("a PIE-Bench mask needs (start, length) pairs; got an odd number of values")
    size = shape[0] * shape[1]
    flat = np.zeros(size, dtype=np.float64)
    for start, length in zip(encoded[0::2], encoded[1::2], strict=True):
        flat[start:start + max(0, min(length, size - start))] = 1
    mask = flat.reshape(shape)
    if border:
        mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = 1
    return mask


def encode_mask(mask: np.ndarray) -> list[int]:
    """The run-length list of a binary (H, W) mask, as PIE-Bench stores it: ``[start, length, ...]`` of every run of
    ones in the row-major flattened mask, in order. :func:`decode_mask` with ``border=False`` inverts it."""
    flat = np.concatenate([[0], (np.asarray(mask).reshape(-1) > 0.5).astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(flat))
    starts, ends = edges[0::2], edges[1::2]
    return [int(v) for run in zip(starts, ends - starts, strict=True) for v in run]


def mask_at(encoded: Sequence[int], side: int) -> np.ndarray:
    """The decoded mask at ``side`` x ``side`` pixels, where an edit made at another size is scored: decoded at
    512 without borders, resized by nearest neighbour, then given the border convention at the new size (at 512,
    exactly :func:`decode_mask`)."""
    mask = decode_mask(encoded, border=False)
    if side != MASK_SHAPE[0]:
        rows = ((np.arange(side) + 0.5) * MASK_SHAPE[0] / side).astype(int)
        cols = ((np.arange(side) + 0.5) * MASK_SHAPE[1] / side).astype(int)
        mask = mask[np.ix_(rows, cols)]
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = 1
    return mask
