"""Transformer layers of the Stable Diffusion UNet: cross-attention, the transformer block and its spatial wrapper.

Names and submodule layout follow the CompVis checkpoints (``attn1.to_q``, ``ff.net.0.proj``, ``proj_in`` ...).

This module also holds what every attention layer of the project shares (the UNet's ``CrossAttention`` and
``AttentionBlock``, the VAE's ``AttnBlock``): the one attention function, :func:`attention`, with optional query
slicing (:func:`set_attention_slicing`), and the conversions between feature maps and token sequences. The latter
keep each feature map in its input's memory format, so that a model moved to ``torch.channels_last`` stays in it
and a plain (NCHW) model never hands a convolution a tensor it would first have to copy.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.errors import UserError
from ldm.modules.diffusionmodules.util import checkpoint, zero_module

# "auto" slicing keeps each slice's score matrix (batch x heads x slice x keys) at most this many elements
# (256 MiB in float32): SD 1.x at 1024x1024 then runs its largest self-attention in 64 slices, at 512x512 in 4.
AUTO_SLICE_SCORES = 2**26


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slice_size: int | str | None = None) -> torch.Tensor:
    """Softmax attention with scale ``d ** -0.5``: q: (B, heads, N, d), k: (B, heads, M, d), v: (B, heads, M, dv)
    -> (B, heads, N, dv).

    ``slice_size`` runs the queries in chunks of that many rows, so a kernel that materialises the scores (the math
    kernel of the CPU and MPS, or CUDA without flash / memory-efficient kernels) holds a (B, heads, slice_size, M)
    matrix instead of (B, heads, N, M). Query rows are independent, so the result is the same up to rounding.
    ``"auto"`` picks the largest slice with at most ``AUTO_SLICE_SCORES`` scores; None means one chunk.
    """
    n = q.shape[-2]
    if slice_size == "auto":
        slice_size = max(1, AUTO_SLICE_SCORES // (q.shape[0] * q.shape[1] * k.shape[-2]))
    if slice_size is None or slice_size >= n:
        return F.scaled_dot_product_attention(q, k, v)
    chunks = [F.scaled_dot_product_attention(q[..., i : i + slice_size, :], k, v) for i in range(0, n, slice_size)]
    return torch.cat(chunks, dim=-2)


def check_slice_size(slice_size: int | str | None) -> None:
    """UserError unless ``slice_size`` is a positive int, "auto" or None."""
    valid = slice_size is None or slice_size == "auto"
    valid = valid or (isinstance(slice_size, int) and not isinstance(slice_size, bool) and slice_size > 0)
    if not valid:
        raise UserError(f"the attention slice size must be a positive integer, 'auto' or None, got {slice_size!r}.")


def set_attention_slicing(model: nn.Module, slice_size: int | str | None) -> None:
    """Set ``slice_size`` (see :func:`attention`) on every attention layer of ``model``: a positive int, "auto", or
    None to turn slicing off. Layers are found by their ``slice_size`` attribute (CrossAttention, the UNet's
    AttentionBlock and the VAE's AttnBlock).
    """
    check_slice_size(slice_size)
    for module in model.modules():
        if hasattr(module, "slice_size"):
            module.slice_size = slice_size


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """``torch.channels_last`` for a 4D tensor laid out that way, else ``torch.contiguous_format``.

    A tensor dense in both layouts (size-1 dims can make it so) counts as contiguous: either way nothing is copied.
    Works on conv weights too, (out, in, kh, kw), to tell which layout a model was moved to.
    """
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def to_tokens(x: torch.Tensor) -> torch.Tensor:
    """Feature map (B, C, *spatial) -> contiguous tokens (B, T, C), T = prod(spatial).

    Free for a channels_last map (its memory already is (B, H, W, C)); one copy for an NCHW one.
    """
    return x.flatten(2).transpose(1, 2).contiguous()


def from_tokens(tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Tokens (B, T, C') -> feature map (B, C', *spatial) with the spatial shape and memory format of ``like``.

    The plain reshape would be channels_last-strided whatever ``like`` is; an NCHW model's next convolution (and the
    residual sum, whose layout follows its first operand) would then copy. Free when ``like`` is channels_last.
    """
    x = tokens.transpose(1, 2).unflatten(2, like.shape[2:])
    return x.contiguous(memory_format=memory_format_of(like))


def conv1x1_as_linear(tokens: torch.Tensor, conv: nn.Module) -> torch.Tensor:
    """Apply a 1x1 convolution (any dims) to tokens (..., in_channels) -> (..., out_channels), as a matmul.

    The attention layers keep the checkpoints' conv weights but work on tokens, where a Linear needs no layout change.
    """
    return F.linear(tokens, conv.weight.flatten(1), conv.bias)


class CrossAttention(nn.Module):
    """Multi-head attention of ``x`` over ``context`` (over ``x`` itself when no context is given).

    x: (B, N, query_dim); context: (B, M, context_dim) -> (B, N, query_dim). ``slice_size``: see :func:`attention`.
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))
        self.slice_size: int | str | None = None

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context

        def split_heads(t: torch.Tensor) -> torch.Tensor:
            # (B, L, heads * d) -> (B, heads, L, d) as a view: SDPA takes strided inputs, so no copy is made here.
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        q, k, v = split_heads(self.to_q(x)), split_heads(self.to_k(context)), split_heads(self.to_v(context))
        out = attention(q, k, v, self.slice_size)
        return self.to_out(out.transpose(1, 2).flatten(2))


class GEGLU(nn.Module):
    """GELU-gated linear unit: ``(..., dim_in) -> (..., dim_out)``."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """Transformer MLP ``(..., dim) -> (..., dim_out)`` with hidden width ``dim * mult``, GEGLU-gated if ``glu``."""

    def __init__(
        self, dim: int, dim_out: int | None = None, mult: int = 4, glu: bool = False, dropout: float = 0.0
    ) -> None:
        super().__init__()
        inner_dim = int(dim * mult)
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU())
        dim_out = dim if dim_out is None else dim_out
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner_dim, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention to ``context``, feed-forward; each residual.

    x: (B, N, dim); context: (B, M, context_dim) -> (B, N, dim). With ``disable_self_attn`` the first attention
    also attends to the context instead of to ``x``.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        d_head: int,
        dropout: float = 0.0,
        context_dim: int | None = None,
        gated_ff: bool = True,
        checkpoint: bool = True,
        disable_self_attn: bool = False,
    ) -> None:
        super().__init__()
        self.disable_self_attn = disable_self_attn
        self.checkpoint = checkpoint
        self.attn1 = CrossAttention(
            dim, context_dim=context_dim if disable_self_attn else None, heads=n_heads, dim_head=d_head, dropout=dropout
        )
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(dim, context_dim=context_dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return checkpoint(self._forward, (x, context), self.parameters(), self.checkpoint)

    def _forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        x = self.attn1(self.norm1(x), context=context if self.disable_self_attn else None) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of an image feature map, conditioned on ``context``; residual overall.

    x: (B, C, H, W) -> (B, C, H, W). ``context`` is one (B, M, context_dim) tensor, or a list with one per block
    (``context_dim`` may likewise be a list, one per block). ``use_linear`` projects in and out with Linear layers
    after flattening (SD 2.x) instead of 1x1 convolutions before it (SD 1.x).
    """

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        dropout: float = 0.0,
        context_dim: int | Sequence[int] | None = None,
        disable_self_attn: bool = False,
        use_linear: bool = False,
        use_checkpoint: bool = True,
    ) -> None:
        super().__init__()
        if context_dim is None or isinstance(context_dim, int):
            context_dim = [context_dim] * depth
        context_dim = list(context_dim)
        if len(context_dim) != depth:
            raise ValueError(f"context_dim lists {len(context_dim)} sizes but depth is {depth}")
        inner_dim = n_heads * d_head
        self.use_linear = use_linear
        # eps 1e-6 (not GroupNorm's default) is what the original checkpoints were trained with.
        self.norm = nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)
        if use_linear:
            self.proj_in = nn.Linear(in_channels, inner_dim)
            self.proj_out = zero_module(nn.Linear(inner_dim, in_channels))
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
            self.proj_out = zero_module(nn.Conv2d(inner_dim, in_channels, kernel_size=1))
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner_dim,
                n_heads,
                d_head,
                dropout=dropout,
                context_dim=context_dim[d],
                disable_self_attn=disable_self_attn,
                checkpoint=use_checkpoint,
            )
            for d in range(depth)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor | Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        if not isinstance(context, (list, tuple)):
            context = [context] * len(self.transformer_blocks)
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        # Contiguous rows once on the way in (free for channels_last), so every block's Linear sees them.
        x = to_tokens(x)
        if self.use_linear:
            x = self.proj_in(x)
        for block, block_context in zip(self.transformer_blocks, context, strict=True):
            x = block(x, context=block_context)
        if self.use_linear:
            x = self.proj_out(x)
        x = from_tokens(x, like=x_in)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in


class LinearAttention(nn.Module):
    """Linear (softmax-kernel) self-attention over a feature map, ``(B, dim, H, W) -> (B, dim, H, W)``.

    Keys are softmax-normalised over positions and summarised per head into a ``dim_head x dim_head`` context
    ``sum_n softmax(k)_n v_n^T``, which each query then reads: cost linear in ``H * W`` where attention is quadratic.
    No residual: callers add it if they want one. Keys ``to_qkv`` (1x1, no bias) and ``to_out`` as CompVis's.
    """

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32) -> None:
        super().__init__()
        self.heads = heads
        hidden_dim = dim_head * heads
        self.to_qkv = nn.Conv2d(dim, hidden_dim * 3, 1, bias=False)
        self.to_out = nn.Conv2d(hidden_dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        # (B, 3 * heads * d, H, W) -> three (B, heads, d, N); channels are ordered (q/k/v, head, d).
        q, k, v = self.to_qkv(x).reshape(b, 3, self.heads, -1, h * w).unbind(1)
        context = k.softmax(dim=-1) @ v.transpose(-1, -2)  # (B, heads, d_k, d_v)
        out = context.transpose(-1, -2) @ q  # (B, heads, d_v, N)
        return self.to_out(out.reshape(b, -1, h, w))
