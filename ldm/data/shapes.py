"""Synthetic coloured shapes with captions, drawn on the fly: a dataset a small text-to-image model can learn on a
CPU, and whose held-out combinations test whether it composes words it has only seen apart.

Vocabulary (the only words captions use):

- colours (``COLORS``): red, pink, yellow, green, blue, purple, white, black
- shapes (``SHAPES``): circle, square, triangle, diamond, star
- caption template: ``"a {color} {shape} on a {background} background"``, e.g. "a red circle on a blue background";
  the background is always another colour than the shape.

That makes 8 x 5 x 7 = 280 combinations (``COMBINATIONS``, in a fixed order: ``class_label`` indexes it). The 12 in
``HOLDOUT`` never appear in the ``train`` split; ``split="holdout"`` yields only them. Every colour, shape and
background of a held-out combination does appear in training, in other combinations.

Item ``i`` is a pure function of ``(seed, split, i)``: the combination (uniform over the split's combinations) and
the shape's size (30-60% of the image side) and position (anywhere it fits whole) are drawn from a generator seeded
with them, so any worker, process or run draws the same image for the same index.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from ldm.errors import UserError

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "pink": (250, 130, 190),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "purple": (140, 60, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "star")
CAPTION = "a {color} {shape} on a {background} background"

# (colour, shape, background) triples kept out of the train split.
HOLDOUT: tuple[tuple[str, str, str], ...] = (
    ("red", "triangle", "green"),
    ("pink", "circle", "purple"),
    ("yellow", "square", "blue"),
    ("green", "star", "white"),
    ("blue", "diamond", "pink"),
    ("purple", "triangle", "yellow"),
    ("white", "circle", "black"),
    ("black", "square", "red"),
    ("red", "diamond", "white"),
    ("blue", "star", "black"),
    ("green", "circle", "pink"),
    ("yellow", "triangle", "purple"),
)
COMBINATIONS: tuple[tuple[str, str, str], ...] = tuple(
    (color, shape, background) for color in COLORS for shape in SHAPES for background in COLORS if background != color
)
SPLITS = ("train", "holdout")

# Shapes are drawn this many times larger and box-filtered down, which anti-aliases their edges.
SUPERSAMPLE = 4


def caption(color: str, shape: str, background: str) -> str:
    """``caption("red", "circle", "blue") == "a red circle on a blue background"``."""
    return CAPTION.format(color=color, shape=shape, background=background)


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of ``shape`` (not a circle) centred at ``(cx, cy)`` inside a box of half-side ``r``."""
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "star":
        # Five points alternating between the outer radius and an inner one, the first pointing up.
        radii = [r if k % 2 == 0 else 0.45 * r for k in range(10)]
        angles = [-math.pi / 2 + k * math.pi / 5 for k in range(10)]
        return [(cx + rad * math.cos(a), cy + rad * math.sin(a)) for rad, a in zip(radii, angles, strict=True)]
    raise UserError(f"unknown shape '{shape}'; shapes are {SHAPES}.")


def draw(color: str, shape: str, background: str, size: int, cx: float, cy: float, r: float) -> Image.Image:
    """An RGB ``size`` x ``size`` image of one shape; centre ``(cx, cy)`` and half-size ``r`` are in pixels."""
    s = SUPERSAMPLE
    image = Image.new("RGB", (size * s, size * s), COLORS[background])
    canvas = ImageDraw.Draw(image)
    if shape == "circle":
        canvas.ellipse([(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s], fill=COLORS[color])
    else:
        canvas.polygon([(x * s, y * s) for x, y in shape_polygon(shape, cx, cy, r)], fill=COLORS[color])
    return image.resize((size, size), resample=Image.Resampling.BOX)


class ShapesDataset(Dataset):
    """``length`` images of coloured shapes with captions (see the module docstring for the vocabulary).

    Items: ``{image_key: float32 (size, size, 3) in [-1, 1], caption_key: str, "color", "shape", "background": str,
    "class_label": int}``, ``class_label`` being the combination's index in ``COMBINATIONS``.

    Args:
        size: image side in pixels.
        length: number of items.
        split: ``"train"`` (every combination but ``HOLDOUT``) or ``"holdout"`` (only those).
        seed: changes every item; use another seed for a validation set of the train combinations.
        min_scale, max_scale: the shape's side as a fraction of the image side.
    """

    def __init__(
        self,
        size: int = 64,
        length: int = 10_000,
        split: str = "train",
        seed: int = 0,
        min_scale: float = 0.3,
        max_scale: float = 0.6,
        image_key: str = "jpg",
        caption_key: str = "txt",
    ) -> None:
        if split not in SPLITS:
            raise UserError(f"split '{split}' is not one of {SPLITS}.")
        if not 0.0 < min_scale <= max_scale <= 1.0:
            raise UserError(f"need 0 < min_scale <= max_scale <= 1, got {min_scale} and {max_scale}.")
        if size < 4:
            raise UserError(f"size must be at least 4 pixels, got {size}.")
        self.size = size
        self.length = length
        self.split = split
        self.seed = seed
        self.min_scale, self.max_scale = min_scale, max_scale
        self.image_key = image_key
        self.caption_key = caption_key
        held_out = set(HOLDOUT)
        self.combinations = list(HOLDOUT) if split == "holdout" else [c for c in COMBINATIONS if c not in held_out]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} is out of range for {self.length} items.")
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), index])
        color, shape, background = self.combinations[rng.integers(len(self.combinations))]
        r = 0.5 * self.size * rng.uniform(self.min_scale, self.max_scale)
        cx, cy = rng.uniform(r, self.size - r, size=2)
        image = draw(color, shape, background, self.size, cx, cy, r)
        return {
            self.image_key: np.asarray(image, dtype=np.float32) / 127.5 - 1.0,
            self.caption_key: caption(color, shape, background),
            "color": color,
            "shape": shape,
            "background": background,
            "class_label": COMBINATIONS.index((color, shape, background)),
        }
