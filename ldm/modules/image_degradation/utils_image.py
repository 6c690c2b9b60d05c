"""Image helpers of the BSR degradations: uint8 <-> float conversion and the resizes they use.

Images are numpy arrays ``(H, W, C)``: uint8 in [0, 255] or float32 in [0, 1]. The resizes stand in for OpenCV's
``cv2.resize`` (the interpolation codes 0-3 the original draws from) and for MATLAB's ``imresize`` (the original's
``imresize_np``), so the project needs neither OpenCV nor MATLAB-in-numpy code.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

# cv2's INTER_LINEAR and INTER_CUBIC -> torch's modes. Like cv2 they do not antialias: they sample the source at the
# output pixels' centres (cubic with a = -0.75, cv2's value). INTER_NEAREST (0) and INTER_AREA (3) are computed
# here directly, with OpenCV's index arithmetic and weights.
CV_MODES = {1: "bilinear", 2: "bicubic"}


def uint2single(image: np.ndarray) -> np.ndarray:
    """uint8 ``(H, W, C)`` in [0, 255] -> float32 in [0, 1]."""
    return np.float32(image / 255.0)


def single2uint(image: np.ndarray) -> np.ndarray:
    """float ``(H, W, C)`` -> uint8, clipped to [0, 1] and rounded to the nearest level."""
    return np.uint8((image.clip(0, 1) * 255.0).round())


def modcrop(image: np.ndarray, scale: int) -> np.ndarray:
    """``image`` cropped at the bottom and right to height and width divisible by ``scale``."""
    height, width = image.shape[:2]
    return image[: height - height % scale, : width - width % scale, ...].copy()


def _area_matrix(in_length: int, out_length: int, averaging: bool) -> np.ndarray:
    """``(out_length, in_length)`` weights of OpenCV's INTER_AREA along one axis.

    ``averaging`` (OpenCV's choice when neither side grows): output pixel i averages the input over
    ``[i s, (i + 1) s)``, ``s = in / out``, each input pixel weighted by how much of it lies inside. Otherwise (on
    both axes): a blend of source pixels ``j = floor(i s)`` and ``j + 1`` with the fraction
    ``f = (i + 1) - (j + 1) / s``, 0 where negative, else its fractional part.
    """
    # OpenCV's own floating-point steps, so that floor() lands where its does (60 * 45 / 100 is 26.99... there).
    inverse = out_length / in_length
    scale = 1.0 / inverse
    outputs = np.arange(out_length)
    if averaging:
        starts, ends = outputs * scale, (outputs + 1) * scale
        pixels = np.arange(in_length)
        overlap = np.minimum(ends[:, None], pixels + 1) - np.maximum(starts[:, None], pixels)
        return np.clip(overlap, 0, None) / scale
    source = np.floor(outputs * scale).astype(np.int64)
    fraction = (outputs + 1) - (source + 1) * inverse
    fraction = np.where(fraction <= 0, 0.0, fraction - np.floor(fraction))
    matrix = np.zeros((out_length, in_length))
    np.add.at(matrix, (outputs, np.minimum(source, in_length - 1)), 1 - fraction)
    np.add.at(matrix, (outputs, np.minimum(source + 1, in_length - 1)), fraction)
    return matrix


def cv_resize(image: np.ndarray, size: tuple[int, int], interpolation: int) -> np.ndarray:
    """``cv2.resize(image, size, interpolation=interpolation)`` for a float ``(H, W, C)`` image; ``size`` is
    ``(width, height)`` as in OpenCV, ``interpolation`` a cv2 code 0-3 (see :data:`CV_MODES`)."""
    width, height = size
    if width < 1 or height < 1:
        raise ValueError(f"cannot resize a {image.shape[1]}x{image.shape[0]} image to {width}x{height}")
    if interpolation == 3:
        averaging = width <= image.shape[1] and height <= image.shape[0]
        rows, cols = _area_matrix(image.shape[0], height, averaging), _area_matrix(image.shape[1], width, averaging)
        out = np.einsum("oh,hw...->ow...", rows, image.astype(np.float64))
        return np.einsum("pw,ow...->op...", cols, out).astype(np.float32)
    if interpolation == 0:
        # Source pixel floor(i * in / out), with the scale computed as OpenCV does (torch's float32 one can floor
        # to the pixel before).
        rows = np.floor(np.arange(height) * (1.0 / (height / image.shape[0]))).astype(np.int64)
        cols = np.floor(np.arange(width) * (1.0 / (width / image.shape[1]))).astype(np.int64)
        return image[np.minimum(rows, image.shape[0] - 1)][:, np.minimum(cols, image.shape[1] - 1)]
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
    y = F.interpolate(x, size=(height, width), mode=CV_MODES[interpolation], align_corners=False)
    return y[0].permute(1, 2, 0).numpy()


def _cubic(x: np.ndarray) -> np.ndarray:
    """MATLAB's bicubic kernel (a = -0.5)."""
    ax = np.abs(x)
    near = (1.5 * ax**3 - 2.5 * ax**2 + 1) * (ax <= 1)
    far = (-0.5 * ax**3 + 2.5 * ax**2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2))
    return near + far


def _resize_matrix(in_length: int, out_length: int, scale: float, antialiasing: bool) -> np.ndarray:
    """``(out_length, in_length)`` weights of MATLAB's bicubic imresize along one axis, borders mirrored with the edge
    pixel repeated (MATLAB's 'symmetric' padding)."""
    widen = antialiasing and scale < 1
    kernel_width = 4.0 / scale if widen else 4.0
    # Output pixel i (1-based) sits at u in input coordinates (1-based), pixel centres aligned.
    u = np.arange(1, out_length + 1) / scale + 0.5 * (1 - 1 / scale)
    left = np.floor(u - kernel_width / 2)
    taps = left[:, None] + np.arange(math.ceil(kernel_width) + 2)[None, :]
    distance = u[:, None] - taps
    weights = scale * _cubic(scale * distance) if widen else _cubic(distance)
    weights /= weights.sum(axis=1, keepdims=True)
    # 1-based index -> 0-based, mirrored into [0, in_length) with the edge repeated: -1 -> 0, in_length -> in - 1.
    index = (taps - 1).astype(np.int64)
    period = 2 * in_length
    index = np.mod(index, period)
    index = np.where(index >= in_length, period - 1 - index, index)
    matrix = np.zeros((out_length, in_length))
    np.add.at(matrix, (np.repeat(np.arange(out_length), index.shape[1]), index.ravel()), weights.ravel())
    return matrix


def imresize_np(image: np.ndarray, scale: float, antialiasing: bool = True) -> np.ndarray:
    """MATLAB's ``imresize(image, scale, 'bicubic')`` of a float ``(H, W, C)`` (or ``(H, W)``) image: the output is
    ``ceil(H * scale) x ceil(W * scale)``; downscaling widens the kernel by ``1 / scale`` when ``antialiasing``."""
    height, width = image.shape[:2]
    rows = _resize_matrix(height, math.ceil(height * scale), scale, antialiasing)
    cols = _resize_matrix(width, math.ceil(width * scale), scale, antialiasing)
    out = np.einsum("oh,hw...->ow...", rows, image.astype(np.float64))
    out = np.einsum("pw,ow...->op...", cols, out)
    return out.astype(np.float32)
