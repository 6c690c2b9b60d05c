"""The convolutional VAE of the first stage: ``Encoder`` (image -> latent moments) and ``Decoder`` (latent -> image).

Module names and nesting follow the original CompVis layout (``down.{i}.block.{j}``, ``mid.attn_1.q`` ...) because
released Stable Diffusion checkpoints are loaded into these modules by key.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.attention import attention, conv1x1_as_linear, from_tokens, memory_format_of, to_tokens

ATTN_TYPES = ("vanilla", "vanilla-xformers", "none")


def nonlinearity(x: torch.Tensor) -> torch.Tensor:
    """Swish / SiLU, ``x * sigmoid(x)``."""
    return F.silu(x)


def Normalize(in_channels: int, num_groups: int = 32) -> nn.GroupNorm:
    """The GroupNorm used throughout the VAE (eps 1e-6, as the released weights were trained with)."""
    return nn.GroupNorm(num_groups=num_groups, num_channels=in_channels, eps=1e-6, affine=True)


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling, optionally followed by a 3x3 conv: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, in_channels: int, with_conv: bool) -> None:
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.with_conv:
            x = self.conv(x)
        return x


class Downsample(nn.Module):
    """x2 downsampling by a stride-2 3x3 conv or by average pooling: (B, C, H, W) -> (B, C, H/2, W/2)."""

    def __init__(self, in_channels: int, with_conv: bool) -> None:
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            # Asymmetric padding (right and bottom only) is what the pretrained weights expect; symmetric padding=1
            # would shift every output pixel by half an input pixel.
            return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: (B, in_channels, H, W) -> (B, out_channels, H, W).

    ``temb_channels > 0`` adds a projection of a timestep embedding ``temb: (B, temb_channels)`` after the first conv;
    the VAE passes 0 and calls it with ``temb=None``. When the channel count changes, the skip path goes through
    ``conv_shortcut`` (3x3) if ``conv_shortcut`` else ``nin_shortcut`` (1x1).
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int | None = None,
        conv_shortcut: bool = False,
        dropout: float,
        temb_channels: int = 512,
    ) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.use_conv_shortcut = conv_shortcut

        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if temb_channels > 0:
            self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            if conv_shortcut:
                self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
            else:
                self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(nonlinearity(self.norm1(x)))
        if temb is not None:
            h = h + self.temb_proj(nonlinearity(temb))[:, :, None, None]
        h = self.conv2(self.dropout(nonlinearity(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.conv_shortcut(x) if self.use_conv_shortcut else self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual: (B, C, H, W) -> (B, C, H, W).

    q, k, v and the output projection are 1x1 convs (not Linear) to keep the original checkpoint's weight shapes;
    they are applied to the pixels as tokens, where they are matmuls. ``slice_size``: see
    :func:`ldm.modules.attention.attention`.
    """

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.norm = Normalize(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.slice_size: int | str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One head whose tokens are the pixels: (B, 1, H*W, C), contiguous as the fused SDPA kernels want it.
        tokens = to_tokens(self.norm(x))[:, None]
        q, k, v = (conv1x1_as_linear(tokens, conv) for conv in (self.q, self.k, self.v))
        # SDPA's default scale, C ** -0.5, is the original's.
        h = conv1x1_as_linear(attention(q, k, v, self.slice_size), self.proj_out)
        return x + from_tokens(h[:, 0], like=x)


def make_attn(in_channels: int, attn_type: str = "vanilla") -> nn.Module:
    """The attention block for ``attn_type``: "vanilla" (or "vanilla-xformers", the same maths) or "none"."""
    if attn_type in ("vanilla", "vanilla-xformers"):
        return AttnBlock(in_channels)
    if attn_type == "none":
        return nn.Identity()
    raise ValueError(f"unknown attn_type '{attn_type}'; supported: {', '.join(ATTN_TYPES)}.")


def _make_level(
    block_in: int, block_out: int, num_blocks: int, with_attn: bool, attn_type: str, dropout: float
) -> nn.Module:
    """One resolution level: ``block`` (ResnetBlocks) and ``attn`` (one after each block, or none), CompVis keys."""
    level = nn.Module()
    level.block = nn.ModuleList(
        ResnetBlock(in_channels=c_in, out_channels=block_out, temb_channels=0, dropout=dropout)
        for c_in in [block_in] + [block_out] * (num_blocks - 1)
    )
    level.attn = nn.ModuleList(make_attn(block_out, attn_type) for _ in range(num_blocks if with_attn else 0))
    return level


def _run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn) > 0:
            h = level.attn[i](h)
    return h


def _make_mid(channels: int, attn_type: str, dropout: float) -> nn.Module:
    """Middle section: ResnetBlock, attention, ResnetBlock (``mid.block_1``, ``mid.attn_1``, ``mid.block_2``)."""
    mid = nn.Module()
    mid.block_1 = ResnetBlock(in_channels=channels, out_channels=channels, temb_channels=0, dropout=dropout)
    mid.attn_1 = make_attn(channels, attn_type=attn_type)
    mid.block_2 = ResnetBlock(in_channels=channels, out_channels=channels, temb_channels=0, dropout=dropout)
    return mid


class Encoder(nn.Module):
    """Image -> latent moments: (B, in_channels, H, W) -> (B, 2*z_channels if double_z else z_channels, H/f, W/f)
    with f = 2**(len(ch_mult)-1).

    Level i runs ``num_res_blocks`` ResnetBlocks at ``ch*ch_mult[i]`` channels (with attention after each one when
    the nominal resolution, starting at ``resolution``, is in ``attn_resolutions``) and then halves the size, except
    at the last level. A mid section (block, attention, block) follows. H and W need only be divisible by f.
    ``out_ch`` is unused here; it is accepted because one ``ddconfig`` is shared by the Encoder and the Decoder.
    """

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        in_channels: int,
        resolution: int,
        z_channels: int,
        double_z: bool = True,
        use_linear_attn: bool = False,
        attn_type: str = "vanilla",
        **ignore_kwargs,
    ) -> None:
        super().__init__()
        if use_linear_attn:
            attn_type = "linear"  # not implemented here: make_attn rejects it with a clear error
        self.ch = ch
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels

        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)

        in_ch_mult = (1, *ch_mult)
        curr_res = resolution
        self.down = nn.ModuleList()
        for i_level in range(self.num_resolutions):
            block_in, block_out = ch * in_ch_mult[i_level], ch * ch_mult[i_level]
            down = _make_level(block_in, block_out, num_res_blocks, curr_res in attn_resolutions, attn_type, dropout)
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_out, resamp_with_conv)
                curr_res = curr_res // 2
            self.down.append(down)
        block_in = block_out
        self.mid = _make_mid(block_in, attn_type, dropout)

        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(
            block_in, 2 * z_channels if double_z else z_channels, kernel_size=3, stride=1, padding=1
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Runs in the memory format of the weights (see torch.channels_last); returns the input's.
        h = self.conv_in(x.contiguous(memory_format=memory_format_of(self.conv_in.weight)))
        for i_level, down in enumerate(self.down):
            h = _run_level(down, h)
            if i_level != self.num_resolutions - 1:
                h = down.downsample(h)

        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(nonlinearity(self.norm_out(h))).contiguous(memory_format=memory_format_of(x))


class Decoder(nn.Module):
    """Latent -> image: (B, z_channels, h, w) -> (B, out_ch, h*f, w*f) with f = 2**(len(ch_mult)-1).

    The mirror of :class:`Encoder` with ``num_res_blocks + 1`` blocks per level; ``up[i]`` holds level i, run from the
    deepest level up. ``give_pre_end`` returns the features before ``norm_out``/``conv_out``; ``tanh_out`` squashes
    the output to (-1, 1).
    """

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        in_channels: int,
        resolution: int,
        z_channels: int,
        give_pre_end: bool = False,
        tanh_out: bool = False,
        use_linear_attn: bool = False,
        attn_type: str = "vanilla",
        **ignore_kwargs,
    ) -> None:
        super().__init__()
        if use_linear_attn:
            attn_type = "linear"  # not implemented here: make_attn rejects it with a clear error
        self.ch = ch
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels
        self.give_pre_end = give_pre_end
        self.tanh_out = tanh_out

        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)

        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)

        self.mid = _make_mid(block_in, attn_type, dropout)

        # Built deepest level first (channel counts flow that way) but stored so that up[i] is level i.
        up_levels = []
        for i_level in reversed(range(self.num_resolutions)):
            block_out = ch * ch_mult[i_level]
            up = _make_level(block_in, block_out, num_res_blocks + 1, curr_res in attn_resolutions, attn_type, dropout)
            block_in = block_out
            if i_level != 0:
                up.upsample = Upsample(block_in, resamp_with_conv)
                curr_res = curr_res * 2
            up_levels.append(up)
        self.up = nn.ModuleList(reversed(up_levels))

        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # Runs in the memory format of the weights (see torch.channels_last); returns the input's.
        h = self.conv_in(z.contiguous(memory_format=memory_format_of(self.conv_in.weight)))
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))

        for i_level in reversed(range(self.num_resolutions)):
            h = _run_level(self.up[i_level], h)
            if i_level != 0:
                h = self.up[i_level].upsample(h)

        if not self.give_pre_end:
            h = self.conv_out(nonlinearity(self.norm_out(h)))
            h = torch.tanh(h) if self.tanh_out else h
        return h.contiguous(memory_format=memory_format_of(z))
