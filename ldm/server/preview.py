"""Live previews: an RGB picture of a latent without running the VAE decoder (A1111's "Approx cheap").

The map from latent channels to colours is linear, fitted once per model on its own VAE: smooth random colour
fields are encoded and the latents regressed onto the colours, so it works for any first stage (SD's 4 channels,
SDXL's, the demo model's) without a table of coefficients.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

FIT_IMAGES = 8
FIT_LATENT_SIZE = 16


@torch.no_grad()
def fit_preview(pipe: Any) -> torch.Tensor:
    """The (C + 1, 3) least-squares map from a latent pixel (and a bias) to RGB in [-1, 1], for ``pipe``'s VAE."""
    size = FIT_LATENT_SIZE * pipe.geometry.factor
    generator = torch.Generator().manual_seed(0)
    colours = torch.rand(FIT_IMAGES, 3, 4, 4, generator=generator) * 2 - 1
    pixels = F.interpolate(colours, size=(size, size), mode="bicubic", align_corners=False).clamp(-1, 1)
    latents = pipe.encode(pixels.to(pipe.device)).float().cpu()
    target = F.interpolate(pixels, size=latents.shape[-2:], mode="area")
    inputs = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    inputs = torch.cat([inputs, torch.ones(len(inputs), 1)], dim=1)
    return torch.linalg.lstsq(inputs, target.permute(0, 2, 3, 1).reshape(-1, 3)).solution


def preview_image(latent: torch.Tensor, mapping: torch.Tensor, size: tuple[int, int]) -> Image.Image:
    """latent: (C, h, w) -> an RGB image of ``size`` (width, height), by ``mapping`` from :func:`fit_preview`."""
    pixels = latent.permute(1, 2, 0) @ mapping[:-1] + mapping[-1]
    pixels = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    return Image.fromarray(pixels, "RGB").resize(size, Image.Resampling.BILINEAR)
