"""The DPT encoders: a ViT (or the R50 + ViT hybrid) read out at four depths and reassembled into image-like maps.

The transformer layers themselves are timm's (``VisionTransformer``, ``ResNetV2``, ``HybridEmbed``), built from the
architecture numbers in :data:`BACKBONES` and never with pretrained weights; the state-dict keys are then exactly
those of MiDaS's ``timm.create_model("vit_large_patch16_384")`` / ``("vit_base_resnet50_384")``. What DPT adds is
here: running the ViT at any size that is a multiple of its patch (the position embedding resized to the token
grid), the readout of the class token, and the reassembly of tokens into maps at 1/4, 1/8, 1/16 and 1/32 of the
input's size (:class:`Reassemble`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ldm.util import ConfigError

PATCH = 16  # every DPT backbone sees 16x16-pixel tokens
START_INDEX = 1  # tokens before the image patches: the class token


@dataclass(frozen=True)
class BackboneSpec:
    """A DPT backbone's architecture numbers.

    embed_dim, depth, num_heads: the ViT's. hooks: the four layers read out (ViT blocks; for a hybrid the first two
    are ResNet stages). features: the channels of the four reassembled maps. resnet_layers / resnet_channels /
    resnet_stem: the hybrid's ResNetV2 stages (None for a plain ViT). img_size: the size the position embedding
    was trained at (its grid is img_size / 16 on a side).
    """

    embed_dim: int
    depth: int
    num_heads: int
    hooks: tuple[int, int, int, int]
    features: tuple[int, int, int, int]
    resnet_layers: tuple[int, ...] | None = None
    resnet_channels: tuple[int, ...] = (256, 512, 1024)
    resnet_stem: int = 64
    img_size: int = 384

    @property
    def hybrid(self) -> bool:
        return self.resnet_layers is not None


# MiDaS's backbones (timm vit_large_patch16_384, vit_base_resnet50_384 and vit_base_patch16_384).
BACKBONES = {
    "vitl16_384": BackboneSpec(1024, 24, 16, (5, 11, 17, 23), (256, 512, 1024, 1024)),
    "vitb_rn50_384": BackboneSpec(768, 12, 12, (0, 1, 8, 11), (256, 512, 768, 768), resnet_layers=(3, 4, 9)),
    "vitb16_384": BackboneSpec(768, 12, 12, (2, 5, 8, 11), (96, 192, 384, 768)),
}


def backbone_spec(backbone: str, overrides: dict[str, Any] | None = None) -> BackboneSpec:
    """The numbers of ``backbone`` (a :data:`BACKBONES` name), with ``overrides`` (BackboneSpec fields) applied:
    a reduced-width network is the same code with smaller numbers."""
    if backbone not in BACKBONES:
        raise ConfigError(f"DPT backbone '{backbone}' is not one of {', '.join(BACKBONES)}.")
    overrides = dict(overrides or {})
    unknown = set(overrides) - {f.name for f in dataclasses.fields(BackboneSpec)}
    if unknown:
        raise ConfigError(f"unknown DPT backbone setting(s) {sorted(unknown)}; known: BackboneSpec's fields.")
    for key in ("hooks", "features", "resnet_layers", "resnet_channels"):
        if overrides.get(key) is not None:
            overrides[key] = tuple(overrides[key])
    spec = dataclasses.replace(BACKBONES[backbone], **overrides)
    if len(spec.hooks) != 4 or len(spec.features) != 4:
        raise ConfigError(f"a DPT backbone reads out 4 layers into 4 maps; got hooks {spec.hooks}, features "
                          f"{spec.features}.")  # fmt: skip
    if spec.hybrid and (len(spec.resnet_layers) != 3 or spec.features[:2] != spec.resnet_channels[:2]):
        raise ConfigError(
            "a hybrid DPT backbone has 3 ResNet stages whose first two outputs are the first two maps: "
            f"features[:2] must equal resnet_channels[:2], got {spec.features[:2]} and {spec.resnet_channels[:2]}."
        )
    return spec


def make_vit(spec: BackboneSpec) -> nn.Module:
    """The timm ViT (with its 1000-class head, as MiDaS's was built) of ``spec``, randomly initialised."""
    from timm.layers import HybridEmbed, StdConv2dSame
    from timm.models.resnetv2 import ResNetV2
    from timm.models.vision_transformer import VisionTransformer

    vit = partial(VisionTransformer, img_size=spec.img_size, embed_dim=spec.embed_dim, depth=spec.depth,
                  num_heads=spec.num_heads)  # fmt: skip
    if not spec.hybrid:
        return vit(patch_size=PATCH)
    resnet = ResNetV2(
        layers=spec.resnet_layers,
        channels=spec.resnet_channels,
        stem_chs=spec.resnet_stem,
        num_classes=0,
        global_pool="",
        preact=False,
        stem_type="same",
        conv_layer=partial(StdConv2dSame, eps=1e-8),
    )
    # With feature_size given HybridEmbed does not run the ResNet once to find it (which fails for weights on the
    # meta device); it then reads the width from num_features, as timm 1.0.31 cannot from a ResNetV2's feature_info.
    del resnet.feature_info
    embed = partial(HybridEmbed, backbone=resnet, feature_size=spec.img_size // PATCH)
    return vit(patch_size=1, embed_layer=embed)


def resize_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """pos_embed (1, 1 + g*g, C) for a g x g token grid -> (1, 1 + gh*gw, C): the grid part resized bilinearly
    (align_corners False), the class token's entry kept."""
    tokens, cells = pos_embed[:, :START_INDEX], pos_embed[0, START_INDEX:]
    side = int(round(cells.shape[0] ** 0.5))
    cells = cells.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    cells = F.interpolate(cells, size=grid, mode="bilinear", align_corners=False)
    return torch.cat([tokens, cells.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)], dim=1)


class ProjectReadout(nn.Module):
    """Tokens (B, 1 + N, C) -> (B, N, C): each patch token concatenated with the class token, projected back to C."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.project = nn.Sequential(nn.Linear(2 * in_features, in_features), nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = x[:, START_INDEX:]
        return self.project(torch.cat([patches, x[:, :1].expand_as(patches)], dim=-1))


class AddReadout(nn.Module):
    """Tokens (B, 1 + N, C) -> (B, N, C): the class token added to each patch token."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, START_INDEX:] + x[:, :1]


class IgnoreReadout(nn.Module):
    """Tokens (B, 1 + N, C) -> (B, N, C): the class token dropped."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, START_INDEX:]


READOUTS = {"project": ProjectReadout, "add": lambda _: AddReadout(), "ignore": lambda _: IgnoreReadout()}


class Reassemble(nn.Sequential):
    """One read-out layer as a map: tokens (B, 1 + N, C) -> (B, features, h, w), or a ResNet stage's map passed on.

    Laid out as MiDaS's ``act_postprocess`` Sequential, so the keys match: [0] the readout, [1] and [2] where the
    original transposes and unflattens (done in :meth:`forward` with the input's real token grid, so any size works),
    [3] a 1x1 convolution to ``features`` and [4] the resampling to the map's scale (a transposed convolution up by
    4 or 2, none, or a stride-2 convolution down). A hybrid's first two maps are the ResNet's own: all identities.
    """

    @classmethod
    def from_tokens(cls, vit_features: int, features: int, scale: int, readout: str) -> Reassemble:
        """``scale``: 4 or 2 (up), 1, or -2 (down by 2)."""
        layers = [READOUTS[readout](vit_features), nn.Identity(), nn.Identity(), nn.Conv2d(vit_features, features, 1)]
        if scale > 1:
            layers.append(nn.ConvTranspose2d(features, features, kernel_size=scale, stride=scale))
        elif scale == -2:
            layers.append(nn.Conv2d(features, features, kernel_size=3, stride=2, padding=1))
        return cls(*layers)

    @classmethod
    def passthrough(cls) -> Reassemble:
        return cls(nn.Identity(), nn.Identity(), nn.Identity())

    def forward(self, x: torch.Tensor, grid: tuple[int, int] = (0, 0)) -> torch.Tensor:
        if x.dim() == 4:  # a ResNet stage's map
            return x
        x = self[0](x).transpose(1, 2)
        x = x.reshape(x.shape[0], x.shape[1], *grid)
        for layer in list(self)[3:]:
            x = layer(x)
        return x


class DPTEncoder(nn.Module):
    """MiDaS's ``pretrained``: the ViT (``model``) and the four reassemble blocks (``act_postprocess1..4``).

    forward: image (B, 3, H, W), H and W multiples of 32 -> four maps (B, features[i], H / 2**(i+2), W / 2**(i+2)).
    """

    def __init__(self, spec: BackboneSpec, readout: str = "project") -> None:
        super().__init__()
        if readout not in READOUTS:
            raise ConfigError(f"DPT readout '{readout}' is not one of {', '.join(READOUTS)}.")
        self.spec = spec
        self.model = make_vit(spec)
        scales = (4, 2, 1, -2)
        for i, (features, scale) in enumerate(zip(spec.features, scales, strict=True)):
            if spec.hybrid and i < 2:
                block = Reassemble.passthrough()
            else:
                block = Reassemble.from_tokens(spec.embed_dim, features, scale, readout)
            self.add_module(f"act_postprocess{i + 1}", block)

    def read_out(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four hooked outputs for image x (B, 3, H, W): ResNet stage maps (B, C, h, w) or ViT tokens
        (B, 1 + H/16 * W/16, C)."""
        vit, hooks = self.model, self.spec.hooks
        grid = (x.shape[-2] // PATCH, x.shape[-1] // PATCH)
        outputs = []
        if self.spec.hybrid:
            resnet = vit.patch_embed.backbone
            x = resnet.stem(x)
            for i, stage in enumerate(resnet.stages):
                x = stage(x)
                if i in hooks[:2]:
                    outputs.append(x)
            x = resnet.norm(x)
        tokens = vit.patch_embed.proj(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([vit.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        tokens = vit.pos_drop(tokens + resize_pos_embed(vit.pos_embed, grid))
        block_hooks = hooks[2:] if self.spec.hybrid else hooks
        for i, block in enumerate(vit.blocks[: max(block_hooks) + 1]):
            tokens = block(tokens)
            if i in block_hooks:
                outputs.append(tokens)
        return outputs

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.shape[-2] % 32 or x.shape[-1] % 32:
            raise ValueError(f"a DPT network takes sides that are multiples of 32, got {tuple(x.shape[-2:])}.")
        grid = (x.shape[-2] // PATCH, x.shape[-1] // PATCH)
        blocks = [self.act_postprocess1, self.act_postprocess2, self.act_postprocess3, self.act_postprocess4]
        return [block(out, grid) for block, out in zip(blocks, self.read_out(x), strict=True)]
