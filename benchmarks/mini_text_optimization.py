"""Does text optimization move the edit toward the input, on the miniature model, scene by scene?

For each of the world's first scenes (``render_example(seed)``, edited to the first other pose): optimize the
target text (200 steps, seed 0, the paper's setting), invert with NTI without source, sample at eta 0 (the optimized
embedding) and eta 1 (the target text) with 20% injection, and report each output's mean absolute pixel difference
to the input. It also reports the denoising loss of the target text, the optimized embedding and the scene's true
caption on one fixed set of (t, noise) draws, which says how far 200 steps go toward the caption that explains
the image.

    python benchmarks/mini_text_optimization.py --scenes 10

About 20 s per scene on 2 CPU cores. ``tests/test_quality.py`` asserts the mean over scenes 0-2.
"""

from __future__ import annotations

import argparse
import random

import numpy as np
import torch

from nonrigid import invert, optimize_text, sample
from nonrigid.mini.world import POSES, random_scene, render_example
from nonrigid.models.family import Conditioning
from nonrigid.models.loading import load_pipeline
from nonrigid.models.registry import family_of


def mean_loss(pipe, latent: torch.Tensor, embedding: Conditioning, draws: int = 512, seed: int = 123) -> float:
    """Denoising loss of ``embedding`` on ``draws`` fixed (t, noise) pairs: the same draws for every embedding."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (draws,), generator=generator)
    noise = torch.randn((draws, *latent.shape[1:]), generator=generator)
    alpha_bar = pipe.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = alpha_bar.sqrt() * latent + (1 - alpha_bar).sqrt() * noise
    family = family_of(pipe)
    with torch.no_grad():
        errors = [((family.predict(noisy[i:i + 128], t[i:i + 128], embedding) - noise[i:i + 128]) ** 2)
                  .mean() * len(t[i:i + 128]) for i in range(0, draws, 128)]
    return float(sum(errors) / draws)


def pixel_distance(image, reference) -> float:
    return float(np.abs(np.asarray(image, dtype=np.float32) - np.asarray(reference, dtype=np.float32)).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=10, help="scenes 0..N-1")
    parser.add_argument("--steps", type=int, default=200, help="text optimization steps")
    args = parser.parse_args()
    torch.set_num_threads(2)
    pipe = load_pipeline("mini", device="cpu", dtype="fp32")
    pipe.set_progress_bar_config(disable=True)
    print("scene | edit | eta 0 | eta 1 | loss: target / optimized / true caption")
    closer, eta0, eta1 = 0, [], []
    for seed in range(args.scenes):
        scene = random_scene(random.Random(seed))
        image = render_example(seed=seed)
        pose = next(p for p in POSES if p != scene.pose)
        text = optimize_text(pipe, image, scene.with_pose(pose).caption, steps=args.steps, seed=0)
        optimized, plain = sample(pipe, invert(pipe, image, method="nti"), text, (0.0, 1.0), (10,))
        eta0.append(pixel_distance(optimized, image))
        eta1.append(pixel_distance(plain, image))
        closer += eta0[-1] < eta1[-1]
        latent = family_of(pipe).encode_image(image)
        losses = [mean_loss(pipe, latent, e) for e in (text.target, text.optimized,
                                                         family_of(pipe).encode_prompt(scene.caption))]
        print(f"{seed} | {scene.caption.removeprefix('a photo of a ')} -> {pose} | {eta0[-1]:.2f} | "
              f"{eta1[-1]:.2f} | {' / '.join(f'{x:.5f}' for x in losses)}", flush=True)
    print(f"eta 0 closer on {closer} of {args.scenes}; mean {np.mean(eta0):.2f} vs {np.mean(eta1):.2f}")


if __name__ == "__main__":
    main()
