"""A hand-off from one model to another partway through one sampling run (SDXL base -> refiner).

The second model takes over from the first step whose sigma is at or below the switch sigma, inside the same sampler
loop, as A1111's ``--refiner_switch`` does: the run is one schedule (same grid, same ancestral noise, multistep
history kept), only the model giving the estimates changes. Both models must share the training schedule.

The choice is by sigma, so a step that evaluates at its end point (Heun's correction) just before the switch takes that
estimate from the second model, where A1111, counting steps, still asks the first; single-evaluation samplers
(Euler, DDIM, DPM++ 2M ...) switch exactly where A1111 does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ldm.errors import UserError
from ldm.models.diffusion.guidance import Denoiser


def check_switch(switch: float) -> float:
    """UserError unless the share of the steps before the hand-off is a number in (0, 1]."""
    if isinstance(switch, bool) or not isinstance(switch, int | float) or not 0 < switch <= 1:
        raise UserError(f"the refiner switch must be in (0, 1] (0.8 is usual), got {switch!r}.")
    return switch


@dataclass(frozen=True)
class Handoff:
    """The model that finishes a run and its own conditioning.

    Args:
        model: a ``LatentDiffusion`` with the same ``alphas_cumprod`` as the first model.
        cond, uncond: its conditioning and unconditional/negative conditioning (its own conditioner's output).
        switch: share of the steps the first model runs, in (0, 1]; 1 never hands over.
        on_change: called with True when the second model takes charge and with False when the first does again
            (a restart sampler's jump back up, or the end of the run), e.g. to keep only the UNet in use on the
            accelerator.
    """

    model: Any
    cond: Any
    uncond: Any
    switch: float = 0.8
    on_change: Callable[[bool], None] | None = None

    def check(self, first: Any) -> None:
        """UserError unless ``switch`` is in (0, 1] and both models share one training schedule."""
        check_switch(self.switch)
        ours, theirs = first.alphas_cumprod, self.model.alphas_cumprod
        if ours.shape != theirs.shape or not torch.allclose(ours.double().cpu(), theirs.double().cpu(), atol=1e-6):
            raise UserError("the refiner was trained on another noise schedule than the base: use a matching pair.")


class SwitchedDenoiser:
    """``D(x, sigma)`` of ``first`` above ``sigma_switch`` and of ``second`` at and below it (see :class:`Denoiser`)."""

    def __init__(
        self,
        first: Denoiser,
        second: Denoiser,
        sigma_switch: float,
        on_change: Callable[[bool], None] | None = None,
    ) -> None:
        self.first, self.second, self.sigma_switch = first, second, float(sigma_switch)
        self.schedule = first.schedule
        self.on_change = on_change
        self.second_in_charge = False

    @property
    def sigma_min(self) -> float:
        return self.first.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.first.sigma_max

    def _pick(self, sigma: float) -> Denoiser:
        self._set(float(sigma) <= self.sigma_switch)
        return self.second if self.second_in_charge else self.first

    def _set(self, second: bool) -> None:
        if second != self.second_in_charge:
            self.second_in_charge = second
            if self.on_change is not None:
                self.on_change(second)

    def finish(self) -> None:
        """Give the first model charge again (after the run, or when it was interrupted)."""
        self._set(False)

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """x: (B, C, H, W) at noise level ``sigma`` -> denoised (B, C, H, W)."""
        return self._pick(sigma)(x, sigma)

    def with_uncond(self, x: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, C, H, W) -> (denoised, uncond_denoised) of the model in charge at ``sigma``."""
        return self._pick(sigma).with_uncond(x, sigma)
