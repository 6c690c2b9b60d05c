"""Discrete timestep grids and DDIM coefficient tables, shared by the DDIM and PLMS samplers.

Everything here is a CPU table (Python ints, float64 tensors), computed once per sampling run: the loops read Python
floats from it and never synchronise with the device.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import NamedTuple

import torch


def make_ddim_timesteps(num_steps: int, num_timesteps: int = 1000) -> list[int]:
    """The ``num_steps`` training timesteps a DDIM/PLMS run visits, ascending.

    ``i * (T // S) + 1`` for ``i < S`` ("leading" spacing with offset 1): for ``S`` dividing ``T`` exactly the
    original's ``arange(0, T, T // S) + 1``, and exactly ``S`` steps for every other ``S`` too. For ``S == T`` that
    rule would reach ``t = T``, past the table, so every timestep ``0 .. T-1`` is used instead.
    """
    try:
        steps = operator.index(num_steps)
    except TypeError:
        raise ValueError(f"the number of steps S must be an integer, got {num_steps!r}.") from None
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"the number of steps S must be in 1..{num_timesteps}, got {steps}.")
    if steps == num_timesteps:
        return list(range(num_timesteps))
    stride = num_timesteps // steps
    return [i * stride + 1 for i in range(steps)]


class DDIMSchedule(NamedTuple):
    """Per-step DDIM coefficients, indexed like ``timesteps`` (ascending); a run walks them from the end.

    Step ``i`` takes ``x_t`` at ``alphas[i] = alphas_cumprod[timesteps[i]]`` to ``alphas_prev[i]`` with extra noise
    of std ``sigmas[i]``. ``alphas``, ``alphas_prev``, ``sigmas``: (S,) float64 on the CPU.
    """

    timesteps: list[int]
    alphas: torch.Tensor
    alphas_prev: torch.Tensor
    sigmas: torch.Tensor

    def truncated(self, num_steps: int) -> DDIMSchedule:
        """The ``num_steps`` least noisy steps, the part of the run img2img performs."""
        return DDIMSchedule(
            self.timesteps[:num_steps], self.alphas[:num_steps], self.alphas_prev[:num_steps], self.sigmas[:num_steps]
        )


def ddim_schedule(
    alphas_cumprod: torch.Tensor, timesteps: Sequence[int], eta: float = 0.0, final_alpha: float | None = None
) -> DDIMSchedule:
    """DDIM coefficients for ``timesteps`` (ascending) of a model with ``alphas_cumprod``: (T,).

    ``sigma_i = eta * sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))``: ``eta = 0`` is deterministic DDIM, ``eta = 1``
    ancestral sampling (DDPM over the reduced schedule). The last step goes to ``final_alpha``, by default
    ``alphas_cumprod[0]`` as in CompVis DDIM (1.0 would be the clean data, as in DDPM).
    """
    eta = float(eta)
    if eta < 0:
        raise ValueError(f"eta must be >= 0 (0 = deterministic DDIM, 1 = ancestral), got {eta}.")
    table = alphas_cumprod.detach().to("cpu", torch.float64)
    timesteps = [int(t) for t in timesteps]
    if any(not 0 <= t < len(table) for t in timesteps):
        raise ValueError(f"timesteps must lie in 0..{len(table) - 1}, got {timesteps}.")
    alphas = table[timesteps]
    first = table[0] if final_alpha is None else torch.tensor(float(final_alpha), dtype=torch.float64)
    alphas_prev = torch.cat([first.view(1), alphas])[: len(alphas)]
    sigmas = eta * ((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev)).sqrt()
    # The deterministic part of a step keeps a share sqrt(1 - a_prev - sigma^2) of eps; it must stay real.
    if bool((1 - alphas_prev - sigmas**2 < -1e-12).any()):
        raise ValueError(f"eta = {eta} is too large: a step's noise would exceed its variance; use eta in 0..1.")
    return DDIMSchedule(timesteps, alphas, alphas_prev, sigmas)
