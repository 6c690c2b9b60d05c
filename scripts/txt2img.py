"""Text to image: CompVis's scripts/txt2img.py flags, plus --negative_prompt, --sampler, --clip_skip ...

python scripts/txt2img.py --help     # every flag; the README's "Generating images" section has examples
"""

import sys
from typing import Any

from PIL import Image

from ldm.checkpoint import load_model_from_config
from ldm.cli import main
from ldm.postprocess import Watermarker

# CompVis's and Stability's scripts define these helpers here, and code written against them imports them from here.
__all__ = ["load_model_from_config", "put_watermark"]


def put_watermark(img: Image.Image, wm_encoder: Any = None) -> Image.Image:
    """CompVis's helper of this name, which the originals' img2img.py imports from ``scripts.txt2img``: ``img``
    marked by ``wm_encoder`` (an ``imwatermark.WatermarkEncoder``), or unchanged without one."""
    return img if wm_encoder is None else Watermarker(wm_encoder)(img)


if __name__ == "__main__":
    sys.exit(main("txt2img"))
