"""The argument parser of the generation scripts (txt2img, img2img, inpaint, depth2img, image_variation): CompVis's
flags with their names, meanings and defaults, and the A1111-style additions beside them."""

from __future__ import annotations

import argparse
from pathlib import Path

from ldm.control_cli import add_control_arguments
from ldm.devices import PRECISIONS
from ldm.errors import ScriptParser
from ldm.feature_args import FOLDER_MODES, add_feature_arguments
from ldm.models.diffusion.samplers import sampler_names, schedule_names
from ldm.openvino_engine import add_engine_argument
from ldm.refiner import add_refiner_arguments
from ldm.request import IMG2IMG_STRENGTH, INPAINT_STRENGTH

DEFAULT_CONFIG = Path("configs/stable-diffusion/v1-inference.yaml")
DEPTH_CONFIG = Path("configs/stable-diffusion/v2-midas-inference.yaml")
DEFAULT_CKPT = Path("models/ldm/stable-diffusion-v1/model.ckpt")
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
    config_help = "config of the model (default: the checkpoint's, detected from its layout, e.g. " + (
        f"{DEPTH_CONFIG} for SD 2 depth)" if depth else f"{DEFAULT_CONFIG} for SD 1.x)"
    )
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
    add_engine_argument(parser)
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
    _add_size_conditioning(parser)
    add("--vae", type=str, default=None, metavar="FILE", help="a VAE file (.safetensors/.ckpt) for the model's own")
    add(
        "--embeddings_dir",
        type=str,
        default=None,
        metavar="DIR",
        help="textual-inversion embeddings, used by file name in prompts (default: embeddings/ where it exists)",
    )
    add(
        "--lora",
        action="append",
        default=[],
        metavar="NAME:WEIGHT",
        help="merge a LoRA from --lora_dir (repeatable; "
        "NAME:TE_WEIGHT:UNET_WEIGHT for two weights); prompts may name them too, as <lora:NAME:WEIGHT>",
    )
    add("--lora_dir", type=str, default=None, metavar="DIR", help="the folder LoRA names are looked up in")
    if image_input:
        folder = mode in FOLDER_MODES  # --init-img or --indir, checked by ldm.folders.resolve_inputs
        add("--init-img", dest="init_img", type=str, required=not folder, help="path to the input image")
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
    if mode in ("txt2img", "img2img"):
        add_refiner_arguments(parser)
    if mode in ("txt2img", "img2img", "inpaint"):
        add_control_arguments(parser)
    if mode == "inpaint":
        add("--mask", type=str, default=None, help="mask image of the init image's size, white = repaint")
    if depth:
        add("--depth_map", type=str, default=None, help="a depth map (brighter = nearer) to use instead of MiDaS's")
    add_feature_arguments(parser, mode)
    add("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser


def _add_size_conditioning(parser: argparse.ArgumentParser) -> None:
    """SDXL's micro-conditioning flags (diffusers' names; see ldm.sdxl_conditioning), all defaulting to None."""
    group = parser.add_argument_group("SDXL size conditioning (other models refuse these)")
    for negative in ("", "negative_"):
        side = "the negative prompt's " if negative else ""
        default = "the prompt's" if negative else None
        group.add_argument(
            f"--{negative}original_size", type=int, nargs=2, metavar=("H", "W"), default=None,
            help=f"{side}original image size conditioning (default: {default or 'the output size'})",
        )  # fmt: skip
        group.add_argument(
            f"--{negative}crops_coords_top_left", type=int, nargs=2, metavar=("TOP", "LEFT"), default=None,
            help=f"{side}crop corner conditioning (default: {default or '0 0'})",
        )  # fmt: skip
        group.add_argument(
            f"--{negative}target_size", type=int, nargs=2, metavar=("H", "W"), default=None,
            help=f"{side}target size conditioning, SDXL base (default: {default or 'the output size'})",
        )  # fmt: skip
    group.add_argument("--aesthetic_score", type=float, default=None, help="SDXL refiner: aesthetic score (6.0)")
    group.add_argument(
        "--negative_aesthetic_score", type=float, default=None, help="SDXL refiner: the negative prompt's (2.5)"
    )


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
        return " (default: the size the model was trained at, 512 for SD 1.x, 1024 for SDXL, 64 for the demo model)"
    return " (default: the init image's, rounded down to a multiple of 64 for SD, as CompVis did)"
