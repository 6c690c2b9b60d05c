"""The DPT decoder's pieces: the 3x3 convolutions that bring the four maps to one width (``scratch.layerN_rn``),
the fusion blocks that merge them coarse to fine (``refinenetN``) and a fixed-factor resize for the head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Interpolate(nn.Module):
    """Resize (B, C, H, W) by ``scale_factor`` with ``mode`` (no parameters)."""

    def __init__(self, scale_factor: float, mode: str, align_corners: bool = False) -> None:
        super().__init__()
        self.scale_factor, self.mode, self.align_corners = scale_factor, mode, align_corners

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=self.scale_factor, mode=self.mode, align_corners=self.align_corners)


class ResidualConvUnit_custom(nn.Module):  # noqa: N801 (MiDaS's name)
    """x + conv2(act(bn1(conv1(act(x))))) with 3x3 convolutions (and batch norms with ``bn``); (B, C, H, W) kept."""

    def __init__(self, features: int, activation: nn.Module, bn: bool) -> None:
        super().__init__()
        self.bn = bn
        self.conv1 = nn.Conv2d(features, features, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(features, features, kernel_size=3, padding=1)
        if bn:
            self.bn1, self.bn2 = nn.BatchNorm2d(features), nn.BatchNorm2d(features)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.activation(x))
        out = self.bn1(out) if self.bn else out
        out = self.conv2(self.activation(out))
        out = self.bn2(out) if self.bn else out
        return out + x


class FeatureFusionBlock_custom(nn.Module):  # noqa: N801 (MiDaS's name)
    """One fusion step: the coarser path (B, C, h, w), plus a residual unit of the skip map of the same size when
    given, through a second residual unit, upsampled x2 (bilinear) and mixed by a 1x1 convolution
    -> (B, C or C/2 with ``expand``, 2h, 2w)."""

    def __init__(
        self,
        features: int,
        activation: nn.Module,
        bn: bool = False,
        expand: bool = False,
        align_corners: bool = True,
    ) -> None:
        super().__init__()
        self.align_corners = align_corners
        self.out_conv = nn.Conv2d(features, features // 2 if expand else features, kernel_size=1)
        self.resConfUnit1 = ResidualConvUnit_custom(features, activation, bn)
        self.resConfUnit2 = ResidualConvUnit_custom(features, activation, bn)

    def forward(self, path: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            path = path + self.resConfUnit1(skip)
        path = self.resConfUnit2(path)
        path = F.interpolate(path, scale_factor=2, mode="bilinear", align_corners=self.align_corners)
        return self.out_conv(path)


class ResidualConvUnit(nn.Module):
    """MidasNet's residual unit: relu(x) + conv2(relu(conv1(relu(x)))), 3x3 convolutions; (B, C, H, W) kept.

    The residual is relu(x), not x: MiDaS's in-place ReLU overwrote its input before the sum, and its weights were
    trained so.
    """

    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(features, features, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(x)
        return self.conv2(F.relu(self.conv1(x))) + x


class FeatureFusionBlock(nn.Module):
    """MidasNet's fusion step: the coarser path (B, C, h, w), plus a residual unit of the skip map when given,
    through a second residual unit, upsampled x2 (bilinear, align_corners True) -> (B, C, 2h, 2w)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(self, path: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            path = path + self.resConfUnit1(skip)
        return F.interpolate(self.resConfUnit2(path), scale_factor=2, mode="bilinear", align_corners=True)


def make_scratch(in_shape: tuple[int, ...], features: int, expand: bool = False) -> nn.Module:
    """``scratch`` with ``layer1_rn`` .. ``layer4_rn``: 3x3 convolutions (no bias) from each map's channels to
    ``features`` (with ``expand``: features times 1, 2, 4, 8); the fusion blocks and head are added by the network."""
    scratch = nn.Module()
    for i, channels in enumerate(in_shape):
        width = features * 2**i if expand else features
        scratch.add_module(f"layer{i + 1}_rn", nn.Conv2d(channels, width, kernel_size=3, padding=1, bias=False))
    return scratch


def fuse(scratch: nn.Module, maps: list[torch.Tensor]) -> torch.Tensor:
    """The decoder's common path: the four maps (finest first) through ``layerN_rn`` and fused coarse to fine by
    ``refinenet4`` .. ``refinenet1`` -> the finest path (B, C, H/2, W/2)."""
    layers = [getattr(scratch, f"layer{i}_rn")(m) for i, m in enumerate(maps, start=1)]
    path = scratch.refinenet4(layers[3])
    path = scratch.refinenet3(path, layers[2])
    path = scratch.refinenet2(path, layers[1])
    return scratch.refinenet1(path, layers[0])
