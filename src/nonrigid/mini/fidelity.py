"""Do the miniature model's samples show what their captions say? The judge reads pose, kind and colour back.

This turns "look at the sample grid" into numbers: for random captions of the world, sample with the pipeline
and count how often the judge (trained on rendered scenes only) names the captioned pose, kind and colour.
Chance is 1/4, 1/3 and 1/8; rendered scenes score close to 1 (:func:`render_accuracy` is the ceiling).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from PIL import Image
from tqdm.auto import tqdm

from .judge import FACTORS, SceneJudge, factor_probabilities, scene_labels
from .world import POSES, Scene, random_scene, render


@dataclass
class Fidelity:
    """Share of samples whose judged factor equals the captioned one, per factor, and how many were drawn."""

    accuracy: dict[str, float]
    count: int

    def line(self) -> str:
        return ", ".join(f"{name} {value:.2f}" for name, value in self.accuracy.items()) + f" (n={self.count})"


def fidelity_scenes(per_pose: int, seed: int) -> list[Scene]:
    """``per_pose`` random scenes for every pose (kind, colour and ground random), deterministic in ``seed``."""
    rng = random.Random(seed)
    return [random_scene(rng, pose) for pose in POSES for _ in range(per_pose)]


def judged_accuracy(judge: SceneJudge, scenes: list[Scene], images: list[Image.Image]) -> dict[str, float]:
    probs = factor_probabilities(judge, images)
    labels = scene_labels(scenes)
    return {name: float((probs[name].argmax(-1) == labels[name]).float().mean()) for name in FACTORS}


@torch.no_grad()
def sample_fidelity(pipe, judge: SceneJudge, *, per_pose: int = 32, steps: int = 25, guidance: float = 4.0,
                    seed: int = 0, batch: int = 32, progress: bool = True) -> Fidelity:
    """Sample one image per scene caption (DDIM, ``steps`` steps, classifier-free guidance ``guidance``) and judge
    it. Each batch has its own seeded generator, so the result does not depend on what ran before."""
    scenes = fidelity_scenes(per_pose, seed)
    images: list[Image.Image] = []
    for start in tqdm(range(0, len(scenes), batch), desc="sampling", disable=not progress):
        chunk = scenes[start:start + batch]
        generator = torch.Generator(pipe.device).manual_seed(seed * 100_003 + start)
        images += pipe([s.caption for s in chunk], height=64, width=64, num_inference_steps=steps,
                       guidance_scale=guidance, generator=generator, output_type="pil").images
    return Fidelity(judged_accuracy(judge, scenes, images), len(scenes))


def render_accuracy(judge: SceneJudge, per_pose: int = 32, seed: int = 0) -> Fidelity:
    """The same measure on the renderer's own images: the ceiling a perfect model would reach."""
    scenes = fidelity_scenes(per_pose, seed)
    return Fidelity(judged_accuracy(judge, scenes, [render(s) for s in scenes]), len(scenes))
