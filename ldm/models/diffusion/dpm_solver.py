"""``DPMSolverSampler``: DPM-Solver++ (multistep, order 2) behind the CompVis sampler API, on the original's grid.

The solver is :func:`~ldm.models.diffusion.sampling.sample_dpmpp_2m` (the same update in the sigma view) on the time
discretisation of the original DPM-Solver that CompVis and Stability ship (``skip_type="time_uniform"``,
``method="multistep"``, ``order=2``, ``lower_order_final=True``, DPM-Solver++; see
:func:`~ldm.models.diffusion.schedules.dpm_solver_grid`). The run ends at the model's smallest noise level, not at
sigma 0, after exactly ``S`` model evaluations, and returns ``x_t`` there, as the original does.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch

from ldm.errors import UserError
from ldm.models.diffusion.compvis_sampler import CompVisSampler
from ldm.models.diffusion.sampling import sample_dpmpp_2m
from ldm.models.diffusion.schedules import DiscreteSchedule, get_sigmas, model_timesteps


class DPMSolverSampler(CompVisSampler):
    """DPM-Solver++(2M) sampling of a ``LatentDiffusion`` (or anything with ``apply_model`` and ``alphas_cumprod``).

    Args:
        model: the diffusion model; eps- and v-prediction are both supported.
        device: where the initial noise is made; defaults to the device of ``model.alphas_cumprod``. Other keyword
            arguments (e.g. the DDIM ``schedule="linear"``) are accepted, as by the original, and have no effect.
    """

    def __init__(self, model: Any, device: torch.device | str | None = None, **kwargs: Any) -> None:
        super().__init__(model, device=device)
        self.discrete = DiscreteSchedule(model.alphas_cumprod)

    def _plan(
        self, steps: int, eta: float, temperature: float, noise_dropout: float, verbose: bool
    ) -> tuple[Callable[..., torch.Tensor], torch.Tensor, Callable[[float], float], dict[str, Any]]:
        # The legacy DDIM noise options have no DPM-Solver meaning; the original ignores eta (deterministic solver).
        if temperature != 1.0:
            raise UserError(f"DPMSolverSampler supports only temperature=1, got {temperature}.")
        if noise_dropout != 0.0:
            raise UserError(f"DPMSolverSampler supports only noise_dropout=0, got {noise_dropout}.")
        if eta < 0:
            raise UserError(f"eta must be >= 0, got {eta}.")
        num_timesteps = self.discrete.num_timesteps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= num_timesteps:
            raise UserError(f"S (number of steps) must be in 1..{num_timesteps}, got {steps!r}.")
        sigmas = get_sigmas("dpm_solver", steps, self.discrete)
        loop = partial(sample_dpmpp_2m, lower_order_final=True)
        return loop, sigmas, model_timesteps("dpm_solver", steps, self.discrete), {}

    def sample(
        self, S: int, batch_size: int, shape: Sequence[int], *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, None]:
        """As :meth:`CompVisSampler.sample`, but returns ``(samples, None)``: the original keeps no intermediates.

        ``samples``: (B, C, H, W) latents at the model's smallest noise level, as the original returns them (decode
        with ``model.decode_first_stage``). As in the original, ``eta``, ``normals_sequence`` and ``log_every_t``
        have no effect; options that would change the result and have no meaning here raise a ValueError.
        """
        known = set(inspect.signature(CompVisSampler.sample).parameters)
        unknown = sorted(key for key, value in kwargs.items() if key not in known and value is not None)
        if unknown:
            raise UserError(f"DPMSolverSampler.sample got unsupported arguments: {', '.join(unknown)}.")
        samples, _ = super().sample(S, batch_size, shape, *args, **{k: v for k, v in kwargs.items() if k in known})
        return samples, None
