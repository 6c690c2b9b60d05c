"""Seeded Gaussian noise with one generator per sample, so a batch never changes an image.

Image ``i`` of a batch made with seeds ``[s, s+1, ...]`` equals a single-image run with seed ``s + i``: each sample
draws from its own generator, in the same order, whatever the batch size. Generators run on the CPU (the same
numbers on every device); the result is copied to the target device.
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


class Noise:
    """Per-sample seeded normal noise.

    Args:
        seeds: one seed per sample of the batch.
        device: where the noise is delivered.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu") -> None:
        if len(seeds) == 0:
            raise ValueError("Noise needs at least one seed (one per sample).")
        self.seeds = [check_seed(int(s)) for s in seeds]
        self.device = torch.device(device)
        self.generators = [torch.Generator("cpu").manual_seed(s) for s in self.seeds]

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
        return torch.stack(rows).to(device=self.device, dtype=dtype, non_blocking=True)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        """Noise shaped like ``x`` (B, ...), on ``x``'s device and in its dtype."""
        noise = self.randn(x.shape, dtype=x.dtype)
        return noise if noise.device == x.device else noise.to(x.device)
