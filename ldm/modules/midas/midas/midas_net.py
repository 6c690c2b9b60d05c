"""``MidasNet``: MiDaS v2.1 (``midas_v21``), a ResNeXt-101 32x8d encoder and a RefineNet-style decoder predicting
relative inverse depth, at Stability's path ``ldm.modules.midas.midas.midas_net``.

The encoder is torchvision's ``resnext101_32x8d`` (the architecture of the WSL-Images hub model MiDaS used), built
without weights.
"""

from __future__ import annotations

import torch
from torch import nn

from ldm.modules.midas.midas.base_model import BaseModel
from ldm.modules.midas.midas.blocks import FeatureFusionBlock, Interpolate, fuse, make_scratch

RESNEXT_CHANNELS = (256, 512, 1024, 2048)


def resnext_encoder() -> nn.Module:
    """MiDaS's ``pretrained``: ``layer1`` = stem (conv1, bn1, relu, maxpool) + layer1, then ``layer2`` .. ``layer4``;
    maps at 1/4 .. 1/32 of the input with :data:`RESNEXT_CHANNELS` channels."""
    from torchvision.models import resnext101_32x8d

    resnet = resnext101_32x8d(weights=None)
    encoder = nn.Module()
    encoder.layer1 = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool, resnet.layer1)
    encoder.layer2, encoder.layer3, encoder.layer4 = resnet.layer2, resnet.layer3, resnet.layer4
    return encoder


def encode(encoder: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The four maps of an encoder with ``layer1`` .. ``layer4`` run one after the other."""
    maps = []
    for i in range(1, 5):
        x = getattr(encoder, f"layer{i}")(x)
        maps.append(x)
    return maps


class MidasNet(BaseModel):
    """image (B, 3, H, W), sides multiples of 32, ImageNet-normalised -> relative inverse depth (B, H, W).

    ``path``: a MiDaS weights file to load strictly (SD checkpoints would carry the weights themselves).
    """

    def __init__(self, path: str | None = None, features: int = 256, non_negative: bool = True) -> None:
        super().__init__()
        self.pretrained = resnext_encoder()
        self.scratch = make_scratch(RESNEXT_CHANNELS, features)
        for i in range(1, 5):
            self.scratch.add_module(f"refinenet{i}", FeatureFusionBlock(features))
        self.scratch.output_conv = nn.Sequential(
            nn.Conv2d(features, 128, kernel_size=3, padding=1),
            Interpolate(scale_factor=2, mode="bilinear"),
            nn.Conv2d(128, 32, kernel_size=3, padding=1),
            nn.ReLU(True),
            nn.Conv2d(32, 1, kernel_size=1),
            nn.ReLU(True) if non_negative else nn.Identity(),
        )
        if path:
            self.load(path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scratch.output_conv(fuse(self.scratch, encode(self.pretrained, x))).squeeze(1)
