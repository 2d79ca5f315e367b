"""The miniature world's benchmark: a TEdBench-layout dataset with ground truth, and an evaluation of editing
settings on it that survives interruption.

``write_dataset`` writes ``originals/*.png`` and ``input_list.json`` as TEdBench lays them out (so any TEdBench
tool reads it; each entry also has the input's caption as ``source_text``, which TEdBench readers ignore) plus
``ground_truth.json``: every scene's factors and each pair's target pose, and ``masks/*.png``: each scene's
subject region (the box the animal covers in any pose, widened by 4 px), the mask a user would paint to let it
move (``nonrigid edit --mask``, ``nonrigid bench --masks``).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..errors import UsageError
from ..stages.cache import write_atomic
from .world import POSES, Scene, random_scene, render, subject_region

GROUND_TRUTH = "ground_truth.json"


def write_dataset(out: Path, count: int = 24, edits_per_image: int = 1, seed: int = 0) -> Path:
    """``count`` scenes, each with ``edits_per_image`` target poses other than its own."""
    if count < 1 or not 1 <= edits_per_image <= len(POSES) - 1:
        raise UsageError(f"need count >= 1 and 1 <= edits per image <= {len(POSES) - 1}")
    rng = random.Random(seed)
    originals, masks = out / "originals", out / "masks"
    originals.mkdir(parents=True, exist_ok=True)
    masks.mkdir(exist_ok=True)
    pairs, scenes = [], {}
    for index in range(count):
        scene = random_scene(rng)
        name = f"scene_{index:03d}.png"
        render(scene).save(originals / name)
        Image.fromarray(subject_region(scene)).save(masks / name)
        scenes[name] = scene.to_dict()
        targets = rng.sample([p for p in POSES if p != scene.pose], edits_per_image)
        for pose in targets:
            pairs.append({"img_name": name, "target_text": scene.with_pose(pose).caption + "."})
    truth = {"seed": seed, "scenes": scenes,
             "pairs": [{**p, "target_pose": _pose_of(p["target_text"]), "source_text": _source_text(scenes, p)}
                       for p in pairs]}
    listed = [{**p, "source_text": _source_text(scenes, p)} for p in pairs]  # the input's caption, for any reader
    write_atomic(out / "input_list.json", (json.dumps(listed, indent=2) + "\n").encode())
    write_atomic(out / GROUND_TRUTH, (json.dumps(truth, indent=2) + "\n").encode())
    return out


def _pose_of(text: str) -> str:
    return next(p for p in POSES if f" {p} " in f" {text.rstrip('.')} ")


def _source_text(scenes: dict, pair: dict) -> str:
    return Scene.from_dict(scenes[pair["img_name"]]).caption + "."


@dataclass(frozen=True)
class Pair:
    image: Path
    scene: Scene
    target_text: str
    target_pose: str
    source_text: str


def _ground_truth(folder: Path) -> dict:
    try:
        return json.loads((folder / GROUND_TRUTH).read_text())
    except FileNotFoundError as err:
        raise UsageError(f"{folder} has no {GROUND_TRUTH}; write one with `nonrigid mini dataset`") from err


def world_seed(folder: Path) -> int:
    """The seed the dataset's scenes were drawn with: which world it is."""
    return int(_ground_truth(folder)["seed"])


def read_dataset(folder: Path) -> list[Pair]:
    truth = _ground_truth(folder)
    return [
        Pair(folder / "originals" / p["img_name"], Scene.from_dict(truth["scenes"][p["img_name"]]),
             p["target_text"], p["target_pose"], p["source_text"])
        for p in truth["pairs"]
    ]
