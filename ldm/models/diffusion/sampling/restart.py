"""Restart sampling (Xu et al. 2023) on the one protocol (see :mod:`.core`): Heun steps down the schedule, and at
chosen noise levels a jump back up with fresh noise followed by Heun steps down again.

The ODE's discretization error shrinks along the way, and the fresh noise of each restart contracts the error
accumulated so far (the paper's argument for beating both ODE and SDE samplers at equal cost).

A restart plan ``{sigma: (steps, times, sigma_max)}`` says: after the step that reaches the schedule's sigma nearest
``sigma``, ``times`` times over, add noise to go back up to the schedule's sigma nearest ``sigma_max``, then take
``steps`` Heun steps on a Karras segment down to where the jump started.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from tqdm.auto import tqdm

from ldm.models.diffusion.noise import Noise
from ldm.models.diffusion.sampling.core import Callback, DenoiserFn, heun_to, randn_like, report, sigma_list
from ldm.models.diffusion.schedules import get_sigmas_karras

RestartPlan = Mapping[float, tuple[int, int, float]]
"""``{sigma: (steps, times, sigma_max)}``: where to restart, how many Heun steps a segment, how often, how high."""


def a1111_plan(sigmas: torch.Tensor) -> tuple[torch.Tensor, dict[float, tuple[int, int, float]]]:
    """A1111's default plan for a schedule of S steps ending at 0: (the main schedule, the restarts).

    Below 20 steps, no restarts: plain Heun on ``sigmas``. From 20 steps, one restart at sigma 0.1 up to sigma 2
    with ``k = 9`` Heun steps (``k = S // 4`` and two restarts from 36 steps), and the main schedule becomes Karras
    with ``S - k * restarts`` steps between the ends of ``sigmas``. Either way a run takes S Heun steps, 2S - 1 model
    calls, as Heun with S steps. (A1111 writes ``k + 1``, the number of sigmas of a segment.)
    """
    sig = sigma_list(sigmas)
    steps = len(sig) - 1
    if steps < 20:
        return sigmas, {}
    if sig[-1] != 0:
        raise ValueError("the default Restart plan is for schedules ending at sigma 0; give restart_list for others.")
    k, times = (9, 1) if steps < 36 else (steps // 4, 2)
    return get_sigmas_karras(steps - k * times, sig[-2], sig[0]), {0.1: (k, times, 2.0)}


def _nearest(sig: list[float], sigma: float) -> int:
    return min(range(len(sig)), key=lambda i: abs(sig[i] - sigma))


def restart_steps(sig: list[float], plan: RestartPlan) -> list[tuple[float, float]]:
    """Every Heun step ``(sigma, sigma_next)`` of a run on the schedule ``sig`` with restart ``plan``, in order; a
    step whose sigma is above the previous step's end starts a restart."""
    after: dict[int, list[tuple[int, int, float]]] = {}
    for sigma, (steps, times, sigma_max) in plan.items():
        if steps < 1 or times < 0 or not 0 < sigma < sigma_max:
            raise ValueError(
                f"restart_list entry {sigma}: ({steps}, {times}, {sigma_max}) needs steps >= 1, times >= 0 and "
                "0 < sigma < sigma_max."
            )
        after.setdefault(_nearest(sig, sigma), []).append((steps, times, sigma_max))
    pairs = []
    for i in range(len(sig) - 1):
        pairs.append((sig[i], sig[i + 1]))
        for steps, times, sigma_max in after.get(i + 1, []):
            low, high = sig[i + 1], sig[_nearest(sig, sigma_max)]
            if low > 0 and high > low:
                segment = get_sigmas_karras(steps + 1, low, high)[:-1].tolist()
                pairs += list(zip(segment[:-1], segment[1:], strict=True)) * times
    return pairs


@torch.no_grad()
def sample_restart(
    denoiser: DenoiserFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    restart_list: RestartPlan | None = None,
    s_noise: float = 1.0,
    noise: Noise | None = None,
    callback: Callback | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Restart sampling: Heun steps (Euler for a last step to 0) down ``sigmas`` with the restarts of
    ``restart_list`` (see :data:`RestartPlan`); each restart adds fresh noise of std ``s_noise * sqrt(high**2 -
    low**2)``.

    Without ``restart_list``, A1111's default (:func:`a1111_plan`), which below 20 steps is Heun on ``sigmas`` and
    from 20 steps replaces them by a Karras schedule between their ends; ``restart_list={}`` is Heun on ``sigmas``.
    """
    if restart_list is None:
        sigmas, restart_list = a1111_plan(sigmas)
    pairs = restart_steps(sigma_list(sigmas), restart_list)
    last = pairs[0][0]
    for i in tqdm(range(len(pairs)), disable=not progress):
        sigma, sigma_next = pairs[i]
        if sigma > last:
            x = x + randn_like(x, noise) * (s_noise * math.sqrt(sigma**2 - last**2))
        denoised = denoiser(x, sigma)
        report(callback, i, x, sigma, denoised)
        x, last = heun_to(denoiser, x, denoised, sigma, sigma_next), sigma_next
    return x
