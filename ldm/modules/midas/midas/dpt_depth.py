"""``DPTDepthModel``: MiDaS's DPT (Ranftl et al. 2021), a ViT encoder and a convolutional decoder predicting
relative inverse depth (larger = nearer), at Stability's path ``ldm.modules.midas.midas.dpt_depth``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ldm.modules.midas.midas.base_model import BaseModel
from ldm.modules.midas.midas.blocks import FeatureFusionBlock_custom, Interpolate, fuse, make_scratch
from ldm.modules.midas.midas.vit import DPTEncoder, backbone_spec


class DPT(BaseModel):
    """Encoder (``pretrained``: four maps at 1/4 .. 1/32 scale) and decoder (``scratch``: each map to ``features``
    channels, fused coarse to fine by ``refinenet4`` .. ``refinenet1``, then ``output_conv`` = ``head``).

    ``backbone`` names the encoder's numbers (:data:`~ldm.modules.midas.midas.vit.BACKBONES`); ``vit`` overrides
    some of them (BackboneSpec fields), which builds a reduced-width network with the same code.
    """

    def __init__(
        self,
        head: nn.Module,
        features: int = 256,
        backbone: str = "vitb_rn50_384",
        readout: str = "project",
        channels_last: bool = False,
        use_bn: bool = False,
        vit: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.channels_last = channels_last
        spec = backbone_spec(backbone, vit)
        self.pretrained = DPTEncoder(spec, readout)
        self.scratch = make_scratch(spec.features, features)
        for i in range(1, 5):
            # MiDaS shares one non-inplace ReLU between the residual units of a block; ReLU has no state.
            block = FeatureFusionBlock_custom(features, nn.ReLU(False), bn=use_bn, align_corners=True)
            self.scratch.add_module(f"refinenet{i}", block)
        self.scratch.output_conv = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W), sides multiples of 32 -> the head's output (B, C, H, W)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.scratch.output_conv(fuse(self.scratch, self.pretrained(x)))


class DPTDepthModel(DPT):
    """DPT with MiDaS's depth head: image (B, 3, H, W), sides multiples of 32, normalised to [-1, 1]
    -> relative inverse depth (B, H, W), non-negative with ``non_negative``.

    ``path``: a MiDaS weights file (e.g. ``dpt_hybrid-midas-501f0c75.pt``) to load strictly; SD depth checkpoints
    carry these weights themselves (``depth_model.model.*``), so the SD configs give none.
    """

    def __init__(self, path: str | None = None, non_negative: bool = True, **kwargs: Any) -> None:
        features = kwargs.get("features", 256)
        head = nn.Sequential(
            nn.Conv2d(features, features // 2, kernel_size=3, padding=1),
            Interpolate(scale_factor=2, mode="bilinear", align_corners=True),
            nn.Conv2d(features // 2, 32, kernel_size=3, padding=1),
            nn.ReLU(True),
            nn.Conv2d(32, 1, kernel_size=1),
            nn.ReLU(True) if non_negative else nn.Identity(),
            nn.Identity(),
        )
        super().__init__(head, **kwargs)
        if path is not None:
            self.load(path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).squeeze(1)
