"""``ConcatTimestepEmbedderND``: SDXL's Fourier embedding of size, crop and aesthetic-score conditioning."""

import torch

from ldm.modules.diffusionmodules.util import timestep_embedding
from ldm.modules.encoders.base import AbstractEncoder


class ConcatTimestepEmbedderND(AbstractEncoder):
    """Embeds each number of a tuple with the sinusoidal timestep embedding and concatenates the embeddings.

    x: (B, N) (or (B,), taken as N = 1) -> (B, N * outdim): columns ``[i * outdim, (i + 1) * outdim)`` are the
    embedding of ``x[:, i]``, cosines first (max period 10000), as Stability's ``sgm``. SDXL embeds
    ``original_size_as_tuple`` (height, width), ``crop_coords_top_left`` (top, left), ``target_size_as_tuple``
    (height, width) and, for the refiner, ``aesthetic_score``, each with ``outdim`` 256. No parameters.
    """

    def __init__(self, outdim: int) -> None:
        super().__init__()
        self.outdim = outdim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 1:
            x = x[:, None]
        if x.ndim != 2:
            raise ValueError(f"ConcatTimestepEmbedderND takes (B, N) or (B,) numbers, got shape {tuple(x.shape)}")
        return timestep_embedding(x.flatten(), self.outdim).reshape(x.shape[0], -1)
