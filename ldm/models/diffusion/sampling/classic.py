"""The classic samplers on the one protocol (see :mod:`.core`): Euler, Heun, DPM2, LMS, their ancestral forms, and
DDIM, PLMS and DDPM, which are the same ideas on the CompVis timestep grid.

DDIM is exactly an Euler step in the sigma view (Karras et al. 2022, eq. 4 ff.): with ``eta > 0`` it is the
ancestral Euler step, whose noise split equals DDIM's ``sigma_t``; ``eta = 1`` is DDPM's posterior sampling. PLMS
is Adams-Bashforth of order up to 4 on the eps (= the derivative ``d``) history, with a Heun first step.
x: (B, ...) at ``sigmas[0]``; every function returns the sample (B, ...) at ``sigmas[-1]``.
"""

from __future__ import annotations

import math

import torch

from ldm.models.diffusion.noise import Noise
from ldm.models.diffusion.sampling.core import (
    Callback,
    DenoiserFn,
    adams_bashforth,
    ancestral,
    derivative,
    dpm2_to,
    euler_to,
    lagrange_weights,
    progress_bar,
    randn_like,
    report,
    sigma_list,
)


def _churn(
    x: torch.Tensor, sigma: float, gamma: float, s_noise: float, noise: Noise | None
) -> tuple[torch.Tensor, float]:
    """Karras et al.'s "churn": raise the noise of ``x`` from ``sigma`` to ``sigma * (1 + gamma)`` with fresh noise."""
    if gamma <= 0:
        return x, sigma
    sigma_hat = sigma * (1.0 + gamma)
    return x + randn_like(x, noise) * (s_noise * math.sqrt(sigma_hat**2 - sigma**2)), sigma_hat


def _gamma(sig: list[float], i: int, s_churn: float, s_tmin: float, s_tmax: float) -> float:
    if s_churn < 0:
        raise ValueError(f"s_churn must be >= 0, got {s_churn}.")
    return min(s_churn / (len(sig) - 1), math.sqrt(2.0) - 1.0) if s_tmin <= sig[i] <= s_tmax else 0.0


@torch.no_grad()
def sample_euler(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    noise: Noise | None = None,
    callback: Callback | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Euler's method on the probability-flow ODE (first order, one model call per step).

    ``s_churn > 0`` (with ``s_tmin <= sigma <= s_tmax``) first adds noise, Karras et al.'s stochastic sampler.
    """
    sig = sigma_list(sigmas)
    for i in progress_bar(sig, progress):
        x, sigma = _churn(x, sig[i], _gamma(sig, i, s_churn, s_tmin, s_tmax), s_noise, noise)
        denoised = denoiser(x, sigma)
        report(callback, i, x, sigma, denoised)
        x = euler_to(denoiser, x, denoised, sigma, sig[i + 1])
    return x


@torch.no_grad()
def sample_heun(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    noise: Noise | None = None,
    callback: Callback | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Heun's method (trapezoidal corrector, second order, two model calls per step; Euler for the last step to 0).

    ``s_churn`` as in :func:`sample_euler`.
    """
    sig = sigma_list(sigmas)
    for i in progress_bar(sig, progress):
        x, sigma = _churn(x, sig[i], _gamma(sig, i, s_churn, s_tmin, s_tmax), s_noise, noise)
        sigma_next = sig[i + 1]
        denoised = denoiser(x, sigma)
        report(callback, i, x, sigma, denoised)
        d = derivative(x, denoised, sigma)
        x_euler = x + d * (sigma_next - sigma)
        if sigma_next == 0:
            x = x_euler
        else:
            d_next = derivative(x_euler, denoiser(x_euler, sigma_next), sigma_next)
            x = x + (d + d_next) / 2 * (sigma_next - sigma)
    return x


@torch.no_grad()
def sample_dpm_2(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: Noise | None = None,
    callback: Callback | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """DPM-Solver-2 as in Karras et al.: a midpoint method in log-sigma (second order, two model calls per step)."""
    return ancestral(dpm2_to, denoiser, x, sigmas, 0.0, 0.0, None, callback, progress)


@torch.no_grad()
def sample_lms(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    order: int = 4,
    noise: Noise | None = None,
    callback: Callback | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Linear multistep (Adams-Bashforth in sigma): integrates the polynomial through the last ``order`` derivatives.

    One model call per step; the first steps use the lower orders their history allows.
    """
    if order < 1:
        raise ValueError(f"LMS order must be >= 1, got {order}.")
    sig = sigma_list(sigmas)
    history: list[torch.Tensor] = []
    for i in progress_bar(sig, progress):
        denoised = denoiser(x, sig[i])
        report(callback, i, x, sig[i], denoised)
        history = [derivative(x, denoised, sig[i]), *history[: order - 1]]
        coeffs = lagrange_weights([sig[i - k] for k in range(len(history))], sig[i], sig[i + 1])
        x = x + sum(c * d for c, d in zip(coeffs, history, strict=True))
    return x


@torch.no_grad()
def sample_euler_ancestral(
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
    """Euler step down to ``sigma_down``, then fresh noise of std ``sigma_up * s_noise`` (see ``eta``)."""
    return ancestral(euler_to, denoiser, x, sigmas, eta, s_noise, noise, callback, progress)


@torch.no_grad()
def sample_dpm_2_ancestral(
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
    """DPM-2 midpoint step down to ``sigma_down``, then fresh noise of std ``sigma_up * s_noise``."""
    return ancestral(dpm2_to, denoiser, x, sigmas, eta, s_noise, noise, callback, progress)


@torch.no_grad()
def sample_ddim(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    eta: float = 0.0,
    s_noise: float = 1.0,
    noise_dropout: float = 0.0,
    noise: Noise | None = None,
    callback: Callback | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """DDIM (Song et al. 2021): the (ancestral, for ``eta > 0``) Euler step. On :func:`~ldm.models.diffusion.
    schedules.ddim_sigmas` it is CompVis's DDIM; ``s_noise`` is its ``temperature``, ``noise_dropout`` its own."""
    return ancestral(euler_to, denoiser, x, sigmas, eta, s_noise, noise, callback, progress, noise_dropout)


@torch.no_grad()
def sample_ddpm(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: Noise | None = None,
    callback: Callback | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """DDPM ancestral sampling: a draw from the posterior ``q(x_next | x, denoised)`` each step, i.e. DDIM with
    eta 1. On every training timestep (ending at sigma 0) it is ``DDPM.p_sample_loop``; on any other schedule it is
    ComfyUI's ``ddpm``."""
    return ancestral(euler_to, denoiser, x, sigmas, 1.0, 1.0, noise, callback, progress)


@torch.no_grad()
def sample_plms(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: Noise | None = None,
    callback: Callback | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """PLMS (pseudo linear multistep, Liu et al. 2022) as CompVis runs it: a Heun first step (two model calls),
    then Adams-Bashforth of order 2, 3 and 4 with fixed weights over the derivative history. A last step to sigma 0
    (the CompVis grid with every timestep) lands on the denoised estimate."""
    sig = sigma_list(sigmas)
    history: list[torch.Tensor] = []
    for i in progress_bar(sig, progress):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = denoiser(x, sigma)
        report(callback, i, x, sigma, denoised)
        d = derivative(x, denoised, sigma)
        if sigma_next == 0:
            d_step = d  # the last step to the clean data is no equal step: land on the denoised estimate
        elif history:
            d_step = adams_bashforth(d, history)
        else:
            x_trial = x + d * (sigma_next - sigma)
            d_step = (d + derivative(x_trial, denoiser(x_trial, sigma_next), sigma_next)) / 2
        x = x + d_step * (sigma_next - sigma)
        history = [*history[-2:], d]
    return x
