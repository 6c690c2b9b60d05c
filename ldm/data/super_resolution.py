"""The image pairs of CompVis's super-resolution data: a random-size square crop rescaled to ``size`` (the target)
and its low-resolution version ``downscale_f`` times smaller (the conditioning), made by a named degradation.

Degradations (``degradation:`` in the configs):

- ``bsrgan``, ``bsrgan_light``: the BSR degradations (:mod:`ldm.modules.image_degradation`);
- ``pil_nearest``, ``pil_bilinear``, ``pil_bicubic``, ``pil_box``, ``pil_hamming``, ``pil_lanczos``: a PIL resize
  (antialiased, as the original's torchvision resize of a PIL image);
- ``cv_nearest``, ``cv_bilinear``, ``cv_bicubic``, ``cv_area``: OpenCV's resizes (no antialiasing, except area
  averaging), computed without OpenCV (:func:`ldm.modules.image_degradation.utils_image.cv_resize`);
  ``cv_lanczos`` is PIL's Lanczos, which unlike OpenCV's antialiases.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from ldm.modules.image_degradation import degradation_fn_bsr, degradation_fn_bsr_light
from ldm.modules.image_degradation.utils_image import cv_resize, single2uint, uint2single
from ldm.util import ConfigError, building_path

PIL_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}
CV_CODES = {"nearest": 0, "bilinear": 1, "bicubic": 2, "area": 3}
DEGRADATIONS = (
    "bsrgan",
    "bsrgan_light",
    *(f"pil_{name}" for name in PIL_FILTERS),
    *(f"cv_{name}" for name in (*CV_CODES, "lanczos")),
)

Degradation = Callable[[np.ndarray], np.ndarray]


def smallest_side_size(width: int, height: int, side: int) -> tuple[int, int]:
    """``(width, height)`` scaled so that the shorter side is ``side``."""
    scale = side / min(width, height)
    return max(side, round(width * scale)), max(side, round(height * scale))


def resize_area(image: np.ndarray, side: int) -> np.ndarray:
    """uint8 ``image`` with its shorter side resized to ``side`` by OpenCV's INTER_AREA (the original's rescaler)."""
    height, width = image.shape[:2]
    size = smallest_side_size(width, height, side)
    if size == (width, height):
        return image
    return single2uint(cv_resize(uint2single(image), size, CV_CODES["area"]))


def make_degradation(name: str | None, lr_size: int, downscale_f: int) -> Degradation:
    """uint8 ``(size, size, 3)`` -> uint8 ``(lr_size, lr_size, 3)`` by the degradation ``name``."""
    if name == "bsrgan":
        return lambda image: degradation_fn_bsr(image, sf=downscale_f)["image"]
    if name == "bsrgan_light":
        return lambda image: degradation_fn_bsr_light(image, sf=downscale_f)["image"]
    kind, _, method = (name or "").partition("_")
    if kind == "pil" and method in PIL_FILTERS:

        def pil(image: np.ndarray) -> np.ndarray:
            size = smallest_side_size(image.shape[1], image.shape[0], lr_size)
            return np.asarray(Image.fromarray(image).resize(size, resample=PIL_FILTERS[method]))

        return pil
    if kind == "cv" and method == "lanczos":
        return make_degradation("pil_lanczos", lr_size, downscale_f)
    if kind == "cv" and method in CV_CODES:

        def cv(image: np.ndarray) -> np.ndarray:
            size = smallest_side_size(image.shape[1], image.shape[0], lr_size)
            return single2uint(cv_resize(uint2single(image), size, CV_CODES[method]))

        return cv
    raise ConfigError(f"{building_path()}.params.degradation: '{name}' is not one of {', '.join(DEGRADATIONS)}.")


class SRPair:
    """uint8 image -> ``(target, low-resolution)``, float32 ``(size, size, 3)`` and ``(size / f, size / f, 3)`` in
    [-1, 1].

    The crop is a square of side ``c * min(H, W)``, ``c`` uniform in ``[min_crop_f, max_crop_f]``, centred or (with
    ``random_crop``) anywhere; it is rescaled to ``size`` with area averaging, then degraded. Random choices come from
    torch's generator, which PyTorch seeds differently in every DataLoader worker.
    """

    def __init__(
        self,
        size: int | None,
        degradation: str | None,
        downscale_f: int = 4,
        min_crop_f: float = 0.5,
        max_crop_f: float = 1.0,
        random_crop: bool = True,
    ) -> None:
        where = f"{building_path()}.params"
        if not size or size < 1:
            raise ConfigError(f"{where}.size: give the side of the high-resolution images in pixels, e.g. 256.")
        if downscale_f < 1 or size % downscale_f:
            raise ConfigError(f"{where}.downscale_f: {downscale_f} must divide size {size}.")
        if not 0 < min_crop_f <= max_crop_f <= 1:
            raise ConfigError(f"{where}: need 0 < min_crop_f <= max_crop_f <= 1, got {min_crop_f}, {max_crop_f}.")
        self.size = size
        self.lr_size = size // downscale_f
        self.min_crop_f, self.max_crop_f = min_crop_f, max_crop_f
        self.random_crop = random_crop
        self.degrade = make_degradation(degradation, self.lr_size, downscale_f)

    def crop(self, image: np.ndarray) -> np.ndarray:
        height, width = image.shape[:2]
        fraction = self.min_crop_f + (self.max_crop_f - self.min_crop_f) * float(torch.rand(()))
        side = max(1, int(min(height, width) * fraction))
        if self.random_crop:
            top, left = int(torch.randint(height - side + 1, ())), int(torch.randint(width - side + 1, ()))
        else:
            top, left = (height - side) // 2, (width - side) // 2
        return image[top : top + side, left : left + side]

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        target = resize_area(self.crop(image), self.size)
        low = self.degrade(target)
        return (target / 127.5 - 1.0).astype(np.float32), (low / 127.5 - 1.0).astype(np.float32)
