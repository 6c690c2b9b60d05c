"""Inpainting, in two forms:

- SD models: repaint the white region of --mask in --init-img, or of every ``name.png`` / ``name_mask.png`` pair
  in --indir (``ldm.cli``, every txt2img flag too):
      python scripts/inpaint.py --help
- CompVis latent-diffusion's inpainting_big, with its script's flags: every ``name.png`` / ``name_mask.png`` pair in
  --indir, repainted into ``--outdir/name.png`` (``ldm.concat_inpainting``):
      python scripts/inpaint.py --indir data/inpainting_examples --outdir outputs/inpainting_results --steps 50

``--indir`` runs the CompVis form with its default model (no --config and no --ckpt) or a --config whose cond stage
is its first stage (``__is_first_stage__``, as inpainting_big's); with any other model, the SD form.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from ldm.checkpoint import load_model_from_config
from ldm.cli import main as sd_main
from ldm.concat_inpainting import check_inpainting_model, image_mask_pairs, inpaint
from ldm.devices import resolve_device
from ldm.errors import ScriptParser, UserError, print_error
from ldm.files import atomic_path
from ldm.models.diffusion.noise import check_seed
from ldm.models.diffusion.samplers import check_sampling_arguments
from ldm.openvino_engine import add_engine_argument, attach_openvino, check_engine
from ldm.outputs import load_image
from ldm.util import load_config

CONFIG = "models/ldm/inpainting_big/config.yaml"
CKPT = "models/ldm/inpainting_big/last.ckpt"


def build_parser() -> ScriptParser:
    parser = ScriptParser(prog="scripts/inpaint.py", description="Inpaint image/mask pairs with LDM inpainting_big.")
    add = parser.add_argument
    add("--indir", type=str, required=True, help="dir containing image-mask pairs (example.png, example_mask.png)")
    add("--outdir", type=str, required=True, help="dir to write results to")
    add("--steps", type=int, default=50, help="number of ddim sampling steps")
    add("--config", type=str, default=CONFIG, help=f"config of the model (default {CONFIG})")
    add("--ckpt", type=str, default=CKPT, help=f"checkpoint of the model (default {CKPT})")
    add("--seed", type=int, default=42, help="seed of the first pair; pair k uses seed + k")
    add("--device", type=str, default=None, help="cpu, cuda, cuda:N or mps (default: the best available)")
    add_engine_argument(parser)
    return parser


def main_pairs(argv: Sequence[str]) -> int:
    """CompVis's inpaint.py: every pair of ``--indir``; returns the exit code (0, or 2 after a one-line error)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit:  # --help, or a usage error already reported in one line
        return int(exit.code or 0)
    try:
        config = load_config(args.config)
        check_seed(args.seed)
        device = resolve_device(args.device)
        check_engine(args.engine, device, "full", compile=False)
        check_sampling_arguments("ddim", args.steps, int(config.model.params.get("timesteps", 1000)))
        pairs = image_mask_pairs(args.indir)
        print(f"Found {len(pairs)} inputs.")
        # CompVis samples inside the EMA scope: the EMA weights, where the checkpoint has them.
        use_ema = bool(config.model.params.get("use_ema", True))
        model = load_model_from_config(config, args.ckpt, device=device, use_ema_weights=use_ema)
        if args.engine == "openvino":
            attach_openvino(model, "full")
        check_inpainting_model(model)
        for k, (image_path, mask_path) in enumerate(pairs):
            image, mask = load_image(image_path, "image"), load_image(mask_path, "mask", mode="L")
            result = inpaint(model, image, mask, steps=args.steps, seed=args.seed + k, progress=False)
            out = Path(args.outdir) / image_path.name
            with atomic_path(out) as tmp:
                result.save(tmp, format="PNG")
            print(f"wrote {out}")
    except (UserError, OSError) as err:
        return print_error(err)
    return 0


def _flag(argv: Sequence[str], name: str) -> str | None:
    """The value of ``name`` in ``argv`` (``--name VALUE`` or ``--name=VALUE``), None when absent."""
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.partition("=")[2]
    return None


def runs_compvis_ldm(argv: Sequence[str]) -> bool:
    """Whether ``argv`` is the CompVis LDM form (see the module docstring)."""
    if not any(a == "--indir" or a.startswith("--indir=") for a in argv):
        return False
    config = _flag(argv, "--config")
    if config is None:
        return _flag(argv, "--ckpt") is None
    try:
        return load_config(config).model.params.get("cond_stage_config") == "__is_first_stage__"
    except (UserError, OSError):
        return True  # the CompVis form reports the unreadable config


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if runs_compvis_ldm(argv):
        return main_pairs(argv)
    return sd_main("inpaint", argv)


if __name__ == "__main__":
    sys.exit(main())
