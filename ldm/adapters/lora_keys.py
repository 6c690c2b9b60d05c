"""Where each LoRA key of a kohya / A1111 or diffusers / PEFT file lands in this project's model.

kohya names a layer by its module path with ``.`` replaced by ``_`` under a prefix: ``lora_unet_`` (the UNet, in
diffusers' module names ``down_blocks_0_attentions_0_...`` or in the CompVis / sgm names ``input_blocks_1_1_...``),
``lora_te_`` (the text encoder of SD 1.x / 2.x, in Hugging Face CLIP names
``text_model_encoder_layers_0_self_attn_q_proj``)
and ``lora_te1_`` / ``lora_te2_`` (SDXL's CLIP-L and OpenCLIP bigG). Since ``_`` also occurs inside names, a key is
matched against the full list of names the model has (as A1111 does), never split.

The diffusers <-> CompVis correspondence is read off the built UNet's block structure (the same facts as its config:
levels, res blocks per level, where the attention and the resamplers are), so per-level depths (SDXL) and levels
without attention need no special case. OpenCLIP text towers (SD 2.x, SDXL's bigG) keep open_clip's layout: HF's
``q_proj`` / ``k_proj`` / ``v_proj`` are the row thirds of ``attn.in_proj_weight``, ``out_proj`` is ``attn.out_proj``,
``mlp_fc1`` / ``mlp_fc2`` are ``mlp.c_fc`` / ``mlp.c_proj``.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from ldm.errors import UserError

UNET, TEXT = "unet", "te"


@dataclass(frozen=True)
class Target:
    """One weight a LoRA module changes: ``module.<param>`` (rows ``rows[0]:rows[1]`` of it when not None).

    ``name``: the parameter's state-dict key in the model, for messages and backups. ``role``: :data:`UNET` or
    :data:`TEXT`, which multiplier of a ``<lora:name:te:unet>`` tag applies.
    """

    name: str
    module: nn.Module
    param: str
    rows: tuple[int, int] | None
    role: str

    @property
    def bias(self) -> str | None:
        """The bias parameter beside the weight (for ``diff_b``), None when the layer has none."""
        bias = "in_proj_bias" if self.param == "in_proj_weight" else "bias"
        return bias if getattr(self.module, bias, None) is not None else None


_RES = {
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_FIXED = {
    "input_blocks.0.0": "conv_in",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "label_emb.0.0": "add_embedding.linear_1",
    "label_emb.0.2": "add_embedding.linear_2",
    "out.0": "conv_norm_out",
    "out.2": "conv_out",
}


def diffusers_block_names(unet: nn.Module) -> dict[str, str]:
    """CompVis block prefix -> diffusers block prefix for a built ``UNetModel``.

    E.g. ``input_blocks.1.0`` -> ``down_blocks.0.resnets.0``,
    ``input_blocks.3.0.op`` -> ``down_blocks.0.downsamplers.0.conv``,
    ``output_blocks.2.2.conv`` -> ``up_blocks.0.upsamplers.0.conv``, ``middle_block.1`` -> ``mid_block.attentions.0``.
    """
    from ldm.modules.diffusionmodules.openaimodel import Downsample, Upsample

    names = {}
    level = index = 0
    for i, block in enumerate(unet.input_blocks):
        if i == 0:
            continue
        if isinstance(block[0], Downsample):
            names[f"input_blocks.{i}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
            level, index = level + 1, 0
            continue
        names[f"input_blocks.{i}.0"] = f"down_blocks.{level}.resnets.{index}"
        if len(block) > 1:
            names[f"input_blocks.{i}.1"] = f"down_blocks.{level}.attentions.{index}"
        index += 1
    for i, part in enumerate(("resnets.0", "attentions.0", "resnets.1")):
        names[f"middle_block.{i}"] = f"mid_block.{part}"
    level = index = 0
    for i, block in enumerate(unet.output_blocks):
        names[f"output_blocks.{i}.0"] = f"up_blocks.{level}.resnets.{index}"
        for j, layer in enumerate(block):
            if isinstance(layer, Upsample):
                names[f"output_blocks.{i}.{j}.conv"] = f"up_blocks.{level}.upsamplers.0.conv"
                level, index = level + 1, -1
            elif j:
                names[f"output_blocks.{i}.{j}"] = f"up_blocks.{level}.attentions.{index}"
        index += 1
    return names


def _diffusers_name(path: str, blocks: dict[str, str]) -> str | None:
    """A UNet module path in CompVis names -> its diffusers name, None where diffusers has no such module."""
    if path in _FIXED:
        return _FIXED[path]
    if path in blocks:
        return blocks[path]
    parts = path.split(".")
    for cut in (3, 2):  # "input_blocks.1.0" + "in_layers.2", "middle_block.1" + "transformer_blocks.0..."
        head, tail = ".".join(parts[:cut]), ".".join(parts[cut:])
        if head in blocks and tail:
            resnet = ".resnets." in blocks[head]
            if resnet and tail not in _RES:
                return None
            return f"{blocks[head]}.{_RES[tail] if resnet else tail}"
    return None


def _layers(module: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for path, layer in module.named_modules():
        if isinstance(layer, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d):
            yield path, layer


def unet_targets(unet: nn.Module, prefix: str) -> dict[str, Target]:
    """kohya name -> Target for every Linear / Conv layer of a ``UNetModel``, under both naming schemes."""
    blocks = diffusers_block_names(unet)
    table = {}
    for path, layer in _layers(unet):
        target = Target(f"{prefix}{path}.weight", layer, "weight", None, UNET)
        table["lora_unet_" + path.replace(".", "_")] = target
        name = _diffusers_name(path, blocks)
        if name is not None:
            table["lora_unet_" + name.replace(".", "_")] = target
    return table


_HF_LAYER = re.compile(r"(?:^|\.)encoder\.layers\.(\d+)\.(self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])$")
_OPEN_CLIP = {"attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def text_targets(encoder: nn.Module, prefix: str, kohya: str) -> dict[str, Target]:
    """kohya name (under ``kohya``, e.g. ``lora_te1_``) -> Target for a FrozenCLIPEmbedder or FrozenOpenCLIPEmbedder.

    Both get Hugging Face CLIP names ``text_model_encoder_layers_N_<layer>``; other encoders (BERT ...) get none.
    """
    table = {}
    resblocks = getattr(getattr(getattr(encoder, "model", None), "transformer", None), "resblocks", None)
    if resblocks is not None:  # open_clip layout
        for n, block in enumerate(resblocks):
            base = f"text_model_encoder_layers_{n}_"
            width = block.attn.in_proj_weight.shape[1]
            for third, letter in enumerate("qkv"):
                rows = (third * width, (third + 1) * width)
                name = f"{prefix}model.transformer.resblocks.{n}.attn.in_proj_weight"
                table[f"{kohya}{base}self_attn_{letter}_proj"] = Target(name, block.attn, "in_proj_weight", rows, TEXT)
            for ours, hf in _OPEN_CLIP.items():
                layer = block.get_submodule(ours)
                name = f"{prefix}model.transformer.resblocks.{n}.{ours}.weight"
                table[f"{kohya}{base}{hf.replace('.', '_')}"] = Target(name, layer, "weight", None, TEXT)
        return table
    for path, layer in _layers(encoder):
        match = _HF_LAYER.search(path)
        if match:
            hf = f"text_model_encoder_layers_{match[1]}_{match[2].replace('.', '_')}"
            table[kohya + hf] = Target(f"{prefix}{path}.weight", layer, "weight", None, TEXT)
    return table


def _text_encoders(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(state-dict prefix, encoder) of the model's text encoders, in order (SDXL's conditioner holds two)."""
    from ldm.modules.encoders.modules import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder

    kinds = FrozenCLIPEmbedder | FrozenOpenCLIPEmbedder
    cond = getattr(model, "cond_stage_model", None)
    encoders = (
        [cond]
        if isinstance(cond, kinds)
        else [e for e in getattr(cond, "embedders", None) or [] if isinstance(e, kinds)]
    )
    paths = {id(module): path for path, module in model.named_modules()}  # SDXL's is "conditioner"
    return [(paths[id(e)] + ".", e) for e in encoders]


def model_targets(model: nn.Module) -> dict[str, Target]:
    """kohya name -> Target for a LatentDiffusion (SD 1.x / 2.x / SDXL): UNet and text encoders.

    One text encoder: ``lora_te_`` (``lora_te1_`` too, for files made that way); two: ``lora_te1_`` and ``lora_te2_``.
    """
    table = unet_targets(model.model.diffusion_model, "model.diffusion_model.")
    encoders = _text_encoders(model)
    for i, (prefix, encoder) in enumerate(encoders):
        for name in ["lora_te_", "lora_te1_"] if len(encoders) == 1 else [f"lora_te{i + 1}_"]:
            table.update(text_targets(encoder, prefix, name))
    return table


# -- diffusers / PEFT key forms -> kohya names ------------------------------------------------------------------------

_DIFFUSERS_PREFIXES = {"unet.": "lora_unet_", "text_encoder.": "lora_te1_", "text_encoder_2.": "lora_te2_"}
_DIFFUSERS_SUFFIXES = [
    (re.compile(r"^(.*)\.lora_A\.weight$"), "lora_down.weight"),
    (re.compile(r"^(.*)\.lora_B\.weight$"), "lora_up.weight"),
    (re.compile(r"^(.*?)(?:\.processor)?\.(to_q|to_k|to_v)_lora\.down\.weight$"), "lora_down.weight"),
    (re.compile(r"^(.*?)(?:\.processor)?\.(to_q|to_k|to_v)_lora\.up\.weight$"), "lora_up.weight"),
    (re.compile(r"^(.*?)(?:\.processor)?\.(to_out)_lora\.down\.weight$"), "lora_down.weight"),
    (re.compile(r"^(.*?)(?:\.processor)?\.(to_out)_lora\.up\.weight$"), "lora_up.weight"),
    (re.compile(r"^(.*)\.(?:lora|lora_linear_layer)\.down\.weight$"), "lora_down.weight"),
    (re.compile(r"^(.*)\.(?:lora|lora_linear_layer)\.up\.weight$"), "lora_up.weight"),
    (re.compile(r"^(.*)\.alpha$"), "alpha"),
]


def is_diffusers_key(key: str) -> bool:
    return key.startswith((*_DIFFUSERS_PREFIXES, "base_model.model."))


def kohya_key(key: str) -> str:
    """A diffusers / PEFT key -> the kohya key of the same tensor.

    ``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight`` ->
    ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight``; the older attention
    processor form (``...attn1.processor.to_out_lora.up.weight`` -> ``..._attn1_to_out_0.lora_up.weight``) and
    ``.lora.down`` / ``.lora_linear_layer.down`` too. ``text_encoder`` is CLIP-L (te1), ``text_encoder_2`` bigG (te2);
    a bare PEFT ``base_model.model.`` prefix is the UNet's. Raises UserError for a form it does not know.
    """
    prefix = "lora_unet_" if key.startswith("base_model.model.") else None
    rest = key.removeprefix("base_model.model.")
    for start, kohya in _DIFFUSERS_PREFIXES.items():
        if prefix is None and rest.startswith(start):
            prefix, rest = kohya, rest[len(start) :]
    for pattern, suffix in _DIFFUSERS_SUFFIXES:
        match = pattern.match(rest)
        if match:
            module = match[1] if match.lastindex == 1 else f"{match[1]}.{match[2]}"
            module = module + ".0" if module.endswith(".to_out") else module
            return f"{prefix}{module.replace('.', '_')}.{suffix}"
    raise UserError(f"unknown diffusers / PEFT LoRA key {key!r}: expected <module>.lora_A.weight / lora_B.weight.")
