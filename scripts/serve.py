"""Serve a model over A1111's HTTP API (``/sdapi/v1/*``) and a web page; see :mod:`ldm.server.cli` for the flags.

python scripts/serve.py --config models/ldm/shapes/config.yaml --ckpt models/ldm/shapes/model.safetensors
"""

import sys

from ldm.server.cli import main

if __name__ == "__main__":
    sys.exit(main())
