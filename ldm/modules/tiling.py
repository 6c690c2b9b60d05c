"""Decode latents tile by tile, so the VAE decoder's memory is bounded by the tile size instead of the image size.

The decoder's activations at full resolution dominate the memory of a large image (SD 1.x at 1024x1024: several GiB
in float32, and its mid-block attention over all 16384 latent pixels). Decoding overlapping tiles and blending them
linearly where they overlap keeps the peak to one tile's worth. The result is close to a full decode but not equal:
each tile's GroupNorm statistics and mid-block attention see only that tile.
"""

import math
from collections.abc import Callable

import torch


def tiled_decode(
    decode: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, factor: int, tile: int = 64, overlap: int = 16
) -> torch.Tensor:
    """Decode latents z: (B, C, h, w) -> images (B, C', factor*h, factor*w) by tiles of ``tile`` x ``tile`` latents.

    ``decode`` maps a latent tile (B, C, h', w') to its image (B, C', factor*h', factor*w'). Neighbouring tiles
    overlap by at least ``overlap`` latents (tiles are spread evenly, so most overlap a little more) and are
    cross-faded linearly across each overlap. A latent that fits in one tile goes through ``decode`` unchanged.
    """
    if tile < 1 or not 0 <= overlap < tile:
        raise ValueError(f"tiles need tile >= 1 and 0 <= overlap < tile, got tile {tile} and overlap {overlap}.")
    height, width = z.shape[-2:]
    if height <= tile and width <= tile:
        return decode(z)
    rows, cols = _spans(height, tile, overlap), _spans(width, tile, overlap)
    row_weights, col_weights = _blend_weights(rows, factor, z.device), _blend_weights(cols, factor, z.device)
    out = None
    for (y0, y1), wy in zip(rows, row_weights, strict=True):
        for (x0, x1), wx in zip(cols, col_weights, strict=True):
            piece = decode(z[..., y0:y1, x0:x1])
            if out is None:
                # Accumulated in float32, whatever the decoder's dtype, so the blend adds no rounding of its own.
                out = torch.zeros(*piece.shape[:2], factor * height, factor * width, device=piece.device)
            out[..., factor * y0 : factor * y1, factor * x0 : factor * x1] += piece.float() * wy[:, None] * wx
    return out.to(piece.dtype)


def _spans(size: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """(start, stop) of the fewest tiles of length ``tile`` covering ``range(size)`` with overlaps >= ``overlap``."""
    if size <= tile:
        return [(0, size)]
    count = math.ceil((size - overlap) / (tile - overlap))
    starts = [round(i * (size - tile) / (count - 1)) for i in range(count)]
    return [(start, start + tile) for start in starts]


def _blend_weights(spans: list[tuple[int, int]], factor: int, device: torch.device) -> list[torch.Tensor]:
    """Per tile, the weights of its pixels along one axis, (factor * tile length,).

    Each tile ramps linearly from ~0 to 1 across its overlap with each neighbour; the weights are then normalised
    to sum to one at every pixel, which is only needed where three tiles overlap (on short axes).
    """
    ramps = []
    for i, (start, stop) in enumerate(spans):
        ramp = torch.ones(factor * (stop - start), device=device)
        rise = factor * (spans[i - 1][1] - start) if i > 0 else 0
        fall = factor * (stop - spans[i + 1][0]) if i + 1 < len(spans) else 0
        if rise > 0:
            ramp[:rise] = (torch.arange(rise, device=device) + 0.5) / rise
        if fall > 0:
            ramp[-fall:] = torch.minimum(ramp[-fall:], (torch.arange(fall, 0, -1, device=device) - 0.5) / fall)
        ramps.append(ramp)
    total = torch.zeros(factor * spans[-1][1], device=device)
    for (start, stop), ramp in zip(spans, ramps, strict=True):
        total[factor * start : factor * stop] += ramp
    return [ramp / total[factor * start : factor * stop] for (start, stop), ramp in zip(spans, ramps, strict=True)]
