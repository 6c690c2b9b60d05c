"""How well does the shapes demo model draw what it is told? Sample every prompt of a set of seen (training) and all
held-out combinations of ``ldm.data.shapes``, read each image with the pixel checker of ``ldm.data.shapes_checker``
and print the accuracy of colour, shape and background (and all three) for seen and held-out prompts.

python scripts/evaluate_shapes.py                                  # the bundled model, 24 seen + 12 held out, 4 each
python scripts/evaluate_shapes.py --n 8 --seen 48 --json outputs/shapes-eval/results.json

Image k of prompt p (grid and JSON order: seen prompts first) uses seed ``--seed + p * --n + k``, so any image can
be remade with scripts/txt2img.py. The grid (``--outdir``/grid-NNNN.png) has a row per prompt, its caption on the
left; a green frame marks an image whose three attributes the checker read as asked, a red one any miss.
Trailing key=value arguments override the config. Bad input: one line ``error: ...`` on stderr, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from ldm.data.shapes import COLORS, COMBINATIONS, HOLDOUT, SHAPES, caption
from ldm.data.shapes_checker import ATTRIBUTES, Prediction, accuracy, classify
from ldm.devices import resolve_device
from ldm.errors import ScriptParser, UserError, print_error
from ldm.geometry import LatentGeometry
from ldm.inference import Pipeline
from ldm.openvino_engine import add_engine_argument
from ldm.outputs import save_numbered
from ldm.request import GenerationRequest
from ldm.util import load_config

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = Path("models/ldm/shapes/config.yaml")
DEFAULT_CKPT = Path("models/ldm/shapes/model.safetensors")
# A deterministic second-order sampler: 20 steps are enough for it, and the same seed always gives the same image.
DEFAULT_SAMPLER = "DPM++ 2M Karras"
GROUPS = ("seen", "held out")


def _balanced_order() -> list[tuple[str, str, str]]:
    """Every training combination once, ordered so that any prefix asks for each colour, shape and background about
    equally often: the i-th is colour i mod 8, shape i mod 5 and the background (i mod 7) + 1 colours further on,
    which (8, 5 and 7 having no common factor) runs through all 280 combinations in 280 steps."""
    colors = list(COLORS)
    order = []
    for i in range(len(COMBINATIONS)):
        color = i % len(colors)
        combination = (colors[color], SHAPES[i % len(SHAPES)], colors[(color + 1 + i % 7) % len(colors)])
        if combination not in HOLDOUT:
            order.append(combination)
    return order


SEEN = tuple(_balanced_order())


def seen_combinations(k: int) -> list[tuple[str, str, str]]:
    """The first ``k`` training combinations of a fixed order that balances colours, shapes and backgrounds."""
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= len(SEEN):
        raise UserError(f"the number of seen combinations must be between 0 and {len(SEEN)}, got {k!r}.")
    return list(SEEN[:k])


@dataclass
class Sample:
    """One generated image, what it was asked to show and what the checker read in it."""

    combination: tuple[str, str, str]
    seed: int
    prediction: Prediction
    image: Image.Image

    @property
    def prompt(self) -> str:
        return caption(*self.combination)

    @property
    def group(self) -> str:
        return "held out" if self.combination in HOLDOUT else "seen"

    @property
    def correct(self) -> bool:
        return tuple(self.prediction) == self.combination


@dataclass
class Evaluation:
    """The samples of an :func:`evaluate` run, in prompt order (``n`` per prompt), and its settings."""

    samples: list[Sample]
    settings: dict[str, Any] = field(default_factory=dict)

    def accuracy(self) -> dict[str, dict[str, float]]:
        """``{"seen" | "held out": {"color", "shape", "background", "all": fraction right, "images": count}}`` for
        the groups that have samples."""
        result = {}
        for group in GROUPS:
            samples = [s for s in self.samples if s.group == group]
            if samples:
                scores = accuracy([s.prediction for s in samples], [s.combination for s in samples])
                result[group] = {**scores, "images": len(samples)}
        return result

    def to_json(self) -> dict[str, Any]:
        """Settings, accuracy and every image's prompt, seed and reading (no pixels), as plain JSON types."""
        return {
            "settings": self.settings,
            "accuracy": self.accuracy(),
            "images": [
                {
                    "prompt": s.prompt,
                    "group": s.group,
                    "seed": s.seed,
                    "asked": dict(zip(ATTRIBUTES, s.combination, strict=True)),
                    "read": s.prediction._asdict(),
                }
                for s in self.samples
            ],
        }


def evaluate(
    pipeline: Pipeline,
    combinations: Sequence[tuple[str, str, str]],
    n: int = 4,
    steps: int = 20,
    sampler: str = DEFAULT_SAMPLER,
    scale: float = 10.0,
    seed: int = 0,
    batch: int = 16,
    size: int | None = None,
    progress: bool = False,
) -> Evaluation:
    """Generate ``n`` images of each combination's caption, ``size`` x ``size`` pixels (default: the model's native
    size, 64 for the demo model), and read each one with the checker.

    Image k of combination p gets seed ``seed + p * n + k``; ``batch`` images are sampled at once (results do not
    depend on it). ValueError for bad settings, before anything is sampled.
    """
    if not combinations:
        raise UserError("give at least one combination to evaluate.")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise UserError(f"the batch size must be at least 1, got {batch!r}.")
    GenerationRequest("", steps=steps, sampler=sampler, scale=scale, n=n, height=size, width=size).for_model(
        pipeline.geometry
    )
    jobs = [(tuple(c), seed + p * n + k) for p, c in enumerate(combinations) for k in range(n)]
    samples = []
    for start in tqdm(range(0, len(jobs), batch), desc="evaluate", unit="batch", disable=not progress):
        chunk = jobs[start : start + batch]
        result = pipeline.generate(
            [caption(*c) for c, _ in chunk],
            seed=[s for _, s in chunk],
            steps=steps,
            sampler=sampler,
            scale=scale,
            height=size,
            width=size,
            progress=False,
        )
        for (combination, image_seed), image in zip(chunk, result.images, strict=True):
            samples.append(Sample(combination, image_seed, classify(image), image))
    settings = {"n": n, "steps": steps, "sampler": sampler, "scale": scale, "seed": seed, "size": result.width}
    return Evaluation(samples, settings)


def make_labelled_grid(evaluation: Evaluation, n: int, padding: int = 4, frame: int = 2) -> Image.Image:
    """A row per prompt: its caption (and "held out") on the left, then its ``n`` images, each framed green when
    the checker read all three attributes as asked and red otherwise."""
    font = ImageFont.load_default()
    rows = [evaluation.samples[i : i + n] for i in range(0, len(evaluation.samples), n)]
    labels = [f"{row[0].prompt}{' (held out)' if row[0].group == 'held out' else ''}" for row in rows]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_width = max(int(measure.textlength(label, font=font)) for label in labels) + 2 * padding
    side = max(max(s.image.size) for s in evaluation.samples)
    cell = side + 2 * frame + padding
    grid = Image.new("RGB", (label_width + n * cell + padding, len(rows) * cell + padding), "white")
    canvas = ImageDraw.Draw(grid)
    for r, (row, label) in enumerate(zip(rows, labels, strict=True)):
        top = padding + r * cell
        _, text_top, _, text_bottom = canvas.textbbox((0, 0), label, font=font)
        canvas.text((padding, top + (cell - padding - text_top - text_bottom) // 2), label, fill="black", font=font)
        for k, sample in enumerate(row):
            left = label_width + k * cell
            canvas.rectangle(
                [left, top, left + side + 2 * frame - 1, top + side + 2 * frame - 1],
                fill=(40, 170, 60) if sample.correct else (220, 40, 40),
            )
            grid.paste(sample.image, (left + frame, top + frame))
    return grid


def format_table(scores: dict[str, dict[str, float]]) -> str:
    """The accuracy table printed at the end of a run."""
    lines = [f"{'':10s} {'colour':>8s} {'shape':>8s} {'background':>11s} {'all three':>10s} {'images':>7s}"]
    for group, s in scores.items():
        lines.append(
            f"{group:10s} {s['color']:8.1%} {s['shape']:8.1%} {s['background']:11.1%} {s['all']:10.1%} {s['images']:7d}"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = ScriptParser(
        prog="scripts/evaluate_shapes.py",
        description="Sample the shapes demo model over seen and held-out prompts and check each image's colour, "
        "shape and background.",
        epilog="Trailing key=value arguments override the config.",
    )
    add = parser.add_argument
    add("--config", type=str, default=None, help=f"config of the model (default {DEFAULT_CONFIG})")
    add("--ckpt", type=str, default=None, help=f"checkpoint of the model (default {DEFAULT_CKPT})")
    add("--n", type=int, default=4, help="images per prompt (default 4)")
    add("--steps", type=int, default=20, help="sampling steps (default 20)")
    add(
        "--sampler",
        type=str,
        default=DEFAULT_SAMPLER,
        help=f"sampler, any name txt2img takes (default {DEFAULT_SAMPLER})",
    )
    add("--scale", type=float, default=10.0, help="classifier-free guidance scale (default 10.0)")
    add("--seed", type=int, default=0, help="seed of the first image (default 0)")
    add("--seen", type=int, default=24, help=f"training combinations to sample, 0-{len(SEEN)} (default 24)")
    add("--outdir", type=str, default="outputs/shapes-eval", help="folder for the grid PNG")
    add("--skip_grid", action="store_true", help="write no grid")
    add("--json", type=str, default=None, help="also write the results, image by image, to this JSON file")
    add("--device", type=str, default=None, help="cpu, cuda, cuda:N or mps (default: the best available)")
    add_engine_argument(parser)
    add("--batch", type=int, default=16, help="images sampled at once (default 16)")
    add("--size", type=int, default=None, help="image side in pixels (default: the model's, 64 for the demo model)")
    add("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser


def _default(path: Path) -> Path:
    """A default path: relative to the working directory, or else to this project's root."""
    return path if path.exists() else ROOT / path


def _existing(given: str | None, default: Path, what: str, flag: str) -> Path:
    path = Path(given) if given is not None else _default(default)
    if not path.is_file():
        if given is not None:
            raise FileNotFoundError(f"{what} '{given}' does not exist; check {flag}.")
        raise FileNotFoundError(
            f"no {what} at {default}: train the demo model first (see models/ldm/shapes/), or pass {flag} PATH."
        )
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """Run the evaluation with ``argv``; returns the exit code (0, or 2 after a one-line error)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit:  # --help, or a usage error already reported in one line
        return int(exit.code or 0)
    try:
        config = load_config(_existing(args.config, DEFAULT_CONFIG, "config", "--config"), args.overrides)
        ckpt = _existing(args.ckpt, DEFAULT_CKPT, "checkpoint", "--ckpt")
        combinations = seen_combinations(args.seen) + list(HOLDOUT)
        geometry = LatentGeometry.from_config(config)
        settings = {"steps": args.steps, "sampler": args.sampler, "scale": args.scale, "n": args.n}
        GenerationRequest("", **settings, height=args.size, width=args.size).for_model(geometry)
        if args.batch < 1:
            raise UserError(f"--batch must be at least 1, got {args.batch}.")
        outdir, json_path = Path(args.outdir), Path(args.json) if args.json else None
        if not args.skip_grid and outdir.exists() and not outdir.is_dir():
            raise UserError(f"--outdir '{args.outdir}' is a file; give a directory.")
        if json_path is not None and json_path.is_dir():
            raise UserError(f"--json '{args.json}' is a directory; give a file name.")
        pipeline = Pipeline.from_config(
            config, ckpt, device=resolve_device(args.device), precision="full", engine=args.engine
        )
        evaluation = evaluate(
            pipeline,
            combinations,
            n=args.n,
            steps=args.steps,
            sampler=args.sampler,
            scale=args.scale,
            seed=args.seed,
            batch=args.batch,
            size=args.size,
            progress=True,
        )
        print(format_table(evaluation.accuracy()))
        if not args.skip_grid:
            grid = save_numbered(make_labelled_grid(evaluation, args.n), outdir, grid=True)
            print(f"grid: {grid}")
        if json_path is not None:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            results = evaluation.to_json()
            results["settings"].update(config=str(args.config or DEFAULT_CONFIG), ckpt=str(ckpt))
            json_path.write_text(json.dumps(results, indent=1) + "\n")
            print(f"results: {json_path}")
    except (UserError, OSError) as err:
        return print_error(err)
    except torch.OutOfMemoryError:
        return print_error("out of memory; lower --batch.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
