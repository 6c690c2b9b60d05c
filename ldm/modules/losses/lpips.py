"""LPIPS, the learned perceptual image distance (Zhang et al. 2018) on VGG16 features, in the CompVis layout.

Its weights (ImageNet VGG16 and the linear heads on its features) cannot be downloaded here, so they only come from
local files: :func:`load_lpips_weights`. The network is built untrained (torchvision's VGG16, ``weights=None``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torchvision.models.vgg import cfgs, make_layers

# VGG16 ``features`` indices where each LPIPS slice ends: after relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3.
SLICE_ENDS = (4, 9, 16, 23, 30)
CHANNELS = (64, 128, 256, 512, 512)
# Prefixes under which LPIPS weights are found in other files (a CompVis autoencoder checkpoint, DataParallel).
KNOWN_PREFIXES = ("loss.perceptual_loss.", "perceptual_loss.", "module.")


class ScalingLayer(nn.Module):
    """Maps images in [-1, 1] to the input statistics VGG16 was trained on (LPIPS's constants)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


class NetLinLayer(nn.Module):
    """A 1x1 convolution weighting one layer's squared feature differences; the dropout only keeps the key
    ``model.1.weight`` of the released weights (LPIPS runs in eval mode)."""

    def __init__(self, chn_in: int, chn_out: int = 1) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(chn_in, chn_out, kernel_size=1, bias=False))


class vgg16(nn.Module):  # noqa: N801 -- the CompVis class name, which shows in checkpoint keys as ``net.``.
    """torchvision's VGG16 convolutional stack cut into five slices. x: (B, 3, H, W) -> five feature maps.

    Each slice keeps torchvision's layer indices as names (``slice2.5.weight`` is ``features.5.weight``).
    """

    def __init__(self) -> None:
        super().__init__()
        features = make_layers(cfgs["D"])  # torchvision's VGG16 "features", without the classifier head
        start = 0
        for i, end in enumerate(SLICE_ENDS, start=1):
            block = nn.Sequential()
            for index in range(start, end):
                block.add_module(str(index), features[index])
            setattr(self, f"slice{i}", block)
            start = end

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for i in range(1, len(SLICE_ENDS) + 1):
            x = getattr(self, f"slice{i}")(x)
            outputs.append(x)
        return outputs


class LPIPS(nn.Module):
    """Perceptual distance between images in [-1, 1]: (B, 3, H, W), (B, 3, H, W) -> (B, 1, 1, 1).

    Always in eval mode and without gradients for its own weights: it is a fixed metric, not a trained part.
    ``weights`` (see :func:`load_lpips_weights`) loads the pretrained network; without it the distance is meaningless.
    """

    def __init__(self, weights: str | os.PathLike | Sequence[str | os.PathLike] | None = None) -> None:
        super().__init__()
        self.scaling_layer = ScalingLayer()
        self.net = vgg16()
        for i, channels in enumerate(CHANNELS):
            setattr(self, f"lin{i}", NetLinLayer(channels))
        self.requires_grad_(False)
        self.eval()
        if weights is not None:
            load_lpips_weights(self, weights)

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        features = self.net(torch.cat([self.scaling_layer(input), self.scaling_layer(target)]))
        distance = 0.0
        for i, feature in enumerate(features):
            a, b = _unit_normalize(feature).chunk(2)
            distance = distance + getattr(self, f"lin{i}").model((a - b) ** 2).mean(dim=(2, 3), keepdim=True)
        return distance


def _unit_normalize(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Scale each spatial position's feature vector to unit length. x: (B, C, H, W)."""
    return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


def _to_lpips_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename known layouts to LPIPS's: drop :data:`KNOWN_PREFIXES`, map torchvision ``features.N.*`` into the
    slices, and skip what LPIPS does not use (a VGG classifier head, other parts of an autoencoder checkpoint)."""
    slice_of = {}
    start = 0
    for i, end in enumerate(SLICE_ENDS, start=1):
        slice_of.update({index: i for index in range(start, end)})
        start = end
    out = {}
    for key, value in state_dict.items():
        for prefix in KNOWN_PREFIXES:
            key = key.removeprefix(prefix)
        match = re.fullmatch(r"features\.(\d+)\.(weight|bias)", key)
        if match and int(match[1]) in slice_of:
            key = f"net.slice{slice_of[int(match[1])]}.{match[1]}.{match[2]}"
        if re.match(r"(net\.slice\d|lin\d)\.", key):
            out[key] = value
    return out


def load_lpips_weights(lpips: LPIPS, paths: str | os.PathLike | Sequence[str | os.PathLike]) -> None:
    """Load pretrained LPIPS weights from local files into ``lpips``; every weight must be found.

    ``paths`` is one file or several (later files win on shared keys), each a ``.pth`` / ``.ckpt`` / ``.safetensors``
    state dict in any of these layouts: LPIPS's own (``net.slice1.0.weight``, ``lin0.model.1.weight``: the file the
    ``lpips`` / taming packages fetch holds the ``lin*`` part), torchvision's ImageNet VGG16 (``features.0.weight``),
    or a CompVis autoencoder checkpoint (``loss.perceptual_loss.*``).
    """
    from ldm.checkpoint import read_checkpoint

    paths = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    found: dict[str, torch.Tensor] = {}
    for path in paths:
        state_dict, _ = read_checkpoint(path)
        found.update(_to_lpips_keys(state_dict))
    needed = {k for k in lpips.state_dict() if not k.startswith("scaling_layer.")}
    missing = sorted(needed - found.keys())
    if missing:
        names = ", ".join(missing[:4]) + (" ..." if len(missing) > 4 else "")
        raise ValueError(
            f"perceptual_weights {[str(p) for p in paths]} lack {len(missing)} LPIPS weights ({names}). Give files "
            "holding both the VGG16 features and the LPIPS linear layers (lin0..lin4)."
        )
    lpips.load_state_dict({k: found[k] for k in needed}, strict=False)
