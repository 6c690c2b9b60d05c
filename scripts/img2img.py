"""Image to image: redraw --init-img guided by the prompt; --strength says how much changes (CompVis flags).

python scripts/img2img.py --help     # every flag; the README's "Generating images" section has examples
"""

import sys

from ldm.cli import main

if __name__ == "__main__":
    sys.exit(main("img2img"))
