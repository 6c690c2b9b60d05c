"""The command line shared by ``scripts/txt2img.py``, ``img2img.py``, ``inpaint.py``, ``depth2img.py`` and
``image_variation.py``.

Every CompVis flag keeps its name, meaning and default; A1111-style additions (``--negative_prompt``, ``--sampler``,
``--clip_skip`` ...) sit beside them, and trailing ``key=value`` arguments override the config. All input is checked
before the model is loaded, and any bad input ends the run with one line ``error: ...`` on stderr and exit code 2,
before a single output file is written.

Seeds: image k of a run (counting over all ``--n_iter`` iterations and batches) uses seed ``--seed + k``, and its
own noise generator, so any image can be remade alone with ``--seed <its seed> --n_samples 1 --n_iter 1`` (the
seed is in its PNG metadata). ``--fixed_code`` gives every batch the seeds of the first one, ``--batch_seeds``
lists each image's seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ldm.devices import (
    PRECISIONS,
    available_memory,
    is_out_of_memory,
)
from ldm.errors import ScriptParser, UserError, print_error
from ldm.geometry import LatentGeometry, output_size
from ldm.inference import Pipeline
from ldm.memory import Footprint, MemoryEstimate, check_memory, estimate, min_chunks
from ldm.models.diffusion.latent_unclip import check_variation_config
from ldm.models.diffusion.noise import MAX_SEED, check_seed
from ldm.models.diffusion.samplers import sampler_names, schedule_names
from ldm.outputs import image_size, read_prompt_file
from ldm.postprocess import OutputStep
from ldm.request import IMG2IMG_STRENGTH, INPAINT_STRENGTH, GenerationRequest, RuntimeOptions
from ldm.util import load_config

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = Path("configs/stable-diffusion/v1-inference.yaml")
DEPTH_CONFIG = Path("configs/stable-diffusion/v2-midas-inference.yaml")
DEFAULT_CKPT = Path("models/ldm/stable-diffusion-v1/model.ckpt")
DEMO_DIR = Path("models/ldm/shapes")
SAFETY_DIR = Path("models/safety_checker")
MODES = {
    "txt2img": "Text to image, with CompVis's txt2img flags and A1111-style additions.",
    "img2img": "Redraw --init-img guided by the prompt; --strength says how much of it changes.",
    "inpaint": "Repaint the white part of --mask in --init-img (SD inpainting models or any SD model).",
    "depth2img": "Redraw --init-img guided by the prompt, keeping its depth map (SD 2 depth models); --strength "
    "says how much changes.",
    "image_variation": "Variations of --init-img with an SD 2.1 unCLIP model, optionally steered by --prompt.",
}
# Modes whose images start from noise, sized like txt2img (an image variation's image is only its condition).
FROM_NOISE = ("txt2img", "image_variation")
DEFAULT_PROMPT = "a painting of a virus monster playing guitar"


def build_parser(mode: str) -> argparse.ArgumentParser:
    """The argument parser of one script: ``mode`` is one of :data:`MODES`."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    image_input = mode != "txt2img"
    parser = ScriptParser(
        prog=f"scripts/{mode}.py",
        description=MODES[mode],
        epilog="Trailing key=value arguments override the config, e.g. model.params.scale_factor=0.18215.",
    )
    add = parser.add_argument
    prompt = DEFAULT_PROMPT if mode in ("txt2img", "img2img") else ""
    add("--prompt", type=str, nargs="?", default=prompt, help="the prompt")
    add("--negative_prompt", type=str, default="", help="what the images should not show (A1111 syntax too)")
    add("--outdir", type=str, default=f"outputs/{mode}-samples", help="dir to write results to")
    add("--skip_grid", action="store_true", help="do not save a grid, only individual samples")
    add("--skip_save", action="store_true", help="do not save individual samples (e.g. for speed measurements)")
    add("--ddim_steps", "--steps", dest="ddim_steps", type=int, default=50, help="number of sampling steps")
    samplers = parser.add_mutually_exclusive_group()
    samplers.add_argument("--plms", action="store_true", help="use PLMS sampling (= --sampler PLMS)")
    samplers.add_argument("--dpm_solver", action="store_true", help="use DPM-Solver++ sampling")
    samplers.add_argument(
        "--sampler",
        type=str,
        default=None,
        metavar="NAME",
        help="sampler by its A1111 name (default DDIM): "
        + ", ".join(n for n in sampler_names() if not n.islower() and not n.endswith((" Karras", " Exponential")))
        + "; add ' Karras' or ' Exponential' to k-diffusion ones for that schedule. Ids such as dpmpp_2m work too.",
    )
    add(
        "--schedule",
        type=str,
        default=None,
        metavar="NAME",
        help="sigma schedule (A1111's Schedule type), overriding the sampler name's: "
        + ", ".join(schedule_names())
        + " (default: the sampler's own)",
    )
    add("--fixed_code", action="store_true", help="every batch starts from the same noise (the first batch's seeds)")
    add(
        "--ddim_eta",
        type=float,
        default=None,
        help="eta: 0 = deterministic DDIM (default 0.0 for DDIM, 1.0 for ancestral/SDE samplers)",
    )
    add("--n_iter", type=int, default=2, help="sample this often")
    add("--H", type=int, default=None, help="image height, in pixel space" + _size_help(mode))
    add("--W", type=int, default=None, help="image width, in pixel space" + _size_help(mode))
    add("--C", type=int, default=None, help="latent channels (default: the model's, 4 for SD); must match the model")
    add("--f", type=int, default=None, help="downsampling factor (default: the model's, 8 for SD); must match")
    add("--n_samples", type=int, default=3, help="how many samples to produce for each given prompt (batch size)")
    add("--n_rows", type=int, default=0, help="images per row in the grid (default: n_samples)")
    add(
        "--scale",
        type=float,
        default=7.5,
        help="unconditional guidance scale: eps = eps(x, uncond) + scale * (eps(x, cond) - eps(x, uncond))",
    )
    add(
        "--guidance_rescale",
        type=float,
        default=0.0,
        help="rescale the guided prediction's std toward the conditional one's, 0..1 (0 = off; 0.7 for "
        "zero-terminal-SNR models, Lin et al. 2023)",
    )
    add(
        "--sampler_option",
        type=_sampler_option,
        action="append",
        metavar="NAME=VALUE",
        help="a sampler's own option, e.g. s_churn=1.0 for Euler / Heun (repeatable)",
    )
    add("--from-file", dest="from_file", type=str, help="read prompts from this file, one a line, in batches")
    depth = mode == "depth2img"
    config_help = f"config of the model (default {DEPTH_CONFIG if depth else DEFAULT_CONFIG})"
    add("--config", type=str, default=None, help=config_help)
    if depth:
        add("--ckpt", type=str, required=True, help="the SD 2 depth checkpoint (512-depth-ema.ckpt, MiDaS included)")
    else:
        add("--ckpt", type=str, default=None, help=f"checkpoint of the model (default {DEFAULT_CKPT})")
    add("--seed", type=int, default=42, help="seed of the first image; image k uses seed + k")
    add("--batch_seeds", type=int, nargs="+", default=None, metavar="SEED", help="one seed per image of the run")
    add(
        "--precision",
        type=str,
        choices=PRECISIONS,
        default="autocast",
        help="full (fp32), autocast (fp16 compute on CUDA, fp32 elsewhere), fp16 or bf16 weights",
    )
    add("--device", type=str, default=None, help="cpu, cuda, cuda:N or mps (default: the best available)")
    add("--clip_skip", type=int, default=1, help="1 = last text encoder layer, 2 = the one before (A1111)")
    add("--idle_device", type=str, default=None, help="keep the text encoder and VAE here (e.g. cpu) while not in use")
    add("--channels_last", action="store_true", help="run the UNet and VAE in channels_last memory format")
    add("--compile", action="store_true", help="torch.compile the UNet (slow first image; on the CPU it needs g++)")
    add(
        "--attention_slicing",
        type=str,
        nargs="?",
        const="auto",
        default=None,
        metavar="N|auto",
        help="compute attention in slices of N query rows to save memory (no N or 'auto': a size bounding it)",
    )
    add("--vae_tiling", action="store_true", help="decode large images by overlapping tiles, to save memory")
    if image_input:
        add("--init-img", dest="init_img", type=str, required=True, help="path to the input image")
    if mode == "image_variation":
        add(
            "--noise_level",
            type=int,
            default=0,
            help="noise added to the image's CLIP embedding, 0 (follow the image closely) to 999 (default 0)",
        )
    elif image_input:
        add(
            "--strength",
            type=float,
            default=INPAINT_STRENGTH if mode == "inpaint" else IMG2IMG_STRENGTH,
            help="strength for noising/unnoising: 1.0 corresponds to full destruction of the init image",
        )
    if mode == "inpaint":
        add("--mask", type=str, required=True, help="mask image of the init image's size, white = repaint")
    if depth:
        add("--depth_map", type=str, default=None, help="a depth map (brighter = nearer) to use instead of MiDaS's")
    add("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser


def _sampler_option(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    try:
        if not sep or not name:
            raise ValueError
        return name.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=NUMBER such as s_churn=1.0, got '{text}'") from None


def _size_help(mode: str) -> str:
    if mode in FROM_NOISE:
        return " (default: the size the model was trained at, 512 for SD 1.x, 64 for the demo model)"
    return " (default: the init image's, rounded down to a multiple of 64 for SD, as CompVis did)"


# ---------------------------------------------------------------------------------------------------------------------
# Checking the request


@dataclass
class Job:
    """A fully checked run: what to load, what to generate, where to write."""

    mode: str
    config: Any
    ckpt: Path
    options: RuntimeOptions
    request: GenerationRequest  # the first batch's, checked against the model: each batch changes prompts and seeds
    batches: list[list[str]]  # the prompts of one iteration, batch by batch
    n_iter: int
    seed: int
    fixed_code: bool
    batch_seeds: list[int] | None
    memory: MemoryEstimate  # of the largest batch
    outdir: Path
    save_samples: bool
    grid_images_per_row: int | None  # None: no grid

    def seeded_batches(self) -> Iterator[tuple[list[str], list[int]]]:
        """Each batch's prompts and seeds, made when the run reaches it: ``--n_iter`` may be any size."""
        k = 0
        for _ in range(self.n_iter):
            for prompts in self.batches:
                if self.batch_seeds is not None:
                    seeds = self.batch_seeds[k : k + len(prompts)]
                else:
                    seeds = [self.seed + (0 if self.fixed_code else k) + j for j in range(len(prompts))]
                k += len(prompts)
                yield prompts, seeds


def _shown(path: Path) -> str:
    """A path as the user would type it: relative to the working directory when it is inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def project_path(relative: Path) -> Path:
    """A default path: relative to the working directory, as in CompVis, or else to this project's root."""
    return relative if relative.exists() else ROOT / relative


def _demo_hint() -> str:
    demo = project_path(DEMO_DIR)
    if not demo.is_dir():
        return ""
    configs = sorted(demo.glob("*.yaml"))
    ckpts = sorted([*demo.glob("*.ckpt"), *demo.glob("*.safetensors")])
    if configs and ckpts:
        return f" To try the bundled demo model instead: --config {_shown(configs[0])} --ckpt {_shown(ckpts[0])}."
    return f" A bundled demo model is in {_shown(demo)}/."


def find_checkpoint(ckpt: str | None) -> Path:
    """The checkpoint to load: ``--ckpt``, or the CompVis default path (``.ckpt`` or ``.safetensors``)."""
    if ckpt is not None:
        path = Path(ckpt)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint '{ckpt}' does not exist; check --ckpt.")
        return path
    for base in (DEFAULT_CKPT, ROOT / DEFAULT_CKPT):
        for candidate in (base, base.with_suffix(".safetensors")):
            if candidate.is_file():
                return candidate
    default = ROOT / DEFAULT_CKPT
    raise FileNotFoundError(
        f"no --ckpt given and no checkpoint at {_shown(default)}. Download a Stable Diffusion 1.x checkpoint "
        f"(e.g. v1-5-pruned-emaonly.ckpt or sd-v1-4.ckpt) and save it as {_shown(default)}, or pass "
        f"--ckpt PATH (with --config for SD 2.x; see models/README.md).{_demo_hint()}"
    )


def _sampler(args: argparse.Namespace) -> str:
    if args.plms:
        return "plms"
    if args.dpm_solver:
        return "dpm_solver"
    return args.sampler if args.sampler is not None else "ddim"


def parse_slice_size(text: str | None) -> int | str | None:
    """``--attention_slicing``'s value: None (off), "auto" or a positive int; ValueError naming the fix."""
    if text is None or text == "auto":
        return text
    if not text.isdigit() or int(text) < 1:
        raise UserError(f"--attention_slicing takes a positive number of query rows or 'auto', got '{text}'.")
    return int(text)


def plan(mode: str, args: argparse.Namespace) -> Job:
    """Check every input and work out batches and seeds; loads no model and writes nothing."""
    ckpt = find_checkpoint(args.ckpt)
    default_config = DEPTH_CONFIG if mode == "depth2img" else DEFAULT_CONFIG
    config = load_config(args.config if args.config is not None else project_path(default_config), args.overrides)
    if mode == "depth2img" and not str(config.model.get("target", "")).endswith(".LatentDepth2ImageDiffusion"):
        raise UserError(
            f"depth2img needs a depth-to-image model's config (LatentDepth2ImageDiffusion), such as {DEPTH_CONFIG}."
        )
    geometry = LatentGeometry.from_config(config)
    if args.C is not None and args.C != geometry.channels:
        raise UserError(f"--C {args.C} does not match the model's {geometry.channels} latent channels; drop --C.")
    if args.f is not None and args.f != geometry.factor:
        raise UserError(f"--f {args.f} does not match the model's downsampling factor {geometry.factor}; drop --f.")
    options = RuntimeOptions(
        device=args.device,
        precision=args.precision,
        idle_device=args.idle_device,
        channels_last=args.channels_last,
        compile=args.compile,
        attention_slicing=parse_slice_size(args.attention_slicing),
        vae_tiling=args.vae_tiling,
    )
    if args.n_iter < 1:
        raise UserError(f"--n_iter must be at least 1, got {args.n_iter}.")
    if args.n_rows < 0:
        raise UserError(f"--n_rows must be 0 (= n_samples) or more, got {args.n_rows}.")
    if args.n_samples < 1:
        raise UserError(f"--n_samples must be at least 1, got {args.n_samples}.")
    if mode == "image_variation":
        check_variation_config(config, args.noise_level)
    if mode in FROM_NOISE:
        height, width = args.H or geometry.default_size, args.W or geometry.default_size
        geometry.check_size(height, width)
    else:
        # Sized from the file's header: the memory check below comes before any image is decoded.
        width, height = output_size(image_size(args.init_img, "init image"), geometry, height=args.H, width=args.W)

    prompts = read_prompt_file(args.from_file) if args.from_file else [args.prompt if args.prompt is not None else ""]
    # A file's prompts go n_samples at a time; a single prompt makes batches of n_samples copies.
    if args.from_file:
        batches = [prompts[i : i + args.n_samples] for i in range(0, len(prompts), args.n_samples)]
    else:
        batches = [prompts * args.n_samples]
    total = args.n_iter * sum(len(b) for b in batches)
    _check_seeds(args, total, len(batches[0]))
    request = GenerationRequest(
        batches[0],
        negative_prompts=args.negative_prompt,
        steps=args.ddim_steps,
        sampler=_sampler(args),
        schedule=args.schedule,
        scale=args.scale,
        eta=args.ddim_eta,
        guidance_rescale=args.guidance_rescale,
        sampler_options=dict(args.sampler_option or ()),
        seed=args.seed,
        height=args.H,
        width=args.W,
        init_image=getattr(args, "init_img", None),
        mask=getattr(args, "mask", None),
        depth_map=getattr(args, "depth_map", None),
        strength=getattr(args, "strength", None),
        clip_skip=args.clip_skip,
        noise_level=getattr(args, "noise_level", None),
    )
    grid = None if args.skip_grid else args.n_rows or args.n_samples
    memory = estimate(
        Footprint.from_config(config),
        batch=len(batches[0]),
        height=height,
        width=width,
        chunks=max(min_chunks(p) for p in [*prompts, args.negative_prompt]),
        half=options.half,
        vae_tiling=args.vae_tiling,
        encode=mode not in FROM_NOISE,
        kept_images=total if grid is not None else 0,
    )
    check_memory(memory, available_memory(options.device), options.device, args.vae_tiling)
    request = request.for_model(geometry)

    outdir = Path(args.outdir)
    if outdir.exists() and not outdir.is_dir():
        raise UserError(f"--outdir '{args.outdir}' is a file; give a directory.")
    return Job(
        mode=mode,
        config=config,
        ckpt=ckpt,
        options=options,
        request=request,
        batches=batches,
        n_iter=args.n_iter,
        seed=args.seed,
        fixed_code=args.fixed_code,
        batch_seeds=args.batch_seeds,
        memory=memory,
        outdir=outdir,
        save_samples=not args.skip_save,
        grid_images_per_row=grid,
    )


def _check_seeds(args: argparse.Namespace, total: int, largest_batch: int) -> None:
    """ValueError unless every image's seed is one the noise generator takes (see ldm.models.diffusion.noise)."""
    if args.batch_seeds is not None:
        if len(args.batch_seeds) != total:
            raise UserError(f"--batch_seeds gives {len(args.batch_seeds)} seeds for {total} images; give one each.")
        for seed in args.batch_seeds:
            check_seed(seed, "--batch_seeds seed")
        return
    check_seed(args.seed, "--seed")
    last = args.seed + (largest_batch if args.fixed_code else total) - 1
    if last > MAX_SEED:
        raise UserError(
            f"--seed {args.seed} would give the run's last image seed {last}, past the largest seed {MAX_SEED} "
            f"(2**64 - 1); use --seed {MAX_SEED - (last - args.seed)} or less."
        )


# ---------------------------------------------------------------------------------------------------------------------
# Running it


def _note_flagged(seed: int) -> None:
    tqdm.write(f"note: the image of seed {seed} was flagged by the safety checker and blacked out.")


def run(job: Job) -> Iterator[Path]:
    """Load the model, generate every batch and save samples and grid; yields each file as it is written."""
    pipe = Pipeline.from_config(job.config, job.ckpt, job.options)
    device = job.options.device
    # Again now that the weights take their share: a job that fits no more fails here, before any sample.
    check_memory(job.memory, available_memory(device), device, job.options.vae_tiling)
    keeps = {"save_samples": job.save_samples, "grid_images_per_row": job.grid_images_per_row}
    if job.save_samples or job.grid_images_per_row is not None:
        step, notices = OutputStep.load(
            job.outdir, device, safety_dir=project_path(SAFETY_DIR), on_flagged=_note_flagged, **keeps
        )
        for notice in notices:
            print(f"note: {notice}", file=sys.stderr)
    else:
        step = OutputStep(job.outdir, **keeps)
    steps = job.request.steps
    with tqdm(total=job.n_iter * len(job.batches) * steps, desc=job.mode, unit="step") as bar:
        for b, (prompts, seeds) in enumerate(job.seeded_batches()):
            # The scripts take one negative prompt for all images.
            request = dataclasses.replace(
                job.request, prompts=prompts, negative_prompts=job.request.negative_prompts[:1], seed=seeds
            )
            result = pipe.run(request, callback=lambda i, x: bar.update(1), progress=False)
            # img2img runs only part of the schedule; the bar still ends each batch at its boundary.
            bar.update((b + 1) * steps - bar.n)
            yield from step.save(result)
    yield from step.finish()


# What bad input (and a full disk) raises; each message names the fix.
BAD_INPUT = (UserError, OSError)


def describe(err: BaseException) -> str:
    """The one line an error of a run prints, after ``error:``."""
    if is_out_of_memory(err):
        return (
            "out of memory; lower --n_samples or --H/--W, or add --vae_tiling (large images), --attention_slicing "
            "(MPS) or --precision fp16 (GPUs)."
        )
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"the disk is full ({err.strerror}); free some space or give another --outdir."
    return str(err)


def _written_note(written: list[Path]) -> str:
    if not written:
        return ""
    names = [_shown(path) for path in written]
    listed = names if len(names) <= 4 else [*names[:2], "...", names[-1]]
    return f" {len(names)} file{'s' if len(names) != 1 else ''} had been written: {', '.join(listed)}."


def _show_warning(message: Warning | str, category: type, filename: str, lineno: int, *args: Any) -> None:
    """Warnings (a clamped prompt weight, NaN weights in a checkpoint) as one ``warning: ...`` line, like errors."""
    tqdm.write(f"warning: {' '.join(str(message).split())}", file=sys.stderr)


def main(mode: str, argv: Sequence[str] | None = None) -> int:
    """Run one script (``mode``: one of :data:`MODES`) with ``argv``; returns the exit code."""
    try:
        args = build_parser(mode).parse_args(argv)
    except SystemExit as exit:  # --help, or a usage error already reported in one line
        return int(exit.code or 0)
    written: list[Path] = []
    error = None
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            job = plan(mode, args)
            for path in run(job):
                written.append(path)
        except Exception as err:
            if not (isinstance(err, BAD_INPUT) or is_out_of_memory(err)):
                raise  # a bug, not bad input
            error = f"{describe(err)}{_written_note(written)}"
    for path in written:
        print(f"wrote {_shown(path)}")
    if error is not None:
        return print_error(error)
    if written:
        files = f"{len(written)} file" + ("s" if len(written) != 1 else "")
        print(f"Your samples are ready and waiting for you here: {_shown(job.outdir)} ({files})")
    return 0
