"""The diffusion UNet (ADM architecture) with the constructor and state-dict layout of the CompVis checkpoints.

The UNet is a stack of ``TimestepEmbedSequential`` blocks: an encoder (``input_blocks``), a ``middle_block`` and a
decoder (``output_blocks``) that concatenates the encoder's activations back in. ResBlocks receive the timestep
embedding; attention is either ``SpatialTransformer`` (text-conditioned models) or ``AttentionBlock`` (older LDMs).
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.attention import (
    SpatialTransformer,
    attention,
    conv1x1_as_linear,
    from_tokens,
    memory_format_of,
    to_tokens,
)

# Timestep is imported here because Stability's code names it by this module's path.
from ldm.modules.diffusionmodules.util import (
    Timestep as Timestep,
)
from ldm.modules.diffusionmodules.util import (
    avg_pool_nd,
    checkpoint,
    conv_nd,
    linear,
    normalization,
    timestep_embedding,
    zero_module,
)


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as well: ``forward(x, emb)``, emb: (B, emb_channels)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """Sequential that hands ``emb`` to timestep blocks and ``context`` to spatial transformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling (only of H and W for 3D data), optionally followed by a 3x3 convolution.

    x: (B, channels, [D,] H, W) -> (B, out_channels, [D,] 2H, 2W).
    """

    def __init__(
        self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None, padding: int = 1
    ) -> None:
        super().__init__()
        out_channels = out_channels or channels
        if not use_conv and out_channels != channels:
            raise ValueError("Upsample without use_conv cannot change the number of channels (out_channels)")
        self.scale_factor = (1, 2, 2) if dims == 3 else 2
        self.conv = conv_nd(dims, channels, out_channels, 3, padding=padding) if use_conv else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=self.scale_factor, mode="nearest"))


class Downsample(nn.Module):
    """2x downsampling (only of H and W for 3D data) by a strided 3x3 convolution, or by average pooling.

    x: (B, channels, [D,] H, W) -> (B, out_channels, [D,] H/2, W/2).
    """

    def __init__(
        self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None, padding: int = 1
    ) -> None:
        super().__init__()
        out_channels = out_channels or channels
        stride = (1, 2, 2) if dims == 3 else 2
        if use_conv:
            self.op = conv_nd(dims, channels, out_channels, 3, stride=stride, padding=padding)
        elif out_channels != channels:
            raise ValueError("Downsample without use_conv cannot change the number of channels (out_channels)")
        else:
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding, optionally resampling (``up``/``down``) on the way.

    x: (B, channels, H, W), emb: (B, emb_channels) -> (B, out_channels, H', W'). The embedding is added to the
    features, or with ``use_scale_shift_norm`` applied FiLM-style as ``norm(h) * (1 + scale) + shift``. A channel
    change on the skip path uses a 3x3 convolution if ``use_conv``, else a 1x1 one.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        dims: int = 2,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), conv_nd(dims, channels, out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False, dims), Upsample(channels, False, dims)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False, dims), Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            normalization(out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, out_channels, out_channels, 3, padding=1)),
        )
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, (x, emb), self.parameters(), self.use_checkpoint)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            # Resample between the activation and the convolution, so the convolution already works at the new size.
            h = self.h_upd(self.in_layers[:-1](x))
            h = self.in_layers[-1](h)
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        emb_out = emb_out.reshape(*emb_out.shape, *((1,) * (h.ndim - 2)))
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over all positions of a feature map, residual; used when there is no text conditioning.

    x: (B, C, ...) -> same shape. ``num_head_channels`` (if not -1) fixes the head width instead of ``num_heads``.
    ``slice_size``: see :func:`ldm.modules.attention.attention`.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_checkpoint: bool = False,
        use_new_attention_order: bool = False,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads if num_head_channels == -1 else channels // num_head_channels
        if channels % self.num_heads:
            raise ValueError(f"channels {channels} is not divisible into {self.num_heads} heads (num_heads)")
        self.use_checkpoint = use_checkpoint
        self.use_new_attention_order = use_new_attention_order
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))
        self.slice_size: int | str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, (x,), self.parameters(), self.use_checkpoint)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        # The 1x1 convolutions are applied as matmuls on (B, T, C) tokens, which the fused SDPA kernels need with
        # each head's channels contiguous; the conv's (B, C, T) output would only give that after a bigger copy.
        qkv = conv1x1_as_linear(to_tokens(self.norm(x)), self.qkv)
        # The 3C qkv channels are grouped (head, q/k/v, d) in legacy checkpoints and (q/k/v, head, d) in the new order.
        if self.use_new_attention_order:
            q, k, v = qkv.unflatten(-1, (3, self.num_heads, -1)).permute(2, 0, 3, 1, 4)
        else:
            q, k, v = qkv.unflatten(-1, (self.num_heads, 3, -1)).permute(3, 0, 2, 1, 4)
        # q, k, v: (B, heads, T, d); SDPA's default scale 1/sqrt(d) is the original's.
        h = attention(q, k, v, self.slice_size).transpose(1, 2).flatten(2)
        return x + from_tokens(conv1x1_as_linear(h, self.proj_out), like=x)


class UNetModel(nn.Module):
    """The diffusion UNet: ``(x, timesteps, context, y) -> `` prediction (noise, v or x0, as trained).

    x: (B, in_channels, H, W); timesteps: (B,); context: (B, M, context_dim) (or a list, one per transformer depth);
    y: (B,) class ids, or (B, adm_in_channels) for ``num_classes="sequential"``, (B, 1) for "continuous".
    Returns (B, out_channels, H, W), or (B, n_embed, H, W) codebook logits when ``n_embed`` is set.
    ``attention_resolutions`` lists downsampling factors (1, 2, 4 ...) at which blocks get attention.
    ``transformer_depth``: one depth, or one per level (SDXL base ``[1, 2, 10]``); ``transformer_depth_middle``
    defaults to the last level's, as in Stability's ``sgm``, whose ``spatial_transformer_attn_type`` (a backend
    choice) is accepted and ignored: attention always runs through SDPA. ``image_size`` is unused.
    """

    ATTN_TYPES = ("softmax", "softmax-xformers")

    def __init__(
        self,
        image_size: int | None,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int | Sequence[int],
        attention_resolutions: Sequence[int],
        dropout: float = 0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: int | str | None = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        use_bf16: bool = False,
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
        spatial_transformer_attn_type: str = "softmax",
    ) -> None:
        super().__init__()
        # use_fp16 (SD 2.x configs) and use_bf16 (Intel's SD 2.x configs) are accepted so those configs load, but
        # ignored: the originals cast activations to that dtype inside forward (the weights stay float32), whereas
        # here the caller chooses the precision (autocast, or moving the module to a dtype).
        del use_fp16, use_bf16
        if use_spatial_transformer and context_dim is None:
            raise ValueError("use_spatial_transformer=True needs context_dim (the width of the conditioning)")
        if context_dim is not None and not use_spatial_transformer:
            raise ValueError("context_dim is only used by the spatial transformer; set use_spatial_transformer=True")
        if spatial_transformer_attn_type not in self.ATTN_TYPES:
            raise ValueError(
                f"spatial_transformer_attn_type must be one of {self.ATTN_TYPES}, got {spatial_transformer_attn_type!r}"
            )
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("set either num_heads or num_head_channels")
        channel_mult = tuple(channel_mult)
        levels = len(channel_mult)
        num_res_blocks = [num_res_blocks] * levels if isinstance(num_res_blocks, int) else list(num_res_blocks)
        if len(num_res_blocks) != levels:
            raise ValueError(f"num_res_blocks needs one entry per channel_mult level ({levels})")
        depths = [transformer_depth] * levels if isinstance(transformer_depth, int) else list(transformer_depth)
        if len(depths) != levels:
            raise ValueError(f"transformer_depth needs one entry per channel_mult level ({levels}), got {depths}")
        depth_middle = depths[-1] if transformer_depth_middle is None else transformer_depth_middle
        disable_self_attentions = list(disable_self_attentions or [False] * levels)
        if len(disable_self_attentions) != levels:
            raise ValueError(f"disable_self_attentions needs one entry per channel_mult level ({levels})")
        if num_attention_blocks is not None:
            num_attention_blocks = list(num_attention_blocks)
            too_many = any(a > r for a, r in zip(num_attention_blocks, num_res_blocks, strict=False))
            if len(num_attention_blocks) != levels or too_many:
                raise ValueError("num_attention_blocks needs one entry per level, none above num_res_blocks there")
        if context_dim is not None and not isinstance(context_dim, int):
            context_dim = list(context_dim)
        # Only the legacy decoder AttentionBlocks ever used a separate head count.
        num_heads_upsample = num_heads if num_heads_upsample == -1 else num_heads_upsample
        attention_resolutions = set(attention_resolutions)

        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_classes = num_classes
        self.predict_codebook_ids = n_embed is not None
        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            linear(model_channels, time_embed_dim), nn.SiLU(), linear(time_embed_dim, time_embed_dim)
        )
        self.label_emb = self._label_embedding(num_classes, time_embed_dim, adm_in_channels)

        def res_block(channels: int, out: int, up: bool = False, down: bool = False) -> ResBlock:
            return ResBlock(
                channels,
                time_embed_dim,
                dropout,
                out_channels=out,
                dims=dims,
                use_checkpoint=use_checkpoint,
                use_scale_shift_norm=use_scale_shift_norm,
                up=up,
                down=down,
            )

        def attention(channels: int, disable_self_attn: bool, decoder: bool, depth: int) -> nn.Module:
            if num_head_channels != -1:
                heads = channels // num_head_channels
            elif decoder and legacy and not use_spatial_transformer:
                heads = num_heads_upsample
            else:
                heads = num_heads
            if use_spatial_transformer:
                return SpatialTransformer(
                    channels,
                    heads,
                    num_head_channels if num_head_channels != -1 else channels // heads,
                    depth=depth,
                    context_dim=context_dims(depth),
                    disable_self_attn=disable_self_attn,
                    use_linear=use_linear_in_transformer,
                    use_checkpoint=use_checkpoint,
                )
            return AttentionBlock(
                channels,
                num_heads=heads,
                use_checkpoint=use_checkpoint,
                use_new_attention_order=use_new_attention_order,
            )

        def context_dims(depth: int) -> int | list[int] | None:
            # sgm repeats a list's one width over a block of another depth (the refiner lists 4 equal widths).
            if isinstance(context_dim, list) and len(context_dim) != depth and len(set(context_dim)) == 1:
                return [context_dim[0]] * depth
            return context_dim

        def wants_attention(ds: int, level: int, index: int) -> bool:
            return ds in attention_resolutions and (num_attention_blocks is None or index < num_attention_blocks[level])

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(dims, in_channels, model_channels, 3, padding=1))]
        )
        skip_channels = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for index in range(num_res_blocks[level]):
                layers = [res_block(ch, mult * model_channels)]
                ch = mult * model_channels
                if wants_attention(ds, level, index):
                    layers.append(attention(ch, disable_self_attentions[level], False, depths[level]))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != levels - 1:
                down = res_block(ch, ch, down=True) if resblock_updown else Downsample(ch, conv_resample, dims, ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            res_block(ch, ch), attention(ch, disable_middle_self_attn, False, depth_middle), res_block(ch, ch)
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for index in range(num_res_blocks[level] + 1):
                layers = [res_block(ch + skip_channels.pop(), mult * model_channels)]
                ch = mult * model_channels
                if wants_attention(ds, level, index):
                    layers.append(attention(ch, disable_self_attentions[level], True, depths[level]))
                if level and index == num_res_blocks[level]:
                    up = res_block(ch, ch, up=True) if resblock_updown else Upsample(ch, conv_resample, dims, ch)
                    layers.append(up)
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_module(conv_nd(dims, ch, out_channels, 3, padding=1))
        )
        if self.predict_codebook_ids:
            self.id_predictor = nn.Sequential(normalization(ch), conv_nd(dims, ch, n_embed, 1))

    @staticmethod
    def _label_embedding(num_classes: int | str | None, dim: int, adm_in_channels: int | None) -> nn.Module | None:
        """Embedding of the class label / ADM vector ``y``, added to the timestep embedding."""
        if num_classes is None:
            return None
        if isinstance(num_classes, int):
            return nn.Embedding(num_classes, dim)
        if num_classes == "continuous":
            return nn.Linear(1, dim)
        if num_classes == "sequential":
            if adm_in_channels is None:
                raise ValueError('num_classes="sequential" needs adm_in_channels (the width of y)')
            # Nested Sequential reproduces the checkpoints' label_emb.0.{0,2} keys.
            return nn.Sequential(nn.Sequential(linear(adm_in_channels, dim), nn.SiLU(), linear(dim, dim)))
        raise ValueError(f'num_classes must be an int, "continuous" or "sequential", got {num_classes!r}')

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor | None = None,
        context: torch.Tensor | Sequence[torch.Tensor] | None = None,
        y: torch.Tensor | None = None,
        control: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``control``: a ControlNet's residuals (:mod:`~ldm.modules.diffusionmodules.controlnet`), one per input
        block then the middle block's, added to the skip connections and to the middle block's output (cldm)."""
        if timesteps is None:
            raise ValueError("UNetModel.forward needs timesteps")
        if (y is not None) != (self.label_emb is not None):
            raise ValueError("pass y exactly when the model is class-conditional (num_classes is set)")
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        if y is not None:
            emb = emb + self.label_emb(y)
        skips = []
        # Runs in the memory format of the weights (see torch.channels_last); returns the input's.
        h = x.contiguous(memory_format=memory_format_of(self.input_blocks[0][0].weight))
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        if control is not None:
            h = h + control[-1]
            skips = [skip + residual for skip, residual in zip(skips, control[:-1], strict=True)]
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        out = self.id_predictor(h) if self.predict_codebook_ids else self.out(h)
        return out.contiguous(memory_format=memory_format_of(x))


def __getattr__(name: str) -> type:
    # EncoderUNetModel lives in its own module, which builds on the blocks above; it is looked up here lazily (at its
    # CompVis path) because an import at the top would be circular.
    if name == "EncoderUNetModel":
        from ldm.modules.diffusionmodules.encoder_unet import EncoderUNetModel

        return EncoderUNetModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
