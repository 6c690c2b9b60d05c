"""A tiny ControlNet for the tiny SD model (tests/conftest.py ``tiny_config``), and files of it in the published
layouts: lllyasviel's cldm layout and diffusers' ControlNetModel layout."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from ldm.modules.diffusionmodules.controlnet import ControlNet

TARGET = "ldm.modules.diffusionmodules.controlnet.ControlNet"


def tiny_control_params(tiny_config) -> dict:
    """cldm's control_stage_config params for the tiny UNet: its own, less out_channels, plus hint_channels."""
    params = OmegaConf.to_container(tiny_config.model.params.unet_config.params)
    del params["out_channels"]
    return {**params, "hint_channels": 3}


def tiny_controlnet(tiny_config, seed: int | None = 0) -> ControlNet:
    """A tiny ControlNet; with a seed, its zero convolutions (fresh: all zero) get random weights so it acts."""
    torch.manual_seed(0 if seed is None else seed)
    net = ControlNet(**tiny_control_params(tiny_config)).eval()
    if seed is not None:
        with torch.no_grad():
            for name, param in net.named_parameters():
                if name.startswith(("zero_convs", "middle_block_out", "input_hint_block.14")):
                    param.copy_(torch.randn_like(param) * 0.3)
    return net


def write_config(path: Path, tiny_config) -> None:
    """The cldm YAML beside a ControlNet file (A1111's convention): ``NAME.yaml`` next to ``NAME.safetensors``."""
    node = {"target": TARGET, "params": tiny_control_params(tiny_config)}
    OmegaConf.save(OmegaConf.create({"model": {"params": {"control_stage_config": node}}}), path.with_suffix(".yaml"))


def write_cldm(path: Path, net: ControlNet, tiny_config, prefix: str = "control_model.") -> Path:
    """A standalone cldm-layout file (``control_model.*`` keys, as control_v11p_sd15_canny.pth has them)."""
    save_file({prefix + k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    write_config(path, tiny_config)
    return path


RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj", "out_layers.0": "norm2",
          "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}  # fmt: skip


def diffusers_key(key: str, blocks_per_level: int = 2) -> str:
    """The diffusers ControlNetModel name of a cldm key (the published layout, written out independently of
    ldm.control_files, which maps the other way)."""
    fixed = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
             "input_blocks.0.0": "conv_in", "input_hint_block.0": "controlnet_cond_embedding.conv_in",
             "input_hint_block.14": "controlnet_cond_embedding.conv_out", "middle_block_out.0": "controlnet_mid_block",
             "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2"}  # fmt: skip
    module, _, param = key.rpartition(".")
    if module in fixed:
        return f"{fixed[module]}.{param}"
    if m := re.fullmatch(r"input_hint_block\.(\d+)", module):
        return f"controlnet_cond_embedding.blocks.{int(m[1]) // 2 - 1}.{param}"
    if m := re.fullmatch(r"zero_convs\.(\d+)\.0", module):
        return f"controlnet_down_blocks.{m[1]}.{param}"
    if m := re.fullmatch(r"middle_block\.([012])\.(.+)", module):
        if m[1] == "1":
            return f"mid_block.attentions.0.{m[2]}.{param}"
        return f"mid_block.resnets.{int(m[1]) // 2}.{RESNET[m[2]]}.{param}"
    m = re.fullmatch(r"input_blocks\.(\d+)\.([01])\.(.+)", module)
    level, index = divmod(int(m[1]) - 1, blocks_per_level + 1)
    if index == blocks_per_level:
        return f"down_blocks.{level}.downsamplers.0.conv.{param}"
    if m[2] == "1":
        return f"down_blocks.{level}.attentions.{index}.{m[3]}.{param}"
    return f"down_blocks.{level}.resnets.{index}.{RESNET[m[3]]}.{param}"


def write_diffusers(path: Path, net: ControlNet, tiny_config) -> Path:
    """The same weights as a diffusers ``diffusion_pytorch_model.safetensors`` of a ControlNetModel."""
    weights = {diffusers_key(k): v.contiguous() for k, v in net.state_dict().items()}
    save_file(weights, str(path))
    write_config(path, tiny_config)
    return path
