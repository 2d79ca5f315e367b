"""The pairs of a benchmark folder, their source captions, and the selection of some of them. Torch-free.

Two layouts are recognised (:func:`.piebench.read_dataset`): TEdBench's (``input_list.json`` + ``originals/``),
read here, and PIE-Bench's as released with PnPInversion (``mapping_file.json`` + ``annotation_images/``), read by
:mod:`.piebench`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from ..images import check_image
from ..methods.output import slugify

LISTING = "input_list.json"


@dataclass(frozen=True)
class Pair:
    """One (input image, target text) pair of a TEdBench-layout folder; ``index`` is its place in input_list."""

    index: int
    img_name: str
    image: Path
    target_text: str
    source_text: str = ""  # a caption of the input: the source prompt of settings that use one
    source_origin: str = ""  # where that caption comes from: "sources", "input list", "file name", "mapping file"
    edit_type: str = ""  # PIE-Bench's editing_type_id ("5": change pose); empty for TEdBench
    mask: tuple[int, ...] | None = None  # PIE-Bench's edited region, run-length pairs over the flattened 512 x 512
    instruction: str = ""  # the dataset's own instruction (PIE-Bench's editing_instruction), for instruction editors

    @property
    def slug(self) -> str:
        return f"{self.index:03d}-{slugify(Path(self.img_name).stem)}"


def caption_from_filename(img_name: str) -> str:
    """A last-resort source prompt from a file name: ``dog2_standing.png`` -> ``A photo of dog standing.``

    TEdBench gives no captions of its inputs; trailing digits and tokens with digits in them (hashes, sizes) are
    dropped.
    """
    words = []
    for token in re.split(r"[^A-Za-z0-9]+", Path(img_name).stem):
        token = token.rstrip("0123456789")
        if len(token) > 1 and not any(c.isdigit() for c in token):
            words.append(token.lower())
    return f"A photo of {' '.join(words) or 'an object'}."


def read_pairs(data: str | os.PathLike, sources: str | os.PathLike | None = None) -> list[Pair]:
    """The pairs of ``data/input_list.json`` with their images in ``data/originals/``.

    Source captions come from ``sources`` (a JSON object: image name or stem -> caption), else a ``source_text``
    field of the input list's entries (TEdBench's readers ignore extra fields), else the file name
    (:func:`caption_from_filename`). They are only used by settings with ``source=pair``.
    """
    data = Path(data)
    listing = data / LISTING
    if not listing.is_file():
        raise UsageError(f"{data} has no {LISTING}; give a folder in TEdBench's layout ({LISTING} + originals/)")
    try:
        listed = json.loads(listing.read_text())
    except ValueError as err:
        raise UsageError(f"{listing} is not valid JSON ({err})") from None
    if not isinstance(listed, list) or not all(isinstance(e, dict) and {"img_name", "target_text"} <= set(e)
                                               for e in listed):
        raise UsageError(f"{listing} must be a list of {{img_name, target_text}} objects, as in TEdBench")
    entries = [(str(e["img_name"]), str(e["target_text"]), e.get("source_text")) for e in listed]
    captions = read_captions(sources) if sources is not None else {}
    pairs = []
    for index, (img_name, target, source) in enumerate(entries):
        image = data / "originals" / img_name
        if not image.is_file():
            raise UsageError(f"{listing} names {img_name}, which is not in {data / 'originals'}")
        check_image(image)  # a decompression bomb or an over-size image: refused before any job runs
        found = [("sources", captions.get(img_name) or captions.get(Path(img_name).stem)), ("input list", source),
                 ("file name", caption_from_filename(img_name))]
        origin, caption = next((origin, text) for origin, text in found if text)
        pairs.append(Pair(index, img_name, image, target, str(caption), origin))
    if not pairs:
        raise UsageError(f"{listing} lists no pairs")
    return pairs


def read_captions(sources: str | os.PathLike) -> dict[str, str]:
    """A JSON file holding one object: image name (or stem) -> caption."""
    try:
        given = json.loads(Path(sources).read_text())
    except (OSError, ValueError):
        given = None
    if not isinstance(given, dict) or not all(isinstance(v, str) for v in given.values()):
        raise UsageError(f"sources file {sources} must be a JSON file with an object mapping image names to "
                         "captions")
    return given


def select_pairs(pairs: Sequence[Pair], spec: str | None = None, limit: int | None = None) -> list[Pair]:
    """``spec``: comma-separated indices (0-based, as in input_list.json or PIE-Bench's mapping file), ranges
    ``3-7`` and image names or stems (every pair of that image; a name wins over an index, since PIE-Bench's are
    numbers); then the first ``limit`` of those. Indices are the pairs' own (``Pair.index``): a range over pairs
    left out before (PIE-Bench's other editing types) takes those of it that are here."""
    chosen = list(pairs)
    if spec:
        by_index = {p.index: p for p in pairs}
        total = max(by_index) + 1 if by_index else 0
        wanted: dict[int, None] = {}
        for token in (t.strip() for t in spec.split(",")):
            if not token:
                continue
            named = [p.index for p in pairs if token in (p.img_name, Path(p.img_name).stem)]  # PIE-Bench ids too
            if not named and re.fullmatch(r"\d+(-\d+)?", token):
                low, _, high = token.partition("-")
                indices = [i for i in range(int(low), int(high or low) + 1) if i in by_index]
                if int(high or low) >= total or int(high or low) < int(low):
                    raise UsageError(f"pairs {token}: there are {total} pairs, numbered 0-{total - 1}")
                if not indices:
                    raise UsageError(f"pairs {token}: none of these pairs is among the selected ones")
            else:
                indices = named
                if not indices:
                    raise UsageError(f"pairs {token}: no pair has that image (give indices or image names)")
            wanted.update(dict.fromkeys(indices))
        chosen = [by_index[i] for i in sorted(wanted)]
    if limit is not None:
        if limit < 1:
            raise UsageError(f"limit must be >= 1, got {limit}")
        chosen = chosen[:limit]
    if not chosen:
        raise UsageError("no pairs selected")
    return chosen
