"""A deterministic pixel-based checker for images of :mod:`ldm.data.shapes`: which colour, shape and background does
an image show? It judges generated images (``scripts/evaluate_shapes.py``) without a learned classifier.

How an image is read, after a 3x3 median filter (which removes specks and pixel noise, and keeps edges in place):

1. Background: every pixel of the image's outer ring votes for its nearest named colour (``COLORS``); the winner is
   the background, and the median of its voters is the background's actual RGB (a generated image's colours drift).
2. Foreground: pixels farther than ``ROUGH_DISTANCE`` from that RGB, reduced to their largest connected region
   (specks and noise elsewhere are dropped). The nearest named colour (other than the background) to the median of
   the region's farther half (its core, free of edge pixels blended with the background) is the shape's colour.
3. Shape mask: pixels nearer the foreground's median than the background's (the 50% coverage line of an
   anti-aliased edge), again the largest region, with its holes filled. Its bounding box is resampled to a
   ``GRID`` x ``GRID`` square and compared by IoU with the same view of each shape drawn by the dataset's own
   :func:`ldm.data.shapes.draw`, at several sizes and slight blurs (:func:`templates`); the shape of the best match
   wins. Cropping to the box makes this independent of size and position, as the dataset varies both.

An image with (almost) no foreground gets ``color=None`` and ``shape=None``, which never count as right.
Made for the dataset's 64x64 images (every one of them read right); at 32x32 the smallest stars and diamonds are a
few pixels across and about 1% are misread.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageFilter

from ldm.data.shapes import COLORS, SHAPES, draw

ATTRIBUTES = ("color", "shape", "background")
GRID = 32
# Half the smallest distance between two named colours (blue and purple, 106): a pixel this far from the background
# is surely something else, while a generated image's background noise stays well within it.
ROUGH_DISTANCE = 45.0
# A shape covers at least ~2.7% of the image (a star of the smallest size); less than this is noise, not a shape.
MIN_AREA_FRACTION = 0.004
# Template shapes: half-sizes in pixels (the dataset's span 4.8-9.6 px at 32x32, 9.6-19.2 px at 64x64) and
# Gaussian blurs (sigma in pixels, at most MAX_BLUR_PER_RADIUS times the half-size).
TEMPLATE_RADII = (5.0, 7.0, 10.0, 14.0, 20.0, 28.0)
TEMPLATE_BLURS = (0.0, 0.8, 1.4, 2.0)
MAX_BLUR_PER_RADIUS = 0.15

_NAMES = tuple(COLORS)
_PALETTE = np.array([COLORS[name] for name in _NAMES], dtype=np.float32)  # (8, 3)


class Prediction(NamedTuple):
    """What an image shows; ``color`` and ``shape`` are None when no shape was found. Compares equal to the
    ``(color, shape, background)`` tuples of ``ldm.data.shapes.COMBINATIONS``."""

    color: str | None
    shape: str | None
    background: str


def _pixels(image: Image.Image | np.ndarray) -> np.ndarray:
    """PIL image or (H, W, 3) uint8 array -> (H, W, 3) float32."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.shape[0] < 3 or array.shape[1] < 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3) with H, W >= 3, got shape {array.shape}.")
    return array.astype(np.float32)


def _nearest(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) colours -> (...,) index of the nearest named colour in ``_NAMES``."""
    return np.linalg.norm(rgb[..., None, :] - _PALETTE, axis=-1).argmin(axis=-1)


def _border(a: np.ndarray) -> np.ndarray:
    """(H, W, ...) -> (2H + 2W - 4, ...): the outer ring of pixels."""
    return np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]])


def _labels(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool -> (H, W) int: 8-connected regions, each labelled with one of its pixels' flat index + 1; 0 off.

    Every pixel starts with its own label and repeatedly takes the largest among its neighbours' and the one its
    label points to (the label of the pixel with that index, in the same region: pointer jumping, which spreads
    labels along a region much faster than neighbours alone), until nothing changes.
    """
    height, width = mask.shape
    labels = np.where(mask, np.arange(1, height * width + 1).reshape(height, width), 0)
    padded = np.zeros((height + 2, width + 2), dtype=labels.dtype)
    while True:
        padded[1:-1, 1:-1] = labels
        spread = labels.copy()
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                np.maximum(spread, padded[dy : dy + height, dx : dx + width], out=spread)
        spread *= mask
        spread = np.where(mask, spread.ravel()[np.maximum(spread, 1) - 1].reshape(height, width), 0)
        if np.array_equal(spread, labels):
            return labels
        labels = spread


def _largest_region(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool -> the largest 8-connected region of ``mask`` (all False when it is empty)."""
    labels = _labels(mask)
    if not labels.any():
        return mask.copy()
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    return labels == counts.argmax()


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool -> ``mask`` plus every region of its complement that does not reach the image's edge."""
    outside = _labels(~mask)
    reaching_edge = np.unique(_border(outside))
    return mask | ~np.isin(outside, reaching_edge)


def _median3(pixels: np.ndarray) -> np.ndarray:
    """(H, W, 3) -> the same, each channel 3x3 median filtered (edges repeated): removes specks and pixel noise
    but keeps edges where they are."""
    height, width, _ = pixels.shape
    padded = np.pad(pixels, ((1, 1), (1, 1), (0, 0)), mode="edge")
    shifts = [padded[dy : dy + height, dx : dx + width] for dy in range(3) for dx in range(3)]
    return np.median(np.stack(shifts), axis=0)


def _normalised_view(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool mask with at least one True -> (GRID, GRID) float32 in [0, 1]: its bounding box, stretched."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    box = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].astype(np.float32)
    return np.asarray(Image.fromarray(box, mode="F").resize((GRID, GRID), Image.Resampling.BILINEAR))


class _Reading(NamedTuple):
    background: int  # index into _NAMES
    color: int | None
    mask: np.ndarray | None  # (H, W) bool, the shape


def _read(image: Image.Image | np.ndarray) -> _Reading:
    """Background, foreground colour and shape mask of an image (steps 1-3 of the module docstring)."""
    pixels = _median3(_pixels(image))
    height, width, _ = pixels.shape

    border = _border(pixels)
    votes = _nearest(border)
    background = int(np.bincount(votes, minlength=len(_NAMES)).argmax())
    background_rgb = np.median(border[votes == background], axis=0)

    distance = np.linalg.norm(pixels - background_rgb, axis=-1)
    rough = _largest_region(distance > ROUGH_DISTANCE)
    if rough.sum() < MIN_AREA_FRACTION * height * width:
        return _Reading(background, None, None)
    # Soft edges mix in the background; the farthest half of the region is the shape's own colour.
    core = rough & (distance >= np.median(distance[rough]))
    foreground_rgb = np.median(pixels[core], axis=0)
    distances = np.linalg.norm(_PALETTE - foreground_rgb, axis=-1)
    distances[background] = np.inf  # the shape is never the background's colour
    color = int(distances.argmin())

    # Where a pixel lies between the two colours: 0 at the background's, 1 at the foreground's.
    axis = foreground_rgb - background_rgb
    position = (pixels - background_rgb) @ axis / max(float(axis @ axis), 1e-6)
    return _Reading(background, color, _fill_holes(_largest_region(position > 0.5)))


@functools.cache
def templates() -> tuple[tuple[str, ...], np.ndarray]:
    """Every shape as the checker sees it at several sizes and blurs: drawn by the dataset's ``draw``, read like an
    image by the checker, cropped and resampled. Returns (shape of each template, (N, GRID, GRID) float32 views).

    Blurred templates make blurry generated images match the right shape (a blurred star's 50% outline loses its
    tips); blurs stay small next to the shape, where shapes are still told apart.
    """
    names, views = [], []
    for shape in SHAPES:
        for r in TEMPLATE_RADII:
            size = int(2 * r) + 8
            image = draw("white", shape, "black", size, size / 2, size / 2, r)
            for sigma in TEMPLATE_BLURS:
                if sigma > MAX_BLUR_PER_RADIUS * r:
                    continue
                blurred = image.filter(ImageFilter.GaussianBlur(sigma)) if sigma else image
                names.append(shape)
                views.append(_normalised_view(_read(blurred).mask))
    return tuple(names), np.stack(views)


def shape_scores(mask: np.ndarray) -> dict[str, float]:
    """(H, W) bool mask of one shape -> ``{shape: best soft IoU with that shape's templates}``, each in [0, 1]."""
    if not mask.any():
        return dict.fromkeys(SHAPES, 0.0)
    view = _normalised_view(mask)
    names, views = templates()
    ious = np.minimum(view, views).sum(axis=(1, 2)) / np.maximum(view, views).sum(axis=(1, 2))
    return {shape: float(max(iou for name, iou in zip(names, ious, strict=True) if name == shape)) for shape in SHAPES}


def classify(image: Image.Image | np.ndarray) -> Prediction:
    """Read the colour, shape and background of one image (PIL or (H, W, 3) uint8) of the shapes dataset."""
    reading = _read(image)
    background = _NAMES[reading.background]
    if reading.color is None:
        return Prediction(None, None, background)
    scores = shape_scores(reading.mask)
    return Prediction(_NAMES[reading.color], max(scores, key=scores.get), background)


def accuracy(predictions: Iterable[Sequence[str | None]], truths: Iterable[Sequence[str]]) -> dict[str, float]:
    """Fraction right per attribute and for all three at once: ``{"color", "shape", "background", "all"}``.

    ``predictions`` and ``truths`` are ``(color, shape, background)`` triples (``Prediction`` or tuples), in the
    same order; ValueError if their numbers differ or there are none.
    """
    predictions, truths = list(predictions), list(truths)
    if len(predictions) != len(truths):
        raise ValueError(f"got {len(predictions)} predictions for {len(truths)} truths; give one each.")
    if not predictions:
        raise ValueError("accuracy needs at least one prediction.")
    pairs = zip(predictions, truths, strict=True)
    right = np.array([[p[i] == t[i] for i in range(len(ATTRIBUTES))] for p, t in pairs], dtype=bool)
    result = {name: float(right[:, i].mean()) for i, name in enumerate(ATTRIBUTES)}
    result["all"] = float(right.all(axis=1).mean())
    return result
