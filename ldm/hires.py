"""A1111's hires fix: generate at the request's size, upscale, then redraw the result at the larger size.

The first pass is the plain txt2img request. Its result is upscaled ``hr_scale`` times (each side rounded down to
the model's multiple) by ``hr_upscaler``:

- a latent upscaler (A1111's names): the first pass's latents are resized with ``torch.nn.functional.interpolate``,
  ``Latent`` bilinear, ``Latent (antialiased)``, ``Latent (bicubic)``, ``Latent (bicubic antialiased)``,
  ``Latent (nearest)`` and ``Latent (nearest-exact)``;
- an image upscaler: the decoded images are resized with PIL (``Lanczos``, ``Nearest``) and encoded again.

The second pass is img2img from those latents at ``denoising_strength`` with ``hr_second_pass_steps`` steps (0: the
first pass's steps), the same prompts and seeds; strength 0 returns the upscaled latents decoded. The infotext keeps
the first pass's Size, as A1111's does, and adds ``Denoising strength``, ``Hires upscale``, ``Hires steps`` (when
set) and ``Hires upscaler``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from ldm.conversions import image_to_tensor
from ldm.errors import UserError

# name -> (interpolate mode, antialias)
LATENT_UPSCALERS = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
IMAGE_UPSCALERS = {"Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST}
UPSCALERS = (*LATENT_UPSCALERS, *IMAGE_UPSCALERS)


def check_hires(enable: bool, scale: float, upscaler: str, steps: int, strength: float) -> None:
    """UserError naming the fix for any bad hires fix setting (checked whether or not it is enabled)."""
    if not isinstance(enable, bool):
        raise UserError(f"enable_hr is True or False, got {enable!r}.")
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale) or scale < 1:
        raise UserError(f"hr_scale must be a number of at least 1 (2 = twice the size), got {scale!r}.")
    if upscaler not in UPSCALERS:
        raise UserError(f"unknown hr_upscaler {upscaler!r}; choose one of: {', '.join(UPSCALERS)}.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise UserError(f"hr_second_pass_steps must be a whole number >= 0 (0 = the same steps), got {steps!r}.")
    if isinstance(strength, bool) or not isinstance(strength, int | float) or not 0 <= strength <= 1:
        raise UserError(f"denoising_strength must be a number in [0, 1], got {strength!r}.")


def hires_size(height: int, width: int, scale: float, multiple: int) -> tuple[int, int]:
    """The second pass's (height, width): each side times ``scale``, rounded down to ``multiple``."""

    def side(length: int) -> int:
        return max(multiple, int(length * scale) // multiple * multiple)

    return side(height), side(width)


def upscale_latents(latents: torch.Tensor, upscaler: str, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) latents resized to ``size`` = (h', w') by a latent upscaler of :data:`LATENT_UPSCALERS`."""
    mode, antialias = LATENT_UPSCALERS[upscaler]
    corners = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(latents.float(), size=size, mode=mode, antialias=antialias, **corners).to(latents.dtype)


def hires_fields(request: Any) -> dict[str, Any]:
    """The A1111 infotext entries of the hires fix (none when it is off)."""
    if not request.enable_hr:
        return {}
    return {
        "Hires upscale": request.hr_scale,
        "Hires steps": request.hr_second_pass_steps or None,
        "Hires upscaler": request.hr_upscaler,
    }


def run_hires(pipe: Any, request: Any, run: Callable[..., Any]) -> Any:
    """Both passes of ``request`` with ``run(request, start=None)`` (the pipeline's own run); see the module."""
    first = run(dataclasses.replace(request, enable_hr=False))
    height, width = hires_size(first.height, first.width, request.hr_scale, pipe.geometry.multiple)
    factor = pipe.geometry.factor
    if request.hr_upscaler in LATENT_UPSCALERS:
        start = upscale_latents(first.latents, request.hr_upscaler, (height // factor, width // factor))
    else:
        resample = IMAGE_UPSCALERS[request.hr_upscaler]
        pixels = torch.cat([image_to_tensor(im.resize((width, height), resample)) for im in first.images])
        start = pipe.encode(pixels.to(pipe.device))
    second = dataclasses.replace(
        request,
        enable_hr=False,
        height=height,
        width=width,
        steps=request.hr_second_pass_steps or request.steps,
        seed=list(request.seeds),
        subseed=list(request.subseeds) if request.subseeds is not None else None,
    )
    result = run(second, start=(start, float(request.denoising_strength)))
    return dataclasses.replace(
        result,
        steps=request.steps,
        width=first.width,
        height=first.height,
        strength=request.denoising_strength,
        extra={**result.extra, **hires_fields(request)},
    )
