"""How every sampler calls the model: classifier-free guidance, eps/x0/v conversion, and the sigma view.

Samplers never call the UNet directly: every sampler calls a :class:`Denoiser`, ``D(x, sigma)`` with
``x = x0 + sigma * eps``, which calls :class:`GuidedEps`, the guided eps-prediction ``eps(x_t, t)``, which calls
``model.apply_model`` once per evaluation, with the unconditional and conditional halves in one batch.
Conditioning may change over the steps and compose several sub-prompts per image (:class:`StepConditioning`,
A1111's prompt editing and ``AND``): :mod:`~ldm.models.diffusion.step_clock` says which step each call is of.
The schedule is a CPU table, and step arguments are Python floats, so a sampling loop makes no host-device syncs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ldm.errors import UserError
from ldm.models.diffusion.schedules import DiscreteSchedule


def output_to_eps(output: torch.Tensor, x_t: torch.Tensor, alpha_cumprod: float, parameterization: str) -> torch.Tensor:
    """Convert a model output (eps, x0 or v prediction) at ``x_t`` with ``alpha_cumprod`` to an eps prediction."""
    if parameterization == "eps":
        return output
    a, b = math.sqrt(alpha_cumprod), math.sqrt(1.0 - alpha_cumprod)
    if parameterization == "v":
        return a * output + b * x_t
    if parameterization == "x0":
        return (x_t - a * output) / b
    raise ValueError(f"unknown parameterization '{parameterization}'; expected eps, x0 or v.")


def _batch_conditionings(uncond: Any, cond: Any) -> Any | None:
    """``uncond`` and ``cond`` stacked along the batch, or None when they cannot be (e.g. different lengths)."""
    if isinstance(cond, torch.Tensor) and isinstance(uncond, torch.Tensor):
        return torch.cat([uncond, cond]) if uncond.shape[1:] == cond.shape[1:] else None
    if isinstance(cond, Mapping) and isinstance(uncond, Mapping) and cond.keys() == uncond.keys():
        out = {}
        for key in cond:
            out[key] = _batch_conditionings(uncond[key], cond[key])
            if out[key] is None:
                return None
        return out
    if isinstance(cond, list | tuple) and isinstance(uncond, list | tuple) and len(cond) == len(uncond):
        out = [_batch_conditionings(u, c) for u, c in zip(uncond, cond, strict=True)]
        return None if any(o is None for o in out) else out
    return None


def select_rows(conditioning: Any, rows: torch.Tensor) -> Any:
    """Rows ``rows`` (a (M,) long tensor) of a batched conditioning: a tensor (N, ...), or a dict / list of them."""
    if isinstance(conditioning, torch.Tensor):
        return conditioning.index_select(0, rows.to(conditioning.device))
    if isinstance(conditioning, Mapping):
        return {key: select_rows(value, rows) for key, value in conditioning.items()}
    if isinstance(conditioning, list | tuple):
        return [select_rows(value, rows) for value in conditioning]
    raise TypeError(f"cannot take rows of a {type(conditioning).__name__} conditioning.")


@dataclass(frozen=True)
class StepConditioning:
    """Conditioning that changes over a run's steps and may guide an image with several weighted rows (A1111's
    prompt editing, alternation and composable ``AND``; :func:`ldm.prompt_schedule.encode_scheduled` builds it).

    Attributes:
        table: the conditioning of N distinct texts, batch first: (N, L, D), or a dict / list of such (SDXL's).
        rows: per step, the table rows of the batch at that step (M each); steps past the end use the last.
        owners: per batch row, the image (0..B-1) it guides; the rows of one image are adjacent.
        weights: per batch row, its ``AND`` weight.
        extend: applied to each step's rows before the model sees them, e.g. to add every row's ControlNet images
            (:meth:`ldm.control.ControlRun.conditioning`); None leaves them as they are.
    """

    table: Any
    rows: tuple[tuple[int, ...], ...]
    owners: tuple[int, ...]
    weights: tuple[float, ...]
    extend: Callable[[Any], Any] | None = None
    _cache: dict[tuple[int, ...], Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def simple(self) -> bool:
        """One row of weight 1 per image: guided as a plain conditioning."""
        return self.owners == tuple(range(len(self.owners))) and all(w == 1.0 for w in self.weights)

    def at(self, step: int) -> Any:
        """The batch's conditioning (M rows) at 0-based ``step``; each distinct row set is gathered once."""
        rows = self.rows[min(max(step, 0), len(self.rows) - 1)]
        if rows not in self._cache:
            selected = select_rows(self.table, torch.tensor(rows, dtype=torch.long))
            self._cache[rows] = selected if self.extend is None else self.extend(selected)
        return self._cache[rows]


def check_guidance_rescale(phi: float) -> float:
    """``phi`` as a float, or a ValueError unless it lies in [0, 1]."""
    phi = float(phi)
    if not 0.0 <= phi <= 1.0:
        raise UserError(f"guidance_rescale must be in [0, 1] (0 = off; Lin et al. 2023 suggest 0.7), got {phi}.")
    return phi


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2023, section 3.4; diffusers' ``guidance_rescale``): ``guided`` scaled so that
    each sample's std is that of the conditional output ``cond``, mixed ``phi : 1 - phi`` with ``guided`` itself.
    Counters the over-exposure strong guidance gives. guided, cond: (B, ...) -> (B, ...)."""
    dims = tuple(range(1, guided.dim()))
    std_guided = guided.std(dim=dims, keepdim=True)
    # A constant guided output has no spread to rescale; it stays as it is.
    ratio = torch.where(std_guided > 0, cond.std(dim=dims, keepdim=True) / std_guided, torch.ones_like(std_guided))
    return guided * (phi * ratio + (1.0 - phi))


def keep_known(x: torch.Tensor, known: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` with its ``mask`` 1 region replaced by ``known`` (CompVis's convention: 1 = keep). The one place that
    blends the known region of an inpainting run, during sampling and after it. x, known: (B, C, h, w); mask
    broadcasts, typically (B or 1, 1, h, w)."""
    return known * mask + (1.0 - mask) * x


class GuidedEps:
    """Classifier-free guided eps-prediction ``eps(x_t, t)`` of a diffusion model.

    ``eps = eps_u + scale * (eps_c - eps_u)`` with one batched ``apply_model`` call over ``[uncond, cond]``. Without
    ``uncond`` (or with ``scale == 1``) only the conditional branch runs. ``uncond`` may be any conditioning of the
    model's kind, which is how negative prompts work.

    Args:
        model: a ``DDPM``/``LatentDiffusion`` (uses ``apply_model``, ``alphas_cumprod``, ``parameterization``).
        cond: conditioning for ``apply_model`` (e.g. (B, 77, D), or a dict for hybrid/inpainting models), or a
            :class:`StepConditioning` (per step, and with ``AND`` several weighted rows per image: composable
            guidance ``eps_u + sum_i w_i * scale * (eps_i - eps_u)``, all rows in the one batched call).
        uncond: the unconditional (or negative) conditioning, same kind as ``cond`` (or a StepConditioning).
        scale: guidance scale; 1 means no guidance.
        guidance_rescale: :func:`rescale_guidance`'s ``phi`` in [0, 1] (0, the default, is off), applied to the guided
            model output (eps, or v for v-models) as diffusers does.
    """

    def __init__(
        self, model: Any, cond: Any = None, uncond: Any = None, scale: float = 1.0, guidance_rescale: float = 0.0
    ) -> None:
        self.guidance_rescale = check_guidance_rescale(guidance_rescale)
        self.model = model
        self.cond = cond
        self.uncond = uncond
        self.scale = float(scale)
        self.parameterization = getattr(model, "parameterization", "eps")
        self.schedule = DiscreteSchedule(model.alphas_cumprod)
        self.scheduled = isinstance(cond, StepConditioning) or isinstance(uncond, StepConditioning)
        # Sub-prompts composed with weights (AND): the unconditional branch is always needed.
        self.composed = isinstance(cond, StepConditioning) and not cond.simple
        self.step_of: Callable[[float], int] | None = None
        plain = uncond is not None and not self.scheduled
        self.batched = _batch_conditionings(uncond, cond) if plain else None

    def count_steps(self, step_of: Callable[[float], int]) -> None:
        """Map model calls to steps with ``step_of(t) -> step`` (:mod:`~ldm.models.diffusion.step_clock`; the
        sampler front end sets it once it knows the run)."""
        self.step_of = step_of

    def _conditionings(self, t: float) -> tuple[Any, Any]:
        """(uncond, cond) at timestep ``t``: the step's rows of scheduled conditionings."""
        if not self.scheduled:
            return self.uncond, self.cond
        step = self.step_of(t) if self.step_of is not None else 0
        pick = [c.at(step) if isinstance(c, StepConditioning) else c for c in (self.uncond, self.cond)]
        return pick[0], pick[1]

    def _branches(self, x_t: torch.Tensor, t: float, with_uncond: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Raw (unconditional or None, conditional) outputs at ``x_t``: (B, C, H, W) and timestep ``t``, which reaches
        ``apply_model`` as a (B,) torch.long tensor when it is an integer and as floats otherwise."""
        if float(t).is_integer():
            # As CompVis's samplers pass them: models and wrappers index their schedule tables with t.
            ts = torch.full((x_t.shape[0],), int(t), device=x_t.device, dtype=torch.long)
        else:
            # float32, unless the whole computation is float64 (analytic tests need the exact fractional t).
            dtype = torch.promote_types(x_t.dtype, torch.float32)
            ts = torch.full((x_t.shape[0],), float(t), device=x_t.device, dtype=dtype)
        if self.scheduled:
            return self._scheduled_branches(x_t, ts, t, with_uncond or self.composed)
        if self.uncond is None or not with_uncond:
            return None, self.model.apply_model(x_t, ts, self.cond)
        if self.batched is not None:
            out_u, out_c = self.model.apply_model(torch.cat([x_t, x_t]), torch.cat([ts, ts]), self.batched).chunk(2)
        else:
            out_u = self.model.apply_model(x_t, ts, self.uncond)
            out_c = self.model.apply_model(x_t, ts, self.cond)
        return out_u, out_c

    def _scheduled_branches(
        self, x_t: torch.Tensor, ts: torch.Tensor, t: float, with_uncond: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """:meth:`_branches` for :class:`StepConditioning`: the step's rows, uncond (B) and every cond row (M) in
        one ``apply_model`` call where they batch. Returns (B, ...) or None, and (M, ...)."""
        uncond, cond = self._conditionings(t)
        if self.composed:
            owners = torch.tensor(self.cond.owners, device=x_t.device)
            x_c, ts_c = x_t.index_select(0, owners), ts.index_select(0, owners)
        else:
            x_c, ts_c = x_t, ts
        if uncond is None or not with_uncond:
            return None, self.model.apply_model(x_c, ts_c, cond)
        batched = _batch_conditionings(uncond, cond)
        if batched is None:
            return self.model.apply_model(x_t, ts, uncond), self.model.apply_model(x_c, ts_c, cond)
        out = self.model.apply_model(torch.cat([x_t, x_c]), torch.cat([ts, ts_c]), batched)
        return out[: len(x_t)], out[len(x_t) :]

    def _guide(self, out_u: torch.Tensor | None, out_c: torch.Tensor) -> torch.Tensor:
        if out_u is None:
            return out_c
        if self.composed:
            # Composable diffusion (A1111's): uncond + sum_i w_i * scale * (cond_i - uncond) over each image's rows.
            owners = torch.tensor(self.cond.owners, device=out_c.device)
            weights = torch.tensor(self.cond.weights, device=out_c.device, dtype=out_c.dtype)
            delta = (out_c - out_u.index_select(0, owners)) * weights.reshape(-1, *[1] * (out_c.dim() - 1))
            composed = out_u.index_add(0, owners, delta)  # the conditional estimate guidance rescale aims at
            guided = out_u.index_add(0, owners, delta * self.scale)
            return rescale_guidance(guided, composed, self.guidance_rescale) if self.guidance_rescale else guided
        guided = out_u + self.scale * (out_c - out_u)
        return rescale_guidance(guided, out_c, self.guidance_rescale) if self.guidance_rescale else guided

    def model_output(self, x_t: torch.Tensor, t: float) -> torch.Tensor:
        """The guided raw model output (eps, x0 or v) at ``x_t``: (B, C, H, W) and timestep ``t`` (see
        :meth:`_branches`). At scale 1 the unconditional branch is skipped: the guided output is the conditional."""
        return self._guide(*self._branches(x_t, t, self.scale != 1.0))

    def __call__(self, x_t: torch.Tensor, t: float, alpha_cumprod: float | None = None) -> torch.Tensor:
        """eps prediction at ``x_t``: (B, C, H, W), timestep ``t`` (fractional allowed); ``alpha_cumprod`` at ``t``."""
        if alpha_cumprod is None:
            alpha_cumprod = self.schedule.alpha_cumprod(t)
        return output_to_eps(self.model_output(x_t, t), x_t, alpha_cumprod, self.parameterization)

    def with_uncond(
        self, x_t: torch.Tensor, t: float, alpha_cumprod: float | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(guided eps, unconditional eps), both (B, C, H, W), from the same single batched model call.

        CFG++ samplers step with the guided estimate but renoise with the unconditional one, so they need it at
        scale 1 too, where :meth:`__call__` skips it. Without ``uncond`` both are the conditional eps.
        """
        if alpha_cumprod is None:
            alpha_cumprod = self.schedule.alpha_cumprod(t)
        out_u, out_c = self._branches(x_t, t, True)
        eps = output_to_eps(self._guide(out_u, out_c), x_t, alpha_cumprod, self.parameterization)
        if out_u is None:
            return eps, eps
        return eps, output_to_eps(out_u, x_t, alpha_cumprod, self.parameterization)


class Denoiser:
    """The k-diffusion view of a discrete-time model: ``D(x, sigma)`` estimates x0 from ``x = x0 + sigma * eps``.

    ``x`` is the model's ``x_t`` divided by ``sqrt(alpha_cumprod)``; the model sees ``x_t`` at the (possibly
    fractional) timestep whose sigma this is, or at ``timestep(sigma)`` where a solver defines its own time (DPM-Solver
    interpolates the schedule in another variable). With ``mask`` and ``x0`` (mask 1 = keep ``x0``, as in CompVis),
    the known region of the estimate is replaced by ``x0``, which inpaints with any sampler.
    """

    def __init__(
        self,
        eps: GuidedEps,
        mask: torch.Tensor | None = None,
        x0: torch.Tensor | None = None,
        timestep: Callable[[float], float] | None = None,
    ) -> None:
        if (mask is None) != (x0 is None):
            raise ValueError("inpainting needs both mask and x0 (the known latent).")
        self.eps = eps
        self.schedule = eps.schedule
        self.mask = mask
        self.x0 = x0
        self.timestep = timestep if timestep is not None else self.schedule.sigma_to_t

    @property
    def sigma_min(self) -> float:
        return self.schedule.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.schedule.sigma_max

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """x: (B, C, H, W) at noise level ``sigma`` (a Python float) -> denoised (B, C, H, W)."""
        sigma = float(sigma)
        alpha_cumprod = 1.0 / (1.0 + sigma**2)
        eps = self.eps(x * math.sqrt(alpha_cumprod), self.timestep(sigma), alpha_cumprod)
        return self._keep_known(x - sigma * eps)

    def with_uncond(self, x: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, C, H, W) -> (denoised, uncond_denoised), both (B, C, H, W), from one batched model call.

        The guided estimate and the unconditional one (see :meth:`GuidedEps.with_uncond`); without ``uncond``
        they are equal.
        """
        sigma = float(sigma)
        alpha_cumprod = 1.0 / (1.0 + sigma**2)
        eps, eps_u = self.eps.with_uncond(x * math.sqrt(alpha_cumprod), self.timestep(sigma), alpha_cumprod)
        return self._keep_known(x - sigma * eps), self._keep_known(x - sigma * eps_u)

    def _keep_known(self, denoised: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            return denoised
        return keep_known(denoised, self.x0, self.mask)
