"""A procedural miniature world in which identity and pose are separate, known factors.

A scene is a small articulated animal on textured ground under a sky, at 64 x 64 pixels.

- **Identity** (what an edit must keep): the animal's kind and colour, its position, size and facing, and the
  background — ground material and colour, sky colour, horizon height, and an uncaptioned texture (stripes or
  spots with their own frequency and phase), different in every scene.
- **Pose** (what a non-rigid edit changes): standing, sitting, jumping or lying.

Captions name kind, colour, pose and ground in plain words: "a photo of a red dog sitting on grass". Everything
is drawn from a :class:`Scene`, so the renderer also gives exact ground truth: the subject mask, and the ideal
edit (the same scene in the target pose).
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, replace

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
SUPERSAMPLE = 2  # drawn at 128 px and downsampled, for smooth edges

KINDS = ("dog", "cat", "horse")
POSES = ("standing", "sitting", "jumping", "lying")
COLOURS = {
    "red": (200, 40, 40),
    "blue": (40, 80, 210),
    "yellow": (235, 205, 40),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
    "brown": (125, 75, 35),
    "orange": (245, 140, 30),
    "purple": (130, 50, 170),
}
GROUNDS = {
    "grass": ((60, 150, 50), (40, 110, 35)),
    "sand": ((220, 195, 140), (190, 165, 110)),
    "snow": ((225, 235, 245), (190, 205, 225)),
    "dirt": ((120, 90, 60), (95, 70, 45)),
}
SKIES = ((150, 200, 245), (110, 160, 230), (245, 185, 140), (190, 195, 205), (200, 225, 250))


@dataclass(frozen=True)
class Scene:
    """Every factor of a scene. ``pose`` is the only one a non-rigid edit should change."""

    kind: str
    colour: str
    pose: str
    ground: str
    sky: tuple[int, int, int]
    horizon: float  # fraction of the height where the ground starts
    x: float  # subject centre, fraction of the width
    scale: float
    facing: int  # +1 right, -1 left
    texture: str  # "stripes" or "spots"
    texture_freq: float
    texture_phase: float
    shade: float  # brightness jitter of the subject colour

    @property
    def caption(self) -> str:
        return caption(self.kind, self.colour, self.pose, self.ground)

    def with_pose(self, pose: str) -> Scene:
        return replace(self, pose=pose)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Scene:
        return cls(**{**data, "sky": tuple(data["sky"])})


def caption(kind: str, colour: str, pose: str, ground: str) -> str:
    article = "an" if colour[0] in "aeiou" else "a"
    return f"a photo of {article} {colour} {kind} {pose} on {ground}"


def vocabulary() -> list[str]:
    """Every word a caption can use."""
    words = {"a", "an", "photo", "of", "on", *KINDS, *POSES, *COLOURS, *GROUNDS}
    return sorted(words)


def random_scene(rng: random.Random, pose: str | None = None) -> Scene:
    return Scene(
        kind=rng.choice(KINDS),
        colour=rng.choice(sorted(COLOURS)),
        pose=pose or rng.choice(POSES),
        ground=rng.choice(sorted(GROUNDS)),
        sky=_jitter(rng.choice(SKIES), rng, 12),
        horizon=rng.uniform(0.42, 0.58),
        x=rng.uniform(0.36, 0.64),
        scale=rng.uniform(0.9, 1.1),
        facing=rng.choice((-1, 1)),
        texture=rng.choice(("stripes", "spots")),
        texture_freq=rng.uniform(0.25, 0.6),
        texture_phase=rng.uniform(0, 2 * math.pi),
        shade=rng.uniform(0.85, 1.1),
    )


def _jitter(colour, rng: random.Random, amount: int) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, c + rng.randint(-amount, amount)))) for c in colour)


def render(scene: Scene) -> Image.Image:
    """The scene as a 64 x 64 RGB image."""
    return render_with_mask(scene)[0]


def render_with_mask(scene: Scene) -> tuple[Image.Image, np.ndarray]:
    """The image and the subject's coverage in [0, 1] (64 x 64 float array)."""
    big = SIZE * SUPERSAMPLE
    canvas = Image.fromarray(_background(scene, big))
    mask = Image.new("L", (big, big), 0)
    colour = tuple(int(min(255, c * scene.shade)) for c in COLOURS[scene.colour])
    for shape in _subject_shapes(scene, big):
        for target, fill in ((ImageDraw.Draw(canvas), colour), (ImageDraw.Draw(mask), 255)):
            _draw(target, shape, fill)
    image = canvas.resize((SIZE, SIZE), Image.Resampling.LANCZOS)
    coverage = np.asarray(mask.resize((SIZE, SIZE), Image.Resampling.BOX), dtype=np.float32) / 255.0
    return image, coverage


def subject_region(scene: Scene, margin: int = 4) -> np.ndarray:
    """The mask a user would paint to let the subject change pose: the box covering the subject in every pose,
    widened by ``margin`` pixels; uint8, 255 inside (64 x 64)."""
    covered = np.zeros((SIZE, SIZE), bool)
    for pose in POSES:
        covered |= render_with_mask(scene.with_pose(pose))[1] > 0
    rows, cols = np.flatnonzero(covered.any(axis=1)), np.flatnonzero(covered.any(axis=0))
    region = np.zeros((SIZE, SIZE), np.uint8)
    region[max(rows[0] - margin, 0) : rows[-1] + margin + 1, max(cols[0] - margin, 0) : cols[-1] + margin + 1] = 255
    return region


def render_background(scene: Scene) -> Image.Image:
    """The scene without its subject: what every pixel not covered by the animal must look like."""
    big = SIZE * SUPERSAMPLE
    return Image.fromarray(_background(scene, big)).resize((SIZE, SIZE), Image.Resampling.LANCZOS)


def _background(scene: Scene, big: int) -> np.ndarray:
    ys, xs = np.mgrid[0:big, 0:big].astype(np.float32) / SUPERSAMPLE
    horizon = scene.horizon * SIZE
    base, detail = (np.array(c, dtype=np.float32) for c in GROUNDS[scene.ground])
    if scene.texture == "stripes":
        # stripes that converge toward the horizon, like furrows seen in perspective
        depth = np.maximum(ys - horizon, 0.5)
        pattern = np.sin((xs - SIZE / 2) * scene.texture_freq * 8 / depth + scene.texture_phase) > 0.3
    else:
        pattern = (np.sin(xs * scene.texture_freq + scene.texture_phase) * np.sin(ys * scene.texture_freq * 1.3)) > 0.5
    ground = np.where(pattern[..., None], detail, base)
    sky_top = np.array(scene.sky, dtype=np.float32)
    sky = sky_top * (0.85 + 0.15 * (ys / max(horizon, 1))[..., None])
    image = np.where((ys >= horizon)[..., None], ground, np.clip(sky, 0, 255))
    return image.astype(np.uint8)


# --------------------------------------------------------------------------------------------------- the animal

# Proportions per kind: body length/height, leg length, neck length, head radius, ears, tail.
BODIES = {
    "dog": {"body": (15, 7), "leg": 7, "neck": 2, "head": 3.6, "ears": "floppy", "tail": (6, 35)},
    "cat": {"body": (12, 6), "leg": 5.5, "neck": 1, "head": 3.2, "ears": "pointed", "tail": (9, 70)},
    "horse": {"body": (17, 7.5), "leg": 11, "neck": 6, "head": 3.4, "ears": "small", "tail": (7, -60)},
}


def _subject_shapes(scene: Scene, big: int) -> list[tuple]:
    """Polygons, lines and circles of the animal in pixel coordinates of the supersampled canvas."""
    spec = BODIES[scene.kind]
    s = scene.scale
    length, height = spec["body"][0] * s, spec["body"][1] * s
    leg = spec["leg"] * s
    ground_y = (scene.horizon + (1 - scene.horizon) * 0.55) * SIZE  # where the feet stand
    pose = _pose_geometry(scene.pose, length, height, leg)
    shapes: list[tuple] = []

    def to_px(x: float, y: float) -> tuple[float, float]:
        # local frame: x forward, y up, origin on the ground under the body centre
        return ((scene.x * SIZE + scene.facing * x) * SUPERSAMPLE, (ground_y - y) * SUPERSAMPLE)

    cx, cy, tilt = pose["body"]
    body = [
        (cx + math.cos(a) * length / 2 * math.cos(tilt) - math.sin(a) * height / 2 * math.sin(tilt),
         cy + math.cos(a) * length / 2 * math.sin(tilt) + math.sin(a) * height / 2 * math.cos(tilt))
        for a in np.linspace(0, 2 * math.pi, 40, endpoint=False)
    ]
    shapes.append(("polygon", [to_px(*p) for p in body]))
    width = 2.2 * s * SUPERSAMPLE
    for start, end in pose["legs"]:
        shapes.append(("line", [to_px(*start), to_px(*end)], width))
    # neck and head at the front of the body
    front = (cx + math.cos(tilt) * length * 0.42, cy + math.sin(tilt) * length * 0.42 + height * 0.2)
    neck_angle = tilt + math.radians(pose["neck"])
    neck = spec["neck"] * s + 2
    head = (front[0] + math.cos(neck_angle) * neck, front[1] + math.sin(neck_angle) * neck)
    shapes.append(("line", [to_px(*front), to_px(*head)], 3.2 * s * SUPERSAMPLE))
    radius = spec["head"] * s
    shapes.append(("circle", to_px(*head), radius * SUPERSAMPLE))
    shapes.append(("circle", to_px(head[0] + radius * 0.9, head[1] - radius * 0.3), radius * 0.6 * SUPERSAMPLE))
    shapes.extend(_ears(spec["ears"], head, radius, to_px))
    back = (cx - math.cos(tilt) * length * 0.48, cy - math.sin(tilt) * length * 0.48 + height * 0.15)
    tail_len, tail_deg = spec["tail"]
    tail_angle = math.pi - math.radians(tail_deg) + tilt
    tail_end = (back[0] + math.cos(tail_angle) * tail_len * s, back[1] + math.sin(tail_angle) * tail_len * s)
    shapes.append(("line", [to_px(*back), to_px(*tail_end)], 1.8 * s * SUPERSAMPLE))
    return shapes


def _ears(style: str, head, radius, to_px) -> list[tuple]:
    hx, hy = head
    if style == "pointed":
        return [("polygon", [to_px(hx + dx - 1.2, hy + radius * 0.6), to_px(hx + dx + 1.2, hy + radius * 0.6),
                             to_px(hx + dx, hy + radius * 1.7)]) for dx in (-1.3, 1.3)]
    if style == "floppy":
        return [("polygon", [to_px(hx - radius * 0.7, hy + radius * 0.5), to_px(hx - radius * 0.1, hy + radius * 0.7),
                             to_px(hx - radius * 1.0, hy - radius * 0.8)])]
    return [("polygon", [to_px(hx - 0.8, hy + radius * 0.7), to_px(hx + 0.6, hy + radius * 0.7),
                         to_px(hx - 0.3, hy + radius * 1.5)])]


def _pose_geometry(pose: str, length: float, height: float, leg: float) -> dict:
    """Body centre and tilt, leg segments and neck angle for each pose, in the local frame."""
    hip, shoulder = -length * 0.32, length * 0.32
    if pose == "standing":
        cy = leg + height * 0.35
        legs = [((x, cy - height * 0.3), (x + dx, 0)) for x in (hip, shoulder) for dx in (-0.8, 0.8)]
        return {"body": (0.0, cy, 0.0), "legs": legs, "neck": 50}
    if pose == "sitting":
        tilt = math.radians(38)
        cy = leg * 0.55 + height * 0.5
        back_x = hip * math.cos(tilt)
        front_x = shoulder * math.cos(tilt)
        front_y = cy + shoulder * math.sin(tilt) - height * 0.3
        legs = [((front_x + dx, front_y), (front_x + dx + 0.5, 0)) for dx in (-0.7, 0.7)]
        legs += [((back_x, cy + hip * math.sin(tilt)), (back_x + leg * 0.6, 0.8)),
                 ((back_x + 0.8, cy + hip * math.sin(tilt)), (back_x + leg * 0.6 + 0.8, 0.8))]
        return {"body": (0.0, cy, tilt), "legs": legs, "neck": 40}
    if pose == "jumping":
        tilt = math.radians(18)
        cy = leg + height * 0.35 + 9
        fy, by = cy + shoulder * math.sin(tilt) - height * 0.2, cy + hip * math.sin(tilt) - height * 0.2
        fx, bx = shoulder * math.cos(tilt), hip * math.cos(tilt)
        legs = [((fx, fy), (fx + leg * 0.8, fy - leg * 0.55)), ((fx - 0.8, fy), (fx + leg * 0.7, fy - leg * 0.75)),
                ((bx, by), (bx - leg * 0.85, by - leg * 0.5)), ((bx + 0.8, by), (bx - leg * 0.7, by - leg * 0.7))]
        return {"body": (0.0, cy, tilt), "legs": legs, "neck": 25}
    if pose == "lying":
        cy = height * 0.5
        legs = [((shoulder, 1.0), (shoulder + leg * 0.9, 0.6)), ((shoulder - 1.0, 0.8), (shoulder + leg * 0.8, 0.2)),
                ((hip, 1.0), (hip - leg * 0.4, 0.3)), ((hip + 1.0, 0.8), (hip + leg * 0.5, 0.2))]
        return {"body": (0.0, cy, 0.0), "legs": legs, "neck": 35}
    raise ValueError(f"unknown pose {pose!r}; choose one of {', '.join(POSES)}")


def _draw(draw: ImageDraw.ImageDraw, shape: tuple, fill) -> None:
    if shape[0] == "polygon":
        draw.polygon(shape[1], fill=fill)
    elif shape[0] == "line":
        (x0, y0), (x1, y1) = shape[1]
        width = shape[2]
        draw.line(shape[1], fill=fill, width=max(1, round(width)))
        for x, y in ((x0, y0), (x1, y1)):  # round caps
            draw.ellipse((x - width / 2, y - width / 2, x + width / 2, y + width / 2), fill=fill)
    elif shape[0] == "circle":
        (x, y), r = shape[1], shape[2]
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)


def render_example(seed: int = 0, pose: str | None = None) -> Image.Image:
    """One scene of the world, reproducible from ``seed``."""
    return render(random_scene(random.Random(seed), pose))
