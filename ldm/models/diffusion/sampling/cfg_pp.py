"""CFG++ (Chung et al. 2024) on the one protocol (see :mod:`.core`): Euler, Euler ancestral and DPM++ 2M CFG++.

A CFG++ step takes the guided denoised estimate ``D_g`` as its target but renoises with the unconditional one
``D_u``: DDIM's ``x_next = D_g + sigma_next * (x - D_u) / sigma``. That is the unconditional step plus the guidance
vector ``g = D_g - D_u`` at full weight, where classifier-free guidance adds it at weight ``scale * (1 -
sigma_next / sigma)``; so a CFG++ step at ``scale`` equals a CFG step at ``scale * sigma / (sigma - sigma_next)``,
and its guidance grows with the step count. ``scale`` is the usual one of ``D_u + scale * (D_c - D_u)``, which is how
the authors' code and ComfyUI pass CFG++'s lambda: useful values are about 0.5 to 2 (the paper's lambda in [0, 1]),
not the 5 to 10 of CFG.

The denoiser must give both estimates from one model call, ``denoiser.with_uncond(x, sigma) -> (D_g, D_u)``
(:meth:`ldm.models.diffusion.guidance.Denoiser.with_uncond`); one without it (no guidance) is its own unconditional
estimate, and then every sampler here is exactly its base sampler.
x: (B, ...) at ``sigmas[0]``; every sampler returns the sample (B, ...) at ``sigmas[-1]``.
"""

from __future__ import annotations

import math

import torch

from ldm.models.diffusion.noise import Noise
from ldm.models.diffusion.sampling.core import (
    Callback,
    DenoiserFn,
    ancestral_split,
    euler_to,
    exp_step,
    progress_bar,
    randn_like,
    report,
    sigma_list,
)


def denoise_with_uncond(denoiser: DenoiserFn, x: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(guided, unconditional) denoised estimates of x: (B, ...), each (B, ...)."""
    both = getattr(denoiser, "with_uncond", None)
    if both is None:
        denoised = denoiser(x, sigma)
        return denoised, denoised
    return both(x, sigma)


@torch.no_grad()
def sample_euler_ancestral_cfg_pp(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    noise: Noise | None = None,
    callback: Callback | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Euler a CFG++: the unconditional Euler step down to ``sigma_down`` plus the guidance vector, then fresh noise
    of std ``sigma_up * s_noise`` (see :func:`~.core.ancestral_split`). One model call a step."""
    sig = sigma_list(sigmas)
    for i in progress_bar(sig, progress):
        sigma = sig[i]
        denoised, uncond = denoise_with_uncond(denoiser, x, sigma)
        report(callback, i, x, sigma, denoised)
        sigma_down, sigma_up = ancestral_split(sigma, sig[i + 1], eta)
        x = euler_to(denoiser, x, uncond, sigma, sigma_down) + (denoised - uncond)
        if sigma_up > 0:
            x = x + randn_like(x, noise) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_euler_cfg_pp(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: Noise | None = None,
    callback: Callback | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Euler CFG++ (DDIM CFG++ in the sigma view): ``x_next = D_g + sigma_next * (x - D_u) / sigma``."""
    return sample_euler_ancestral_cfg_pp(denoiser, x, sigmas, eta=0.0, callback=callback, progress=progress)


@torch.no_grad()
def sample_dpmpp_2m_cfg_pp(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: Noise | None = None,
    callback: Callback | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """DPM++ 2M CFG++, as the authors' code and ComfyUI: ``x_next = D_g + (sigma_next / sigma) (x - D_u) + (1 -
    sigma_next / sigma) h / (2 h_last) (D_g - D_u_last)``, first order on the first step and a last step to 0.

    That is DPM++ 2M on the unconditional estimates plus the guidance vector at weight ``1 + (1 - sigma_next /
    sigma) h / (2 h_last)``: the reference extrapolates from the last unconditional estimate to the current guided
    one, not to the current unconditional one.
    """
    sig = sigma_list(sigmas)
    old_uncond, h_last = None, 0.0
    for i in progress_bar(sig, progress):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised, uncond = denoise_with_uncond(denoiser, x, sigma)
        report(callback, i, x, sigma, denoised)
        h = math.log(sigma / sigma_next) if sigma_next > 0 else math.inf
        uncond_mid, weight = uncond, 1.0
        if old_uncond is not None and sigma_next > 0:
            w = h / (2 * h_last)
            uncond_mid = (1 + w) * uncond - w * old_uncond
            weight = 1 + (1 - sigma_next / sigma) * w
        x = exp_step(x, uncond_mid, sigma, sigma_next) + weight * (denoised - uncond)
        old_uncond, h_last = uncond, h
    return x
