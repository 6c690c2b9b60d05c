"""The command line shared by ``scripts/txt2img.py``, ``img2img.py``, ``inpaint.py``, ``depth2img.py`` and
``image_variation.py`` (their flags are in :mod:`ldm.cli_parser`).

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

from omegaconf import DictConfig
from tqdm import tqdm

from ldm.adapters.embeddings import embeddings_folder
from ldm.adapters.lora_prompts import check_loras
from ldm.cli_parser import DEFAULT_CKPT, DEPTH_CONFIG, FROM_NOISE, build_parser
from ldm.control_cli import controls_from_args
from ldm.devices import (
    available_memory,
    is_out_of_memory,
)
from ldm.errors import UserError, print_error
from ldm.feature_args import feature_settings
from ldm.folders import Input, resolve_inputs
from ldm.geometry import LatentGeometry, output_size
from ldm.inference import Pipeline
from ldm.memory import Footprint, MemoryEstimate, check_memory, estimate, min_chunks, with_refiner
from ldm.model_detection import detect_checkpoint
from ldm.models.diffusion.latent_unclip import check_variation_config
from ldm.models.diffusion.noise import MAX_SEED, check_seed
from ldm.outputs import image_size, read_prompt_file
from ldm.postprocess import OutputStep
from ldm.refiner import RefinerPlan, plan_refiner
from ldm.request import GenerationRequest, RuntimeOptions
from ldm.sdxl_conditioning import SIZE_FIELDS, check_model_takes, config_size_keys
from ldm.util import load_config
from ldm.vae import check_vae_file
from ldm.xy_grid import GridPlan, plan_grid, write_grid

ROOT = Path(__file__).resolve().parents[1]
DEMO_DIR = Path("models/ldm/shapes")
SAFETY_DIR = Path("models/safety_checker")


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
    refiner: RefinerPlan | None = None  # --refiner
    vae: Path | None = None  # --vae
    embeddings_dir: Path | None = None  # --embeddings_dir, or embeddings/ where it exists
    inputs: list[Input] | None = None  # --indir: each input's (image, mask); request.height/width are --H/--W's
    xy: GridPlan | None = None  # --xy_x / --xy_y
    lora_dir: Path | None = None  # --lora_dir (the --lora names, checked in it, are in the request)

    def seeded_batches(self) -> Iterator[tuple[list[str], list[int], list[int] | None]]:
        """Each batch's prompts, seeds and subseeds, made when the run reaches it: ``--n_iter`` may be any size.
        With variation seeds the images keep ``--seed`` and image k gets the subseed + k, as in A1111."""
        k, vary = 0, self.request.subseed_strength > 0
        for _ in range(self.n_iter):
            for prompts in self.batches:
                offsets = [(0 if self.fixed_code else k) + j for j in range(len(prompts))]
                if self.batch_seeds is not None:
                    seeds = self.batch_seeds[k : k + len(prompts)]
                else:
                    seeds = [self.seed + (0 if vary else offset) for offset in offsets]
                k += len(prompts)
                yield prompts, seeds, [self.request.subseed + offset for offset in offsets] if vary else None


def shown_path(path: Path) -> str:
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
        return (
            f" To try the bundled demo model instead: --config {shown_path(configs[0])} --ckpt {shown_path(ckpts[0])}."
        )
    return f" A bundled demo model is in {shown_path(demo)}/."


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
        f"no --ckpt given and no checkpoint at {shown_path(default)}. Download a Stable Diffusion 1.x checkpoint "
        f"(e.g. v1-5-pruned-emaonly.ckpt or sd-v1-4.ckpt) and save it as {shown_path(default)}, or pass "
        f"--ckpt PATH (any model of models/README.md: its config is detected).{_demo_hint()}"
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


def choose_config(config: str | None, ckpt: Path, overrides: Sequence[str]) -> DictConfig:
    """``--config`` with the overrides; without it, the config detected from the checkpoint
    (:mod:`ldm.model_detection`), announced in one line. Detection also covers the CompVis default checkpoint path: an
    SD 1.x file there detects as v1-inference.yaml, CompVis's default, and any other model there loads instead of
    failing."""
    if config is not None:
        return load_config(config, overrides)
    detection = detect_checkpoint(ckpt)
    print(detection.line())
    return load_config(detection.path, [*detection.overrides, *overrides])


def plan(mode: str, args: argparse.Namespace) -> Job:
    """Check every input and work out batches and seeds; loads no model and writes nothing."""
    inputs = resolve_inputs(args, mode)
    if inputs is not None:  # the first input stands for all in the checks below; each is sized when it runs
        args.init_img, args.mask = inputs[0]
    ckpt = find_checkpoint(args.ckpt)
    config = choose_config(args.config, ckpt, args.overrides)
    if mode == "depth2img" and not str(config.model.get("target", "")).endswith(".LatentDepth2ImageDiffusion"):
        raise UserError(
            f"depth2img needs a depth-to-image model (LatentDepth2ImageDiffusion, {DEPTH_CONFIG}), such as SD 2's "
            "512-depth-ema.ckpt; this one is not."
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
        engine=args.engine,
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
        **{field: getattr(args, field) for field in SIZE_FIELDS},
        refiner_switch=getattr(args, "refiner_switch", 0.8),
        controls=controls_from_args(args),
        **feature_settings(args),
    )
    kind = str(config.model.get("target", "")).rpartition(".")[2]
    refiner = plan_refiner(args, config)
    taken = config_size_keys(config) | (config_size_keys(refiner.config) if refiner is not None else set())
    check_model_takes({field: getattr(request, field) for field in SIZE_FIELDS}, taken, kind)
    # A folder's images differ in size, and an X/Y grid writes its own: no CompVis grid.
    xy_axes = getattr(args, "xy_x", None), getattr(args, "xy_y", None)
    grid = None if args.skip_grid or inputs is not None or any(xy_axes) else args.n_rows or args.n_samples
    sizing = {
        "batch": len(batches[0]),
        "height": height,
        "width": width,
        "chunks": max(min_chunks(p) for p in [*prompts, args.negative_prompt]),
        "half": options.half,
        "vae_tiling": args.vae_tiling,
        "encode": mode not in FROM_NOISE,
        "kept_images": total if grid is not None else 0,
    }
    memory = estimate(Footprint.from_config(config), **sizing, controlnets=len(request.controls))
    if refiner is not None:
        memory = with_refiner(memory, estimate(Footprint.from_config(refiner.config), **sizing))
    check_memory(memory, available_memory(options.device), options.device, args.vae_tiling)
    checked = request.for_model(geometry)
    xy = plan_grid(*xy_axes, checked, geometry)
    if xy is not None and inputs is not None:
        raise UserError("an X/Y grid runs on one input: give --init-img instead of --indir.")
    for image, _ in (inputs or [])[1:]:  # the others, sized from their headers (each is loaded when it runs)
        output_size(image_size(image, "init image"), geometry, height=args.H, width=args.W)
    request = checked if inputs is None else request  # a folder's request is sized for each input as it runs
    loras = check_loras(args.lora, args.lora_dir)
    request = dataclasses.replace(request, loras=tuple(loras["loras"]))

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
        refiner=refiner,
        vae=check_vae_file(args.vae),
        embeddings_dir=embeddings_folder(args.embeddings_dir),
        inputs=inputs,
        xy=xy,
        lora_dir=loras["lora_dir"],
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
    pipe = Pipeline.from_config(job.config, job.ckpt, job.options, vae=job.vae, embeddings_dir=job.embeddings_dir)
    pipe.loras.directory = job.lora_dir
    if job.refiner is not None:
        job.refiner.load(pipe)
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
    if job.xy is not None:
        yield from write_grid(job.xy, pipe, step)
        return
    steps, inputs = job.request.steps, job.inputs or [(None, None)]
    with tqdm(total=len(inputs) * job.n_iter * len(job.batches) * steps, desc=job.mode, unit="step") as bar:
        for image, mask in inputs:
            base = job.request if image is None else dataclasses.replace(job.request, init_image=image, mask=mask)
            for prompts, seeds, subseeds in job.seeded_batches():
                # The scripts take one negative prompt for all images.
                request = dataclasses.replace(
                    base, prompts=prompts, negative_prompts=base.negative_prompts[:1], seed=seeds, subseed=subseeds
                )
                done = bar.n + steps
                result = pipe.run(request, callback=lambda i, x: bar.update(1), progress=False)
                # img2img runs only part of the schedule; the bar still ends each batch at its boundary.
                bar.update(done - bar.n)
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
    names = [shown_path(path) for path in written]
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
        print(f"wrote {shown_path(path)}")
    if error is not None:
        return print_error(error)
    if written:
        files = f"{len(written)} file" + ("s" if len(written) != 1 else "")
        print(f"Your samples are ready and waiting for you here: {shown_path(job.outdir)} ({files})")
    return 0
