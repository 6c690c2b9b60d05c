"""The low-resolution image an upscaler (``LatentUpscaleDiffusion``) is conditioned on, and its noise augmentation.

``ImageConcatWithNoiseAugmentation`` noises the low-res image with its own forward-diffusion schedule to a noise
level, which the UNet is told (as its class label), so the model learns to upscale degraded inputs and the user
can choose how much detail it invents (SD 2.x x4 upscaler: ``noise_level`` 0..350, 20 by default in Stability's
demos). Module path and buffer names are Stability's, so ``x4-upscaling.yaml`` and its checkpoint load unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from ldm.errors import UserError
from ldm.modules.diffusionmodules.util import extract_into_tensor, make_beta_schedule
from ldm.util import ConfigError


class AbstractLowScaleModel(nn.Module):
    """Prepares the low-res image that is concatenated to the noisy latent; with ``noise_schedule_config`` (the
    arguments of :meth:`register_schedule`) it has a forward-diffusion schedule for the image, stored as buffers."""

    def __init__(self, noise_schedule_config: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        if noise_schedule_config is not None:
            self.register_schedule(**noise_schedule_config)

    def register_schedule(
        self,
        beta_schedule: str = "linear",
        timesteps: int = 1000,
        linear_start: float = 1e-4,
        linear_end: float = 2e-2,
        cosine_s: float = 8e-3,
    ) -> None:
        """The image's noise schedule, computed in float64 and stored as float32 buffers (the checkpoint's
        ``low_scale_model.*`` keys; the posterior tables of ``DDPM`` are not needed, nothing denoises with them)."""
        betas = make_beta_schedule(
            beta_schedule, timesteps, linear_start=linear_start, linear_end=linear_end, cosine_s=cosine_s
        )
        alphas_cumprod = np.cumprod(1.0 - betas)
        self.num_timesteps = len(betas)
        self.linear_start, self.linear_end = linear_start, linear_end
        buffers = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": np.append(1.0, alphas_cumprod[:-1]),
            "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
            "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1.0),
        }
        for name, value in buffers.items():
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32))

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Noise x_start: (B, C, H, W) to levels t: (B,): ``sqrt(a_t) x + sqrt(1 - a_t) eps``, eps ~ N(0, 1)."""
        noise = torch.randn_like(x_start) if noise is None else noise
        return (
            extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, C, H, W) -> (x, no noise level)."""
        return x, None

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """The image back from what :meth:`forward` made of it: the same tensor (it is an image already)."""
        return x


class SimpleImageConcat(AbstractLowScaleModel):
    """The low-res image concatenated as it is, always at noise level 0 (no noise-level conditioning)."""

    def __init__(self) -> None:
        super().__init__(noise_schedule_config=None)
        self.max_noise_level = 0

    def forward(
        self, x: torch.Tensor, noise_level: torch.Tensor | int | None = None, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, C, H, W) -> (x unchanged, zeros (B,) long). A noise level other than 0 cannot be honoured."""
        if noise_level is not None and bool(torch.as_tensor(noise_level).ne(0).any()):
            raise UserError("this upscaler (SimpleImageConcat) takes no noise augmentation; use noise_level 0.")
        return x, torch.zeros(x.shape[0], device=x.device, dtype=torch.long)


class ImageConcatWithNoiseAugmentation(AbstractLowScaleModel):
    """The low-res image noised by its own schedule to a noise level, which is returned for the UNet to see.

    Training draws levels uniformly in ``[0, max_noise_level)``; sampling gives one. ``to_cuda`` is accepted for
    config compatibility and has no effect (the buffers follow the model's ``.to``).
    """

    def __init__(
        self, noise_schedule_config: Mapping[str, Any], max_noise_level: int = 1000, to_cuda: bool = False
    ) -> None:
        super().__init__(noise_schedule_config=noise_schedule_config)
        if not 1 <= int(max_noise_level) <= self.num_timesteps:
            raise ConfigError(
                f"max_noise_level must be in 1..{self.num_timesteps} (the noise schedule's length), got "
                f"{max_noise_level}."
            )
        self.max_noise_level = int(max_noise_level)

    def noise_levels(self, noise_level: torch.Tensor | int, batch_size: int, device: torch.device) -> torch.Tensor:
        """A requested noise level (one for all, or (B,)) as (B,) long on ``device``, checked to lie in the schedule
        (where it was given: a Python number is checked on the CPU, with no device sync)."""
        levels = noise_level if isinstance(noise_level, torch.Tensor) else torch.tensor(noise_level, device="cpu")
        if levels.is_floating_point() and not bool((levels == levels.round()).all()):
            raise UserError(f"noise_level must be a whole number, got {noise_level!r}.")
        levels = levels.long().reshape(-1)
        if levels.numel() == 1:
            levels = levels.repeat(batch_size)
        if levels.numel() != batch_size:
            raise UserError(f"noise_level has {levels.numel()} entries for a batch of {batch_size}; give 1 or B.")
        if not bool(((levels >= 0) & (levels < self.num_timesteps)).all()):
            raise UserError(
                f"noise_level must be in 0..{self.num_timesteps - 1} (the model was trained up to "
                f"{self.max_noise_level - 1}; 20 is usual), got {levels.tolist()}."
            )
        return levels.to(device)

    def forward(
        self, x: torch.Tensor, noise_level: torch.Tensor | int | None = None, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, C, H, W) -> (x noised to the levels, levels (B,) long). Without ``noise_level`` the levels are
        drawn uniformly in [0, max_noise_level) (training); ``noise`` (like x) replaces the random eps."""
        if noise_level is None:
            levels = torch.randint(0, self.max_noise_level, (x.shape[0],), device=x.device)
        else:
            levels = self.noise_levels(noise_level, x.shape[0], x.device)
        return self.q_sample(x, levels, noise), levels
