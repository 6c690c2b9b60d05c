"""LCM sampling (Luo et al. 2023, "Latent Consistency Models") on the one protocol (see :mod:`.core`).

A consistency model maps any noisy ``x`` straight to the clean sample, so each step takes the model's estimate and
noises it afresh to the next sigma; the steps do not integrate an ODE, and with an ordinary model the result is
coarser than a solver's. x: (B, ...) at ``sigmas[0]``; returns the sample (B, ...) at ``sigmas[-1]``.
"""

from __future__ import annotations

import torch

from ldm.models.diffusion.noise import Noise
from ldm.models.diffusion.sampling.core import Callback, DenoiserFn, progress_bar, randn_like, report, sigma_list


@torch.no_grad()
def sample_lcm(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    s_noise: float = 1.0,
    noise: Noise | None = None,
    callback: Callback | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Denoise, then re-noise to the next sigma with fresh noise (std ``s_noise * sigma_next``): one call a step."""
    sig = sigma_list(sigmas)
    for i in progress_bar(sig, progress):
        denoised = denoiser(x, sig[i])
        report(callback, i, x, sig[i], denoised)
        x = denoised
        if sig[i + 1] > 0:
            x = x + randn_like(x, noise) * (s_noise * sig[i + 1])
    return x
