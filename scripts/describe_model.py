"""Build models from their configs on the ``meta`` device (no memory, no weights) and print their parts.

python scripts/describe_model.py                                   # SD 1.x, SD 2.x and SD 2.x-v
python scripts/describe_model.py --config configs/stable-diffusion/v1-inference.yaml model.params.use_ema=true
"""

from __future__ import annotations

import argparse
import operator
import sys
from pathlib import Path

import torch

from ldm.errors import ScriptParser, print_error
from ldm.util import ConfigError, count_params, instantiate_from_config, load_config

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = [
    ROOT / "configs/stable-diffusion/v1-inference.yaml",
    ROOT / "configs/stable-diffusion/v2-inference.yaml",
    ROOT / "configs/stable-diffusion/v2-inference-v.yaml",
]
PARTS = {
    "UNet (model.diffusion_model)": "model.diffusion_model",
    "VAE (first_stage_model)": "first_stage_model",
    "text encoder (cond_stage_model)": "cond_stage_model",
    "image encoder (embedder)": "embedder",
}


def describe(config_path: Path, overrides: list[str]) -> str:
    config = load_config(config_path, overrides)
    with torch.device("meta"):
        model = instantiate_from_config(config.model, path="model")
    lines = [f"{config_path.relative_to(ROOT) if config_path.is_relative_to(ROOT) else config_path}"]
    lines.append(f"  {type(model).__module__}.{type(model).__qualname__}, parameterization {model.parameterization}")
    for label, attribute in PARTS.items():
        try:
            part = operator.attrgetter(attribute)(model)
        except AttributeError:
            continue
        if isinstance(part, torch.nn.Module):
            lines.append(f"  {label:34s} {type(part).__name__:26s} {count_params(part) / 1e6:9.1f} M parameters")
    lines.append(f"  {'total':34s} {'':26s} {count_params(model) / 1e6:9.1f} M parameters")
    lines.append(f"  state dict: {len(model.state_dict())} tensors")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = ScriptParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, action="append", help="config to describe (repeatable)")
    parser.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    args = parser.parse_args(argv)
    try:
        for path in args.config or DEFAULT_CONFIGS:
            print(describe(path.resolve(), args.overrides))
    except ConfigError as err:
        return print_error(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
