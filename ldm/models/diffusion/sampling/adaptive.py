"""DPM adaptive (Lu et al. 2022; k-diffusion's ``sample_dpm_adaptive``) on the one protocol (see :mod:`.core`).

An embedded pair of DPM-Solver steps in ``lambda = -log(sigma)``, orders 2/3 (or 1/2), sharing their model calls:
the difference of the two estimates the local error of the lower-order one, scaled per element by ``max(atol, rtol *
|x|)``. A step is accepted when that error is small enough and the run goes on with the higher-order result; the next
step size is ``h * limit(error ** (-1 / order))`` (an integral controller with k-diffusion's soft limiter ``1 +
atan(f - 1)``, k-diffusion's default; its proportional and derivative terms are left out). The step count of a
schedule means nothing here: only its ends do.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from ldm.models.diffusion.noise import Noise
from ldm.models.diffusion.sampling.core import Callback, DenoiserFn, derivative, randn_like, report, sigma_list
from ldm.models.diffusion.sampling.singlestep import (
    ancestral_target,
    dpm_solver_1,
    dpm_solver_2,
    dpm_solver_3,
    dpm_solver_3_inner,
    dpm_solver_inner,
    eps_at,
    sigma_at,
    solver_range,
)

# A step is accepted when the controller would shrink it by no more than this factor (k-diffusion's 0.81).
ACCEPT_SAFETY = 0.81


class AdaptiveInfo(NamedTuple):
    """What an adaptive run did: model calls, accepted and rejected steps."""

    calls: int
    accepted: int
    rejected: int


def embedded_pair(
    denoiser: DenoiserFn, x: torch.Tensor, eps: torch.Tensor, t: float, h: float, order: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lower-order, ``order``) estimates of x at ``t + h`` from eps at ``t``: DPM-Solver-1 and -2 (one more model
    call), or DPM-Solver-2 with ``r1 = 1/3`` and DPM-Solver-3, which share the call at ``t + h/3`` (two more)."""
    if order == 2:
        r1 = 1 / 2
        eps_1 = eps_at(denoiser, dpm_solver_inner(x, eps, t, h, r1), t + r1 * h)
        return dpm_solver_1(x, eps, t, h), dpm_solver_2(x, eps, eps_1, t, h, r1)
    r1, r2 = 1 / 3, 2 / 3
    eps_1 = eps_at(denoiser, dpm_solver_inner(x, eps, t, h, r1), t + r1 * h)
    eps_2 = eps_at(denoiser, dpm_solver_3_inner(x, eps, eps_1, t, h, r1, r2), t + r2 * h)
    return dpm_solver_2(x, eps, eps_1, t, h, r1), dpm_solver_3(x, eps, eps_2, t, h, r2)


def scaled_error(
    low: torch.Tensor, high: torch.Tensor, previous: torch.Tensor, rtol: float, atol: float
) -> torch.Tensor:
    """The largest per-sample RMS of ``(low - high) / max(atol, rtol * max(|low|, |previous|))``: a 0-dim tensor.

    Per sample, so that every image of a batch meets the tolerance (k-diffusion takes one RMS over the whole batch).
    """
    scale = torch.clamp(rtol * torch.maximum(low.abs(), previous.abs()), min=atol)
    return ((low - high) / scale).flatten(1).pow(2).mean(1).sqrt().max()


def step_factor(error: float, order: float) -> float:
    """How much to grow (> 1) or shrink (< 1) the step after one of scaled ``error``; soft-limited to (1 - pi/2, ~2.6)
    so that a single estimate never changes it wildly."""
    return 1 + math.atan((1 / (error + 1e-8)) ** (1 / order) - 1)


def _check(order: int, rtol: float, atol: float, h_init: float, eta: float) -> None:
    if order not in (2, 3):
        raise ValueError(f"DPM adaptive's order must be 2 or 3, got {order}.")
    if not (rtol > 0 and atol > 0 and h_init > 0):
        raise ValueError(f"rtol, atol and h_init must be > 0, got rtol={rtol}, atol={atol}, h_init={h_init}.")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}.")


@torch.no_grad()
def dpm_adaptive(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    order: int = 3,
    rtol: float = 0.05,
    atol: float = 0.0078,
    h_init: float = 0.05,
    eta: float = 0.0,
    s_noise: float = 1.0,
    noise: Noise | None = None,
    callback: Callback | None = None,
    progress: bool = True,
) -> tuple[torch.Tensor, AdaptiveInfo]:
    """DPM adaptive from ``sigmas[0]`` to the smallest positive sigma, then (when the schedule ends at 0) one call to
    denoise the result: (x at ``sigmas[-1]``, what it did).

    ``rtol``/``atol`` are the relative/absolute tolerance of the local error (k-diffusion's defaults suit latents of
    std about 1), ``h_init`` the first step in lambda. An attempt costs ``order - 1`` calls beyond the estimate at
    its start, which a rejected attempt reuses (k-diffusion calls the model there again). ``eta > 0``: each accepted
    step is ancestral, and the controller assumes order 1.5 (as k-diffusion).
    """
    _check(order, rtol, atol, h_init, eta)
    sig = sigma_list(sigmas)
    sigma_max, sigma_min = solver_range(sig)
    s, t_end = -math.log(sigma_max), -math.log(sigma_min)
    h, previous = h_init, x
    calls = accepted = rejected = 0
    denoised = None
    bar = tqdm(disable=not progress, unit="call")
    while s < t_end - 1e-5:
        sigma = sigma_max if accepted == 0 else sigma_at(s)
        if denoised is None:
            denoised = denoiser(x, sigma)
            report(callback, accepted, x, sigma, denoised)
            calls += 1
            bar.update()
        t = min(t_end, s + h)
        down, up = ancestral_target(sigma, sigma_at(t), sigma_min, eta)
        t_down = t if up == 0 else -math.log(down)
        low, high = embedded_pair(denoiser, x, derivative(x, denoised, sigma), s, t_down - s, order)
        calls += order - 1
        bar.update(order - 1)
        # The one host-device sync of an attempt: the controller decides on the host.
        factor = step_factor(float(scaled_error(low, high, previous, rtol, atol)), 1.5 if eta > 0 else order)
        h *= factor
        if factor < ACCEPT_SAFETY:
            rejected += 1
            continue
        previous, x, s, denoised = low, high, t, None
        if up > 0:
            x = x + randn_like(x, noise) * (s_noise * up)
        accepted += 1
    if sig[-1] == 0:
        denoised = denoiser(x, sigma_min)
        report(callback, accepted, x, sigma_min, denoised)
        x, calls = denoised, calls + 1
        bar.update()
    bar.close()
    return x, AdaptiveInfo(calls, accepted, rejected)


@torch.no_grad()
def sample_dpm_adaptive(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    order: int = 3,
    rtol: float = 0.05,
    atol: float = 0.0078,
    h_init: float = 0.05,
    eta: float = 0.0,
    s_noise: float = 1.0,
    noise: Noise | None = None,
    callback: Callback | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """DPM adaptive on the sampler protocol: :func:`dpm_adaptive`'s sample, which chooses its own steps."""
    options = {"order": order, "rtol": rtol, "atol": atol, "h_init": h_init, "eta": eta, "s_noise": s_noise}
    return dpm_adaptive(denoiser, x, sigmas, noise=noise, callback=callback, progress=progress, **options)[0]
