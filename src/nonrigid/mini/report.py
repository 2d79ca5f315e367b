"""docs/MINIATURE.md: what the miniature model generates, how well it inverts, and how the settings compare."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from .evaluate import load_rows, plot, summarize
from .world import COLOURS, KINDS, POSES, caption, random_scene, render


@torch.no_grad()
def sample_grid(pipe, path: Path, seed: int = 0, steps: int = 50, guidance: float = 4.0) -> list[str]:
    """Generated samples (rows: kinds x colours; columns: poses) beside nothing else: look at them."""
    rng = random.Random(seed)
    prompts = []
    for kind in KINDS:
        for colour in rng.sample(sorted(COLOURS), 2):
            ground = rng.choice(["grass", "sand", "snow", "dirt"])
            prompts.extend(caption(kind, colour, pose, ground) for pose in POSES)
    generator = torch.Generator().manual_seed(seed)
    images = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, generator=generator,
                  height=64, width=64).images
    cols = len(POSES)
    grid = Image.new("RGB", (cols * 64, len(prompts) // cols * 64 + 14), "white")
    draw = ImageDraw.Draw(grid)
    for c, pose in enumerate(POSES):
        draw.text((c * 64 + 4, 2), pose, fill="black")
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * 64, 14 + (i // cols) * 64))
    grid.resize((grid.width * 2, grid.height * 2), Image.Resampling.NEAREST).save(path)
    return prompts


def render_grid(path: Path, seed: int = 0, count: int = 6) -> None:
    """The renderer's ground truth: rows are identities, columns poses."""
    rng = random.Random(seed)
    grid = Image.new("RGB", (len(POSES) * 64, count * 64))
    for r in range(count):
        scene = random_scene(rng)
        for c, pose in enumerate(POSES):
            grid.paste(render(scene.with_pose(pose)), (c * 64, r * 64))
    grid.resize((grid.width * 2, grid.height * 2), Image.Resampling.NEAREST).save(path)


def write_plots_and_tables(run: Path, docs: Path) -> str:
    """The three identity-vs-success plots and a Markdown table of every (group, setting, eta)."""
    rows = load_rows(run)
    summary = summarize(rows)
    titles = {"methods": "The method vs the baselines", "inversion": "Ablation: inversion type (inject 20%)",
              "injection": "Ablation: source injection ratio (NTI w/o source)"}
    for group, title in titles.items():
        plot(summary, group, title, docs / f"mini-{group}.png")
    lines = ["| group | setting | eta | n | identity error | background | subject | P(target pose) | pose acc. |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (group, setting, eta), s in sorted(summary.items(), key=lambda kv: (list(titles).index(kv[0][0]),
                                                                           kv[0][1], kv[0][2])):
        lines.append(
            f"| {group} | {setting} | {eta:g} | {int(s['n'])} | {s['identity_error']:.3f} ± "
            f"{s['identity_error_se']:.3f} | {s['background_error']:.3f} | {s['subject_error']:.3f} | "
            f"{s['edit_success']:.3f} ± {s['edit_success_se']:.3f} | {s['pose_correct']:.2f} |"
        )
    (docs / "mini-results.json").write_text(json.dumps(
        [{"group": g, "setting": s, "eta": e, **v} for (g, s, e), v in summary.items()], indent=1))
    return "\n".join(lines)
