"""stable-diffusion.cpp (ggml) through its Python binding ``stable-diffusion-cpp-python``, reading the very same
``.safetensors`` file as the other engines. Optional: the benchmark leaves it out with a note where the binding is
not installed (it is built from source, which takes a while: ``pip install stable-diffusion-cpp-python``).

Its samplers are its own (no plain DDIM; Euler is used, one model call a step as DDIM), so only its time and memory
are compared, not its image, and it has no separate UNet call to time or cross-check."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from ldm.benchmark.settings import GUIDANCE_SCALE, PROMPT, Settings

WEIGHT_TYPES = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}


class SdCppEngine:
    """stable-diffusion.cpp's txt2img on the benchmark's weights file, in the settings' dtype, on every core."""

    def __init__(self, config: DictConfig, weights: Path, settings: Settings) -> None:
        from stable_diffusion_cpp import StableDiffusion

        self.settings = settings
        self.sd = StableDiffusion(
            model_path=str(weights), wtype=WEIGHT_TYPES[settings.dtype], n_threads=os.cpu_count() or 1, verbose=False
        )

    def txt2img(self, steps: int, size: int | None = None) -> np.ndarray:
        """One image (H, W, 3) uint8 of the benchmark prompt, ``steps`` Euler steps at the benchmark's guidance."""
        s = self.settings
        height, width = (size, size) if size else (s.height, s.width)
        images = self.sd.generate_image(
            prompt=PROMPT,
            width=width,
            height=height,
            cfg_scale=GUIDANCE_SCALE,
            sample_steps=steps,
            sample_method="euler",
            seed=s.seed,
        )
        return np.asarray(images[0].convert("RGB"))
