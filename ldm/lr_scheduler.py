"""Learning-rate schedules for ``scheduler_config``: callables ``step -> multiplier`` for ``torch.optim.LambdaLR``.

The model's optimizer runs at ``learning_rate`` times the value these return at each optimizer step, so the
``f_*`` schedules are factors (SD configs use ``f_max: [1.0]``) while :class:`LambdaWarmUpCosineScheduler` returns
``lr_*`` values that multiply a base rate of 1.0. Constructor arguments are the CompVis ones, as YAML configs name them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ldm.errors import UserError


class LambdaWarmUpCosineScheduler:
    """Linear warm-up from ``lr_start`` to ``lr_max`` over ``warm_up_steps``, then half a cosine down to ``lr_min``
    at ``max_decay_steps``, constant after that."""

    def __init__(
        self,
        warm_up_steps: int,
        lr_min: float,
        lr_max: float,
        lr_start: float,
        max_decay_steps: int,
        verbosity_interval: int = 0,
    ) -> None:
        if max_decay_steps <= warm_up_steps:
            raise UserError(f"max_decay_steps ({max_decay_steps}) must exceed warm_up_steps ({warm_up_steps}).")
        self.lr_warm_up_steps = warm_up_steps
        self.lr_start = lr_start
        self.lr_min = lr_min
        self.lr_max = lr_max
        self.lr_max_decay_steps = max_decay_steps
        self.verbosity_interval = verbosity_interval
        self.last_lr = 0.0

    def schedule(self, n: int, **kwargs: object) -> float:
        """The multiplier at optimizer step ``n`` (0-based)."""
        if n < self.lr_warm_up_steps:
            lr = self.lr_start + (self.lr_max - self.lr_start) * n / self.lr_warm_up_steps
        else:
            t = min((n - self.lr_warm_up_steps) / (self.lr_max_decay_steps - self.lr_warm_up_steps), 1.0)
            lr = self.lr_min + 0.5 * (self.lr_max - self.lr_min) * (1.0 + math.cos(t * math.pi))
        self.last_lr = lr
        if self.verbosity_interval > 0 and n % self.verbosity_interval == 0:
            print(f"current step: {n}, recent lr-multiplier: {lr}")
        return lr

    def __call__(self, n: int, **kwargs: object) -> float:
        return self.schedule(n, **kwargs)


class LambdaWarmUpCosineScheduler2:
    """Repeated cycles, cycle ``i`` lasting ``cycle_lengths[i]`` steps: a linear warm-up from ``f_start[i]`` to
    ``f_max[i]`` over ``warm_up_steps[i]`` steps, then half a cosine down to ``f_min[i]`` at the cycle's end.

    All arguments but ``verbosity_interval`` are lists with one entry per cycle. A cycle covers steps
    ``(start, start + length]`` of the run (step 0 belongs to the first). Past the last cycle the multiplier stays
    at its final value.
    """

    def __init__(
        self,
        warm_up_steps: Sequence[int],
        f_min: Sequence[float],
        f_max: Sequence[float],
        f_start: Sequence[float],
        cycle_lengths: Sequence[int],
        verbosity_interval: int = 0,
    ) -> None:
        lists = {"warm_up_steps": warm_up_steps, "f_min": f_min, "f_max": f_max, "f_start": f_start}
        for name, value in lists.items():
            if len(value) != len(cycle_lengths):
                raise UserError(
                    f"{name} has {len(value)} entries but cycle_lengths has {len(cycle_lengths)}: give one per cycle."
                )
        self.lr_warm_up_steps = [int(s) for s in warm_up_steps]
        self.f_start = [float(f) for f in f_start]
        self.f_min = [float(f) for f in f_min]
        self.f_max = [float(f) for f in f_max]
        self.cycle_lengths = [int(c) for c in cycle_lengths]
        self.cum_cycles = [0]
        for length in self.cycle_lengths:
            self.cum_cycles.append(self.cum_cycles[-1] + length)
        self.last_f = 0.0
        self.verbosity_interval = verbosity_interval

    def find_in_interval(self, n: int) -> int:
        """Index of the cycle holding step ``n``; the last cycle for steps past the end."""
        for cycle, end in enumerate(self.cum_cycles[1:]):
            if n <= end:
                return cycle
        return len(self.cycle_lengths) - 1

    def _position(self, n: int) -> tuple[int, int]:
        cycle = self.find_in_interval(n)
        return cycle, min(n - self.cum_cycles[cycle], self.cycle_lengths[cycle])

    def _after_warm_up(self, cycle: int, n: int) -> float:
        t = min((n - self.lr_warm_up_steps[cycle]) / (self.cycle_lengths[cycle] - self.lr_warm_up_steps[cycle]), 1.0)
        return self.f_min[cycle] + 0.5 * (self.f_max[cycle] - self.f_min[cycle]) * (1.0 + math.cos(t * math.pi))

    def schedule(self, n: int, **kwargs: object) -> float:
        """The multiplier at optimizer step ``n`` (0-based)."""
        cycle, n_in_cycle = self._position(n)
        if n_in_cycle < self.lr_warm_up_steps[cycle]:
            span = self.f_max[cycle] - self.f_start[cycle]
            f = self.f_start[cycle] + span * n_in_cycle / self.lr_warm_up_steps[cycle]
        else:
            f = self._after_warm_up(cycle, n_in_cycle)
        self.last_f = f
        if self.verbosity_interval > 0 and n % self.verbosity_interval == 0:
            print(f"current step: {n}, recent lr-multiplier: {f}, current cycle {cycle}")
        return f

    def __call__(self, n: int, **kwargs: object) -> float:
        return self.schedule(n, **kwargs)


class LambdaLinearScheduler(LambdaWarmUpCosineScheduler2):
    """As :class:`LambdaWarmUpCosineScheduler2`, but after the warm-up each cycle goes linearly from ``f_max`` (at
    the cycle's start) to ``f_min`` (at its end). SD's configs use one endless cycle with ``f_min = f_max = 1``:
    a plain linear warm-up to a constant rate.
    """

    def _after_warm_up(self, cycle: int, n: int) -> float:
        length = self.cycle_lengths[cycle]
        return self.f_min[cycle] + (self.f_max[cycle] - self.f_min[cycle]) * (length - n) / length
