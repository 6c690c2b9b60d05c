"""The steps the BSR degradations chain: Gaussian blur kernels, blurring, resizing, Gaussian and JPEG noise.

Every function takes a float32 image ``(H, W, 3)`` in [0, 1] and a ``numpy.random.Generator`` that makes all its
random choices, so a degradation is reproducible from one seed.
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.modules.image_degradation.utils_image import cv_resize, single2uint, uint2single


def anisotropic_gaussian(ksize: int, theta: float, l1: float, l2: float) -> np.ndarray:
    """``(ksize, ksize)`` Gaussian kernel summing to 1 whose covariance has eigenvalues ``l1``, ``l2`` along the
    direction at angle ``theta`` and its normal (``l1 == l2`` gives an isotropic one)."""
    v = np.array([np.cos(theta), np.sin(theta)])
    eigenvectors = np.array([[v[0], v[1]], [v[1], -v[0]]])
    sigma = eigenvectors @ np.diag([l1, l2]) @ np.linalg.inv(eigenvectors)
    # Pixel offsets from the kernel's centre, (size - 1) / 2: a half-pixel one for even sizes.
    offsets = np.arange(ksize) - (ksize - 1) / 2
    cx, cy = np.meshgrid(offsets, offsets)
    points = np.stack([cx, cy], axis=-1)
    exponent = np.einsum("...i,ij,...j->...", points, np.linalg.inv(sigma), points)
    kernel = np.exp(-0.5 * exponent)
    return kernel / kernel.sum()


def isotropic_gaussian(size: int, sigma: float) -> np.ndarray:
    """MATLAB's ``fspecial('gaussian', size, sigma)``: ``(size, size)``, summing to 1, values below
    ``eps * max`` set to 0."""
    half = (size - 1) / 2
    x, y = np.meshgrid(np.arange(-half, half + 1), np.arange(-half, half + 1))
    kernel = np.exp(-(x * x + y * y) / (2 * sigma * sigma))
    kernel[kernel < np.finfo(float).eps * kernel.max()] = 0
    total = kernel.sum()
    return kernel / total if total != 0 else kernel


def shift_pixel(kernel: np.ndarray, sf: int) -> np.ndarray:
    """``kernel`` resampled (bilinearly, edges clamped) ``(sf - 1) / 2`` pixels towards its upper left, so that
    blurring then keeping every ``sf``-th pixel from the first samples the centre of each ``sf x sf`` block."""
    height, width = kernel.shape
    shift = (sf - 1) * 0.5
    xs, ys = np.arange(width, dtype=float), np.arange(height, dtype=float)
    x1, y1 = np.clip(xs + shift, 0, width - 1), np.clip(ys + shift, 0, height - 1)
    rows = np.stack([np.interp(x1, xs, row) for row in kernel])
    return np.stack([np.interp(y1, ys, column) for column in rows.T], axis=1)


def convolve(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Each channel of ``image`` convolved with the 2-D ``kernel`` (a true convolution: the kernel is flipped),
    borders mirrored about the edge pixel (scipy.ndimage's 'mirror'); the kernel's centre is ``size // 2``."""
    kh, kw = kernel.shape
    # out[i] = sum_m k[m] x[i + c - m] with c = size // 2: pad size - 1 - c before and c after.
    pad = ((kh - 1 - kh // 2, kh // 2), (kw - 1 - kw // 2, kw // 2), (0, 0))
    padded = np.pad(image, pad, mode="reflect")
    x = torch.from_numpy(np.ascontiguousarray(padded, dtype=np.float32)).permute(2, 0, 1)[:, None]
    weight = torch.from_numpy(np.ascontiguousarray(kernel[::-1, ::-1], dtype=np.float32))[None, None]
    return F.conv2d(x, weight)[:, 0].permute(1, 2, 0).numpy()


def add_blur(image: np.ndarray, sf: int, rng: np.random.Generator, light: bool) -> np.ndarray:
    """Blur with an anisotropic (probability 1/2) or isotropic Gaussian kernel of random size and spread.

    Full BSR: covariance eigenvalues up to ``4 + sf``, kernels 7-25 px (odd), isotropic sigma up to ``2 + 0.2 sf``.
    Light: spreads divided by 4, anisotropic kernels 5-14 px, isotropic ones 5-7 px.
    """
    wd2, wd = 4.0 + sf, 2.0 + 0.2 * sf
    if light:
        wd2, wd = wd2 / 4, wd / 4
    if rng.random() < 0.5:
        l1, l2 = wd2 * rng.random(), wd2 * rng.random()
        size = int(rng.integers(2, 12)) + 3 if light else 2 * int(rng.integers(2, 12)) + 3
        kernel = anisotropic_gaussian(size, theta=rng.random() * np.pi, l1=l1, l2=l2)
    else:
        size = int(rng.integers(2, 5)) + 3 if light else 2 * int(rng.integers(2, 12)) + 3
        kernel = isotropic_gaussian(size, wd * rng.random())
    return convolve(image, kernel)


def random_interpolation(rng: np.random.Generator) -> int:
    """One of cv2's linear, cubic, area codes, uniformly."""
    return int(rng.choice([1, 2, 3]))


def downsample_random(image: np.ndarray, sf: int, rng: np.random.Generator, resize_p: float) -> np.ndarray:
    """The intermediate downsampling: with probability ``resize_p`` a resize by 1 / U(1, 2 sf) with a random
    interpolation, otherwise a blur with a shifted 25-px Gaussian (sigma U(0.1, 0.6 sf)) and keeping every ``sf``-th
    pixel."""
    if rng.random() < resize_p:
        sf1 = rng.uniform(1, 2 * sf)
        size = (int(image.shape[1] / sf1), int(image.shape[0] / sf1))
        image = cv_resize(image, size, random_interpolation(rng))
    else:
        kernel = shift_pixel(isotropic_gaussian(25, rng.uniform(0.1, 0.6 * sf)), sf)
        image = convolve(image, kernel / kernel.sum())[0::sf, 0::sf, ...]
    return np.clip(image, 0.0, 1.0)


def add_gaussian_noise(image: np.ndarray, rng: np.random.Generator, level1: int, level2: int) -> np.ndarray:
    """Zero-mean Gaussian noise of a level drawn from ``level1..level2`` (in 1/255 units): per-channel colour
    noise (probability 0.4), grey noise shared by the channels (0.4), or noise correlated across channels with a
    random covariance of scale ``level2`` (0.2)."""
    level = int(rng.integers(level1, level2 + 1)) / 255.0
    choice = rng.random()
    if choice > 0.6:
        noise = rng.normal(0, level, image.shape)
    elif choice < 0.4:
        noise = rng.normal(0, level, (*image.shape[:2], 1))
    else:
        scale = level2 / 255.0
        basis = np.linalg.svd(rng.random((3, 3)))[0]  # an orthonormal basis, scipy.linalg.orth's
        covariance = np.abs(scale**2 * (basis.T @ np.diag(rng.random(3)) @ basis))
        # The element-wise abs (the original's) need not keep the matrix positive semi-definite; numpy samples
        # through its SVD either way, so its check would only warn.
        noise = rng.multivariate_normal(np.zeros(3), covariance, image.shape[:2], check_valid="ignore")
    return np.clip(image + noise.astype(np.float32), 0.0, 1.0)


def jpeg_round_trip(image: np.ndarray, quality: int) -> np.ndarray:
    """``image`` encoded as a JPEG of ``quality`` (libjpeg, 4:2:0 chroma) and decoded again."""
    buffer = io.BytesIO()
    Image.fromarray(single2uint(image)).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return uint2single(np.asarray(decoded.convert("RGB")))


def add_jpeg_noise(image: np.ndarray, rng: np.random.Generator, min_quality: int) -> np.ndarray:
    """JPEG compression at a quality drawn from ``min_quality..95``."""
    return jpeg_round_trip(image, int(rng.integers(min_quality, 96)))
