"""The VQ-GAN vector quantizer: each latent vector is replaced by its nearest codebook entry.

API and state-dict layout of taming-transformers' ``VectorQuantizer2`` (``embedding.weight``, ``used`` with a
remap), which CompVis's ``VQModel`` builds as ``quantize``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ldm.errors import UserError

UNKNOWN_INDEX_CHOICES = ("random", "extra")


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantization of z: (B, e_dim, H, W) onto a codebook of ``n_e`` vectors.

    The loss is ``mean((sg[z_q] - z)^2) + beta * mean((z_q - sg[z])^2)`` with ``legacy=True`` (the originals' default,
    which puts ``beta`` on the codebook term by mistake; released checkpoints were trained with it), and
    ``beta * mean((sg[z_q] - z)^2) + mean((z_q - sg[z])^2)`` with ``legacy=False`` (the VQ-VAE paper's commitment
    weight). The output is ``z + sg[z_q - z]``: the codebook vector forward, the identity backward (straight-through),
    so the encoder gets the decoder's gradient.

    ``remap``: a ``.npy`` file of the codebook indices a model actually uses; indices are then reported (and taken by
    :meth:`get_codebook_entry`) as positions in that list. Indices outside it become a random used position
    (``unknown_index="random"``), one extra position after the used ones (``"extra"``), or a given integer.
    ``sane_index_shape`` returns the indices as (B, H, W) instead of flat.
    """

    def __init__(
        self,
        n_e: int,
        e_dim: int,
        beta: float,
        remap: str | os.PathLike | None = None,
        unknown_index: str | int = "random",
        sane_index_shape: bool = False,
        legacy: bool = True,
    ) -> None:
        super().__init__()
        self.n_e = n_e
        self.e_dim = e_dim
        self.beta = beta
        self.legacy = legacy
        self.sane_index_shape = sane_index_shape
        self.embedding = nn.Embedding(n_e, e_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_e, 1.0 / n_e)
        self.remap = remap
        self.re_embed = n_e
        if remap is not None:
            self.register_buffer("used", _load_used_indices(remap, n_e))
            self.re_embed = len(self.used)
            if unknown_index == "extra":
                unknown_index = self.re_embed
                self.re_embed += 1
            elif isinstance(unknown_index, bool) or not (
                unknown_index == "random" or (isinstance(unknown_index, int) and unknown_index >= 0)
            ):
                raise UserError(
                    f"unknown_index must be 'random', 'extra' or a non-negative integer, got {unknown_index!r}."
                )
            self.unknown_index = unknown_index

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, None, torch.Tensor]]:
        """z: (B, e_dim, H, W) -> ``(z_q, loss, (perplexity, min_encodings, indices))``.

        z_q: (B, e_dim, H, W) with straight-through gradients; loss: a scalar; perplexity: exp of the entropy of the
        batch's codebook usage; min_encodings: None (a one-hot of every index, which the originals skip too);
        indices: (B*H*W,), or (B*H*W, 1) with a remap (as the originals give them), or (B, H, W) with
        ``sane_index_shape``.
        """
        if z.shape[1] != self.e_dim:
            raise ValueError(f"expected latents with {self.e_dim} channels, got shape {tuple(z.shape)}.")
        z = z.permute(0, 2, 3, 1).contiguous()
        flat = z.reshape(-1, self.e_dim)
        codebook = self.embedding.weight
        # |z - e|^2 = |z|^2 + |e|^2 - 2 z.e, as one matrix product instead of a (N, n_e, e_dim) difference tensor.
        distances = torch.addmm(
            flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1), flat, codebook.t(), beta=1.0, alpha=-2.0
        )
        indices = distances.argmin(dim=1)
        z_q = self.embedding(indices).view(z.shape)
        codebook_term = torch.mean((z_q - z.detach()) ** 2)
        commitment_term = torch.mean((z_q.detach() - z) ** 2)
        if self.legacy:
            loss = commitment_term + self.beta * codebook_term
        else:
            loss = self.beta * commitment_term + codebook_term
        z_q = z + (z_q - z).detach()
        z_q = z_q.permute(0, 3, 1, 2).contiguous()
        perplexity = _perplexity(indices)
        if self.remap is not None:
            indices = self.remap_to_used(indices).reshape(-1, 1)
        if self.sane_index_shape:
            indices = indices.reshape(z_q.shape[0], z_q.shape[2], z_q.shape[3])
        return z_q, loss, (perplexity, None, indices)

    def remap_to_used(self, indices: torch.Tensor) -> torch.Tensor:
        """Codebook indices (any shape) -> positions in ``used``; unknown ones as ``unknown_index`` says."""
        position = torch.full((self.n_e,), -1, dtype=torch.long, device=indices.device)
        position[self.used.long()] = torch.arange(len(self.used), device=indices.device)
        new = position[indices.long()]
        unknown = new < 0
        if self.unknown_index == "random":
            new[unknown] = torch.randint(0, self.re_embed, (int(unknown.sum()),), device=new.device)
        else:
            new[unknown] = self.unknown_index
        return new

    def unmap_to_all(self, indices: torch.Tensor) -> torch.Tensor:
        """Positions in ``used`` (any shape) -> codebook indices; the ``extra`` position maps to entry 0."""
        indices = indices.long().clone()
        indices[indices >= len(self.used)] = 0
        return self.used.long()[indices]

    def get_codebook_entry(self, indices: torch.Tensor, shape: tuple[int, int, int, int] | None) -> torch.Tensor:
        """Codebook vectors for ``indices``: with ``shape = (B, H, W, e_dim)`` (indices of B*H*W entries) a latent
        (B, e_dim, H, W); with ``shape=None`` the vectors in the indices' own shape, ``indices.shape + (e_dim,)``."""
        if self.remap is not None:
            indices = self.unmap_to_all(indices)
        z_q = self.embedding(indices.long())
        if shape is None:
            return z_q
        return z_q.reshape(shape).permute(0, 3, 1, 2).contiguous()


# taming-transformers' name for this (fixed-loss) variant.
VectorQuantizer2 = VectorQuantizer


def _load_used_indices(path: str | os.PathLike, n_e: int) -> torch.Tensor:
    if not Path(path).is_file():
        raise UserError(
            f"remap file '{path}' does not exist; give the .npy of used codebook indices that came with the model, "
            "or remove remap."
        )
    try:
        used = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise UserError(f"remap file '{path}' is not a .npy array of codebook indices: {err}") from None
    if used.ndim != 1 or used.size == 0 or not np.issubdtype(used.dtype, np.integer):
        raise UserError(f"remap file '{path}' must hold a non-empty 1-D integer array, got {used.dtype} {used.shape}.")
    if used.min() < 0 or used.max() >= n_e:
        raise UserError(f"remap file '{path}' holds indices outside the codebook [0, {n_e}); check n_embed.")
    return torch.from_numpy(used.astype(np.int64))


@torch.no_grad()
def _perplexity(indices: torch.Tensor) -> torch.Tensor:
    """exp(entropy) of the codebook usage in ``indices``: 1 when one entry is used, k when k are used equally."""
    # unique's counts, not bincount: deterministic on CUDA, so runs with deterministic algorithms on still work.
    _, counts = torch.unique(indices, return_counts=True)
    p = counts.float() / indices.numel()
    return torch.exp(-(p * torch.log(p)).sum())
