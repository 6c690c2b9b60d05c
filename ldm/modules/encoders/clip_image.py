"""CLIP image encoders: the image embedding an unCLIP model (SD 2.1 stable-unclip) is conditioned on.

``FrozenOpenCLIPImageEmbedder`` (OpenCLIP ViT-H/14, stable-unclip-h) and ``ClipImageEmbedder`` (OpenAI CLIP
ViT-L/14, stable-unclip-l) map images in [-1, 1] to CLIP's pooled, projected image embedding. Both are built with
open_clip from its bundled architecture configs, never downloaded: the weights come from the checkpoint
(``embedder.model.*``). Module paths (``ldm.modules.encoders.modules``), arguments and state-dict keys are
Stability's; preprocessing is the original's (kornia's antialiased bicubic resize to 224, CLIP normalisation).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.encoders.base import AbstractEncoder
from ldm.util import ConfigError

# CLIP's image normalisation (OpenAI's, which OpenCLIP's ViT-H/14 kept).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# OpenAI's model names (the ``clip`` package's) and the open_clip architecture with the same layers and keys; OpenAI
# trained with QuickGELU, which open_clip's plain configs replace by GELU, so it is forced on.
OPENAI_ARCHS = {
    "ViT-B/32": "ViT-B-32",
    "ViT-B/16": "ViT-B-16",
    "ViT-L/14": "ViT-L-14",
    "ViT-L/14@336px": "ViT-L-14-336",
}


def _gaussian_kernel(size: int, sigma: float, like: torch.Tensor) -> torch.Tensor:
    x = torch.arange(size, dtype=like.dtype, device=like.device) - size // 2
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    return kernel / kernel.sum()


def antialiased_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """x: (B, C, H, W) -> (B, C, *size), as ``kornia.geometry.resize(x, size, "bicubic", align_corners=True,
    antialias=True)``, which the originals' embedders use.

    When shrinking, a Gaussian blur (sigma ``(factor - 1) / 2``, kernel about 4 sigma, odd, reflect padding) comes
    before bicubic interpolation with aligned corners; a size equal to the input's returns it unchanged.
    """
    height, width = x.shape[-2:]
    if (height, width) == tuple(size):
        return x
    factors = (height / size[0], width / size[1])
    if max(factors) > 1:
        sigmas = [max((f - 1.0) / 2.0, 0.001) for f in factors]
        sizes = [max(int(4.0 * s), 3) for s in sigmas]
        sizes = [k + 1 if k % 2 == 0 else k for k in sizes]
        ky, kx = (_gaussian_kernel(k, s, x) for k, s in zip(sizes, sigmas, strict=True))
        channels = x.shape[1]
        # Separable: along the width, then along the height, each channel on its own.
        x = F.pad(x, ((sizes[1] - 1) // 2, sizes[1] // 2, 0, 0), mode="reflect")
        x = F.conv2d(x, kx.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
        x = F.pad(x, (0, 0, (sizes[0] - 1) // 2, sizes[0] // 2), mode="reflect")
        x = F.conv2d(x, ky.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)
    return F.interpolate(x, size=tuple(size), mode="bicubic", align_corners=True)


def build_open_clip(arch: str, quick_gelu: bool, model_cfg: Mapping[str, Any] | None) -> nn.Module:
    """An open_clip ``CLIP`` of architecture ``arch`` (its bundled config) with random weights, built where tensors
    are made now (a ``torch.device("meta")`` block, or the checkpoint loader's empty parameters, cost no memory).

    This is what ``open_clip.create_model(arch, pretrained=None)`` builds, without its move to a device (which meta
    parameters cannot make). ``model_cfg`` overrides the arch's config: ``embed_dim``, and ``vision_cfg`` /
    ``text_cfg`` fields (merged into the arch's), for small models.
    """
    base = open_clip.get_model_config(arch)
    if base is None:
        raise ConfigError(f"unknown open_clip architecture {arch!r}; e.g. 'ViT-H-14' or 'ViT-L-14'.")
    if base.get("custom_text") or "timm_model_name" in base.get("vision_cfg", {}):
        raise ConfigError(
            f"open_clip architecture {arch!r} does not have CLIP's key layout; use a ViT such as ViT-H-14."
        )
    config = {**base, **dict(model_cfg or {})}
    for tower in ("vision_cfg", "text_cfg"):
        config[tower] = {**base[tower], **dict(config[tower])}
    config["quick_gelu"] = quick_gelu or bool(base.get("quick_gelu", False))
    return open_clip.CLIP(**config)


class _CLIPImageEncoder(AbstractEncoder):
    """What both image embedders share: preprocessing, the pooled image embedding, embedding dropout."""

    model: nn.Module

    def _finish(self, antialias: bool, ucg_rate: float) -> None:
        if not 0.0 <= ucg_rate <= 1.0:
            raise ConfigError(f"ucg_rate must be in [0, 1], got {ucg_rate}.")
        self.antialias = antialias
        self.ucg_rate = ucg_rate
        self.register_buffer("mean", torch.tensor(CLIP_MEAN), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD), persistent=False)

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return size[0] if isinstance(size, tuple | list) else int(size)

    @property
    def embedding_dim(self) -> int:
        """The width of the embedding (the projection's output: 1024 for ViT-H/14, 768 for ViT-L/14)."""
        return self.model.visual.proj.shape[1]

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) in [-1, 1] -> (B, 3, S, S) CLIP input (S = 224): resized (antialiased bicubic when
        ``antialias``, the original's kornia resize), mapped to [0, 1], normalised with CLIP's mean and std."""
        side = (self.image_size, self.image_size)
        if self.antialias:
            x = antialiased_resize(x, side)
        elif tuple(x.shape[-2:]) != side:
            x = F.interpolate(x, size=side, mode="bicubic", align_corners=True)
        x = (x + 1.0) / 2.0
        mean, std = (t.to(x.dtype)[None, :, None, None] for t in (self.mean, self.std))
        return (x - mean) / std

    def forward(self, image: torch.Tensor, no_dropout: bool = False) -> torch.Tensor:
        """image: (B, 3, H, W) in [-1, 1] -> (B, embedding_dim), on the image's device and in its dtype.

        In training mode (unless ``no_dropout``) each sample's embedding is zeroed with probability ``ucg_rate``
        (the original also did it in eval mode; here sampling stays deterministic).
        """
        weight = self.model.visual.conv1.weight
        z = self.model.visual(self.preprocess(image.to(weight.device, weight.dtype))).to(image.device, image.dtype)
        if self.training and self.ucg_rate > 0 and not no_dropout:
            keep = torch.bernoulli(torch.full((z.shape[0], 1), 1.0 - self.ucg_rate, device=z.device))
            z = z * keep.to(z.dtype)
        return z

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return self(image)


class FrozenOpenCLIPImageEmbedder(_CLIPImageEncoder):
    """The image tower of an OpenCLIP model (ViT-H/14 by default), pooled and projected: (B, 1024) for ViT-H.

    As in the original, the CLIP model is built whole and only its text transformer removed, so the state dict keeps
    the text tower's embeddings, ``ln_final``, ``text_projection`` and ``logit_scale`` (the checkpoint has them).

    Args:
        arch: open_clip architecture name.
        version: the original's pretrained tag; ignored (nothing is downloaded, the weights are the checkpoint's).
        device: where to move the module after construction; None leaves it where it is built.
        max_length: kept for config compatibility (the text tower is not run).
        freeze: eval mode, no gradients.
        layer: ``"pooled"`` (the only layer the original implements).
        antialias: blur before shrinking to 224, as the original's kornia resize.
        ucg_rate: probability of zeroing a sample's embedding in training.
        model_cfg: open_clip config overrides (``embed_dim``, ``vision_cfg``, ``text_cfg``), for small models.
    """

    def __init__(
        self,
        arch: str = "ViT-H-14",
        version: str | None = None,
        device: str | torch.device | None = None,
        max_length: int = 77,
        freeze: bool = True,
        layer: str = "pooled",
        antialias: bool = True,
        ucg_rate: float = 0.0,
        model_cfg: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if layer != "pooled":
            raise ConfigError(f"layer must be 'pooled' (the pooled image embedding), got {layer!r}.")
        model = build_open_clip(arch, quick_gelu=False, model_cfg=model_cfg)
        del model.transformer
        self.model = model
        self.max_length = max_length
        self.layer = layer
        self._finish(antialias, ucg_rate)
        self.place(device, freeze)


class ClipImageEmbedder(_CLIPImageEncoder):
    """OpenAI CLIP (ViT-L/14 by default) as an image encoder: (B, 768) pooled, projected embeddings for ViT-L/14.

    The original loads OpenAI's ``clip`` package model, text tower included; open_clip's ``CLIP`` with QuickGELU has
    the same modules under the same names, so the state dict (``embedder.model.*``) is OpenAI's key for key.

    Args:
        model: OpenAI's model name (``ViT-L/14``, ``ViT-B/32``, ``ViT-B/16``, ``ViT-L/14@336px``).
        jit: the original's choice of OpenAI's TorchScript file; there is no file here, so it has no effect.
        device: where to move the module after construction; None leaves it where it is built.
        antialias: blur before shrinking to the model's input size, as the original's kornia resize.
        ucg_rate: probability of zeroing a sample's embedding in training.
        model_cfg: open_clip config overrides (``embed_dim``, ``vision_cfg``, ``text_cfg``), for small models.
    """

    def __init__(
        self,
        model: str = "ViT-L/14",
        jit: bool = False,
        device: str | torch.device | None = None,
        antialias: bool = True,
        ucg_rate: float = 0.0,
        model_cfg: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if model not in OPENAI_ARCHS:
            raise ConfigError(f"model must be one of OpenAI's CLIP ViTs {', '.join(OPENAI_ARCHS)}, got {model!r}.")
        self.model = build_open_clip(OPENAI_ARCHS[model], quick_gelu=True, model_cfg=model_cfg)
        self._finish(antialias, ucg_rate)
        # The original's model is frozen by being loaded for inference; it is never trained with the diffusion model.
        self.place(device, freeze=True)
