"""Upscale an image 4x with the SD 2.x x4 upscaler (``ldm.upscale``), guided by a prompt.

    python scripts/upscale.py --init-img small.png --prompt "a photograph of a cat" --ckpt x4-upscaler-ema.ckpt

The defaults are Stability's demo settings (75 DDIM steps, scale 10, noise level 20). Images go to
``--outdir/NNNNN.png`` with their settings in the PNG metadata.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ldm.checkpoint import load_model_from_config
from ldm.cli import choose_config
from ldm.devices import resolve_device
from ldm.errors import ScriptParser, UserError, run_script
from ldm.inference import sampler_label
from ldm.models.diffusion.latent_upscale import DEFAULT_NOISE_LEVEL
from ldm.models.diffusion.noise import check_seed
from ldm.models.diffusion.samplers import check_sampling_arguments
from ldm.openvino_engine import add_engine_argument, attach_openvino, check_engine
from ldm.outputs import format_parameters, load_image, save_numbered
from ldm.upscale import upscale

DEFAULT_CONFIG = "configs/stable-diffusion/x4-upscaling.yaml"


def build_parser() -> ScriptParser:
    parser = ScriptParser(prog="scripts/upscale.py", description="4x upscaling with the SD 2.x x4 upscaler.")
    add = parser.add_argument
    add("--init-img", dest="init_img", type=str, required=True, help="the image to upscale")
    add("--prompt", type=str, default="", help="what the image shows")
    add("--negative_prompt", type=str, default="", help="what the upscale should not show")
    add("--noise_level", type=int, default=DEFAULT_NOISE_LEVEL, help="noise added to the input, 0..350 (default 20)")
    add("--steps", type=int, default=75, help="sampling steps (default 75)")
    add("--scale", type=float, default=10.0, help="classifier-free guidance scale (default 10)")
    add("--sampler", type=str, default="ddim", help="sampler by its A1111 name or id (default DDIM)")
    add("--eta", type=float, default=None, help="eta of DDIM (default 0) and of ancestral samplers (default 1)")
    add("--n_samples", type=int, default=1, help="how many upscales of the image (default 1)")
    add("--seed", type=int, default=42, help="seed of the first upscale; upscale k uses seed + k")
    add("--outdir", type=str, default="outputs/upscale-samples", help="dir to write results to")
    add("--config", type=str, default=None, help=f"config of the model (default: detected, {DEFAULT_CONFIG})")
    add("--ckpt", type=str, required=True, help="checkpoint of the model (x4-upscaler-ema.ckpt)")
    add("--vae_tiling", action="store_true", help="decode by overlapping tiles, to save memory on large outputs")
    add("--device", type=str, default=None, help="cpu, cuda, cuda:N or mps (default: the best available)")
    add_engine_argument(parser)
    add("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Upscale with ``argv``; returns the exit code (0, or 2 after a one-line error)."""
    return run_script(build_parser(), run, argv)


def run(args: argparse.Namespace) -> None:
    """Upscale as ``args`` say; UserError / OSError on bad input."""
    if not Path(args.ckpt).is_file():
        raise UserError(f"--ckpt '{args.ckpt}' does not exist; give the upscaler's checkpoint file.")
    config = choose_config(args.config, Path(args.ckpt), args.overrides)
    if not str(config.model.get("target", "")).endswith(".LatentUpscaleDiffusion"):
        raise UserError(f"upscale.py needs the x4 upscaler ({DEFAULT_CONFIG}, x4-upscaler-ema.ckpt); this is not.")
    if args.n_samples < 1:
        raise UserError(f"--n_samples must be at least 1, got {args.n_samples}.")
    check_seed(args.seed)
    device = resolve_device(args.device)
    check_engine(args.engine, device, "full", compile=False)
    timesteps = int(config.model.params.get("timesteps", 1000))
    check_sampling_arguments(args.sampler, args.steps, timesteps, 1.0, args.eta, False, args.scale, None, 0.0, {})
    image = load_image(args.init_img, "init image")
    model = load_model_from_config(config, args.ckpt, device=device)
    if args.engine == "openvino":
        attach_openvino(model, "full")
    images = upscale(
        model, image, args.prompt, negative_prompt=args.negative_prompt, n=args.n_samples,
        noise_level=args.noise_level, steps=args.steps, sampler=args.sampler, scale=args.scale, seed=args.seed,
        eta=args.eta, vae_tiling=args.vae_tiling,
    )  # fmt: skip
    for i, big in enumerate(images):
        fields = {
            "Steps": args.steps,
            "Sampler": sampler_label(args.sampler),
            "CFG scale": args.scale,
            "Seed": args.seed + i,
            "Size": f"{big.width}x{big.height}",
            "Model": Path(args.ckpt).stem,
            "Noise level": args.noise_level,
            "Eta": args.eta,
        }
        parameters = format_parameters(args.prompt, args.negative_prompt, fields)
        print(f"wrote {save_numbered(big, args.outdir, parameters)}")


if __name__ == "__main__":
    sys.exit(main())
