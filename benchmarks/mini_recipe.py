"""Which training recipe makes the miniature model draw its captions best, for the same CPU time?

Each recipe trains the UNet and text encoder from scratch on the VAE and encoded dataset of a finished
``nonrigid mini train`` run (copied, so that run is untouched), then the judge reads pose, kind and colour back
from its samples (:mod:`nonrigid.mini.fidelity`). The recipes below differ in one thing each and cost the same
number of training samples (batch x steps), i.e. about the same time:

    python benchmarks/mini_recipe.py --base runs/mini-train --out runs/mini-recipes

Resumable per recipe (a rerun continues the unfinished one); results go to ``OUT/results.json`` and a table on
stdout. This is how the shipped recipe (``TrainConfig``'s defaults) was chosen: docs/MINIATURE.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from nonrigid.mini.config import TrainConfig
from nonrigid.mini.fidelity import sample_fidelity
from nonrigid.mini.judge import load_judge
from nonrigid.mini.train import Log, train
from nonrigid.models.loading import load_pipeline

RECIPES = {
    "plain, batch 64": {"unet_steps": 400, "unet_batch": 64, "snr_gamma": 0.0},
    "min-SNR 5, batch 64": {"unet_steps": 400, "unet_batch": 64, "snr_gamma": 5.0},
    "min-SNR 5, batch 32": {"unet_steps": 800, "unet_batch": 32, "snr_gamma": 5.0},
}


def run_recipe(base: Path, out: Path, overrides: dict, per_pose: int) -> dict:
    """Train one recipe into ``out`` (reusing ``base``'s VAE and dataset) and judge its samples."""
    (out / "work").mkdir(parents=True, exist_ok=True)
    for name in ("vae.pt", "dataset.pt"):
        if not (out / "work" / name).exists():
            shutil.copy(base / "work" / name, out / "work" / name)
    config = replace(TrainConfig(), **overrides)
    started = time.perf_counter()
    model = train(out, config, progress=True, log=Log(out / "train_log.txt", echo=None))
    minutes = (time.perf_counter() - started) / 60
    pipe = load_pipeline(str(model), device="cpu", dtype="fp32")
    pipe.set_progress_bar_config(disable=True)
    fidelity = sample_fidelity(pipe, load_judge(), per_pose=per_pose, guidance=4.0)
    return {"config": asdict(config), "minutes": minutes, "accuracy": fidelity.accuracy, "count": fidelity.count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, required=True, help="a finished `nonrigid mini train --out` folder")
    parser.add_argument("--out", type=Path, default=Path("runs/mini-recipes"), help="where the recipes train")
    parser.add_argument("--per-pose", type=int, default=24, help="samples per pose for the judge")
    args = parser.parse_args()
    for name in ("vae.pt", "dataset.pt"):
        if not (args.base / "work" / name).is_file():
            parser.error(f"{args.base / 'work' / name} not found: give a folder written by `nonrigid mini train`")
    torch.set_num_threads(TrainConfig().threads)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for index, (name, overrides) in enumerate(RECIPES.items()):
        if name not in results:
            results[name] = run_recipe(args.base, args.out / f"recipe{index}", overrides, args.per_pose)
            results_path.write_text(json.dumps(results, indent=2) + "\n")
    print("| recipe | minutes | pose | kind | colour |\n| --- | --- | --- | --- | --- |")
    for name, result in results.items():
        acc = result["accuracy"]
        print(f"| {name} | {result['minutes']:.1f} | {acc['pose']:.2f} | {acc['kind']:.2f} | {acc['colour']:.2f} |")


if __name__ == "__main__":
    main()
