"""ControlNet (Zhang & Agrawala 2023) with the constructor and state-dict layout of lllyasviel's ``cldm``.

A ControlNet is a trainable copy of the UNet's encoder (``input_blocks``) and ``middle_block``. A small convolution
stack (``input_hint_block``) maps the control image (edges, depth ...) at full pixel size down to the latent size and
adds it after the first input block; a zero-initialised 1x1 convolution after every input block (``zero_convs``) and
after the middle block (``middle_block_out``) gives the residuals that the UNet adds to its skip connections and to its
middle block's output (:meth:`UNetModel.forward`'s ``control``). Fresh, all those convolutions are zero, so the
ControlNet changes nothing until trained.

The encoder is built by :class:`UNetModel` itself, from the same arguments, so the blocks and their key names are
the UNet's by construction; the decoder it builds on the way is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ldm.modules.diffusionmodules.openaimodel import TimestepEmbedSequential, UNetModel
from ldm.modules.diffusionmodules.util import conv_nd, timestep_embedding, zero_module

# (out_channels, stride) of the hint block's convolutions before the last: three stride-2 steps take the hint image
# down 8x, to the latent size. Each is followed by a SiLU, so the keys are input_hint_block.{0,2,...,14}.
HINT_LAYERS = ((16, 1), (16, 1), (32, 2), (32, 1), (96, 2), (96, 1), (256, 2))
HINT_FACTOR = 8  # the hint image's side / the latent's


def skip_widths(model_channels: int, channel_mult: Sequence[int], num_res_blocks: int | Sequence[int]) -> list[int]:
    """The output channels of every UNet input block, in order (the widths of its skip connections)."""
    levels = len(channel_mult)
    blocks = [num_res_blocks] * levels if isinstance(num_res_blocks, int) else list(num_res_blocks)
    widths = [model_channels]
    for level, mult in enumerate(channel_mult):
        widths += [mult * model_channels] * blocks[level]
        if level != levels - 1:
            widths.append(mult * model_channels)  # the downsampling block keeps the width
    return widths


class ControlNet(nn.Module):
    """``(x, hint, timesteps, context, y) ->`` the ``len(input_blocks) + 1`` residuals for the UNet.

    x: (B, in_channels, h, w) latents; hint: (B, hint_channels, 8h, 8w) in [0, 1]; timesteps: (B,); context: (B, M,
    context_dim); y: (B, adm_in_channels) for SDXL-style models (``num_classes="sequential"``). Returns one tensor per
    input block, (B, C_i, h_i, w_i) as that block's output, then the middle block's (B, C_mid, h/2^k, w/2^k).

    The arguments are those of ``control_stage_config.params`` in cldm's YAML files (``cldm_v15.yaml``,
    ``cldm_v21.yaml``) and mean what they mean for :class:`UNetModel`; ``hint_channels`` is the control image's
    channels (3). ``out_channels`` is not one: a ControlNet has no decoder.
    """

    def __init__(
        self,
        image_size: int | None,
        in_channels: int,
        model_channels: int,
        hint_channels: int,
        num_res_blocks: int | Sequence[int],
        attention_resolutions: Sequence[int],
        dropout: float = 0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: int | str | None = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = -1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_spatial_transformer: bool = False,
        transformer_depth: int | Sequence[int] = 1,
        transformer_depth_middle: int | None = None,
        context_dim: int | Sequence[int] | None = None,
        n_embed: int | None = None,
        legacy: bool = True,
        disable_self_attentions: Sequence[bool] | None = None,
        num_attention_blocks: Sequence[int] | None = None,
        disable_middle_self_attn: bool = False,
        use_linear_in_transformer: bool = False,
        adm_in_channels: int | None = None,
    ) -> None:
        super().__init__()
        del n_embed  # cldm accepts it for the UNet's sake; a ControlNet predicts no codebook ids
        unet = UNetModel(
            image_size, in_channels, model_channels, in_channels, num_res_blocks, attention_resolutions,
            dropout=dropout, channel_mult=channel_mult, conv_resample=conv_resample, dims=dims,
            num_classes=num_classes, use_checkpoint=use_checkpoint, use_fp16=use_fp16, num_heads=num_heads,
            num_head_channels=num_head_channels, num_heads_upsample=num_heads_upsample,
            use_scale_shift_norm=use_scale_shift_norm, resblock_updown=resblock_updown,
            use_new_attention_order=use_new_attention_order, use_spatial_transformer=use_spatial_transformer,
            transformer_depth=transformer_depth, transformer_depth_middle=transformer_depth_middle,
            context_dim=context_dim, legacy=legacy, disable_self_attentions=disable_self_attentions,
            num_attention_blocks=num_attention_blocks, disable_middle_self_attn=disable_middle_self_attn,
            use_linear_in_transformer=use_linear_in_transformer, adm_in_channels=adm_in_channels,
        )  # fmt: skip
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.hint_channels = hint_channels
        self.dims = dims
        self.time_embed = unet.time_embed
        self.label_emb = unet.label_emb
        self.input_blocks = unet.input_blocks
        self.middle_block = unet.middle_block
        del unet  # the decoder (output_blocks, out) goes with it

        layers: list[nn.Module] = []
        channels = hint_channels
        for out, stride in HINT_LAYERS:
            layers += [conv_nd(dims, channels, out, 3, padding=1, stride=stride), nn.SiLU()]
            channels = out
        layers.append(zero_module(conv_nd(dims, channels, model_channels, 3, padding=1)))
        self.input_hint_block = TimestepEmbedSequential(*layers)
        widths = skip_widths(model_channels, channel_mult, num_res_blocks)
        self.zero_convs = nn.ModuleList([self._zero_conv(width) for width in widths])
        self.middle_block_out = self._zero_conv(widths[-1])

    def _zero_conv(self, channels: int) -> TimestepEmbedSequential:
        # In a TimestepEmbedSequential, as cldm has it: the keys read zero_convs.N.0.weight.
        return TimestepEmbedSequential(zero_module(conv_nd(self.dims, channels, channels, 1, padding=0)))

    def forward(
        self,
        x: torch.Tensor,
        hint: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | Sequence[torch.Tensor] | None = None,
        y: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        if (y is not None) != (self.label_emb is not None):
            raise ValueError("pass y exactly when the ControlNet is class-conditional (num_classes is set)")
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        if y is not None:
            emb = emb + self.label_emb(y)
        guided_hint: torch.Tensor | None = self.input_hint_block(hint.to(x.dtype), emb, context)
        outs = []
        h = x
        for block, zero_conv in zip(self.input_blocks, self.zero_convs, strict=True):
            h = block(h, emb, context)
            if guided_hint is not None:
                # The hint joins once, after the first block (the latent's input convolution).
                h, guided_hint = h + guided_hint, None
            outs.append(zero_conv(h, emb, context))
        h = self.middle_block(h, emb, context)
        outs.append(self.middle_block_out(h, emb, context))
        return outs
