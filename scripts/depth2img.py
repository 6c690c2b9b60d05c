"""Depth to image: redraw --init-img guided by the prompt while keeping its depth map (SD 2 depth models; MiDaS
estimates the depth, or give --depth_map); --strength says how much changes.

python scripts/depth2img.py --init-img room.png --prompt "a cosy cabin" --ckpt 512-depth-ema.ckpt
python scripts/depth2img.py --help     # every flag (img2img's, plus --depth_map)
"""

import sys

from ldm.cli import main

if __name__ == "__main__":
    sys.exit(main("depth2img"))
