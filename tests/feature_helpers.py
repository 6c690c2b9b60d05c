"""Small images and pixel arrays for the Pipeline tests (tests/test_inference.py and the A1111 feature tests)."""

import numpy as np
from PIL import Image


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def random_image(size=(32, 32), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    # Smooth content, so that the tiny VAE's reconstruction is a fair comparison.
    small = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BILINEAR)


def box_mask(size, box) -> Image.Image:
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask
