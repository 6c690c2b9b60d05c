"""Single-step DPM-Solvers (Lu et al. 2022) on the one protocol (see :mod:`.core`): DPM++ 2S and 3S, and DPM fast.

Every step here is a self-contained Runge-Kutta-like step in ``lambda = -log(sigma)``: it evaluates the model at
``sigma`` and at one or two intermediate noise levels of the step, and keeps no history.

- DPM++ 2S / 3S: DPM-Solver++(2S) and (3S), the data-prediction ("++") form, which integrates the exponential
  part exactly and a polynomial in lambda of the denoised estimate: intermediate points at ``r = 1/2`` (2S) and
  ``r = 1/3, 2/3`` (3S) of the step, 2 and 3 model calls a step; a last step to sigma 0 lands on the denoised
  estimate (one call). DPM++ 2S is DPM++ 2S a with ``eta = 0``.
- DPM fast: k-diffusion's DPM-Solver-fast, in the noise-prediction form of the original DPM-Solver (as k-diffusion
  and so A1111 and ComfyUI run it): steps uniform in lambda, of order 3, 3, ... and a last one of order 2 or 1,
  chosen to spend a given number of model calls exactly.

The noise-prediction steps work on ``eps = (x - denoised) / sigma`` with ``t = lambda``; ``h = t_next - t > 0``.
x: (B, ...) at ``sigmas[0]``; every sampler returns the sample (B, ...) at ``sigmas[-1]``.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ldm.models.diffusion.noise import Noise
from ldm.models.diffusion.sampling.core import (
    Callback,
    DenoiserFn,
    ancestral,
    ancestral_split,
    derivative,
    exp_step,
    randn_like,
    report,
    sigma_list,
)
from ldm.models.diffusion.sampling.dpmpp import dpmpp_2s_to

# -- DPM-Solver++ (data prediction) --


def dpmpp_3s_to(denoiser: DenoiserFn, x: torch.Tensor, denoised: torch.Tensor, sigma: float, to: float) -> torch.Tensor:
    """DPM-Solver++(3S): third order, model calls at ``r = 1/3`` and ``2/3`` of the step in lambda (plus ``denoised``,
    the estimate at ``sigma``); the last step to sigma 0 lands on ``denoised``."""
    if to == 0:
        return denoised
    r1, r2 = 1 / 3, 2 / 3
    h = math.log(sigma / to)
    sigma_1, sigma_2 = sigma * math.exp(-r1 * h), sigma * math.exp(-r2 * h)
    denoised_1 = denoiser(exp_step(x, denoised, sigma, sigma_1), sigma_1)
    # The linear term of the denoised estimate in lambda, integrated against exp(-(lambda_2 - lambda)) up to lambda_2.
    phi_22 = 1 + math.expm1(-r2 * h) / (r2 * h)
    x_2 = exp_step(x, denoised, sigma, sigma_2) + (r2 / r1 * phi_22) * (denoised_1 - denoised)
    denoised_2 = denoiser(x_2, sigma_2)
    phi_2 = 1 + math.expm1(-h) / h
    return exp_step(x, denoised, sigma, to) + (phi_2 / r2) * (denoised_2 - denoised)


@torch.no_grad()
def sample_dpmpp_2s(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: Noise | None = None,
    callback: Callback | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """DPM-Solver++(2S): single-step second order (midpoint in lambda), two model calls a step."""
    return ancestral(dpmpp_2s_to, denoiser, x, sigmas, 0.0, 0.0, None, callback, progress)


@torch.no_grad()
def sample_dpmpp_3s(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: Noise | None = None,
    callback: Callback | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """DPM-Solver++(3S): single-step third order in lambda, three model calls a step (see :func:`dpmpp_3s_to`)."""
    return ancestral(dpmpp_3s_to, denoiser, x, sigmas, 0.0, 0.0, None, callback, progress)


# -- DPM-Solver (noise prediction), the steps of DPM fast and DPM adaptive --


def sigma_at(t: float) -> float:
    return math.exp(-t)


def eps_at(denoiser: DenoiserFn, x: torch.Tensor, t: float) -> torch.Tensor:
    """The noise prediction ``(x - denoised) / sigma`` at ``lambda = t``: (B, ...)."""
    sigma = sigma_at(t)
    return derivative(x, denoiser(x, sigma), sigma)


def dpm_solver_1(x: torch.Tensor, eps: torch.Tensor, t: float, h: float) -> torch.Tensor:
    """DPM-Solver-1 over ``[t, t + h]``: exact for a constant eps (the DDIM step)."""
    return x - (sigma_at(t + h) * math.expm1(h)) * eps


def dpm_solver_inner(x: torch.Tensor, eps: torch.Tensor, t: float, h: float, r: float) -> torch.Tensor:
    """The first-order point at ``t + r h`` where the second- and third-order steps evaluate the model again."""
    return dpm_solver_1(x, eps, t, r * h)


def dpm_solver_2(
    x: torch.Tensor, eps: torch.Tensor, eps_1: torch.Tensor, t: float, h: float, r1: float
) -> torch.Tensor:
    """DPM-Solver-2 over ``[t, t + h]`` from eps at ``t`` and ``eps_1`` at ``t + r1 h`` (from
    :func:`dpm_solver_inner`)."""
    scale = sigma_at(t + h) * math.expm1(h)
    return x - scale * eps - (scale / (2 * r1)) * (eps_1 - eps)


def dpm_solver_3_inner(
    x: torch.Tensor, eps: torch.Tensor, eps_1: torch.Tensor, t: float, h: float, r1: float, r2: float
) -> torch.Tensor:
    """DPM-Solver-3's second intermediate point, at ``t + r2 h``, from eps at ``t`` and ``eps_1`` at ``t + r1 h``."""
    sigma_2, rh = sigma_at(t + r2 * h), r2 * h
    return x - (sigma_2 * math.expm1(rh)) * eps - (sigma_2 * r2 / r1 * (math.expm1(rh) / rh - 1)) * (eps_1 - eps)


def dpm_solver_3(
    x: torch.Tensor, eps: torch.Tensor, eps_2: torch.Tensor, t: float, h: float, r2: float
) -> torch.Tensor:
    """DPM-Solver-3 over ``[t, t + h]`` from eps at ``t`` and ``eps_2`` at ``t + r2 h`` (see
    :func:`dpm_solver_3_inner`)."""
    sigma_next = sigma_at(t + h)
    return x - (sigma_next * math.expm1(h)) * eps - (sigma_next / r2 * (math.expm1(h) / h - 1)) * (eps_2 - eps)


def dpm_solver_step(
    denoiser: DenoiserFn, x: torch.Tensor, eps: torch.Tensor, t: float, t_next: float, order: int
) -> torch.Tensor:
    """One DPM-Solver step of ``order`` 1, 2 (``r1 = 1/2``) or 3 (``r1, r2 = 1/3, 2/3``) from ``t`` to ``t_next``:
    ``order - 1`` model calls beyond ``eps`` at ``t``."""
    h = t_next - t
    if order == 1:
        return dpm_solver_1(x, eps, t, h)
    if order == 2:
        r1 = 1 / 2
        return dpm_solver_2(x, eps, eps_at(denoiser, dpm_solver_inner(x, eps, t, h, r1), t + r1 * h), t, h, r1)
    r1, r2 = 1 / 3, 2 / 3
    eps_1 = eps_at(denoiser, dpm_solver_inner(x, eps, t, h, r1), t + r1 * h)
    eps_2 = eps_at(denoiser, dpm_solver_3_inner(x, eps, eps_1, t, h, r1, r2), t + r2 * h)
    return dpm_solver_3(x, eps, eps_2, t, h, r2)


def fast_orders(calls: int) -> list[int]:
    """DPM-Solver-fast's step orders spending exactly ``calls`` model calls: as many third-order steps as fit, then
    one of order 2 and one of order 1 when ``calls`` is a multiple of 3, else one of order ``calls % 3``."""
    if calls < 0:
        raise ValueError(f"the number of model calls must be >= 0, got {calls}.")
    if calls == 0:
        return []
    steps = calls // 3 + 1
    if calls % 3 == 0:
        return [3] * (steps - 2) + [2, 1]
    return [3] * (steps - 1) + [calls % 3]


def solver_range(sig: list[float]) -> tuple[float, float]:
    """(sigma_max, sigma_min) that DPM fast and DPM adaptive solve between: the schedule's first sigma and its
    smallest positive one."""
    return sig[0], sig[-1] if sig[-1] > 0 else sig[-2]


def ancestral_target(sigma: float, sigma_next: float, sigma_min: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) of an ancestral step ``sigma -> sigma_next`` that never steps below ``sigma_min``
    (which stays the solver's end point); ``sigma_down**2 + sigma_up**2 = sigma_next**2``."""
    down = max(ancestral_split(sigma, sigma_next, eta)[0], sigma_min)
    return down, math.sqrt(max(sigma_next**2 - down**2, 0.0))


def lambda_grid(sigma_max: float, sigma_min: float, steps: int) -> tuple[list[float], list[float]]:
    """``steps + 1`` points uniform in lambda from ``sigma_max`` to ``sigma_min``: (lambdas, sigmas), with the ends
    exactly the given sigmas (so the model sees the schedule's own noise levels there)."""
    ts = torch.linspace(-math.log(sigma_max), -math.log(sigma_min), steps + 1, dtype=torch.float64).tolist()
    return ts, [sigma_max, *(sigma_at(t) for t in ts[1:-1]), sigma_min][: steps + 1]


@torch.no_grad()
def sample_dpm_fast(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    eta: float = 0.0,
    s_noise: float = 1.0,
    noise: Noise | None = None,
    callback: Callback | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """DPM-Solver-fast: fixed steps uniform in lambda, of orders 3, ..., 3 then 2/1, using exactly ``len(sigmas) - 1``
    model calls.

    Only the ends of ``sigmas`` matter: it solves from ``sigmas[0]`` to the smallest positive sigma. When the schedule
    ends at 0, that solve gets ``len(sigmas) - 2`` calls and the last call denoises the result, so the run ends at
    sigma 0 like every sampler here; k-diffusion (and A1111 and ComfyUI with it) spends all calls on the solve and
    returns the sample at the smallest sigma, noise and all. ``eta > 0`` makes each step ancestral (A1111 passes its
    ancestral eta, 1 by default; ComfyUI 0).
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}.")
    sig = sigma_list(sigmas)
    sigma_max, sigma_min = solver_range(sig)
    denoise_last = sig[-1] == 0
    orders = fast_orders(len(sig) - 1 - denoise_last)
    ts, grid = lambda_grid(sigma_max, sigma_min, len(orders))
    bar = tqdm(total=len(orders) + denoise_last, disable=not progress)
    for i, order in enumerate(orders):
        down, up = ancestral_target(grid[i], grid[i + 1], sigma_min, eta)
        denoised = denoiser(x, grid[i])
        report(callback, i, x, grid[i], denoised)
        t_down = ts[i + 1] if up == 0 else -math.log(down)
        x = dpm_solver_step(denoiser, x, derivative(x, denoised, grid[i]), ts[i], t_down, order)
        if up > 0:
            x = x + randn_like(x, noise) * (s_noise * up)
        bar.update()
    if denoise_last:
        denoised = denoiser(x, sigma_min)
        report(callback, len(orders), x, sigma_min, denoised)
        x = denoised
        bar.update()
    bar.close()
    return x
