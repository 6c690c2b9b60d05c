"""This project's side of the benchmark: ``Pipeline`` (ldm.inference) running the UNet forward and the txt2img job."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from ldm.benchmark.settings import DTYPES, GUIDANCE_SCALE, PRECISION_OF_DTYPE, PROMPT, Settings
from ldm.inference import Pipeline


class LdmEngine:
    """This project's ``Pipeline`` (ldm.inference), with the fast paths of ``settings``, on its torch engine or (with
    ``engine="openvino"``) its OpenVINO one (:mod:`ldm.openvino_engine`)."""

    def __init__(self, config: DictConfig, weights: Path, settings: Settings, engine: str = "torch") -> None:
        self.settings = settings
        self.device = torch.device(settings.device)
        self.dtype = DTYPES[settings.dtype]
        self.pipe = Pipeline.from_config(
            config,
            weights,
            device=self.device,
            precision=PRECISION_OF_DTYPE[settings.dtype],
            engine=engine,
            **settings.fast_path_options(),
        )
        # Image metadata is not needed here, and hashing a multi-GB weights file would land in the first txt2img.
        self.pipe.ckpt = None

    def _autocast(self) -> AbstractContextManager:
        # As Pipeline.generate runs the model: half-precision weights under autocast, float32 sampler state.
        if self.dtype == torch.float32 or self.pipe.engine is not None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @torch.no_grad()
    def unet(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The UNet's prediction (2, C, h, w) for latents x: (2, C, h, w), timesteps t: (2,), context (2, L, D)."""
        with self._autocast():
            return self.pipe.model.apply_model(x, t, context.to(self.dtype))

    def txt2img(self, steps: int, size: int | None = None) -> np.ndarray:
        """One image (H, W, 3) uint8 of the benchmark prompt, ``steps`` DDIM steps, CFG at batch 2; ``size``: a
        square image of that side instead of the settings' size."""
        s = self.settings
        height, width = (size, size) if size else (s.height, s.width)
        result = self.pipe.generate(
            PROMPT,
            steps=steps,
            sampler="ddim",
            scale=GUIDANCE_SCALE,
            seed=s.seed,
            height=height,
            width=width,
            eta=0.0,
            progress=False,
        )
        return np.asarray(result.images[0])

    def token_ids(self, prompt: str) -> list[int]:
        return self.pipe.model.cond_stage_model.tokenizer([prompt])[0].tolist()
