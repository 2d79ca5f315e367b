"""Scoring edits made elsewhere (named ``<image name>-<target text>.png`` like TEdBench's published Imagic
results) into the same kind of run folder as the benchmark's. Torch-free at import."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..methods.output import slugify
from .bench import BenchStats
from .data import Pair
from .protocol import METRIC_NAMES
from .runfolder import RunFolder

SCORE_BATCH = 16  # outside edits scored and committed together
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def normalize_words(text: str) -> str:
    """Lower-case alphanumeric words separated by single spaces: how file names and texts are compared."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


@dataclass(frozen=True)
class OutsideEdit:
    """An edit made elsewhere, matched to its pair; ``seed`` from a trailing number, when the name has one."""

    file: Path
    pair: Pair
    seed: int = 0


def match_edits(files: Sequence[Path], pairs: Sequence[Pair]) -> tuple[list[OutsideEdit], list[str]]:
    """Match ``<image name>-<target text>[ <n>].png`` files to pairs, ignoring case, spaces, underscores and
    punctuation, with or without the image's extension. Returns the matches and one warning per file left out."""
    exact: dict[str, list[Pair]] = {}
    loose: dict[str, list[Pair]] = {}
    for pair in pairs:
        target = normalize_words(pair.target_text)
        exact.setdefault(f"{normalize_words(pair.img_name)} {target}", []).append(pair)
        loose.setdefault(f"{normalize_words(Path(pair.img_name).stem)} {target}", []).append(pair)
    matches: dict[tuple[int, int], OutsideEdit] = {}
    warnings: list[str] = []
    for file in sorted(files):
        name = normalize_words(file.stem)
        candidates, seed = exact.get(name) or loose.get(name) or [], 0
        numbered = re.fullmatch(r"(.*) (\d+)", name)
        if not candidates and numbered:  # several edits of one pair: "<image>-<text>_3.png"
            candidates, seed = exact.get(numbered[1]) or loose.get(numbered[1]) or [], int(numbered[2])
        if not candidates:
            warnings.append(f"{file.name}: matches no pair of input_list.json; skipped")
        elif len(candidates) > 1:
            names = ", ".join(str(p.index) for p in candidates)
            warnings.append(f"{file.name}: matches several pairs ({names}); skipped")
        elif (candidates[0].index, seed) in matches:
            other = matches[candidates[0].index, seed].file.name
            warnings.append(f"{file.name}: pair {candidates[0].index} seed {seed} is already {other}; skipped")
        else:
            matches[candidates[0].index, seed] = OutsideEdit(file, candidates[0], seed)
    return [matches[k] for k in sorted(matches)], warnings


def outside_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder of edited images")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not p.name.startswith("."))


def score_identity(folder: Path, data: Path, method: str, size: int, metrics: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "score", "folder": str(folder.resolve()), "data": str(data.resolve()), "method": method,
            "size": size, "metrics": dict(metrics)}


def score_folder(
    edits: Sequence[OutsideEdit],
    run: RunFolder,
    method: str,
    size: int,
    metrics: Any,
    *,
    progress: bool = False,
) -> BenchStats:
    """Score outside edits against their pair's original (both as the editor sees images: center crop, ``size``),
    copying each into the run folder; resumable like the benchmark (one job per file)."""
    from tqdm.auto import tqdm

    from ..images import load_image

    if size <= 0:
        raise UsageError(f"size must be positive, got {size}")
    done = run.done_jobs()
    todo = [e for e in edits if _outside_key(e, method) not in done]
    stats = BenchStats(jobs=len(edits), done_before=len(edits) - len(todo))
    with tqdm(total=len(edits), initial=stats.done_before, desc="score", unit="image", disable=not progress) as bar:
        for start in range(0, len(todo), SCORE_BATCH):
            chunk = todo[start:start + SCORE_BATCH]
            sources = [load_image(e.pair.image, size) for e in chunk]
            edited = [load_image(e.file, size) for e in chunk]
            finished = []
            scores = metrics.score_batch(sources, edited, [e.pair.target_text for e in chunk])
            for edit, source, image, score in zip(chunk, sources, edited, scores, strict=True):
                input_path = f"inputs/{edit.pair.slug}.png"
                path = f"images/{slugify(method)}/default/{edit.pair.slug}/seed{edit.seed}.png"
                run.write_image(input_path, source)
                run.write_image(path, image)
                key = _outside_key(edit, method)
                row = {"job": key, "pair": edit.pair.index, "image_name": edit.pair.img_name,
                       "target_text": edit.pair.target_text, "source_prompt": "", "method": method,
                       "setting": "default", "seed": edit.seed, "knobs": {}, "params": {},
                       **{m: score.get(m) for m in METRIC_NAMES}, "image": path,
                       "record": {"file": edit.file.name, "input": input_path}}
                job_row = {"job": key, "pair": edit.pair.index, "method": method, "setting": "default", "params": {},
                           "edits": 1, "seconds": None, "timings": None, "cache": None,
                           "record": {"file": edit.file.name}}
                finished.append((job_row, [row]))
            run.commit(finished)
            stats.ran += len(chunk)
            stats.edits += len(chunk)
            bar.update(len(chunk))
    return stats


def _outside_key(edit: OutsideEdit, method: str) -> str:
    return f"{edit.pair.index:03d}/{method}/seed{edit.seed}"
