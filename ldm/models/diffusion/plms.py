"""``PLMSSampler`` (pseudo linear multistep, Liu et al., 2022) with the CompVis API; eta must be 0.

The sampling itself is :func:`~ldm.models.diffusion.sampling.sample_plms` on the CompVis DDIM timestep grid.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ldm.errors import UserError
from ldm.models.diffusion.ddim import DDIMGridSampler
from ldm.models.diffusion.sampling import sample_plms


class PLMSSampler(DDIMGridSampler):
    """PLMS with the CompVis API (``make_schedule``, ``sample``); eta must be 0. Works for eps and v models."""

    def make_schedule(
        self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0, verbose: bool = True
    ) -> None:
        if ddim_eta != 0:
            raise UserError(f"ddim_eta must be 0 for PLMS, got {ddim_eta}.")
        if ddim_discretize != "uniform":
            raise UserError(f"PLMS runs on the uniform DDIM grid; ddim_discretize '{ddim_discretize}' is not one.")
        super().make_schedule(ddim_num_steps, ddim_discretize, ddim_eta, verbose)

    def _plan(
        self, steps: int, eta: float, temperature: float, noise_dropout: float, verbose: bool
    ) -> tuple[Callable[..., torch.Tensor], torch.Tensor, None, dict[str, Any]]:
        # Temperature and noise dropout scale the step noise, which PLMS (eta = 0) does not have.
        self.make_schedule(steps, ddim_eta=eta, verbose=verbose)
        return sample_plms, self.sigmas, None, {}
