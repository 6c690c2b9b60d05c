"""The named sigma schedules users pick (A1111's "Schedule type", ComfyUI's schedulers, diffusers' spacings).

Each returns (n + 1,) float64 sigmas on the CPU, strictly decreasing and ending at 0, from either

- a formula of ``(n, sigma_min, sigma_max)``: Karras, exponential, polyexponential, KL-optimal, or a published table
  (Align Your Steps), or
- a rule that picks noise levels of the model's own table (a
  :class:`~ldm.models.diffusion.schedules.DiscreteSchedule`): normal, SGM uniform, simple, beta, and diffusers'
  ``leading`` / ``linspace`` / ``trailing`` timestep spacings.

:data:`ldm.models.diffusion.schedules.SIGMA_SCHEDULES` registers them by name.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import TYPE_CHECKING

import torch

from ldm.models.diffusion.beta_quantile import beta_ppf

if TYPE_CHECKING:
    from ldm.models.diffusion.schedules import DiscreteSchedule


def check_schedule_args(n: int, sigma_min: float, sigma_max: float) -> None:
    if n < 1:
        raise ValueError(f"number of steps n must be >= 1, got {n}.")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}.")


def append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def _ramp(n: int) -> torch.Tensor:
    """``n`` points evenly from 0 to 1 (just ``[0]`` for one step, which then starts at sigma_max)."""
    return torch.linspace(0, 1, n, dtype=torch.float64)


# -- formulas of (n, sigma_min, sigma_max) --


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022) schedule: evenly spaced in ``sigma ** (1 / rho)``. Returns (n + 1,) float64 on the CPU."""
    check_schedule_args(n, sigma_min, sigma_max)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return append_zero((hi + _ramp(n) * (lo - hi)) ** rho)


def get_sigmas_exponential(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Schedule evenly spaced in ``log(sigma)``. Returns (n + 1,) float64 on the CPU."""
    check_schedule_args(n, sigma_min, sigma_max)
    return append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp())


def get_sigmas_polyexponential(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> torch.Tensor:
    """k-diffusion's polyexponential schedule: ``log(sigma)`` runs from ``log(sigma_max)`` to ``log(sigma_min)`` as
    ``(1 - i / (n - 1)) ** rho``. A1111's "Polyexponential" uses ``rho = 1``, where it is the exponential schedule.
    Returns (n + 1,) float64 on the CPU."""
    check_schedule_args(n, sigma_min, sigma_max)
    if rho <= 0:
        raise ValueError(f"the polyexponential schedule needs rho > 0, got {rho}.")
    ramp = (1.0 - _ramp(n)) ** rho
    return append_zero((ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)).exp())


def get_sigmas_kl_optimal(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """The KL-optimal schedule (Sabour et al. 2024, as ComfyUI's ``kl_optimal``): evenly spaced in ``arctan(sigma)``
    from sigma_max to sigma_min, then 0. Returns (n + 1,) float64 on the CPU."""
    check_schedule_args(n, sigma_min, sigma_max)
    w = _ramp(n)
    return append_zero(torch.tan(w * math.atan(sigma_min) + (1.0 - w) * math.atan(sigma_max)))


def linear_quadratic_fractions(n: int, threshold_noise: float = 0.025, linear_steps: int | None = None) -> list[float]:
    """ComfyUI's ``linear_quadratic`` (from Mochi) as fractions of sigma_max: (n + 1,) from 1 down to 0.

    The noise fraction ``1 - f`` rises linearly over the first ``linear_steps`` (default ``n // 2``) steps to
    ``threshold_noise``, then along the quadratic that continues it with a matching slope and reaches 1 at step n.
    """
    if n < 1:
        raise ValueError(f"number of steps n must be >= 1, got {n}.")
    if n == 1:
        return [1.0, 0.0]
    linear = n // 2 if linear_steps is None else linear_steps
    if not 1 <= linear < n:
        raise ValueError(f"linear_steps must be in 1..{n - 1} for {n} steps, got {linear}.")
    quadratic = n - linear
    gap = linear - threshold_noise * n
    quadratic_coef = gap / (linear * quadratic**2)
    linear_coef = threshold_noise / linear - 2 * gap / quadratic**2
    const = quadratic_coef * linear**2
    rising = [i * threshold_noise / linear for i in range(linear)]
    rising += [quadratic_coef * i**2 + linear_coef * i + const for i in range(linear, n)]
    return [1.0 - f for f in [*rising, 1.0]]


def get_sigmas_linear_quadratic(n: int, schedule: DiscreteSchedule) -> torch.Tensor:
    """ComfyUI's ``linear_quadratic``: :func:`linear_quadratic_fractions` times the model's sigma_max.
    Returns (n + 1,) float64 on the CPU."""
    return torch.tensor(linear_quadratic_fractions(n), dtype=torch.float64) * schedule.sigma_max


# Align Your Steps (Sabour et al. 2024): NVIDIA's published 10-step sigmas for Stable Diffusion 1.5 and SDXL. The last
# value is the models' smallest noise level (timestep 0), where a run ends.
AYS_TABLES = {
    "ays_sd15": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),
    "ays_sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029),
}


def loglinear_interp(values: torch.Tensor, num: int) -> torch.Tensor:
    """``num`` values along the decreasing ``values``, piecewise linear in ``log(value)`` over an even grid: the
    authors' recipe for step counts other than the table's. values: (K,) -> (num,) float64."""
    log_values = values.to(torch.float64).log()
    position = torch.linspace(0, len(values) - 1, num, dtype=torch.float64)
    low = position.floor().long().clamp(max=len(values) - 2)
    w = position - low
    return ((1 - w) * log_values[low] + w * log_values[low + 1]).exp()


def get_sigmas_ays(n: int, table: str = "ays_sd15") -> torch.Tensor:
    """Align Your Steps: the published 10-step table, log-linearly interpolated to n + 1 points for other n; the last
    point (the models' smallest noise level) becomes 0, as ComfyUI and diffusers' ``AysSchedules`` do, so the run
    ends at the clean sample. At n = 10 this is the table itself. Returns (n + 1,) float64 on the CPU.

    The tables are for models with the SD noise schedule (sigma 0.029 .. 14.6); other models' samplers take them as
    they are.
    """
    if n < 1:
        raise ValueError(f"number of steps n must be >= 1, got {n}.")
    if table not in AYS_TABLES:
        raise ValueError(f"unknown Align Your Steps table '{table}'; use one of {', '.join(AYS_TABLES)}.")
    sigmas = torch.tensor(AYS_TABLES[table], dtype=torch.float64)
    if n + 1 != len(sigmas):
        sigmas = loglinear_interp(sigmas, n + 1)
    sigmas[-1] = 0.0
    return sigmas


# -- rules that pick noise levels of the model's table --


def _table_sigmas(schedule: DiscreteSchedule, timesteps: list[float]) -> torch.Tensor:
    """The model's sigmas at ``timesteps`` (descending; fractional ones interpolated), then 0: (len + 1,)."""
    return append_zero(torch.tensor([schedule.t_to_sigma(t) for t in timesteps], dtype=torch.float64))


def get_sigmas_discrete(n: int, schedule: DiscreteSchedule) -> torch.Tensor:
    """The "normal" schedule (A1111's "Normal" and "Uniform", ComfyUI's ``normal``): the model's own sigmas at ``n``
    evenly spaced (fractional) timesteps from the last to 0. Returns (n + 1,) float64 on the CPU."""
    check_schedule_args(n, schedule.sigma_min, schedule.sigma_max)
    return _table_sigmas(schedule, torch.linspace(schedule.num_timesteps - 1, 0, n, dtype=torch.float64).tolist())


def get_sigmas_sgm_uniform(n: int, schedule: DiscreteSchedule) -> torch.Tensor:
    """SGM uniform (Stability's sgm code, A1111's "SGM Uniform", ComfyUI's ``sgm_uniform``): the model's sigmas at
    the first n of n + 1 evenly spaced timesteps from the last to 0, then sigma 0 where timestep 0 would be.
    Returns (n + 1,) float64 on the CPU."""
    check_schedule_args(n, schedule.sigma_min, schedule.sigma_max)
    ts = torch.linspace(schedule.num_timesteps - 1, 0, n + 1, dtype=torch.float64)[:-1]
    return _table_sigmas(schedule, ts.tolist())


def get_sigmas_simple(n: int, schedule: DiscreteSchedule) -> torch.Tensor:
    """ComfyUI's and A1111's "simple": every ``T / n``-th sigma of the table from the top, ``T - 1 - int(i * T / n)``
    in the same float arithmetic, for ``i < n``. Returns (n + 1,) float64 on the CPU."""
    total = schedule.num_timesteps
    check_schedule_args(n, schedule.sigma_min, schedule.sigma_max)
    if n > total:
        raise ValueError(f"the simple schedule has at most {total} steps (one per timestep), got {n}.")
    stride = total / n
    return _table_sigmas(schedule, [float(total - 1 - int(i * stride)) for i in range(n)])


BETA_ALPHA = BETA_BETA = 0.6
"""The Beta(0.6, 0.6) distribution of Lee et al. 2024 ("Beta Sampling is All You Need"), ComfyUI's and A1111's
default."""


@lru_cache(maxsize=32)
def beta_timesteps(n: int, num_timesteps: int, alpha: float = BETA_ALPHA, beta: float = BETA_BETA) -> tuple[int, ...]:
    """The beta schedule's distinct integer timesteps, descending: ``round(ppf(1 - i / n) * (T - 1))`` for ``i < n``
    with the Beta(alpha, beta) quantile ``ppf``. Cached: the quantiles cost a bisection each."""
    # i * (1 / n), not i / n: the same floats as numpy's linspace(0, 1, n, endpoint=False) in ComfyUI.
    q = 1.0 - torch.arange(n, dtype=torch.float64) * (1.0 / n)
    timesteps = [int(t) for t in torch.round(beta_ppf(q, alpha, beta) * (num_timesteps - 1)).tolist()]
    return tuple(t for i, t in enumerate(timesteps) if i == 0 or t != timesteps[i - 1])


def get_sigmas_beta(
    n: int, schedule: DiscreteSchedule, alpha: float = BETA_ALPHA, beta: float = BETA_BETA
) -> torch.Tensor:
    """The beta schedule (ComfyUI's and A1111's "beta"): the model's sigmas at :func:`beta_timesteps`, then 0; the
    run is dense at both of its ends.

    As those two, a timestep that rounding repeats is visited once, so with many steps (above 138 of 1000 timesteps
    at the default shape) the run has fewer than n steps. Returns (<= n + 1,) float64 on the CPU.
    """
    check_schedule_args(n, schedule.sigma_min, schedule.sigma_max)
    return _table_sigmas(schedule, [float(t) for t in beta_timesteps(n, schedule.num_timesteps, alpha, beta)])


TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")


def spaced_timesteps(spacing: str, n: int, num_timesteps: int) -> list[int]:
    """diffusers' ``timestep_spacing`` (Lin et al. 2023, Table 2): the ``n`` integer timesteps, descending.

    ``linspace``: ``round(linspace(0, T - 1, n))``; ``leading``: ``i * (T // n)`` for ``i < n`` (diffusers'
    default ``steps_offset = 0``; SD's configs set 1, which is CompVis's ``ddim`` grid); ``trailing``:
    ``round(T - i * T / n) - 1``, which starts at the last timestep. (For one step, ``linspace`` is timestep 0
    alone, as in diffusers.)
    """
    if not 1 <= n <= num_timesteps:
        raise ValueError(f"number of steps n must be in 1..{num_timesteps}, got {n}.")
    if spacing == "linspace":
        if n == 1:
            return [0]
        step = (num_timesteps - 1) / (n - 1)
        return [num_timesteps - 1] + [round(i * step) for i in reversed(range(n - 1))]
    if spacing == "leading":
        return [i * (num_timesteps // n) for i in reversed(range(n))]
    if spacing == "trailing":
        return [round(num_timesteps - i * (num_timesteps / n)) - 1 for i in range(n)]
    raise ValueError(f"unknown timestep spacing '{spacing}'; use one of {', '.join(TIMESTEP_SPACINGS)}.")


def get_sigmas_spaced(n: int, schedule: DiscreteSchedule, spacing: str) -> torch.Tensor:
    """The model's sigmas at diffusers' spaced timesteps (:func:`spaced_timesteps`), then 0: (n + 1,) float64."""
    return _table_sigmas(schedule, [float(t) for t in spaced_timesteps(spacing, n, schedule.num_timesteps)])
