"""Captions drawn as images, so that logs can show a batch's conditioning text beside its samples."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def _wrap(text: str, draw: ImageDraw.ImageDraw, font: ImageFont.ImageFont, width: int) -> list[str]:
    """``text`` broken into lines no wider than ``width`` pixels: at spaces where possible, else inside a word."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        candidate = f"{line} {word}" if line else word
        if draw.textlength(candidate, font=font) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        # A word wider than the image on its own is cut wherever it overflows.
        line = ""
        for char in word:
            if line and draw.textlength(line + char, font=font) > width:
                lines.append(line)
                line = ""
            line += char
    if line:
        lines.append(line)
    return lines


def log_txt_as_img(wh: Sequence[int], xc: Sequence[str], size: int = 10) -> torch.Tensor:
    """Each caption of ``xc`` in black on white, wrapped to the width: ``(B, 3, H, W)`` float32 in [-1, 1].

    wh: ``(W, H)`` of each image; size: the font size in pixels (PIL's default font). Text that does not fit the
    height is cut off at the bottom.
    """
    width, height = (int(n) for n in wh)
    font = ImageFont.load_default(size=size)
    images = []
    for caption in xc:
        image = Image.new("RGB", (width, height), color="white")
        draw = ImageDraw.Draw(image)
        draw.multiline_text((0, 0), "\n".join(_wrap(str(caption), draw, font, width)), fill="black", font=font)
        images.append(np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0)
    return torch.from_numpy(np.stack(images)) if images else torch.zeros(0, 3, height, width)
