"""Samples of a latent diffusion model, as CompVis's scripts/sample_diffusion.py (its flags and defaults), for
unconditional and class-conditional models.

    python scripts/sample_diffusion.py -r models/ldm/lsun_churches256/model.ckpt -n 100 --batch_size 10 -c 50 -e 0
    python scripts/sample_diffusion.py -r logs/2024-05-01T12-00-00_mine -n 8 --vanilla_sample
    python scripts/sample_diffusion.py -r models/ldm/cin256-v2 --classes 25,187,448 -n 6 -c 20 -e 0 --scale 3.0

``-r`` takes a checkpoint or a folder: CompVis's model folders (``config.yaml`` + ``model.ckpt``) and this project's
training logdirs (``configs/*-project.yaml`` + ``checkpoints/last.ckpt``) both work. Samples go to
``<logdir>/samples/<time>/img/00000.png ...`` (or ``-l``'s folder) with their settings in the PNG metadata; unlike
CompVis the folder is not named after the checkpoint's global step, which would mean reading the file twice, and no
``.npz`` of all samples is written.

Class-conditional models (a ``ClassEmbedder`` cond stage, the cin256 family): ``--classes`` gives ``-n`` samples of
each listed class, as CompVis's cin256-v2 notebook does; without it every batch draws its classes at random (seeded
by its first image's seed). ``--scale`` above 1 guides with the model's unconditional class (see
:mod:`ldm.class_labels`). Other conditional models are refused: they have their own scripts (``txt2img.py`` ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from ldm.class_labels import class_embedder, draw_class_labels, parse_classes
from ldm.errors import ScriptParser, UserError, run_script
from ldm.geometry import LatentGeometry
from ldm.inference import Pipeline
from ldm.model_folder import find_model
from ldm.modules.encoders.modules import ClassEmbedder
from ldm.openvino_engine import add_engine_argument
from ldm.outputs import save_numbered
from ldm.request import GenerationRequest, RuntimeOptions
from ldm.util import config_value, load_config


def build_parser() -> ScriptParser:
    parser = ScriptParser(
        prog="scripts/sample_diffusion.py", description="Unconditional or class-conditional samples of an LDM."
    )
    add = parser.add_argument
    add("-r", "--resume", type=str, required=True, help="a checkpoint, or a model folder / training logdir")
    add("-n", "--n_samples", type=int, default=50000, help="number of samples to draw (default 50000)")
    add("-e", "--eta", type=float, default=1.0, help="DDIM eta (default 1.0; 0 is deterministic)")
    add("-v", "--vanilla_sample", action="store_true", help="DDPM ancestral sampling over every timestep")
    add("-l", "--logdir", type=str, default="none", help="where to write the samples (default: beside the model)")
    add("-c", "--custom_steps", type=int, default=50, help="DDIM steps (default 50)")
    add("--batch_size", type=int, default=10, help="samples drawn at once (default 10)")
    add("--seed", type=int, default=0, help="seed of the first sample; sample k uses seed + k (default 0)")
    add("--classes", type=str, default=None, help="class-conditional models: -n samples of each, e.g. 25,187,448")
    add("--scale", type=float, default=1.0, help="class-conditional models: classifier-free guidance scale (1 = off)")
    add("--device", type=str, default=None, help="cpu, cuda, cuda:N or mps (default: the best available)")
    add_engine_argument(parser)
    add("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser


def _is_class_conditional(config: Any) -> bool:
    cond_stage = config_value(config, "model.params.cond_stage_config")
    target = str(cond_stage.get("target", "")) if isinstance(cond_stage, DictConfig) else ""
    return target.rpartition(".")[2] == ClassEmbedder.__name__


def _jobs(args: argparse.Namespace, embedder: ClassEmbedder | None) -> Iterator[tuple[int, int, list[int] | None]]:
    """(first image's number, batch size, class of each image or None) of every batch to draw."""
    if embedder is None or args.classes is None:
        for start in range(0, args.n_samples, args.batch_size):
            n = min(args.batch_size, args.n_samples - start)
            labels = draw_class_labels(embedder, n, args.seed + start) if embedder is not None else None
            yield start, n, labels
        return
    for k, label in enumerate(parse_classes(args.classes)):
        for start in range(0, args.n_samples, args.batch_size):
            n = min(args.batch_size, args.n_samples - start)
            yield k * args.n_samples + start, n, [label] * n


def main(argv: Sequence[str] | None = None) -> int:
    """Sample with ``argv``; returns the exit code (0, or 2 after a one-line error)."""
    return run_script(build_parser(), run, argv)


def run(args: argparse.Namespace) -> None:
    """Sample as ``args`` say; UserError / OSError on bad input."""
    logdir, config_path, ckpt = find_model(args.resume)
    config = load_config(config_path, args.overrides)
    class_conditional = _is_class_conditional(config)
    unconditional = config_value(config, "model.params.cond_stage_config") == "__is_unconditional__"
    if not (class_conditional or unconditional):
        raise UserError(f"{config_path} is a conditional model; sample it with scripts/txt2img.py and its kin.")
    if not class_conditional and (args.classes is not None or args.scale != 1.0):
        raise UserError("--classes and --scale are for class-conditional models; this one is unconditional.")
    if args.classes is not None:
        parse_classes(args.classes)  # checked before the model is loaded
    for name in ("n_samples", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, got {getattr(args, name)}.")
    geometry = LatentGeometry.from_config(config)
    if args.vanilla_sample:
        settings = {"sampler": "ddpm", "steps": geometry.timesteps}
    else:
        settings = {"sampler": "ddim", "steps": args.custom_steps, "eta": args.eta}
    # Checked against the model's config before its weights are read.
    request = GenerationRequest(
        "", **settings, scale=args.scale, n=min(args.batch_size, args.n_samples), seed=args.seed
    ).for_model(geometry)
    pipe = Pipeline.from_config(config, ckpt, RuntimeOptions(args.device, precision="full", engine=args.engine))
    embedder = class_embedder(pipe.model)
    outdir = Path(args.logdir) if args.logdir != "none" else logdir / "samples" / time.strftime("%Y-%m-%d-%H-%M-%S")
    for start, n, labels in _jobs(args, embedder):
        batch = dataclasses.replace(request, n=n, seed=args.seed + start, class_labels=labels)
        result = pipe.run(batch, progress=False)
        for i, image in enumerate(result.images):
            print(f"wrote {save_numbered(image, outdir / 'img', result.parameters(i))}")


if __name__ == "__main__":
    sys.exit(main())
