"""ControlNet files as A1111 / ComfyUI users have them, read into a :class:`ControlNet` in the cldm layout.

Layouts read (by :func:`ldm.checkpoint.read_checkpoint`, which runs nothing in the file):

- lllyasviel's cldm layout: standalone files (``control_sd15_canny.pth``, ``control_v11p_sd15_canny.pth`` /
  ``.safetensors``) with keys ``control_model.input_blocks...``, ``control_model.zero_convs.N.0.weight``,
  ``control_model.input_hint_block.N.weight``, ``control_model.middle_block_out.0.weight``, or the same without the
  ``control_model.`` prefix; and whole ``ControlLDM`` checkpoints, whose ``control_model.*`` keys sit beside the SD
  model's (only those are read here; given as the base ``--ckpt``, such a file loads its SD part and says it
  holds a ControlNet, see :data:`ldm.checkpoint.ADDON_PREFIXES`).
- "difference" ControlNets (a ``difference`` marker key): the encoder weights are offsets from SD 1.5's UNet, added
  to the base model's own weights as sd-webui-controlnet does.
- diffusers' ``ControlNetModel`` (``diffusion_pytorch_model.safetensors``): renamed by :func:`diffusers_to_cldm`.

The family is told from the cross-attention width (768: SD 1.x; 1024: SD 2.x, with linear transformer projections;
2048: SDXL, with the ADM ``label_emb``) and must be the base model's; the config is the matching
``configs/controlnet/*.yaml``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ldm.checkpoint import empty_parameters, load_state_dict_into, read_checkpoint
from ldm.errors import UserError
from ldm.modules.diffusionmodules.controlnet import ControlNet
from ldm.util import instantiate_from_config, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "controlnet"
PREFIX = "control_model."
TARGET = "ldm.modules.diffusionmodules.controlnet.ControlNet"
ORIGINAL_TARGET = "cldm.cldm.ControlNet"
CONTEXT_KEY = "attn2.to_k.weight"  # (channels, context_dim)
FAMILIES = {768: ("SD 1.x", "cldm_v15.yaml"), 1024: ("SD 2.x", "cldm_v21.yaml"), 2048: ("SDXL", "cldm_xl.yaml")}

# diffusers' ResBlock / hint-embedding names -> cldm's.
RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
TOP_NAMES = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "controlnet_cond_embedding.conv_in": "input_hint_block.0",
    "controlnet_cond_embedding.conv_out": "input_hint_block.14",
    "controlnet_mid_block": "middle_block_out.0",
}


def is_diffusers_layout(keys: Mapping[str, object]) -> bool:
    return "controlnet_cond_embedding.conv_in.weight" in keys


def diffusers_to_cldm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers ``ControlNetModel`` state dict renamed to cldm's ``ControlNet`` keys (no ``control_model.``).

    ``down_blocks.i.resnets.j`` is input block ``1 + i * (R + 1) + j`` (R res blocks a level, then a downsampler
    ``down_blocks.i.downsamplers.0.conv`` -> ``op``), its ``attentions.j`` the same block's ``.1``; the mid block's
    resnets and attention are ``middle_block.0/2`` and ``.1``; ``controlnet_down_blocks.n`` is ``zero_convs.n.0``; the
    hint embedding's ``blocks.k`` is ``input_hint_block.{2 + 2k}``. Transformer internals keep their names.
    """
    # R, from the first level's resnets (a file without them fails the strict load that follows, naming the keys).
    resnets = [int(m[1]) for k in state_dict if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k))]
    per_level = 1 + max(resnets, default=0)
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        name = _cldm_name(key, per_level)
        if name is None:
            raise UserError(
                f"'{key}' is not a key of a diffusers ControlNetModel this project knows; the file is not one."
            )
        out[name] = value
    return out


def _cldm_name(key: str, per_level: int) -> str | None:
    module, _, param = key.rpartition(".")
    if module in TOP_NAMES:
        return f"{TOP_NAMES[module]}.{param}"
    if m := re.fullmatch(r"controlnet_cond_embedding\.blocks\.(\d+)", module):
        return f"input_hint_block.{2 + 2 * int(m[1])}.{param}"
    if m := re.fullmatch(r"controlnet_down_blocks\.(\d+)", module):
        return f"zero_convs.{m[1]}.0.{param}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", module):
        return f"input_blocks.{1 + int(m[1]) * (per_level + 1) + per_level}.0.op.{param}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", module):
        return f"input_blocks.{1 + int(m[1]) * (per_level + 1) + int(m[2])}.1.{m[3]}.{param}"
    if (m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", module)) and m[3] in RESNET_NAMES:
        return f"input_blocks.{1 + int(m[1]) * (per_level + 1) + int(m[2])}.0.{RESNET_NAMES[m[3]]}.{param}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", module):
        return f"middle_block.1.{m[1]}.{param}"
    if (m := re.fullmatch(r"mid_block\.resnets\.([01])\.(\w+)", module)) and m[2] in RESNET_NAMES:
        return f"middle_block.{2 * int(m[1])}.{RESNET_NAMES[m[2]]}.{param}"
    return None


def control_state_dict(
    state_dict: Mapping[str, torch.Tensor], base_unet: nn.Module | None = None
) -> dict[str, torch.Tensor]:
    """The ControlNet's weights of a file's state dict in any layout above, in cldm's names without the prefix.

    ``base_unet``: the base model's UNet, for "difference" files (their encoder weights are added to its own)."""
    if is_diffusers_layout(state_dict):
        return diffusers_to_cldm(state_dict)
    if any(k.startswith(PREFIX) for k in state_dict):
        weights = {k[len(PREFIX) :]: v for k, v in state_dict.items() if k.startswith(PREFIX)}
    else:
        weights = {k: v for k, v in state_dict.items() if k != "difference"}
    if "zero_convs.0.0.weight" not in weights or "input_hint_block.0.weight" not in weights:
        raise UserError(
            "this file is not a ControlNet (no zero_convs / input_hint_block weights in the cldm layout, nor "
            "diffusers' controlnet_cond_embedding): give a ControlNet file such as control_v11p_sd15_canny.pth."
        )
    if "difference" in state_dict:
        if base_unet is None:
            raise UserError("a 'difference' ControlNet is added to the base model's UNet: load it with a model.")
        base = base_unet.state_dict()
        weights = {k: v + base[k].to(v) if k in base else v for k, v in weights.items()}
    return weights


def context_width(weights: Mapping[str, torch.Tensor]) -> int | None:
    """The cross-attention context width of cldm-named ControlNet weights (None without cross-attention)."""
    # Every cross-attention of the encoder reads the same context.
    key = next((k for k in weights if k.endswith(CONTEXT_KEY)), None)
    return int(weights[key].shape[1]) if key is not None else None


def unet_context_width(unet: nn.Module) -> int | None:
    """The context width of a base UNet, from its first cross-attention; None for a UNet without one."""
    for name, param in unet.named_parameters():
        if name.endswith(CONTEXT_KEY):
            return int(param.shape[1])
    return None


def family_name(width: int | None) -> str:
    return FAMILIES[width][0] if width in FAMILIES else f"a {width}-wide text context"


def build_controlnet(weights: Mapping[str, torch.Tensor], config: str | os.PathLike | None = None) -> ControlNet:
    """A :class:`ControlNet` from ``config`` (by default the family's ``configs/controlnet/*.yaml``) with cldm-named
    ``weights`` loaded strictly. The config is a cldm YAML file (its ``model.params.control_stage_config``) or a
    node with ``target``."""
    if config is None:
        width = context_width(weights)
        if width not in FAMILIES:
            raise UserError(
                f"this ControlNet is for {family_name(width)}, none of SD 1.x (768), SD 2.x (1024) or SDXL (2048): "
                "put its cldm YAML config beside it (same name, .yaml)."
            )
        config = CONFIGS / FAMILIES[width][1]
    node = load_config(config)
    if "model" in node:
        node = node.model.params.control_stage_config
    if node.get("target") == ORIGINAL_TARGET:
        node.target = TARGET  # the original YAML files A1111 keeps beside the models name cldm's class
    # The input widths are the file's: the hint's (3 for images) and the latent's.
    node.params.hint_channels = int(weights["input_hint_block.0.weight"].shape[1])
    node.params.in_channels = int(weights["input_blocks.0.0.weight"].shape[1])
    with empty_parameters():
        net = instantiate_from_config(node)
    load_state_dict_into(net, weights)
    return net.eval()


def load_controlnet(
    path: str | os.PathLike, base_unet: nn.Module | None = None, config: str | os.PathLike | None = None
) -> ControlNet:
    """Read a ControlNet file of any layout above. ``config``: by default a ``.yaml`` beside the file (A1111's
    convention), else the family's. With ``base_unet``, a file of another family than the base model's is a
    UserError naming both."""
    path = Path(path)
    state_dict, _ = read_checkpoint(path)
    weights = control_state_dict(state_dict, base_unet)
    width = context_width(weights)
    base = unet_context_width(base_unet) if base_unet is not None else None
    if base is not None and base != width:
        raise UserError(
            f"{path.name} is a ControlNet for {family_name(width)}, but the model is {family_name(base)}: "
            f"use a ControlNet made for {family_name(base)}."
        )
    beside = path.with_suffix(".yaml")
    try:
        return build_controlnet(weights, config if config is not None or not beside.is_file() else beside)
    except UserError as err:
        raise UserError(f"{path.name}: {err}") from None
