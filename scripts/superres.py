"""LDM super-resolution: a low-res image -> one 4x larger, with CompVis's bsr_sr model (``ldm.superres``).

    python scripts/superres.py --init-img small.png -r models/ldm/bsr_sr --custom_steps 100 --eta 1.0

``-r`` takes a model folder (``config.yaml`` + ``model.ckpt``) or a checkpoint beside its config, as
``scripts/sample_diffusion.py`` does. Images go to ``--outdir/NNNNN.png`` with their settings in the PNG metadata.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ldm.checkpoint import load_model_from_config
from ldm.devices import resolve_device
from ldm.errors import ScriptParser, UserError, run_script
from ldm.inference import sampler_label
from ldm.model_folder import find_model
from ldm.models.diffusion.noise import check_seed
from ldm.models.diffusion.samplers import check_sampling_arguments
from ldm.openvino_engine import add_engine_argument, attach_openvino, check_engine
from ldm.outputs import format_parameters, load_image, save_numbered
from ldm.superres import DEFAULT_ETA, DEFAULT_STEPS, check_superres_model, superresolve
from ldm.util import load_config


def build_parser() -> ScriptParser:
    parser = ScriptParser(prog="scripts/superres.py", description="4x super-resolution with an LDM (bsr_sr).")
    add = parser.add_argument
    add("--init-img", dest="init_img", type=str, required=True, help="the low-res image")
    add("-r", "--resume", type=str, default="models/ldm/bsr_sr", help="model folder or checkpoint (default bsr_sr)")
    add("--outdir", type=str, default="outputs/superres-samples", help="dir to write results to")
    add("-c", "--custom_steps", "--steps", dest="steps", type=int, default=DEFAULT_STEPS, help="DDIM steps (100)")
    add("-e", "--eta", type=float, default=DEFAULT_ETA, help="DDIM eta (default 1.0, as CompVis's notebook)")
    add("--sampler", type=str, default="ddim", help="sampler by its A1111 name or id (default DDIM)")
    add("--n_samples", type=int, default=1, help="how many versions of the image (default 1)")
    add("--seed", type=int, default=42, help="seed of the first version; version k uses seed + k")
    add("--device", type=str, default=None, help="cpu, cuda, cuda:N or mps (default: the best available)")
    add_engine_argument(parser)
    add("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Super-resolve with ``argv``; returns the exit code (0, or 2 after a one-line error)."""
    return run_script(build_parser(), run, argv)


def run(args: argparse.Namespace) -> None:
    """Super-resolve as ``args`` say; UserError / OSError on bad input."""
    _, config_path, ckpt = find_model(args.resume)
    config = load_config(config_path, args.overrides)
    if args.n_samples < 1:
        raise UserError(f"--n_samples must be at least 1, got {args.n_samples}.")
    check_seed(args.seed)
    device = resolve_device(args.device)
    check_engine(args.engine, device, "full", compile=False)
    timesteps = int(config.model.params.get("timesteps", 1000))
    check_sampling_arguments(args.sampler, args.steps, timesteps, 1.0, args.eta, False, 1.0, None, 0.0, {})
    image = load_image(args.init_img, "init image")
    model = load_model_from_config(config, ckpt, device=device)
    if args.engine == "openvino":
        attach_openvino(model, "full")
    check_superres_model(model)
    images = superresolve(
        model, image, n=args.n_samples, steps=args.steps, eta=args.eta, sampler=args.sampler, seed=args.seed
    )
    for i, big in enumerate(images):
        fields = {
            "Steps": args.steps,
            "Sampler": sampler_label(args.sampler),
            "Seed": args.seed + i,
            "Size": f"{big.width}x{big.height}",
            "Model": Path(ckpt).stem,
            "Eta": args.eta,
        }
        print(f"wrote {save_numbered(big, args.outdir, format_parameters('', None, fields))}")


if __name__ == "__main__":
    sys.exit(main())
