"""Seeded Gaussian noise with one generator per sample, so a batch never changes an image.

Image ``i`` of a batch made with seeds ``[s, s+1, ...]`` equals a single-image run with seed ``s + i``: each sample
draws from its own generator, in the same order, whatever the batch size. Generators run on the CPU (the same
numbers on every device); the result is copied to the target device.

Variation seeds (A1111's ``subseed`` / ``subseed_strength``): the first draw, the starting noise, is each sample's
seed noise slerped toward the noise of its subseed (:func:`slerp`); later draws (ancestral samplers' noise) come from
the seed's generator, as in A1111, so strength 1 gives the subseed's image exactly for deterministic samplers only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ldm.errors import UserError

# torch.Generator.manual_seed takes 0..2**64 - 1; it would also take negative seeds down to -2**63, but as their
# two's complement (-1 is 2**64 - 1), so two seeds would name one image.
MAX_SEED = 2**64 - 1


def check_seed(seed: int, what: str = "seed") -> int:
    """``seed`` if it is an integer in 0..MAX_SEED, else ValueError naming ``what`` and the range."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise UserError(f"{what} {seed!r} is out of range: seeds are integers in 0..{MAX_SEED} (2**64 - 1).")
    return seed


def check_subseed_strength(strength: float) -> float:
    """``strength`` if it is a number in [0, 1], else UserError."""
    if isinstance(strength, bool) or not isinstance(strength, int | float) or not 0.0 <= strength <= 1.0:
        raise UserError(f"subseed_strength must be a number in [0, 1] (0 = the seed's image), got {strength!r}.")
    return float(strength)


def slerp(t: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of one sample's noise (C, H, W) toward ``high`` by ``t`` in [0, 1], A1111's way.

    As A1111's ``slerp`` (written for batched (B, C) rows, called on one (C, H, W) sample), the angle is taken over
    dim 1, so every (channel, column) pair is interpolated along its column of H values; where the two are nearly
    parallel (mean cosine > 0.9995) it is a linear interpolation. ``t = 0`` gives ``low`` and ``t = 1`` ``high``
    exactly.
    """
    if t == 0.0:
        return low
    if t == 1.0:
        return high
    cos = (low / low.norm(dim=1, keepdim=True) * (high / high.norm(dim=1, keepdim=True))).sum(1)
    if cos.mean() > 0.9995:
        return low * (1.0 - t) + high * t
    omega = torch.acos(cos)
    sin = torch.sin(omega)
    return (torch.sin((1.0 - t) * omega) / sin).unsqueeze(1) * low + (torch.sin(t * omega) / sin).unsqueeze(1) * high


class Noise:
    """Per-sample seeded normal noise.

    Args:
        seeds: one seed per sample of the batch.
        device: where the noise is delivered.
        subseeds, subseed_strength: variation seeds, one per sample; the first draw is slerped toward their noise
            by ``subseed_strength`` (see the module docstring). None or strength 0: off.
    """

    def __init__(
        self,
        seeds: Sequence[int],
        device: torch.device | str = "cpu",
        subseeds: Sequence[int] | None = None,
        subseed_strength: float = 0.0,
    ) -> None:
        if len(seeds) == 0:
            raise ValueError("Noise needs at least one seed (one per sample).")
        self.seeds = [check_seed(int(s)) for s in seeds]
        self.device = torch.device(device)
        self.generators = [torch.Generator("cpu").manual_seed(s) for s in self.seeds]
        self.subseed_strength = check_subseed_strength(subseed_strength)
        self.subseeds = [check_seed(int(s), "subseed") for s in subseeds] if subseeds is not None else None
        if self.subseeds is not None and len(self.subseeds) != len(self.seeds):
            raise ValueError(f"got {len(self.subseeds)} subseeds for {len(self.seeds)} seeds; give one each.")
        # The first draw is the starting noise, the one variation seeds change.
        self._vary_next = self.subseeds is not None and self.subseed_strength > 0.0

    @classmethod
    def from_seed(cls, seed: int | None, batch_size: int, device: torch.device | str = "cpu") -> Noise:
        """Seeds ``seed, seed+1, ...`` for the batch; ``seed=None`` draws one from torch's global generator."""
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, ()).item())
        return cls([seed + i for i in range(batch_size)], device)

    def __len__(self) -> int:
        return len(self.seeds)

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Noise of ``shape`` = (B, ...) with B equal to the number of seeds; row i from generator i."""
        if shape[0] != len(self.generators):
            raise ValueError(f"noise for a batch of {shape[0]} requested from {len(self.generators)} seeds.")
        rows = [torch.randn(tuple(shape[1:]), generator=g, dtype=torch.float32) for g in self.generators]
        if self._vary_next:
            self._vary_next = False
            rows = [
                slerp(
                    self.subseed_strength, row, torch.randn(row.shape, generator=torch.Generator("cpu").manual_seed(s))
                )
                for row, s in zip(rows, self.subseeds, strict=True)
            ]
        return torch.stack(rows).to(device=self.device, dtype=dtype, non_blocking=True)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        """Noise shaped like ``x`` (B, ...), on ``x``'s device and in its dtype."""
        noise = self.randn(x.shape, dtype=x.dtype)
        return noise if noise.device == x.device else noise.to(x.device)
