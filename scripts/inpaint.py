"""Inpainting: repaint the white region of --mask in --init-img (SD inpainting models or any SD model).

python scripts/inpaint.py --help     # every flag; the README's "Generating images" section has examples
"""

import sys

from ldm.cli import main

if __name__ == "__main__":
    sys.exit(main("inpaint"))
