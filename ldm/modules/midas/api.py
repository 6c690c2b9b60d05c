"""``MiDaSInference``: the frozen depth estimator of SD 2 depth-to-image, and the input transform MiDaS expects.

    midas = MiDaSInference("dpt_hybrid")                # the SD 2 depth model's; weights come from its checkpoint
    depth = midas(prepare_midas_input(image, "dpt_hybrid"))  # image (B, 3, H, W) in [-1, 1] -> (B, 1, h, w)

The transform is MiDaS's (``Resize`` keeping the aspect ratio to sides that are multiples of 32 near 384, bicubic,
then normalised), done on tensors: ``prepare_midas_input`` gives what Stability's ``AddMiDaS`` puts under the batch
key ``midas_in``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.midas.midas.dpt_depth import DPTDepthModel
from ldm.modules.midas.midas.midas_net import MidasNet
from ldm.modules.midas.midas.midas_net_custom import MidasNet_small
from ldm.util import ConfigError

MULTIPLE = 32  # DPT's coarsest map is 1/32 of the input


@dataclass(frozen=True)
class MiDaSTransform:
    """How a model type's input is made: resized (keeping the aspect ratio) near ``size`` by ``resize_method``
    ("minimal": scaled as little as possible, "upper_bound": at most ``size``), then ``(x - mean) / std`` on
    [0, 1] pixels."""

    size: int
    resize_method: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
TRANSFORMS = {
    "dpt_large": MiDaSTransform(384, "minimal", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "dpt_hybrid": MiDaSTransform(384, "minimal", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "midas_v21": MiDaSTransform(384, "upper_bound", *IMAGENET),
    "midas_v21_small": MiDaSTransform(256, "upper_bound", *IMAGENET),
}
MODEL_TYPES = tuple(TRANSFORMS)
# The DPT backbone of each DPT model type.
DPT_BACKBONES = {"dpt_large": "vitl16_384", "dpt_hybrid": "vitb_rn50_384"}


def check_model_type(model_type: str) -> None:
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"MiDaS model_type '{model_type}' is not one of {', '.join(MODEL_TYPES)}.")


def _to_multiple(x: float, max_val: int | None = None) -> int:
    """x rounded to a multiple of 32 (half to even, as numpy), down instead if that exceeds ``max_val``; at least 32
    (MiDaS itself would give 0 for images under 16 pixels)."""
    y = round(x / MULTIPLE) * MULTIPLE
    if max_val is not None and y > max_val:
        y = math.floor(x / MULTIPLE) * MULTIPLE
    return max(MULTIPLE, y)


def midas_input_size(height: int, width: int, model_type: str = "dpt_hybrid") -> tuple[int, int]:
    """The (height, width) MiDaS resizes a (height, width) image to for ``model_type``: one scale for both sides
    (the one nearer 1 for "minimal", the smaller for "upper_bound"), each side then a multiple of 32."""
    check_model_type(model_type)
    transform = TRANSFORMS[model_type]
    scale_h, scale_w = transform.size / height, transform.size / width
    if transform.resize_method == "minimal":
        scale = scale_w if abs(1 - scale_w) < abs(1 - scale_h) else scale_h
        return _to_multiple(scale * height), _to_multiple(scale * width)
    scale = min(scale_h, scale_w)
    return _to_multiple(scale * height, transform.size), _to_multiple(scale * width, transform.size)


def prepare_midas_input(image: torch.Tensor, model_type: str = "dpt_hybrid") -> torch.Tensor:
    """image (B, 3, H, W) in [-1, 1] -> MiDaS's input (B, 3, h, w), float32: resized bicubically (align_corners
    False, as cv2's INTER_CUBIC) to :func:`midas_input_size` and normalised as the model type expects."""
    size = midas_input_size(image.shape[-2], image.shape[-1], model_type)
    transform = TRANSFORMS[model_type]
    pixels = (image.float() + 1.0) / 2.0
    if tuple(pixels.shape[-2:]) != size:
        pixels = F.interpolate(pixels, size=size, mode="bicubic", align_corners=False)
    mean = pixels.new_tensor(transform.mean).view(1, 3, 1, 1)
    std = pixels.new_tensor(transform.std).view(1, 3, 1, 1)
    return (pixels - mean) / std


class MiDaSInference(nn.Module):
    """A MiDaS depth estimator, built without weights (the SD depth checkpoint holds them under ``depth_model.``).

    ``model_type``: "dpt_hybrid" (SD 2 depth's), "dpt_large", "midas_v21" (ResNeXt-101 MidasNet) or
    "midas_v21_small" (EfficientNet-Lite3 MidasNet_small). ``path``: a MiDaS weights file to load (e.g. to
    fine-tune a depth model from an ordinary SD checkpoint). For the DPTs, ``dpt`` keyword arguments go to
    :class:`DPTDepthModel` (``features``, ``vit`` overrides ...): a reduced-width network for tests.

    forward: MiDaS input (B, 3, H, W) from :func:`prepare_midas_input` -> relative inverse depth (B, 1, H, W),
    larger = nearer; no gradients.
    """

    def __init__(self, model_type: str, path: str | None = None, **dpt: Any) -> None:
        super().__init__()
        check_model_type(model_type)
        if dpt and model_type not in DPT_BACKBONES:
            raise ConfigError(f"MiDaS settings {sorted(dpt)} are for the DPT model types, not '{model_type}'.")
        self.model_type = model_type
        if model_type == "midas_v21":
            self.model = MidasNet(path, non_negative=True)
        elif model_type == "midas_v21_small":
            self.model = MidasNet_small(path, features=64, backbone="efficientnet_lite3", exportable=True,
                                        non_negative=True, blocks={"expand": True})  # fmt: skip
        else:
            self.model = DPTDepthModel(path, backbone=DPT_BACKBONES[model_type], non_negative=True, **dpt)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        prediction = self.model(x).unsqueeze(1)
        if prediction.shape[-2:] != x.shape[-2:]:
            prediction = F.interpolate(prediction, size=x.shape[-2:], mode="bicubic", align_corners=False)
        return prediction
