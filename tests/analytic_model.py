"""A diffusion "model" whose predictions are exact, for testing samplers without reference outputs.

For data ``x0 ~ N(mu, s^2 I)`` and ``x_t = sqrt(a) x0 + sqrt(1 - a) eps``, the optimal eps-prediction is
``E[eps | x_t] = sqrt(1 - a) (x_t - sqrt(a) mu) / (a s^2 + 1 - a)``. In the sigma view (``x = x_t / sqrt(a)``,
``sigma^2 = (1 - a) / a``) the probability-flow ODE is solved in closed form:
``x(sigma_to) = mu + (x(sigma_from) - mu) * sqrt(s^2 + sigma_to^2) / sqrt(s^2 + sigma_from^2)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ldm.models.diffusion.schedules import DiscreteSchedule, zero_terminal_snr_betas
from ldm.modules.diffusionmodules.util import make_beta_schedule


class GaussianDataModel(nn.Module):
    """Stands in for LatentDiffusion in samplers: ``apply_model``, ``alphas_cumprod``, ``parameterization``.

    ``cond``, when given, is a (B,) tensor added to ``mu`` per sample (so guidance has something to act on).
    ``zero_terminal_snr`` rescales the SD schedule to end at pure noise (``alphas_cumprod[-1] == 0``).
    """

    def __init__(
        self,
        mu: float = 0.5,
        s: float = 0.7,
        parameterization: str = "eps",
        timesteps: int = 1000,
        zero_terminal_snr: bool = False,
    ) -> None:
        super().__init__()
        betas = torch.tensor(make_beta_schedule("linear", timesteps, linear_start=0.00085, linear_end=0.012))
        if zero_terminal_snr:
            betas = zero_terminal_snr_betas(betas)
        self.register_buffer("alphas_cumprod", betas.to(torch.float64).neg().add(1).cumprod(0))
        self.schedule = DiscreteSchedule(self.alphas_cumprod)
        self.mu, self.s = mu, s
        self.parameterization = parameterization
        self.num_timesteps = timesteps
        self.calls = 0

    def apply_model(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        steps = t.cpu().tolist()
        alphas = {step: self.schedule.alpha_cumprod(step) for step in set(steps)}
        a = torch.tensor([alphas[step] for step in steps], dtype=torch.float64)
        a = a.to(x_t.device).view(-1, *([1] * (x_t.dim() - 1)))
        mu = self.mu if cond is None else self.mu + cond.to(x_t.device, torch.float64).view_as(a)
        eps = (1 - a).sqrt() * (x_t - a.sqrt() * mu) / (a * self.s**2 + 1 - a)
        if self.parameterization == "eps":
            return eps.to(x_t.dtype)
        x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
        if self.parameterization == "x0":
            return x0.to(x_t.dtype)
        return (a.sqrt() * eps - (1 - a).sqrt() * x0).to(x_t.dtype)

    def exact_flow(self, x: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
        """The probability-flow ODE solution in the sigma view, from ``sigma_from`` to ``sigma_to``."""
        ratio = math.sqrt(self.s**2 + sigma_to**2) / math.sqrt(self.s**2 + sigma_from**2)
        return self.mu + (x - self.mu) * ratio
