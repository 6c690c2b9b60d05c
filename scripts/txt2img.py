"""Text to image: CompVis's scripts/txt2img.py flags, plus --negative_prompt, --sampler, --clip_skip ...

python scripts/txt2img.py --help     # every flag; the README's "Generating images" section has examples
"""

import sys

from ldm.cli import main

if __name__ == "__main__":
    sys.exit(main("txt2img"))
