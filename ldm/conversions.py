"""Conversions between PIL images and the tensors the models take: RGB images in [-1, 1], masks, depth maps."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (1, 3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]


def mask_to_tensor(mask: Image.Image) -> torch.Tensor:
    """Binary "L" mask -> (1, 1, H, W) float32, 1 = repaint."""
    return torch.from_numpy((np.asarray(mask) >= 128).astype(np.float32))[None, None]


def depth_to_tensor(depth: Image.Image) -> torch.Tensor:
    """A depth map (any PIL mode: 8- or 16-bit grey, float; brighter = nearer) -> (1, 1, H, W) float32."""
    return torch.from_numpy(np.asarray(depth.convert("F"), dtype=np.float32).copy())[None, None]


def tensor_to_images(x: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) roughly in [-1, 1] -> B RGB uint8 PIL images (clamped, rounded)."""
    pixels = ((x.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a) for a in pixels.permute(0, 2, 3, 1).cpu().numpy()]
