"""The BSRGAN degradation ("Designing a Practical Degradation Model for Deep Blind Image Super-Resolution", Zhang et
al. 2021) in the variant CompVis's ``ImageNetSR`` applies, with the settings of its full and light versions.

One pass, on a float image in [0, 1] (``sf`` the scale factor):

1. with ``sf == 4``, probability 1/4: halve the image first (a cv2-style resize with a random interpolation, or
   MATLAB bicubic), and go on with ``sf = 2``;
2. in a random order, except that the intermediate downsampling always comes before the final one:
   blur (twice in the full version, once in the light one), the intermediate downsampling, the final resize to
   ``1 / sf`` of the size before the intermediate one, Gaussian noise, JPEG noise (probability 0.9);
3. a last JPEG compression.

The output is the low-resolution uint8 image, ``1 / sf`` of the input's height and width (cropped at the bottom
and right to multiples of ``sf`` first; the original swaps height and width in that crop, which changes nothing for
the square crops ``ImageNetSR`` passes). The original's random draws come from Python's and numpy's global
generators; here one ``numpy.random.Generator`` makes them all, so the same distributions are drawn, not the same
numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ldm.errors import UserError
from ldm.modules.image_degradation.steps import (
    add_blur,
    add_gaussian_noise,
    add_jpeg_noise,
    downsample_random,
    random_interpolation,
)
from ldm.modules.image_degradation.utils_image import cv_resize, imresize_np, modcrop, single2uint, uint2single

JPEG_P = 0.9
HALVE_P = 0.25
BLUR, SECOND_BLUR, DOWNSAMPLE, FINAL_RESIZE, NOISE, JPEG, CAMERA = range(7)


@dataclass(frozen=True)
class Settings:
    """What tells the full and light versions apart."""

    light: bool  # smaller blur kernels, one blur instead of two
    downsample_resize_p: float  # probability that the intermediate downsampling is a resize
    noise_levels: tuple[int, int]  # Gaussian noise level range, in 1/255 units
    min_jpeg_quality: int  # JPEG quality is drawn from min_jpeg_quality..95


def default_rng() -> np.random.Generator:
    """A generator seeded from torch's, which PyTorch seeds differently in every DataLoader worker and
    ``seed_everything`` seeds for a run."""
    return np.random.default_rng(int(torch.randint(2**62, ())))


def step_order(rng: np.random.Generator) -> list[int]:
    """A random order of the seven steps with the intermediate downsampling before the final resize."""
    order = [int(i) for i in rng.permutation(7)]
    first, second = order.index(DOWNSAMPLE), order.index(FINAL_RESIZE)
    if first > second:
        order[first], order[second] = order[second], order[first]
    return order


def degrade(image: np.ndarray, sf: int, settings: Settings, rng: np.random.Generator | None = None) -> np.ndarray:
    """The low-resolution version of a uint8 image ``(H, W, 3)``: uint8 ``(H // sf, W // sf, 3)``."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise UserError(f"the BSR degradation takes a uint8 (H, W, 3) image, got {image.dtype} {image.shape}.")
    if sf < 1 or image.shape[0] < sf or image.shape[1] < sf:
        raise UserError(f"cannot downscale a {image.shape[1]}x{image.shape[0]} image by a factor of {sf}.")
    rng = rng if rng is not None else default_rng()
    x = modcrop(uint2single(image), sf)
    if sf == 4 and rng.random() < HALVE_P:
        if rng.random() < 0.5:
            x = cv_resize(x, (x.shape[1] // 2, x.shape[0] // 2), random_interpolation(rng))
        else:
            x = imresize_np(x, 1 / 2, True)
        x = np.clip(x, 0.0, 1.0)
        sf = 2
    # The size the final resize divides by sf: the image's before the intermediate downsampling.
    width, height = x.shape[1], x.shape[0]
    for step in step_order(rng):
        if step == BLUR or (step == SECOND_BLUR and not settings.light):
            x = add_blur(x, sf, rng, settings.light)
        elif step == DOWNSAMPLE:
            width, height = x.shape[1], x.shape[0]
            x = downsample_random(x, sf, rng, settings.downsample_resize_p)
        elif step == FINAL_RESIZE:
            x = np.clip(cv_resize(x, (width // sf, height // sf), random_interpolation(rng)), 0.0, 1.0)
        elif step == NOISE:
            x = add_gaussian_noise(x, rng, *settings.noise_levels)
        elif step == JPEG and rng.random() < JPEG_P:
            x = add_jpeg_noise(x, rng, settings.min_jpeg_quality)
        # CAMERA: the original's camera-sensor (ISP) noise step, disabled in this variant; it keeps its place in the
        # random order so the other steps' order follows the original's draw.
    return single2uint(add_jpeg_noise(x, rng, settings.min_jpeg_quality))
