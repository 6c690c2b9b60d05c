"""ControlNet preprocessors that need no model weights: they turn the user's image into the control image.

ControlNets for lines (canny, scribble, lineart) were trained on white lines on black; a drawing is usually black on
white, so the drawing preprocessors invert it. A depth map (brighter = nearer, as MiDaS gives them) is used as it is
(``none``). Every preprocessor returns an RGB image of the input's size.

- ``none``: the image itself (a depth map, a pose, an edge map already made).
- ``invert``: 255 - image, channel by channel.
- ``lineart``: the inverted grey image (keeps the strokes' shades).
- ``scribble``: the inverted grey image thresholded at half (``SCRIBBLE_THRESHOLD``): strokes 255, the rest 0.
- ``canny``: OpenCV's Canny edges, hysteresis thresholds ``low`` / ``high`` (A1111's defaults 100 / 200); needs
  ``opencv-python``.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

from ldm.errors import UserError

PREPROCESSORS = ("none", "canny", "scribble", "lineart", "invert")
CANNY_THRESHOLDS = (100, 200)
SCRIBBLE_THRESHOLD = 128


def check_preprocessor(name: str) -> str:
    if name not in PREPROCESSORS:
        raise UserError(f"unknown ControlNet preprocessor {name!r}; choose one of {', '.join(PREPROCESSORS)}.")
    return name


def canny(image: Image.Image, low: int = CANNY_THRESHOLDS[0], high: int = CANNY_THRESHOLDS[1]) -> Image.Image:
    """Canny edges of ``image`` (white on black, RGB)."""
    try:
        import cv2
    except ImportError:
        raise UserError("the canny preprocessor needs OpenCV: pip install opencv-python") from None
    edges = cv2.Canny(np.asarray(image.convert("L")), int(low), int(high))
    return Image.fromarray(edges).convert("RGB")


def preprocess(image: Image.Image, name: str, canny_thresholds: tuple[int, int] = CANNY_THRESHOLDS) -> Image.Image:
    """The control image of ``image`` by the preprocessor ``name`` (see the module docstring); RGB, same size."""
    check_preprocessor(name)
    if name == "canny":
        return canny(image, *canny_thresholds)
    if name == "invert":
        return ImageOps.invert(image.convert("RGB"))
    if name == "none":
        return image.convert("RGB")
    inverted = ImageOps.invert(image.convert("L"))
    if name == "scribble":
        inverted = inverted.point(lambda v: 255 if v >= SCRIBBLE_THRESHOLD else 0)
    return inverted.convert("RGB")
