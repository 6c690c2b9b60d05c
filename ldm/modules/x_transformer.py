"""The transformer encoder of the LDM text-to-image models (``BERTEmbedder``, ``TransformerEmbedder``).

CompVis vendored it from lucidrains' x-transformers; this is the part of it those models use, with the original's
module layout and parameter names so that their checkpoints load key for key:

- ``TransformerWrapper``: ``token_emb``, ``pos_emb.emb`` (learned absolute positions), ``project_emb``,
  ``attn_layers``, ``norm`` (final LayerNorm) and ``to_logits``.
- ``Encoder``: ``layers.{i}`` alternating attention (even i) and feed-forward (odd i) layers, each
  ``[norm, block]``: ``layers.{i}.0`` the pre-norm LayerNorm, ``layers.{i}.1`` the block (``to_q``, ``to_k``,
  ``to_v``, ``to_out``; or ``net.0.0`` / ``net.2``). The original's third entry, a parameterless residual
  addition, is the ``+ x`` in :meth:`AttentionLayers.forward`, so it holds no state and needs no module.

The original's other options (causal decoding, cross-attention, memory tokens, relative positions, masks,
attention dropout ...) are not used by any LDM config and are not provided.
"""

import torch
from torch import nn

from ldm.errors import UserError
from ldm.modules.attention import FeedForward, attention

DEFAULT_DIM_HEAD = 64


class AbsolutePositionalEmbedding(nn.Module):
    """Learned positions: x: (B, N, ...) -> (1, N, dim), the embeddings of positions 0 .. N - 1."""

    def __init__(self, dim: int, max_seq_len: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(max_seq_len, dim)
        nn.init.normal_(self.emb.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(x.shape[1], device=self.emb.weight.device)
        return self.emb(positions)[None]


class Attention(nn.Module):
    """Multi-head self-attention: x: (B, N, dim) -> (B, N, dim), scale ``dim_head ** -0.5``.

    ``slice_size``: see :func:`ldm.modules.attention.attention` (set by ``set_attention_slicing``).
    """

    def __init__(self, dim: int, dim_head: int = DEFAULT_DIM_HEAD, heads: int = 8) -> None:
        super().__init__()
        inner_dim = dim_head * heads
        self.heads = heads
        self.to_q = nn.Linear(dim, inner_dim, bias=False)
        self.to_k = nn.Linear(dim, inner_dim, bias=False)
        self.to_v = nn.Linear(dim, inner_dim, bias=False)
        self.to_out = nn.Linear(inner_dim, dim)
        self.slice_size: int | str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def split_heads(t: torch.Tensor) -> torch.Tensor:
            # (B, N, heads * d) -> (B, heads, N, d), a view.
            return t.unflatten(-1, (self.heads, -1)).transpose(1, 2)

        q, k, v = split_heads(self.to_q(x)), split_heads(self.to_k(x)), split_heads(self.to_v(x))
        out = attention(q, k, v, self.slice_size)
        return self.to_out(out.transpose(1, 2).flatten(2))


class AttentionLayers(nn.Module):
    """``depth`` pre-norm blocks of self-attention then feed-forward, each residual: x: (B, N, dim) -> (B, N, dim).

    Args:
        dim: model width.
        depth: number of (attention, feed-forward) pairs; ``layers`` holds ``2 * depth`` entries.
        heads: attention heads.
        attn_dim_head: width of each head (the original's ``attn_dim_head`` keyword).
        ff_mult: feed-forward hidden width as a multiple of ``dim``.
        ff_glu: GEGLU-gated feed-forward instead of Linear + GELU.
        ff_dropout: dropout on the feed-forward hidden activations.
    """

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int = 8,
        attn_dim_head: int = DEFAULT_DIM_HEAD,
        ff_mult: int = 4,
        ff_glu: bool = False,
        ff_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.depth = depth
        self.layers = nn.ModuleList()
        for _ in range(depth):
            attn = Attention(dim, dim_head=attn_dim_head, heads=heads)
            ff = FeedForward(dim, mult=ff_mult, glu=ff_glu, dropout=ff_dropout)
            self.layers.append(nn.ModuleList([nn.LayerNorm(dim), attn]))
            self.layers.append(nn.ModuleList([nn.LayerNorm(dim), ff]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, block in self.layers:
            x = block(norm(x)) + x
        return x


class Encoder(AttentionLayers):
    """Bidirectional :class:`AttentionLayers` (the only kind the LDM models use): same arguments."""


class TransformerWrapper(nn.Module):
    """Token ids (B, N) -> logits (B, N, num_tokens), or the final-normed features (B, N, dim) with
    ``return_embeddings``.

    Args:
        num_tokens: vocabulary size.
        max_seq_len: number of learned positions; longer inputs are refused.
        attn_layers: the :class:`Encoder`, whose ``dim`` is the model width.
        emb_dim: token embedding width; when it differs from ``dim`` a Linear ``project_emb`` maps it.
        emb_dropout: dropout on the summed token and position embeddings.
        use_pos_emb: add learned absolute positions.
    """

    def __init__(
        self,
        *,
        num_tokens: int,
        max_seq_len: int,
        attn_layers: AttentionLayers,
        emb_dim: int | None = None,
        emb_dropout: float = 0.0,
        use_pos_emb: bool = True,
    ) -> None:
        super().__init__()
        dim = attn_layers.dim
        emb_dim = dim if emb_dim is None else emb_dim
        self.max_seq_len = max_seq_len
        self.num_tokens = num_tokens
        self.token_emb = nn.Embedding(num_tokens, emb_dim)
        nn.init.normal_(self.token_emb.weight, std=0.02)
        self.pos_emb = AbsolutePositionalEmbedding(emb_dim, max_seq_len) if use_pos_emb else None
        self.emb_dropout = nn.Dropout(emb_dropout)
        self.project_emb = nn.Linear(emb_dim, dim) if emb_dim != dim else nn.Identity()
        self.attn_layers = attn_layers
        self.norm = nn.LayerNorm(dim)
        # Kept although the LDM embedders only use ``return_embeddings``: the checkpoints hold it.
        self.to_logits = nn.Linear(dim, num_tokens)

    def forward(self, x: torch.Tensor, return_embeddings: bool = False) -> torch.Tensor:
        """x: (B, N) int64 token ids, N <= max_seq_len -> (B, N, dim) or (B, N, num_tokens)."""
        if x.shape[1] > self.max_seq_len:
            raise UserError(
                f"{x.shape[1]} tokens exceed the transformer's {self.max_seq_len} positions; tokenize to at most "
                f"{self.max_seq_len} tokens (the tokenizer's max_length)."
            )
        h = self.token_emb(x)
        if self.pos_emb is not None:
            h = h + self.pos_emb(h)
        h = self.project_emb(self.emb_dropout(h))
        h = self.norm(self.attn_layers(h))
        return h if return_embeddings else self.to_logits(h)
