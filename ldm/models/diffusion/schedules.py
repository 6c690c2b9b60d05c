"""Noise schedules: the model's discrete noise levels, the timestep grids samplers visit, and named sigma schedules.

Every sampler in :mod:`ldm.models.diffusion.sampling` walks a decreasing list of noise levels ``sigmas`` in the
"sigma view" (``x = x_t / sqrt(alpha_cumprod)``, ``sigma^2 = (1 - alpha_cumprod) / alpha_cumprod``). This module is
where those lists come from:

- :class:`DiscreteSchedule`: the model's own ``alphas_cumprod`` as sigmas, with the sigma <-> timestep map
  (log-sigma interpolation between integer steps, exact at them).
- :func:`make_ddim_timesteps` and :func:`ddim_sigmas`: the CompVis DDIM/PLMS grid ("leading" spacing, offset 1).
- :func:`get_sigmas` and :data:`SIGMA_SCHEDULES`: the named schedules users pick ("Karras", "SGM Uniform", "Beta",
  Align Your Steps, ...; the formulas are in :mod:`.schedules_named`).
- :func:`rescale_zero_terminal_snr`: Lin et al.'s fix of a training schedule that never reaches pure noise.

Everything is a CPU table (Python floats, float64 tensors), computed once per run, so sampling loops never
synchronise with the device.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from functools import partial
from typing import NamedTuple

import torch

from ldm.errors import UserError
from ldm.models.diffusion.schedules_named import (
    TIMESTEP_SPACINGS,
    append_zero,
    get_sigmas_ays,
    get_sigmas_beta,
    get_sigmas_discrete,
    get_sigmas_exponential,
    get_sigmas_karras,
    get_sigmas_kl_optimal,
    get_sigmas_linear_quadratic,
    get_sigmas_polyexponential,
    get_sigmas_sgm_uniform,
    get_sigmas_simple,
    get_sigmas_spaced,
)

ZERO_SNR_ALPHA_CUMPROD = 4.8973451890853435e-08
"""Where sampling puts a zero-terminal-SNR schedule's last level (alphas_cumprod 0, sigma infinite): ComfyUI's and
A1111's value, sigma 4518.76."""


class DiscreteSchedule:
    """The model's discrete noise levels, continued to fractional timesteps by interpolating log-sigma.

    ``sigma(t) = sqrt((1 - alpha_cumprod[t]) / alpha_cumprod[t])``, the noise-to-signal ratio at integer step ``t``.
    Held on the CPU in float64; scalars in and out are Python floats. A sigma that is exactly one of the table's maps
    back to its integer timestep, so samplers on the model's grid call the model with integer timesteps.

    A zero-terminal-SNR table (:func:`rescale_zero_terminal_snr`) ends at ``alphas_cumprod`` 0, an infinite sigma that
    no sampler can step from or scale noise by. Here that level is :data:`ZERO_SNR_ALPHA_CUMPROD` (below the table's
    smallest positive value, should that be smaller), as ComfyUI and A1111 do: every sampler then runs unchanged, the
    model still sees its last timestep there, and the start ``x_t`` differs from pure noise by 2e-4 of the data. The
    model's own buffers keep the exact 0, which training needs.
    """

    def __init__(self, alphas_cumprod: torch.Tensor) -> None:
        table = alphas_cumprod.detach().to("cpu", torch.float64)
        if bool((table <= 0).any()):
            floor = min(ZERO_SNR_ALPHA_CUMPROD, 0.5 * float(table[table > 0].min()))
            table = torch.where(table > 0, table, floor)
        self.alphas_cumprod = table
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()
        self.log_sigmas = self.sigmas.log()
        self._sigma_list = self.sigmas.tolist()
        self._timestep_of = {sigma: t for t, sigma in enumerate(self._sigma_list)}

    @property
    def num_timesteps(self) -> int:
        return len(self.sigmas)

    @property
    def sigma_min(self) -> float:
        return self._sigma_list[0]

    @property
    def sigma_max(self) -> float:
        return self._sigma_list[-1]

    def t_to_sigma(self, t: float) -> float:
        """sigma at timestep ``t`` in 0..T-1: the table value at integers, log-linear in between."""
        t = min(max(float(t), 0.0), self.num_timesteps - 1.0)
        if t.is_integer():
            return self._sigma_list[int(t)]
        low = min(int(math.floor(t)), self.num_timesteps - 2)
        w = t - low
        return math.exp((1 - w) * float(self.log_sigmas[low]) + w * float(self.log_sigmas[low + 1]))

    def sigma_to_t(self, sigma: float) -> float:
        """Inverse of :meth:`t_to_sigma` (an exact float for table sigmas); sigmas outside the table clamp."""
        sigma = float(sigma)
        if sigma in self._timestep_of:
            return float(self._timestep_of[sigma])
        log_sigma = math.log(max(sigma, 1e-10))
        high = int(torch.searchsorted(self.log_sigmas, torch.tensor(log_sigma, dtype=torch.float64)))
        high = min(max(high, 1), self.num_timesteps - 1)
        lo, hi = float(self.log_sigmas[high - 1]), float(self.log_sigmas[high])
        w = min(max((log_sigma - lo) / (hi - lo), 0.0), 1.0)
        return high - 1 + w

    def alpha_cumprod(self, t: float) -> float:
        """``alpha_cumprod`` at a possibly fractional ``t`` (exactly the table value at integers)."""
        if float(t).is_integer() and 0 <= t < self.num_timesteps:
            return float(self.alphas_cumprod[int(t)])
        return 1.0 / (1.0 + self.t_to_sigma(t) ** 2)


def sigma_to_alpha_cumprod(sigma: float) -> float:
    return 1.0 / (1.0 + sigma * sigma)


# -- the CompVis DDIM grid --


def make_ddim_timesteps(num_steps: int, num_timesteps: int = 1000, discretize: str = "uniform") -> list[int]:
    """The ``num_steps`` training timesteps a DDIM/PLMS run visits, ascending.

    ``uniform``: ``i * (T // S) + 1`` for ``i < S`` ("leading" spacing with offset 1): for ``S`` dividing ``T``
    exactly the original's ``arange(0, T, T // S) + 1``, and exactly ``S`` steps for every other ``S`` too. For
    ``S == T`` that rule would reach ``t = T``, past the table, so every timestep ``0 .. T-1`` is used instead.
    ``quad``: the original's ``int(linspace(0, sqrt(0.8 T), S) ** 2) + 1``, dense at low noise; the repeats that rule
    makes for larger ``S`` are dropped (a DDIM step between equal timesteps changes nothing).
    """
    try:
        steps = operator.index(num_steps)
    except TypeError:
        raise UserError(f"the number of steps S must be an integer, got {num_steps!r}.") from None
    if not 1 <= steps <= num_timesteps:
        raise UserError(f"the number of steps S must be in 1..{num_timesteps}, got {steps}.")
    if discretize == "quad":
        ramp = torch.linspace(0, math.sqrt(num_timesteps * 0.8), steps, dtype=torch.float64) ** 2
        return sorted({int(t) + 1 for t in ramp.tolist()})
    if discretize != "uniform":
        raise UserError(f"ddim_discretize must be 'uniform' or 'quad', got '{discretize}'.")
    if steps == num_timesteps:
        return list(range(num_timesteps))
    stride = num_timesteps // steps
    return [i * stride + 1 for i in range(steps)]


def ddim_sigmas(schedule: DiscreteSchedule, steps: int, discretize: str = "uniform") -> torch.Tensor:
    """The (S + 1,) sigmas of a CompVis DDIM/PLMS run: the DDIM timesteps, noisiest first, then where it ends.

    As CompVis, the last step goes to ``alphas_cumprod[0]`` (the smallest sigma of the table), not to the clean data.
    With every timestep (``S == T``) the grid already holds that level, so the run ends at sigma 0 instead, as DDPM
    does, and no step is wasted.
    """
    timesteps = make_ddim_timesteps(steps, schedule.num_timesteps, discretize)
    sigmas = [schedule.t_to_sigma(t) for t in reversed(timesteps)]
    sigmas.append(0.0 if timesteps[0] == 0 else schedule.sigma_min)
    return torch.tensor(sigmas, dtype=torch.float64)


def ddim_uniform_sigmas(steps: int, schedule: DiscreteSchedule) -> torch.Tensor:
    """ComfyUI's ``ddim_uniform``: the (S + 1,) sigmas at the DDIM grid's timesteps (:func:`make_ddim_timesteps`),
    noisiest first, then 0, where CompVis's own grid (:func:`ddim_sigmas`) stops at ``alphas_cumprod[0]``.

    A1111's "DDIM" schedule type is the same rule (the name "DDIM" here means the CompVis grid ``ddim``). Where S does
    not divide T, those two run ``len(range(1, T, T // S))`` steps, more than S; this runs S, the lowest of them, as
    the DDIM grid does.
    """
    timesteps = make_ddim_timesteps(steps, schedule.num_timesteps)
    return append_zero(torch.tensor([schedule.t_to_sigma(t) for t in reversed(timesteps)], dtype=torch.float64))


class DDIMSchedule(NamedTuple):
    """Per-step DDIM coefficients, indexed like ``timesteps`` (ascending), as CompVis's ``DDIMSampler`` exposes them.

    Step ``i`` takes ``x_t`` at ``alphas[i] = alphas_cumprod[timesteps[i]]`` to ``alphas_prev[i]`` with extra noise
    of std ``sigmas[i]``. ``alphas``, ``alphas_prev``, ``sigmas``: (S,) float64 on the CPU.
    """

    timesteps: list[int]
    alphas: torch.Tensor
    alphas_prev: torch.Tensor
    sigmas: torch.Tensor


def ddim_coefficients(alphas_cumprod: torch.Tensor, timesteps: Sequence[int], eta: float = 0.0) -> DDIMSchedule:
    """CompVis's DDIM table for ``timesteps`` (ascending) of a model with ``alphas_cumprod``: (T,).

    ``sigma_i = eta * sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))``: ``eta = 0`` is deterministic DDIM, ``eta = 1``
    ancestral sampling (DDPM over the reduced schedule). The first ``alphas_prev`` is ``alphas_cumprod[0]``.
    """
    eta = float(eta)
    if not math.isfinite(eta) or eta < 0:
        raise UserError(f"eta must be >= 0 (0 = deterministic DDIM, 1 = ancestral), got {eta}.")
    table = alphas_cumprod.detach().to("cpu", torch.float64)
    timesteps = [int(t) for t in timesteps]
    alphas = table[timesteps]
    alphas_prev = torch.cat([table[:1], alphas])[: len(alphas)]
    sigmas = eta * ((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev)).sqrt()
    # The deterministic part of a step keeps a share sqrt(1 - a_prev - sigma^2) of eps; it must stay real.
    if bool((1 - alphas_prev - sigmas**2 < -1e-12).any()):
        raise UserError(f"eta = {eta} is too large: a step's noise would exceed its variance; use eta in 0..1.")
    return DDIMSchedule(timesteps, alphas, alphas_prev, sigmas)


# -- zero terminal SNR --


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample Steps are Flawed"), Algorithm 1, on
    ``alphas_cumprod``: (T,) -> (T,) float64 on the CPU.

    ``sqrt(alphas_cumprod)`` is shifted so that its last value is exactly 0 (the last timestep is pure noise, zero
    SNR, as at sampling's start) and scaled so that its first is unchanged; in between it stays an affine function of
    the original.
    """
    root = alphas_cumprod.detach().to("cpu", torch.float64).sqrt()
    first, last = float(root[0]), float(root[-1])
    if not first > last:
        raise ValueError("alphas_cumprod must decrease from its first to its last timestep to be rescaled.")
    return ((root - last) * (first / (first - last))) ** 2


def zero_terminal_snr_betas(betas: torch.Tensor) -> torch.Tensor:
    """The betas (T,) of :func:`rescale_zero_terminal_snr` applied to those of ``betas`` (T,); the last is 1.
    Returns float64 on the CPU."""
    alphas_cumprod = rescale_zero_terminal_snr(torch.cumprod(1.0 - betas.detach().to("cpu", torch.float64), 0))
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1.0 - alphas


def dpm_solver_grid(schedule: DiscreteSchedule, steps: int) -> tuple[list[float], list[float]]:
    """The original DPM-Solver's ``steps + 1`` points: (sigmas, the model's timesteps at them).

    Its discrete noise schedule (``NoiseScheduleVP("discrete")``) puts training step n at continuous time
    ``(n + 1) / N`` and interpolates ``log(alpha) = log(sqrt(alpha_cumprod))`` linearly in between; sampling visits
    ``steps + 1`` times uniform from 1 down to ``1 / N`` (``skip_type="time_uniform"``), where the model sees timestep
    ``(t - 1 / N) * 1000``. So the run ends at the model's smallest noise level, not at sigma 0.
    """
    log_alpha = (0.5 * schedule.alphas_cumprod.log()).tolist()
    n = len(log_alpha)
    sigmas, timesteps = [], []
    for t in torch.linspace(1.0, 1.0 / n, steps + 1, dtype=torch.float64).tolist():
        position = t * n - 1  # the fractional training step at continuous time t
        low = min(max(math.floor(position), 0), n - 2)
        w = position - low
        alpha_sq = math.exp(2 * ((1 - w) * log_alpha[low] + w * log_alpha[low + 1]))
        sigmas.append(math.sqrt((1 - alpha_sq) / alpha_sq))
        timesteps.append((t - 1.0 / n) * 1000.0)
    return sigmas, timesteps


ScheduleFn = Callable[[int, DiscreteSchedule], torch.Tensor]
"""``schedule_fn(n, model_schedule) -> (n + 1,)`` float64 sigmas, decreasing, for a model's discrete schedule."""

SIGMA_SCHEDULES: dict[str, ScheduleFn] = {
    "discrete": get_sigmas_discrete,
    "karras": lambda n, s: get_sigmas_karras(n, s.sigma_min, s.sigma_max),
    "exponential": lambda n, s: get_sigmas_exponential(n, s.sigma_min, s.sigma_max),
    "polyexponential": lambda n, s: get_sigmas_polyexponential(n, s.sigma_min, s.sigma_max),
    "sgm_uniform": get_sigmas_sgm_uniform,
    "simple": get_sigmas_simple,
    "ddim_uniform": ddim_uniform_sigmas,
    "beta": get_sigmas_beta,
    "kl_optimal": lambda n, s: get_sigmas_kl_optimal(n, s.sigma_min, s.sigma_max),
    "linear_quadratic": get_sigmas_linear_quadratic,
    "ays_sd15": lambda n, s: get_sigmas_ays(n, "ays_sd15"),
    "ays_sdxl": lambda n, s: get_sigmas_ays(n, "ays_sdxl"),
    **{spacing: partial(get_sigmas_spaced, spacing=spacing) for spacing in TIMESTEP_SPACINGS},
    "ddim": lambda n, s: ddim_sigmas(s, n),
    "ddim_quad": lambda n, s: ddim_sigmas(s, n, "quad"),
    "dpm_solver": lambda n, s: torch.tensor(dpm_solver_grid(s, n)[0], dtype=torch.float64),
}
"""Every schedule by name (see :mod:`.schedules_named` for each): ``discrete`` (A1111's and ComfyUI's "normal"),
``karras``, ``exponential``, ``polyexponential``, ``sgm_uniform``, ``simple``, ``ddim_uniform``, ``beta``,
``kl_optimal``, ``linear_quadratic``, Align Your Steps (``ays_sd15``, ``ays_sdxl``), diffusers' timestep spacings
(``leading``, ``linspace``, ``trailing``), and the grids of the CompVis samplers: ``ddim`` (DDIM, PLMS; ``ddim_quad``
its "quad" discretisation) and ``dpm_solver`` (the original DPM-Solver's). All end at sigma 0 but the CompVis grids;
``beta`` may have fewer than ``n + 1`` values for large ``n``."""

COMPVIS_GRIDS = ("ddim", "ddim_quad", "dpm_solver")
"""Schedules on which a run follows the CompVis samplers: the start noise ``x_T`` is the model's ``x_t`` at the first
step, and the result the model's ``x_t`` at the last, which lies above sigma 0."""


def get_sigmas(name: str, steps: int, schedule: DiscreteSchedule) -> torch.Tensor:
    """The (steps + 1,) sigmas of the named schedule for a model with this discrete schedule."""
    if name not in SIGMA_SCHEDULES:
        raise UserError(f"unknown schedule '{name}'. Known schedules: {', '.join(SIGMA_SCHEDULES)}.")
    return SIGMA_SCHEDULES[name](steps, schedule)


def model_timesteps(name: str, steps: int, schedule: DiscreteSchedule) -> Callable[[float], float]:
    """Which timestep the model sees at each sigma of the named schedule: the discrete schedule's own inverse, except
    on the DPM-Solver grid, whose continuous time maps to the model differently."""
    if name != "dpm_solver":
        return schedule.sigma_to_t
    grid = dict(zip(*dpm_solver_grid(schedule, steps), strict=True))
    return lambda sigma: grid[sigma] if sigma in grid else dpm_solver_timestep(schedule, sigma)


def dpm_solver_timestep(schedule: DiscreteSchedule, sigma: float) -> float:
    """The model timestep of any ``sigma`` in DPM-Solver's time: the fractional training step at which ``log(alpha)``,
    interpolated linearly between steps, equals ``-log(1 + sigma^2) / 2``, times ``1000 / N`` (so the grid's points
    map to their own timesteps; samplers with midpoints evaluate between them)."""
    neg_log_alpha = -0.5 * schedule.alphas_cumprod.log()  # increasing with the step
    target = 0.5 * math.log1p(sigma * sigma)
    n = len(neg_log_alpha)
    high = int(torch.searchsorted(neg_log_alpha, torch.tensor(target, dtype=torch.float64)))
    high = min(max(high, 1), n - 1)
    lo, hi = float(neg_log_alpha[high - 1]), float(neg_log_alpha[high])
    position = high - 1 + min(max((target - lo) / (hi - lo), 0.0), 1.0)
    return position * 1000.0 / n
