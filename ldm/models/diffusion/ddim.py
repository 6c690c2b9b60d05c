"""``DDIMSampler`` (Song et al., 2021) with the CompVis API: ``make_schedule``, ``sample``, and ``stochastic_encode`` /
``decode`` for img2img.

The sampling itself is :func:`~ldm.models.diffusion.sampling.sample_ddim`, the (ancestral) Euler step in the sigma
view, on the CompVis timestep grid :func:`~ldm.models.diffusion.schedules.ddim_sigmas`. ``make_schedule`` also sets
the original's coefficient tables (``ddim_timesteps``, ``ddim_alphas``, ...) for code that reads them.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ldm.errors import UserError
from ldm.models.diffusion.compvis_sampler import CompVisSampler, to_sigma_view, to_xt
from ldm.models.diffusion.guidance import Denoiser, GuidedEps
from ldm.models.diffusion.noise import Noise
from ldm.models.diffusion.sampling import sample_ddim
from ldm.models.diffusion.schedules import (
    DDIMSchedule,
    DiscreteSchedule,
    ddim_coefficients,
    ddim_sigmas,
    make_ddim_timesteps,
)


class DDIMGridSampler(CompVisSampler):
    """A CompVis sampler on the DDIM timestep grid: ``make_schedule`` and the tables it sets; DDIM and PLMS."""

    def __init__(self, model: Any, schedule: str = "linear", device: torch.device | str | None = None, **kwargs: Any):
        super().__init__(model, schedule, device, **kwargs)
        self.table: DDIMSchedule | None = None
        self.ddim_eta = 0.0
        self.discrete = DiscreteSchedule(model.alphas_cumprod)

    def make_schedule(
        self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0, verbose: bool = True
    ) -> None:
        """Choose ``ddim_num_steps`` timesteps and their coefficients (``ddim_timesteps``, ``ddim_alphas``, ...)."""
        timesteps = make_ddim_timesteps(ddim_num_steps, self.ddpm_num_timesteps, ddim_discretize)
        self.table = ddim_coefficients(self.model.alphas_cumprod, timesteps, ddim_eta)
        self.sigmas = ddim_sigmas(self.discrete, ddim_num_steps, ddim_discretize)
        self.ddim_eta = float(ddim_eta)
        self.ddim_timesteps = np.asarray(timesteps)
        self.ddim_alphas = self.table.alphas
        self.ddim_alphas_prev = self.table.alphas_prev
        self.ddim_sigmas = self.table.sigmas
        self.ddim_sqrt_one_minus_alphas = (1.0 - self.table.alphas).sqrt()
        if verbose:
            span = f"timesteps {timesteps[0]}..{timesteps[-1]}"
            print(f"{type(self).__name__}: {len(timesteps)} steps, {span}, eta {ddim_eta}")

    def _require_table(self) -> DDIMSchedule:
        if self.table is None:
            raise UserError("no schedule yet: call make_schedule(ddim_num_steps, ...) first.")
        return self.table


def _as_indices(t: torch.Tensor | Sequence[int] | int, batch_size: int, limit: int) -> list[int]:
    """``t`` as one schedule index per sample, each checked to lie in 0..limit."""
    indices = torch.as_tensor(t).reshape(-1).tolist()
    if len(indices) == 1:
        indices = indices * batch_size
    if len(indices) != batch_size:
        raise UserError(f"t has {len(indices)} entries for a batch of {batch_size}.")
    if any(not 0 <= i <= limit for i in indices):
        raise UserError(f"t must be step indices in 0..{limit} (0..S, S = top of the schedule), got {indices}.")
    return [int(i) for i in indices]


class DDIMSampler(DDIMGridSampler):
    """DDIM with the CompVis API: ``make_schedule``, ``sample``, and ``stochastic_encode`` / ``decode`` for img2img."""

    def _plan(
        self, steps: int, eta: float, temperature: float, noise_dropout: float, verbose: bool
    ) -> tuple[Callable[..., torch.Tensor], torch.Tensor, None, dict[str, Any]]:
        self.make_schedule(steps, ddim_eta=eta, verbose=verbose)
        options = {"eta": self.ddim_eta, "s_noise": temperature, "noise_dropout": noise_dropout}
        return sample_ddim, self.sigmas, None, options

    @torch.no_grad()
    def stochastic_encode(
        self,
        x0: torch.Tensor,
        t: torch.Tensor | Sequence[int] | int,
        use_original_steps: bool = False,
        noise: torch.Tensor | Noise | None = None,
    ) -> torch.Tensor:
        """Noise ``x0``: (B, C, H, W) to DDIM step index ``t`` (per sample, or one for all), for :meth:`decode`.

        As in CompVis, index ``t`` is the noise level of ``ddim_timesteps[t]``, one step above where
        ``decode(..., t_start=t)`` starts. ``t = S`` (img2img strength 1) encodes at the top of the schedule,
        ``alphas_cumprod[-1]``. With ``use_original_steps``, ``t`` indexes the training timesteps instead.
        ``noise``: a tensor like ``x0``, a :class:`Noise`, or None for torch's global RNG.
        """
        table = self.model.alphas_cumprod.detach().to("cpu", torch.float64)
        alphas = table if use_original_steps else self._require_table().alphas
        alphas = torch.cat([alphas, table[-1:]])
        index = _as_indices(t, x0.shape[0], len(alphas) - 1)
        a = alphas[index].to(x0.device, x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
        if not isinstance(noise, torch.Tensor):
            noise = torch.randn_like(x0) if noise is None else noise.randn_like(x0)
        return a.sqrt() * x0 + (1.0 - a).sqrt() * noise

    @torch.no_grad()
    def decode(
        self,
        x_latent: torch.Tensor,
        cond: Any,
        t_start: int,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning: Any = None,
        use_original_steps: bool = False,
        callback: Callable[[int], None] | None = None,
        noise: Noise | None = None,
        verbose: bool = True,
    ) -> torch.Tensor:
        """Denoise ``x_latent``: (B, C, H, W) through the ``t_start`` least noisy steps (img2img).

        ``t_start = 0`` returns ``x_latent`` unchanged; ``t_start = S`` runs every step. Eta is the one given to
        :meth:`make_schedule`. Returns (B, C, H, W).
        """
        if use_original_steps:
            sigmas = ddim_sigmas(self.discrete, self.ddpm_num_timesteps)
        else:
            self._require_table()
            sigmas = self.sigmas
        try:
            t_start = operator.index(t_start)
        except TypeError:
            raise UserError(f"t_start must be an integer step count, got {t_start!r}.") from None
        total = len(sigmas) - 1
        if not 0 <= t_start <= total:
            raise UserError(f"t_start must be in 0..{total} (the number of steps), got {t_start}.")
        if t_start == 0:
            return x_latent
        sigmas = sigmas[total - t_start :]
        denoiser = Denoiser(GuidedEps(self.model, cond, unconditional_conditioning, unconditional_guidance_scale))
        x = sample_ddim(
            denoiser,
            to_sigma_view(x_latent, float(sigmas[0])),
            sigmas,
            eta=self.ddim_eta,
            noise=noise,
            callback=None if callback is None else lambda step: callback(step["i"]),
            progress=verbose,
        )
        return to_xt(x, float(sigmas[-1]))
