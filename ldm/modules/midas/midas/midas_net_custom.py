"""``MidasNet_small``: MiDaS v2.1 small (``midas_v21_small``), an EfficientNet-Lite3 encoder and a light decoder,
at Stability's path ``ldm.modules.midas.midas.midas_net_custom``.

The encoder is timm's ``tf_efficientnet_lite3`` (the architecture of the gen-efficientnet hub model MiDaS used),
built without weights.
"""

from __future__ import annotations

import torch
from torch import nn

from ldm.modules.midas.midas.base_model import BaseModel
from ldm.modules.midas.midas.blocks import FeatureFusionBlock_custom, Interpolate, fuse, make_scratch
from ldm.modules.midas.midas.midas_net import encode
from ldm.util import ConfigError

EFFICIENTNET_CHANNELS = (32, 48, 136, 384)


def efficientnet_encoder() -> nn.Module:
    """MiDaS's ``pretrained``: ``layer1`` = stem (conv_stem, bn1, its activation) + blocks 0-1, ``layer2`` = block 2,
    ``layer3`` = blocks 3-4, ``layer4`` = blocks 5-6; maps at 1/4 .. 1/32 with :data:`EFFICIENTNET_CHANNELS`."""
    import timm

    net = timm.create_model("tf_efficientnet_lite3", pretrained=False, exportable=True)
    encoder = nn.Module()
    # timm folds the stem's activation into bn1; the Identity keeps the blocks at gen-efficientnet's indices.
    encoder.layer1 = nn.Sequential(net.conv_stem, net.bn1, nn.Identity(), *net.blocks[0:2])
    encoder.layer2 = nn.Sequential(*net.blocks[2:3])
    encoder.layer3 = nn.Sequential(*net.blocks[3:5])
    encoder.layer4 = nn.Sequential(*net.blocks[5:9])
    return encoder


class MidasNet_small(BaseModel):  # noqa: N801 (MiDaS's name)
    """image (B, 3, H, W), sides multiples of 32, ImageNet-normalised -> relative inverse depth (B, H, W).

    ``blocks={"expand": True}`` widens the decoder towards the coarse maps (features x 1, 2, 4, 8), as MiDaS's.
    """

    def __init__(
        self,
        path: str | None = None,
        features: int = 64,
        backbone: str = "efficientnet_lite3",
        non_negative: bool = True,
        exportable: bool = True,
        channels_last: bool = False,
        align_corners: bool = True,
        blocks: dict | None = None,
    ) -> None:
        super().__init__()
        if backbone != "efficientnet_lite3":
            raise ConfigError(f"MidasNet_small backbone '{backbone}' is not available; use efficientnet_lite3.")
        self.channels_last = channels_last
        expand = bool((blocks or {"expand": True}).get("expand", False))
        self.pretrained = efficientnet_encoder()
        self.scratch = make_scratch(EFFICIENTNET_CHANNELS, features, expand=expand)
        self.scratch.activation = nn.ReLU(False)
        for i in range(1, 5):
            width = features * 2 ** (i - 1) if expand else features
            block = FeatureFusionBlock_custom(width, self.scratch.activation, expand=expand and i > 1,
                                              align_corners=align_corners)  # fmt: skip
            self.scratch.add_module(f"refinenet{i}", block)
        self.scratch.output_conv = nn.Sequential(
            nn.Conv2d(features, features // 2, kernel_size=3, padding=1),
            Interpolate(scale_factor=2, mode="bilinear"),
            nn.Conv2d(features // 2, 32, kernel_size=3, padding=1),
            self.scratch.activation,
            nn.Conv2d(32, 1, kernel_size=1),
            nn.ReLU(True) if non_negative else nn.Identity(),
            nn.Identity(),
        )
        if path:
            self.load(path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.scratch.output_conv(fuse(self.scratch, encode(self.pretrained, x))).squeeze(1)
