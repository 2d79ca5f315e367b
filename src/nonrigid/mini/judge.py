"""Exact metrics of the miniature world: identity error from the renderer's ground truth, edit success from a
small classifier (the "judge") trained on rendered scenes.

They stand in for LPIPS (identity) and CLIP-T (edit) of the paper's evaluation:

- ``background_error``: mean absolute pixel difference (0..1) between the edit and the input over the pixels
  that are background in both the input scene and the ideal edit (the same scene rendered in the target pose);
- ``subject_error``: distance (0..1) between the subject's mean colour in the input and the edit's mean colour
  where the ideal edit has its subject;
- ``identity_error``: the mean of the two;
- ``sky_shift``: how far the sky's mean colour moved (0..1, the channels' mean absolute change of the mean over
  the sky pixels that are background in both scenes): a global colour change, which pixel noise barely moves;
- ``edit_success``: the judge's probability that the edit shows the target pose (``pose_correct``: its argmax
  is the target pose).

The judge also names the animal's kind and colour, so the same network tells whether the model's samples show
what their captions say (:mod:`nonrigid.mini.fidelity`).
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from safetensors.torch import load_file, save_file
from torch import nn

from .world import COLOURS, KINDS, POSES, Scene, random_scene, render, render_background, render_with_mask

FACTORS = {"pose": POSES, "kind": KINDS, "colour": tuple(sorted(COLOURS))}


class SceneJudge(nn.Module):
    """A small CNN: 64 x 64 RGB in [-1, 1] -> logits over :data:`POSES`, then :data:`KINDS`, then the colours
    (sorted), concatenated; :func:`split_logits` takes them apart."""

    def __init__(self) -> None:
        super().__init__()
        channels = (3, 16, 32, 64, 64)
        layers: list[nn.Module] = []
        for cin, cout in itertools.pairwise(channels):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(), nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(64 * 4 * 4, sum(len(v) for v in FACTORS.values()))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixels).flatten(1))


def split_logits(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """The judge's output as one (B, n) logit tensor per factor of :data:`FACTORS`."""
    parts = logits.split([len(v) for v in FACTORS.values()], dim=-1)
    return dict(zip(FACTORS, parts, strict=True))


def scene_labels(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    """The class index of each scene for every factor of :data:`FACTORS`."""
    return {name: torch.tensor([values.index(getattr(s, name)) for s in scenes]) for name, values in FACTORS.items()}


def to_pixels(images: list[Image.Image]) -> torch.Tensor:
    array = np.stack([np.asarray(im.convert("RGB").resize((64, 64)), dtype=np.float32) for im in images])
    return torch.from_numpy(array / 127.5 - 1.0).permute(0, 3, 1, 2)


def _degrade(image: Image.Image, rng: random.Random) -> Image.Image:
    """Blur, noise and colour shifts like a small generative model's output, so the judge is not fooled by them."""
    if rng.random() < 0.7:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 1.2)))
    array = np.asarray(image, dtype=np.float32)
    array = array * rng.uniform(0.9, 1.1) + rng.uniform(-12, 12)
    array += np.random.default_rng(rng.randrange(2**32)).normal(0, rng.uniform(0, 10), array.shape)
    return Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))


def train_judge(steps: int = 600, batch: int = 64, seed: int = 0, log=print) -> SceneJudge:
    """Train the judge on freshly rendered, randomly degraded scenes (about three minutes on 2 CPU cores); the loss
    is the sum of the three factors' cross-entropies."""
    rng = random.Random(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        judge = SceneJudge()
    optimizer = torch.optim.AdamW(judge.parameters(), lr=2e-3)
    for step in range(steps):
        scenes = [random_scene(rng) for _ in range(batch)]
        pixels = to_pixels([_degrade(render(s), rng) for s in scenes])
        labels = scene_labels(scenes)
        logits = split_logits(judge(pixels))
        loss = sum(F.cross_entropy(logits[name], labels[name]) for name in FACTORS)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"judge step {step} loss {loss.item():.4f}")
    return judge.eval().requires_grad_(False)


def save_judge(judge: SceneJudge, path: Path) -> None:
    save_file({k: v.contiguous() for k, v in judge.state_dict().items()}, str(path))


def load_judge(path: Path | None = None) -> SceneJudge:
    from ..models.loading import mini_weights_dir

    path = path or mini_weights_dir() / "judge.safetensors"
    judge = SceneJudge()
    judge.load_state_dict(load_file(str(path)))
    return judge.eval().requires_grad_(False)


@torch.no_grad()
def pose_probabilities(judge: SceneJudge, images: list[Image.Image]) -> torch.Tensor:
    """(B, len(POSES)) probabilities of each pose."""
    return factor_probabilities(judge, images)["pose"]


@torch.no_grad()
def factor_probabilities(judge: SceneJudge, images: list[Image.Image]) -> dict[str, torch.Tensor]:
    """Per factor of :data:`FACTORS`, the (B, n) probabilities of its values."""
    return {name: logits.softmax(-1) for name, logits in split_logits(judge(to_pixels(images))).items()}


def identity_errors(source: Scene, target_pose: str, edited: Image.Image) -> dict[str, float]:
    """Background and subject-colour errors of ``edited`` against the input scene, from the renderer.

    The subject is found in the edit wherever it departs from the scene's known background (rendered without the
    animal), so a subject that keeps its colour but not its place or pose is not counted as an identity loss; a
    subject that vanished counts as the distance between its colour and the background's.
    """
    input_image, input_mask = render_with_mask(source)
    ideal_image, ideal_mask = render_with_mask(source.with_pose(target_pose))
    edit = np.asarray(edited.convert("RGB").resize(input_image.size), dtype=np.float32) / 255.0
    inp = np.asarray(input_image, dtype=np.float32) / 255.0
    ideal = np.asarray(ideal_image, dtype=np.float32) / 255.0
    empty = np.asarray(render_background(source), dtype=np.float32) / 255.0
    background = _dilate(np.maximum(input_mask, ideal_mask) > 0.01, 4) == 0  # Lanczos reaches 3 px
    background_error = float(np.abs(edit - inp)[background].mean())
    subject_colour = inp[input_mask > 0.9].mean(axis=0)
    departs = np.abs(edit - empty).max(axis=-1) > 0.25
    found = edit[departs].mean(axis=0) if departs.sum() >= 4 else empty[input_mask > 0.9].mean(axis=0)
    subject_error = float(np.linalg.norm(found - subject_colour) / np.sqrt(3))
    sky = background & (np.arange(inp.shape[0])[:, None] < source.horizon * inp.shape[0] - 1)
    sky_shift = float(np.abs(edit[sky].mean(axis=0) - inp[sky].mean(axis=0)).mean()) if sky.sum() >= 4 else 0.0
    return {
        "background_error": background_error,
        "subject_error": subject_error,
        "identity_error": 0.5 * (background_error + subject_error),
        "ideal_error": float(np.abs(edit - ideal).mean()),
        "sky_shift": sky_shift,
    }


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    out = mask.copy()
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            out |= np.roll(np.roll(mask, dy, axis=0), dx, axis=1)
    return out


def score_edit(judge: SceneJudge, source: Scene, target_pose: str, edited: Image.Image) -> dict[str, float]:
    """All metrics of one edited image."""
    probs = pose_probabilities(judge, [edited])[0]
    target = POSES.index(target_pose)
    return {
        **identity_errors(source, target_pose, edited),
        "edit_success": float(probs[target]),
        "pose_correct": float(int(probs.argmax()) == target),
    }
