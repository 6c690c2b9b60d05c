"""``SpatialRescaler``: the conditioning stage of LDM's image-to-image models (semantic synthesis, super-resolution).

It resizes a conditioning map to the latent's size and, optionally, maps its channels with a 1x1 convolution, so the
result can be concatenated to the UNet's input (``conditioning_key: concat``). The configs and checkpoints name it
``ldm.modules.encoders.modules.SpatialRescaler``; its only weights are ``channel_mapper.*``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldm.errors import UserError

METHODS = ("nearest", "linear", "bilinear", "trilinear", "bicubic", "area")


class SpatialRescaler(nn.Module):
    """Rescale a map ``n_stages`` times by ``multiplier`` (0.5: halve its sides each time), then map its channels.

    Args:
        n_stages: how many times to rescale (0: not at all).
        method: the ``torch.nn.functional.interpolate`` mode, one of :data:`METHODS`.
        multiplier: the scale factor of each stage.
        in_channels: channels of the input map (182 for COCO-Stuff segmentations).
        out_channels: channels after the 1x1 convolution ``channel_mapper``; None keeps the input's (no weights).
        bias: whether ``channel_mapper`` has a bias.
    """

    def __init__(
        self,
        n_stages: int = 1,
        method: str = "bilinear",
        multiplier: float = 0.5,
        in_channels: int = 3,
        out_channels: int | None = None,
        bias: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(n_stages, bool) or not isinstance(n_stages, int) or n_stages < 0:
            raise UserError(f"SpatialRescaler n_stages must be an integer >= 0, got {n_stages!r}.")
        if method not in METHODS:
            raise UserError(f"SpatialRescaler method must be one of {', '.join(METHODS)}, got {method!r}.")
        self.n_stages = n_stages
        self.method = method
        self.multiplier = multiplier
        self.remap_output = out_channels is not None
        if self.remap_output:
            self.channel_mapper = nn.Conv2d(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_channels, H, W) -> (B, out_channels or in_channels, H * m**n, W * m**n)."""
        for _ in range(self.n_stages):
            x = F.interpolate(x, scale_factor=self.multiplier, mode=self.method)
        return self.channel_mapper(x) if self.remap_output else x

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The same as :meth:`forward` (LatentDiffusion encodes conditioning through ``encode``)."""
        return self(x)
