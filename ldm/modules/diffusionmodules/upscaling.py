"""The low-resolution image an upscaler (``LatentUpscaleDiffusion``) is conditioned on, and its noise augmentation.

``ImageConcatWithNoiseAugmentation`` noises the low-res image with its own forward-diffusion schedule to a noise
level, which the UNet is told (as its class label), so the model learns to upscale degraded inputs and the user
can choose how much detail it invents (SD 2.x x4 upscaler: ``noise_level`` 0..350, 20 by default in Stability's
demos). Module path and buffer names are Stability's, so ``x4-upscaling.yaml`` and its checkpoint load unchanged.
``CLIPEmbeddingNoiseAugmentation`` does the same to the CLIP image embedding an unCLIP model is conditioned on.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ldm.errors import UserError
from ldm.modules.diffusionmodules.util import Timestep, extract_into_tensor, make_beta_schedule
from ldm.serialization import CheckpointError, read_file
from ldm.util import ConfigError, building_path


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

    # Named in the message for a level out of range: Stability's demos upscale at 20.
    usual_noise_level = 20

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
                f"{self.max_noise_level - 1}; {self.usual_noise_level} is usual), got {levels.tolist()}."
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


class CLIPEmbeddingNoiseAugmentation(ImageConcatWithNoiseAugmentation):
    """Noise augmentation of CLIP image embeddings for unCLIP models (Karlo's recipe; SD 2.1 stable-unclip).

    The embedding is standardised with the CLIP embedding statistics (``data_mean`` / ``data_std``), noised to a
    level by the schedule (``squaredcos_cap_v2`` in the SD configs), mapped back to the embedding's statistics, and
    returned with the sinusoidal embedding of the level (``time_embed``, ``timestep_dim`` wide), which the UNet is
    told alongside it. The statistics come from ``clip_stats_path`` (a torch file holding ``(mean, std)``, each
    (timestep_dim,)); without it they are 0 and 1. They are not part of the state dict (as in the original), so a
    model built without the file runs with mean 0 / std 1 whatever checkpoint it loads.
    """

    # Image variations keep the embedding as it is by default (Stability's demo and diffusers).
    usual_noise_level = 0

    def __init__(self, *args: Any, clip_stats_path: str | None = None, timestep_dim: int = 256, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if clip_stats_path is None:
            mean, std = torch.zeros(timestep_dim), torch.ones(timestep_dim)
        else:
            mean, std = _read_clip_stats(clip_stats_path, timestep_dim)
        self.register_buffer("data_mean", mean[None, :], persistent=False)
        self.register_buffer("data_std", std[None, :], persistent=False)
        self.time_embed = Timestep(timestep_dim)

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        """Embedding x: (B, D) -> standardised (B, D): zero mean, unit variance under the CLIP statistics."""
        return (x - self.data_mean) / self.data_std

    def unscale(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`scale`."""
        return x * self.data_std + self.data_mean

    def forward(
        self, x: torch.Tensor, noise_level: torch.Tensor | int | None = None, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, D) image embeddings -> (x noised to the levels, (B, timestep_dim) embedding of the levels).

        Without ``noise_level`` the levels are drawn uniformly in [0, max_noise_level) (training); ``noise`` (B, D)
        replaces the random eps. Level 0 is the schedule's first step, sqrt(1 - alphas_cumprod[0]) of noise
        (0.0064 of the standardised embedding for ``squaredcos_cap_v2``), as in the original.
        """
        if noise_level is None:
            levels = torch.randint(0, self.max_noise_level, (x.shape[0],), device=x.device)
        else:
            levels = self.noise_levels(noise_level, x.shape[0], x.device)
        z = self.unscale(self.q_sample(self.scale(x), levels, noise))
        return z, self.time_embed(levels).to(z.dtype)


def _read_clip_stats(path: str, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean, std)``, each (dim,) float32, from a CLIP statistics file (Karlo's ``ViT-L-14_stats.th``)."""
    if not Path(path).is_file():
        raise ConfigError(
            f"{building_path()}.params.clip_stats_path: CLIP embedding statistics file '{path}' does not exist; give "
            "the (mean, std) file that came with the model (Karlo's ViT-L-14_stats.th), or remove clip_stats_path "
            "to use mean 0 / std 1."
        )
    try:
        _, stats = read_file(path)
    except CheckpointError as err:
        raise ConfigError(f"{building_path()}.params.clip_stats_path: {err}") from None
    if not isinstance(stats, tuple | list) or len(stats) != 2:
        raise ConfigError(f"{building_path()}.params.clip_stats_path: '{path}' must hold a (mean, std) pair.")
    mean, std = (torch.as_tensor(s, dtype=torch.float32).reshape(-1) for s in stats)
    if mean.numel() != dim or std.numel() != dim:
        raise ConfigError(
            f"{building_path()}.params.clip_stats_path: '{path}' holds statistics of width {mean.numel()}, the "
            f"embedding is {dim} wide (timestep_dim)."
        )
    return mean, std
