"""PLMS sampling (pseudo linear multistep, Liu et al., 2022): :func:`sample_plms` and the CompVis ``PLMSSampler``.

Each step is a deterministic DDIM update (:func:`~ldm.models.diffusion.ddim.ddim_update`) driven by an eps that
combines the current prediction with earlier ones: the first step averages eps at both ends of a trial DDIM step
(pseudo improved Euler), later ones use Adams-Bashforth of order 2, 3 and then 4 over the eps history.
"""

from __future__ import annotations

from typing import Any

import torch
from tqdm import tqdm

from ldm.models.diffusion.ddim import (
    CompVisSampler,
    EpsFn,
    StepCallback,
    _check_inpainting,
    blend_known,
    ddim_update,
)
from ldm.models.diffusion.guidance import GuidedEps
from ldm.models.diffusion.noise import Noise
from ldm.models.diffusion.timesteps import DDIMSchedule


def adams_bashforth(e_t: torch.Tensor, history: list[torch.Tensor]) -> torch.Tensor:
    """Linear multistep eps from the current ``e_t`` and 1 to 3 earlier predictions (``history``, newest last)."""
    if len(history) == 1:
        return (3 * e_t - history[-1]) / 2
    if len(history) == 2:
        return (23 * e_t - 16 * history[-1] + 5 * history[-2]) / 12
    return (55 * e_t - 59 * history[-1] + 37 * history[-2] - 9 * history[-3]) / 24


@torch.no_grad()
def sample_plms(
    eps: EpsFn,
    x: torch.Tensor,
    schedule: DDIMSchedule,
    *,
    noise: Noise | None = None,
    mask: torch.Tensor | None = None,
    x0: torch.Tensor | None = None,
    callback: StepCallback | None = None,
    progress: bool = True,
) -> torch.Tensor:
    """Run PLMS from ``x`` at the noisiest step of ``schedule`` (an eta = 0 :func:`ddim_schedule`) to its end.

    Args:
        eps: the eps-predictor, e.g. a :class:`GuidedEps`.
        x: (B, C, H, W) at ``alphas_cumprod = schedule.alphas[-1]``.
        schedule: deterministic (all ``sigmas`` 0), ending at ``alphas_cumprod[0]`` (timestep 0).
        noise: per-sample generators for the inpainting noise; None uses torch's global RNG.
        mask, x0: inpainting: before each step the ``mask`` 1 region is replaced by ``x0`` noised to that step.
        callback: ``callback(i, x, pred_x0)`` after each step.
        progress: show a tqdm bar.

    Returns:
        (B, C, H, W), the sample at ``schedule.alphas_prev[0]``. The first step costs two model calls.
    """
    _check_inpainting(mask, x0)
    if bool((schedule.sigmas > 0).any()):
        raise ValueError("PLMS is deterministic: its schedule needs eta = 0.")
    timesteps = schedule.timesteps
    alphas, alphas_prev = schedule.alphas.tolist(), schedule.alphas_prev.tolist()
    history: list[torch.Tensor] = []
    steps = range(len(timesteps) - 1, -1, -1)
    for i, index in enumerate(tqdm(steps, desc="PLMS Sampler", disable=not progress)):
        alpha, alpha_prev = alphas[index], alphas_prev[index]
        if mask is not None:
            x = blend_known(x, x0, mask, alpha, noise)
        e_t = eps(x, timesteps[index], alpha)
        if history:
            e_step = adams_bashforth(e_t, history)
        else:
            x_trial, _ = ddim_update(x, e_t, alpha, alpha_prev)
            t_prev = timesteps[index - 1] if index > 0 else 0
            e_step = (e_t + eps(x_trial, t_prev, alpha_prev)) / 2
        x, pred_x0 = ddim_update(x, e_step, alpha, alpha_prev)
        history = [*history[-2:], e_t]
        if callback is not None:
            callback(i, x, pred_x0)
    return x


class PLMSSampler(CompVisSampler):
    """PLMS with the CompVis API (``make_schedule``, ``sample``); eta must be 0. Works for eps and v models."""

    def make_schedule(
        self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0, verbose: bool = True
    ) -> None:
        if ddim_eta != 0:
            raise ValueError(f"ddim_eta must be 0 for PLMS, got {ddim_eta}.")
        super().make_schedule(ddim_num_steps, ddim_discretize, ddim_eta, verbose)

    def _run(
        self,
        eps: GuidedEps,
        x: torch.Tensor,
        *,
        temperature: float,
        noise_dropout: float,
        **loop_arguments: Any,
    ) -> torch.Tensor:
        # Temperature and noise dropout scale the step noise, which PLMS (eta = 0) does not have.
        return sample_plms(eps, x, self._require_table(), **loop_arguments)
