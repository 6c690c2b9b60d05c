"""The full BSR degradation (``degradation: bsrgan`` in ``ImageNetSR``): see :mod:`.pipeline` for the steps."""

from __future__ import annotations

from typing import Any

import numpy as np

from ldm.modules.image_degradation.pipeline import Settings, degrade

SETTINGS = Settings(light=False, downsample_resize_p=0.75, noise_levels=(2, 25), min_jpeg_quality=30)


def degradation_bsrgan_variant(
    image: np.ndarray, sf: int = 4, isp_model: Any = None, rng: np.random.Generator | None = None
) -> dict[str, np.ndarray]:
    """``{"image": uint8 (H // sf, W // sf, 3)}``, the degraded low-resolution version of the uint8 ``image``
    ``(H, W, 3)``; ``rng`` makes every random choice (default: seeded from torch's generator). ``isp_model`` is
    accepted for CompVis's signature: this variant never applies camera noise."""
    return {"image": degrade(image, sf, SETTINGS, rng)}
