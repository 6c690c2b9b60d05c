"""The sampler protocol, and the step pieces every sampler is made of.

A sampler is a function ``sample_x(denoiser, x, sigmas, *, noise=None, callback=None, progress=True, **options)``:
a loop over a decreasing list of noise levels ``sigmas`` (float64 on the CPU, usually ending in 0) that calls
``denoiser(x, sigma) -> denoised`` once or more per step, where ``x = x0 + sigma * eps`` (the "sigma view"; see
:class:`ldm.models.diffusion.guidance.Denoiser`). ``x`` starts at ``sigmas[0]``; the result is the sample at
``sigmas[-1]``. Step sizes are Python floats, so a loop makes no host-device syncs.

Random numbers (ancestral and SDE noise) come from a :class:`~ldm.models.diffusion.noise.Noise` passed as ``noise``,
which keeps image i of a batch equal to a single-image run with seed ``s + i``; without one, torch's global generator
is used. ``callback`` receives ``{"i", "x", "sigma", "denoised"}`` once per step, before the step is taken.

Notation: ``d = (x - denoised) / sigma`` is the probability-flow ODE's derivative ``dx/dsigma`` (and the eps
prediction). The DPM-Solver++ family works in ``lambda = -log(sigma)``, where a step of size ``h`` to ``sigma_next``
with a constant denoised estimate is exact: ``x_next = (sigma_next / sigma) * x + (1 - sigma_next / sigma) *
denoised`` (the DDIM step).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ldm.models.diffusion.noise import Noise

DenoiserFn = Callable[[torch.Tensor, float], torch.Tensor]
Callback = Callable[[dict[str, Any]], None]
Step = Callable[[DenoiserFn, torch.Tensor, torch.Tensor, float, float], torch.Tensor]
"""``step(denoiser, x, denoised, sigma, sigma_to) -> x at sigma_to``: one deterministic step."""


def sigma_list(sigmas: torch.Tensor) -> list[float]:
    """The schedule as Python floats (one copy from the CPU table, none per step)."""
    if sigmas.dim() != 1 or len(sigmas) < 2:
        raise ValueError(f"sigmas must be a 1-D schedule with at least 2 values, got shape {tuple(sigmas.shape)}.")
    sig = [float(s) for s in sigmas.tolist()]
    if sig[-1] < 0 or any(a <= b for a, b in zip(sig[:-1], sig[1:], strict=True)):
        raise ValueError("sigmas must be strictly decreasing and end at a value >= 0 (usually 0).")
    return sig


def progress_bar(sigmas: list[float], progress: bool) -> tqdm:
    return tqdm(range(len(sigmas) - 1), disable=not progress)


def randn_like(x: torch.Tensor, noise: Noise | None) -> torch.Tensor:
    return torch.randn_like(x) if noise is None else noise.randn_like(x)


def report(callback: Callback | None, i: int, x: torch.Tensor, sigma: float, denoised: torch.Tensor) -> None:
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "denoised": denoised})


def ancestral_split(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """Split a step ``sigma -> sigma_next`` into a deterministic step down to ``sigma_down`` and fresh noise
    ``sigma_up``, with ``sigma_down**2 + sigma_up**2 = sigma_next**2``. ``eta = 1`` is DDPM-like ancestral sampling,
    ``eta = 0`` the deterministic step."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}.")
    if sigma_next == 0 or eta == 0:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


def derivative(x: torch.Tensor, denoised: torch.Tensor, sigma: float) -> torch.Tensor:
    return (x - denoised) / sigma


def exp_step(x: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """First-order DPM-Solver++ (DDIM) step: exact for a constant denoised estimate; lands on it at sigma_next 0."""
    ratio = sigma_next / sigma
    return ratio * x + (1 - ratio) * denoised


def dpm2_step(denoiser: DenoiserFn, x: torch.Tensor, d: torch.Tensor, sigma: float, sigma_to: float) -> torch.Tensor:
    """Midpoint step ``sigma -> sigma_to`` with the midpoint at the geometric mean of the two sigmas (log-space)."""
    if sigma_to == 0:
        return x + d * (sigma_to - sigma)
    sigma_mid = math.sqrt(sigma * sigma_to)
    x_mid = x + d * (sigma_mid - sigma)
    return x + derivative(x_mid, denoiser(x_mid, sigma_mid), sigma_mid) * (sigma_to - sigma)


def adams_bashforth(d: torch.Tensor, history: list[torch.Tensor]) -> torch.Tensor:
    """Adams-Bashforth's multistep derivative (order 2 to 4, the weights for equal steps) from the current ``d`` and 1
    to 3 earlier ones (``history``, newest last); all (B, ...)."""
    if len(history) == 1:
        return (3 * d - history[-1]) / 2
    if len(history) == 2:
        return (23 * d - 16 * history[-1] + 5 * history[-2]) / 12
    return (55 * d - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]) / 24


def lagrange_weights(
    nodes: list[float], a: float, b: float, time: Callable[[np.ndarray], np.ndarray] | None = None, points: int = 0
) -> list[float]:
    """Multistep weights for a step from sigma ``a`` to ``b``: weight j is the integral over sigma of the Lagrange
    basis polynomial that is 1 at ``nodes[j]`` and 0 at the other nodes (sigmas).

    The polynomial is in ``time(sigma)`` (sigma itself by default), integrated by Gauss-Legendre quadrature with
    ``points`` nodes (default ``len(nodes)``, exact for a polynomial in sigma).
    """
    time = time if time is not None else np.asarray
    xi, w = np.polynomial.legendre.leggauss(points or len(nodes))
    taus = time((a + b) / 2 + (b - a) / 2 * xi)
    weights = (b - a) / 2 * w
    at = time(np.asarray(nodes, dtype=np.float64))
    coeffs = []
    for j in range(len(nodes)):
        basis = np.ones_like(taus)
        for k in range(len(nodes)):
            if k != j:
                basis *= (taus - at[k]) / (at[j] - at[k])
        coeffs.append(float(np.dot(weights, basis)))
    return coeffs


def euler_to(denoiser: DenoiserFn, x: torch.Tensor, denoised: torch.Tensor, sigma: float, to: float) -> torch.Tensor:
    return x + derivative(x, denoised, sigma) * (to - sigma)


def dpm2_to(denoiser: DenoiserFn, x: torch.Tensor, denoised: torch.Tensor, sigma: float, to: float) -> torch.Tensor:
    return dpm2_step(denoiser, x, derivative(x, denoised, sigma), sigma, to)


def heun_to(denoiser: DenoiserFn, x: torch.Tensor, denoised: torch.Tensor, sigma: float, to: float) -> torch.Tensor:
    """Heun's step (the trapezoidal corrector on an Euler trial step); the Euler step itself for a last step to 0."""
    d = derivative(x, denoised, sigma)
    x_euler = x + d * (to - sigma)
    if to == 0:
        return x_euler
    return x + (d + derivative(x_euler, denoiser(x_euler, to), to)) / 2 * (to - sigma)


def dropout_noise(z: torch.Tensor, p: float, noise: Noise | None) -> torch.Tensor:
    """Inverted dropout of step noise ``z`` with probability ``p`` (CompVis DDIM's ``noise_dropout``); with ``noise``
    the mask is seeded per sample."""
    if noise is None:
        return torch.nn.functional.dropout(z, p=p)
    # A normal draw through its own CDF is uniform, so the per-sample generators also drive the dropout mask.
    keep = torch.special.ndtr(noise.randn_like(z)) >= p
    return z * keep / (1.0 - p)


def ancestral(
    step: Step,
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    eta: float,
    s_noise: float,
    noise: Noise | None,
    callback: Callback | None,
    progress: bool,
    noise_dropout: float = 0.0,
) -> torch.Tensor:
    """The ancestral scheme: a deterministic ``step`` down to ``sigma_down``, then fresh noise of std
    ``sigma_up * s_noise`` (see :func:`ancestral_split`), optionally with ``noise_dropout``."""
    if not 0.0 <= noise_dropout < 1.0:
        raise ValueError(f"noise_dropout must be in [0, 1), got {noise_dropout}.")
    sig = sigma_list(sigmas)
    for i in progress_bar(sig, progress):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = denoiser(x, sigma)
        report(callback, i, x, sigma, denoised)
        sigma_down, sigma_up = ancestral_split(sigma, sigma_next, eta)
        x = step(denoiser, x, denoised, sigma, sigma_down)
        if sigma_up > 0:
            z = randn_like(x, noise) * s_noise
            x = x + (dropout_noise(z, noise_dropout, noise) if noise_dropout > 0 else z) * sigma_up
    return x
