"""Which sampler step each model call of a run belongs to, for conditioning that changes per step (A1111's prompt
editing; :class:`~ldm.models.diffusion.guidance.StepConditioning`).

A sampler reports each step ``i`` (``callback({"i": ...})``) right after the step's first model call; any further
calls of the step (Heun's correction at the next step's noise level, DPM2's midpoint, PLMS's Heun first step) come
after that report, before the next step's first call. Which calls those are is a property of the sampler's loop, not
of the noise levels (Heun's correction and Euler's next step are the same call), so :func:`trace_call_steps` learns it
from a dry run of the loop with a stand-in denoiser, and :class:`CallSteps` hands the steps out call by call. A
sampler whose calls depend on the model's values (DPM adaptive), or whose own steps are not the grid's (DPM fast),
gets :class:`StepGrid`, by noise level instead.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ldm.models.diffusion.noise import Noise

StepOf = Callable[[float], int]
"""``step_of(t) -> step``: the 0-based step of the model call now being made at timestep ``t``."""


class StepGrid:
    """Steps by timestep: step i covers ``(t_{i+1}, t_i]`` of the run's grid, so a call at a step's own timestep is
    that step's, one between two grid points the step above it, one above the top step 0.

    Args:
        timesteps: the timestep of each step's start, decreasing.
        offset: the number of the first step.
    """

    def __init__(self, timesteps: Sequence[float], offset: int = 0) -> None:
        self._negated = [-float(t) for t in timesteps]
        self.offset = offset

    def __call__(self, t: float) -> int:
        return self.offset + max(bisect.bisect_right(self._negated, -float(t)) - 1, 0)


class CallSteps:
    """Steps by call order: the k-th model call of the run belongs to step ``steps[k] + offset`` (calls beyond the
    table, which a run with the same loop never makes, to its last step)."""

    def __init__(self, steps: Sequence[int], offset: int = 0) -> None:
        self.steps = tuple(int(s) + offset for s in steps) or (offset,)
        self.calls = 0

    def __call__(self, t: float) -> int:
        step = self.steps[min(self.calls, len(self.steps) - 1)]
        self.calls += 1
        return step


def trace_call_steps(loop: Callable[..., torch.Tensor], sigmas: torch.Tensor, options: Mapping[str, Any]) -> list[int]:
    """The step of each model call a sampler ``loop`` makes over ``sigmas`` with ``options``, in call order.

    A dry run on a (1, 1, 1, 1) zero latent with a denoiser that answers zeros, and noise from a generator of its
    own (the run's noise and torch's global generator are untouched). The last call before step i's report is step
    i's first; the calls between two reports are the earlier step's; calls before the first report, none in any
    sampler here, would be step 0's.
    """
    steps: list[int | None] = []
    reported = [0]

    def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
        steps.append(None)
        return torch.zeros_like(x)

    def report(step: dict[str, Any]) -> None:
        pending = [k for k, s in enumerate(steps) if s is None]
        for k in pending[:-1]:
            steps[k] = reported[0]
        if pending:
            steps[pending[-1]] = step["i"]
        reported[0] = step["i"]

    x = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
    loop(denoise, x, sigmas, noise=Noise([0]), callback=report, progress=False, **options)
    return [reported[0] if s is None else s for s in steps]


def step_clock(
    loop: Callable[..., torch.Tensor],
    fixed_steps: bool,
    sigmas: torch.Tensor,
    options: Mapping[str, Any],
    offset: int,
    timestep: Callable[[float], float],
) -> StepOf:
    """The step of each model call of a run of ``loop`` over ``sigmas`` (float64, the steps it runs) with
    ``options``, numbered from ``offset``: by call order (:func:`trace_call_steps`) for a loop with ``fixed_steps``
    whose steps are those of ``sigmas``; else by noise level, with ``timestep(sigma)`` the timestep the model sees
    (DPM adaptive, and DPM fast, whose own steps of up to three calls are fewer).
    """
    if fixed_steps:
        steps = trace_call_steps(loop, sigmas, options)
        if steps and max(steps) == len(sigmas) - 2:
            return CallSteps(steps, offset)
    return StepGrid([timestep(float(s)) for s in sigmas[:-1]], offset)
