"""Image variation with an SD 2.1 unCLIP model: new images of --init-img's content, optionally steered by --prompt;
--noise_level (0..999) noises the image's CLIP embedding so that the variations follow it less closely.

python scripts/image_variation.py --init-img cat.png --ckpt sd21-unclip-h.ckpt --noise_level 0 --n_samples 2 \
    --config configs/stable-diffusion/v2-1-stable-unclip-h-inference.yaml
python scripts/image_variation.py --help     # every flag (those of txt2img.py, plus --init-img and --noise_level)
"""

import sys

from ldm.cli import main

if __name__ == "__main__":
    sys.exit(main("image_variation"))
