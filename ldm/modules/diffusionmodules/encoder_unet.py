"""The UNet's encoder half with a pooling head: ``EncoderUNetModel`` (noisy-image classifiers, guidance models).

The state-dict layout is the CompVis/guided-diffusion one (``input_blocks.*``, ``middle_block.*``, ``out.*``), so
their classifier checkpoints load. Importable as ``ldm.modules.diffusionmodules.openaimodel.EncoderUNetModel``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ldm.modules.attention import attention
from ldm.modules.diffusionmodules.openaimodel import AttentionBlock, Downsample, ResBlock, TimestepEmbedSequential
from ldm.modules.diffusionmodules.util import conv_nd, linear, normalization, timestep_embedding, zero_module

POOLS = ("adaptive", "attention", "spatial", "spatial_v2")


class AttentionPool2d(nn.Module):
    """CLIP-style attention pooling: the mean of the feature map, as a query, attends over all positions.

    x: (B, embed_dim, H, W) with ``H * W == spacial_dim ** 2`` -> (B, output_dim). Heads of ``num_heads_channels``
    channels; the positional embedding (embed_dim, spacial_dim^2 + 1) covers the mean token first.
    """

    def __init__(self, spacial_dim: int, embed_dim: int, num_heads_channels: int, output_dim: int | None = None):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(embed_dim, spacial_dim**2 + 1) / embed_dim**0.5)
        self.qkv_proj = conv_nd(1, embed_dim, 3 * embed_dim, 1)
        self.c_proj = conv_nd(1, embed_dim, output_dim or embed_dim, 1)
        self.num_heads = embed_dim // num_heads_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.flatten(2)  # (B, C, T)
        tokens = torch.cat([tokens.mean(dim=-1, keepdim=True), tokens], dim=-1) + self.positional_embedding.to(x.dtype)
        # The qkv channels are grouped (q/k/v, head, d); heads become (B, heads, T, d) for the attention function.
        q, k, v = self.qkv_proj(tokens).unflatten(1, (3, self.num_heads, -1)).permute(1, 0, 2, 4, 3)
        # Only the mean token's output is kept, so only its query is computed (rows of attention are independent).
        pooled = attention(q[:, :, :1], k, v)  # (B, heads, 1, d)
        return self.c_proj(pooled.permute(0, 1, 3, 2).flatten(1, 2))[:, :, 0]


class EncoderUNetModel(nn.Module):
    """``(x, timesteps) -> (B, out_channels)``: the UNet's input blocks and middle block, then ``pool``.

    x: (B, in_channels, image_size, image_size); timesteps: (B,). ``pool``: "adaptive" (global average, then a 1x1
    convolution), "attention" (:class:`AttentionPool2d`, needs ``num_head_channels``), "spatial" / "spatial_v2"
    (an MLP over the spatial means of every block's output). The arguments mirror :class:`UNetModel`'s; ``use_fp16``
    is accepted and ignored as there.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float = 0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        pool: str = "adaptive",
    ) -> None:
        super().__init__()
        # num_heads_upsample belongs to the decoder, which this model does not have; both are accepted for the
        # originals' configs.
        del use_fp16, num_heads_upsample
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
        if pool == "attention" and num_head_channels == -1:
            raise ValueError('pool="attention" needs num_head_channels (the width of its heads)')
        self.model_channels = model_channels
        self.pool = pool
        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            linear(model_channels, time_embed_dim), nn.SiLU(), linear(time_embed_dim, time_embed_dim)
        )

        def res_block(channels: int, out: int, down: bool = False) -> ResBlock:
            return ResBlock(
                channels,
                time_embed_dim,
                dropout,
                out_channels=out,
                dims=dims,
                use_checkpoint=use_checkpoint,
                use_scale_shift_norm=use_scale_shift_norm,
                down=down,
            )

        def attention_block(channels: int) -> AttentionBlock:
            return AttentionBlock(channels, num_heads, num_head_channels, use_checkpoint, use_new_attention_order)

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(dims, in_channels, model_channels, 3, padding=1))]
        )
        # Output channels of every block, for the spatial pools that concatenate their means.
        block_channels = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res_block(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attention_block(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                block_channels.append(ch)
            if level != len(channel_mult) - 1:
                down = res_block(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, dims, ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                block_channels.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(res_block(ch, ch), attention_block(ch), res_block(ch, ch))
        block_channels.append(ch)

        if pool == "adaptive":
            self.out = nn.Sequential(
                normalization(ch),
                nn.SiLU(),
                nn.AdaptiveAvgPool2d(1),
                zero_module(conv_nd(dims, ch, out_channels, 1)),
                nn.Flatten(),
            )
        elif pool == "attention":
            self.out = nn.Sequential(
                normalization(ch), nn.SiLU(), AttentionPool2d(image_size // ds, ch, num_head_channels, out_channels)
            )
        elif pool == "spatial":
            self.out = nn.Sequential(nn.Linear(sum(block_channels), 2048), nn.ReLU(), nn.Linear(2048, out_channels))
        else:
            self.out = nn.Sequential(
                nn.Linear(sum(block_channels), 2048), normalization(2048), nn.SiLU(), nn.Linear(2048, out_channels)
            )

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        spatial = self.pool.startswith("spatial")
        means = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb)
            if spatial:
                means.append(h.mean(dim=(2, 3)))
        h = self.middle_block(h, emb)
        if spatial:
            means.append(h.mean(dim=(2, 3)))
            return self.out(torch.cat(means, dim=-1))
        return self.out(h)
