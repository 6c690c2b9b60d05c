"""Image to image: redraw --init-img guided by the prompt; --strength says how much changes (CompVis flags).

python scripts/img2img.py --help     # every flag; the README's "Generating images" section has examples
"""

import os
import sys

import torch
from PIL import Image

from ldm.cli import main
from ldm.inference import image_to_tensor
from ldm.outputs import load_image


def load_img(path: str | os.PathLike) -> torch.Tensor:
    """CompVis's helper of this name: the image at ``path`` as (1, 3, H, W) in [-1, 1], each side cut down to a
    multiple of 32 (Lanczos), as CompVis's img2img.py feeds it to the first stage."""
    image = load_image(path, "init image")
    width, height = (side - side % 32 for side in image.size)
    return image_to_tensor(image.resize((width, height), resample=Image.Resampling.LANCZOS))


if __name__ == "__main__":
    sys.exit(main("img2img"))
