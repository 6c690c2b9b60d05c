"""Multistep samplers on the one protocol (see :mod:`.core`): UniPC, DEIS, iPNDM and iPNDM_v, each one model call per
step from the history of earlier estimates.

UniPC (Zhao et al. 2023) works in ``lambda = -log(sigma)`` on the denoised estimates; DEIS (Zhang & Chen 2022) and
iPNDM integrate a polynomial through the earlier derivatives ``d`` (the eps predictions) in sigma. All start with
lower orders while the history fills, and take a last step to sigma 0 as the first-order step, which lands on the
denoised estimate.
x: (B, ...) at ``sigmas[0]``; every function returns the sample (B, ...) at ``sigmas[-1]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from ldm.models.diffusion.noise import Noise
from ldm.models.diffusion.sampling.core import (
    Callback,
    DenoiserFn,
    adams_bashforth,
    derivative,
    exp_step,
    lagrange_weights,
    progress_bar,
    report,
    sigma_list,
)

UNIPC_VARIANTS = ("bh1", "bh2")


def _check_order(order: int, highest: int, name: str) -> None:
    if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= highest:
        raise ValueError(f"{name} order must be an integer in 1..{highest}, got {order!r}.")


# -- UniPC --


def _phi(k: int, z: float) -> float:
    """``phi_k(z) = sum_j z^j / (j + k)!`` for k >= 1 (``phi_1(z) = (e^z - 1) / z``), the exponential integrators'
    weights; the series near 0, where the recurrence ``phi_k+1 = (phi_k - 1/k!) / z`` cancels."""
    if abs(z) > 1:
        value = math.expm1(z) / z
        for m in range(1, k):
            value = (value - 1 / math.factorial(m)) / z
        return value
    term = total = 1 / math.factorial(k)
    j = 0
    while abs(term) > 1e-17 * abs(total):
        j += 1
        term *= z / (j + k)
        total += term
    return total


def _unipc_targets(order: int, h: float, variant: str) -> np.ndarray:
    """UniPC's right-hand side b_k, k = 1..order, in the data-prediction form with B(h) taken out: ``k! phi_k+1(-h)``
    for bh1 (B = h), divided by ``phi_1(-h)`` for bh2 (B = 1 - e^-h)."""
    scale = _phi(1, -h) if variant == "bh2" else 1.0
    return np.array([math.factorial(k) * _phi(k + 1, -h) / scale for k in range(1, order + 1)])


def _solve_rhos(rks: list[float], targets: np.ndarray) -> np.ndarray:
    """Weights rho with ``sum_j rho_j rks_j^(k-1) = targets_k`` for k = 1..len(rks)."""
    return np.linalg.solve(np.vander(np.asarray(rks), increasing=True).T, targets[: len(rks)])


def _unipc_step(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    history: list[tuple[float, torch.Tensor]],
    sigma_next: float,
    variant: str,
    correct: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One UniPC step of order ``len(history)`` from ``history[0]``'s sigma to ``sigma_next``.

    ``history`` holds (sigma, denoised) newest first. The predictor (UniP) extrapolates the denoised estimates; with
    ``correct``, the model is evaluated at the prediction and the corrector (UniC) redoes the step with that
    estimate as well, one order higher. Returns (x at sigma_next, the estimate made there or None); the next step
    reuses that estimate although it was made at the predicted, not the corrected, x.
    """
    sigma, denoised = history[0]
    x_first = exp_step(x, denoised, sigma, sigma_next)
    order = len(history)
    if order == 1 and not correct:
        return x_first, None
    h = math.log(sigma / sigma_next)
    # B(h): bh1 h, bh2 1 - e^-h; it scales every correction term.
    scale = h if variant == "bh1" else -math.expm1(-h)
    rks = [math.log(sigma / s) / h for s, _ in history[1:]]
    d1s = [(older - denoised) / r for (_, older), r in zip(history[1:], rks, strict=True)]
    targets = _unipc_targets(order, h, variant)
    x_pred = x_first
    if order >= 2:
        # UniPC's own simplification at order 2 (and for the order-1 corrector below): rho 1/2 instead of b_1.
        rhos_p = [0.5] if order == 2 else _solve_rhos(rks, targets).tolist()
        x_pred = x_first + scale * sum(rho * d for rho, d in zip(rhos_p, d1s, strict=True))
    if not correct:
        return x_pred, None
    denoised_next = denoiser(x_pred, sigma_next)
    rhos_c = [0.5] if order == 1 else _solve_rhos([*rks, 1.0], targets).tolist()
    terms = [*d1s, denoised_next - denoised]
    return x_first + scale * sum(rho * d for rho, d in zip(rhos_c, terms, strict=True)), denoised_next


@torch.no_grad()
def sample_uni_pc(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    order: int = 3,
    variant: str = "bh1",
    noise: Noise | None = None,
    callback: Callback | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """UniPC (Zhao et al. 2023): the multistep predictor-corrector in data prediction ("UniPC-p"), one model call per
    step.

    Step i has order ``min(order, i + 1, S - i)`` of S steps (the warm-up, and the reference's lower_order_final;
    ComfyUI's order ``min(3, S - 1)`` gives the same orders); every step but the last is corrected with the
    estimate at its prediction, which is the next step's model call. ``variant`` is B(h): ``bh1`` (B = h) or ``bh2``
    (B = 1 - e^-h). A last step to sigma 0 lands on the denoised estimate, where ComfyUI, whose VP wrapper cannot
    take sigma 0, stops at sigma 0.001.
    """
    _check_order(order, 3, "UniPC")
    if variant not in UNIPC_VARIANTS:
        raise ValueError(f"UniPC variant must be one of {', '.join(UNIPC_VARIANTS)}, got {variant!r}.")
    sig = sigma_list(sigmas)
    steps = len(sig) - 1
    history = [(sig[0], denoiser(x, sig[0]))]
    for i in progress_bar(sig, progress):
        report(callback, i, x, sig[i], history[0][1])
        step_order = min(order, i + 1, steps - i)
        last = i == steps - 1
        x, denoised = _unipc_step(denoiser, x, history[:step_order], sig[i + 1], variant, correct=not last)
        if denoised is not None:
            history = [(sig[i + 1], denoised), *history[: order - 1]]
    return x


@torch.no_grad()
def sample_uni_pc_bh2(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    order: int = 3,
    noise: Noise | None = None,
    callback: Callback | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """UniPC with ``B(h) = 1 - e^-h`` (see :func:`sample_uni_pc`)."""
    return sample_uni_pc(
        denoiser, x, sigmas, order=order, variant="bh2", noise=noise, callback=callback, progress=progress
    )


# -- DEIS --

# EDM's (Karras et al. 2022) fit of the linear-beta VP SDE, sigma(t)^2 = exp(beta_d t^2 / 2 + beta_min t) - 1,
# through sigma(1e-3) = 0.002 and sigma(1) = 80: the time in which DEIS's "tab" variant interpolates eps.
VP_BETA_D = 2 * (math.log1p(0.002**2) / 1e-3 - math.log1p(80.0**2)) / (1e-3 - 1)
VP_BETA_MIN = math.log1p(80.0**2) - VP_BETA_D / 2
# Gauss-Legendre nodes for DEIS's weights: their integrands are smooth, and 16 nodes put the quadrature error below
# 1e-10 of the largest weight on the schedules tried, 2 to 1000 steps (ComfyUI sums 10,000 points, an error of
# about 1e-4).
DEIS_QUADRATURE_POINTS = 16


def vp_time(sigma: np.ndarray) -> np.ndarray:
    """The VP SDE time t of noise level ``sigma`` (the inverse of EDM's linear-beta VP schedule), same shape."""
    return (np.sqrt(VP_BETA_MIN**2 + 2 * VP_BETA_D * np.log1p(sigma**2)) - VP_BETA_MIN) / VP_BETA_D


def _polynomial_multistep(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    order: int,
    time: Callable[[np.ndarray], np.ndarray] | None,
    points: int,
    callback: Callback | None,
    progress: bool,
) -> torch.Tensor:
    """Integrate ``dx = d dsigma`` with ``d`` the Lagrange polynomial, in ``time(sigma)``, through the last
    ``order`` derivatives (fewer while the history fills): weights from :func:`~.core.lagrange_weights` for the
    actual steps. A last step to sigma 0 lands on the denoised estimate."""
    sig = sigma_list(sigmas)
    history: list[torch.Tensor] = []
    for i in progress_bar(sig, progress):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = denoiser(x, sigma)
        report(callback, i, x, sigma, denoised)
        history = [derivative(x, denoised, sigma), *history[: order - 1]]
        if sigma_next == 0:
            x = denoised
            continue
        nodes = [sig[i - k] for k in range(len(history))]
        weights = lagrange_weights(nodes, sigma, sigma_next, time, points)
        x = x + sum(w * d for w, d in zip(weights, history, strict=True))
    return x


@torch.no_grad()
def sample_deis(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    order: int = 3,
    noise: Noise | None = None,
    callback: Callback | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """DEIS (Zhang & Chen 2022), the "tAB" exponential integrator, multistep of ``order`` 1 to 4.

    In the sigma view the probability-flow ODE is ``dx = eps dsigma``; each step integrates, exactly, the Lagrange
    polynomial through the last ``order`` eps estimates as a polynomial in the VP time :func:`vp_time` (in sigma
    it would be :func:`sample_ipndm_v`). One model call per step; the first steps use the orders their history
    allows.
    """
    _check_order(order, 4, "DEIS")
    return _polynomial_multistep(denoiser, x, sigmas, order, vp_time, DEIS_QUADRATURE_POINTS, callback, progress)


# -- iPNDM --


@torch.no_grad()
def sample_ipndm(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    order: int = 4,
    noise: Noise | None = None,
    callback: Callback | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """iPNDM (Zhang & Chen 2022): Adams-Bashforth with the fixed weights of equal steps, of ``order`` up to 4, on the
    derivative history in sigma; Euler first, then orders 2, 3 and 4 as the history fills (PLMS starts with Heun
    instead). One model call per step.
    """
    _check_order(order, 4, "iPNDM")
    sig = sigma_list(sigmas)
    history: list[torch.Tensor] = []
    for i in progress_bar(sig, progress):
        sigma, sigma_next = sig[i], sig[i + 1]
        denoised = denoiser(x, sigma)
        report(callback, i, x, sigma, denoised)
        d = derivative(x, denoised, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            x = x + (adams_bashforth(d, history) if history else d) * (sigma_next - sigma)
        history = [*history, d][-(order - 1) :] if order > 1 else []
    return x


@torch.no_grad()
def sample_ipndm_v(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    order: int = 4,
    noise: Noise | None = None,
    callback: Callback | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """iPNDM_v: iPNDM with the variable-step Adams-Bashforth weights, the integrals of the Lagrange polynomial in
    sigma through the last ``order`` derivatives over the actual steps. One model call per step.

    That is LMS but for a last step to sigma 0, which lands on the denoised estimate. ComfyUI's ``ipndm_v`` uses
    closed forms instead whose order-4 weights are (57, -65, 43, -11) / 24 on equal steps, not Adams-Bashforth's
    (55, -59, 37, -9) / 24, and do not sum to 1 on unequal ones (a measured slope under 2 on Karras steps), so its
    samples differ.
    """
    _check_order(order, 4, "iPNDM_v")
    return _polynomial_multistep(denoiser, x, sigmas, order, None, 0, callback, progress)
