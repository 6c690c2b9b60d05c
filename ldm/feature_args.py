"""The command-line flags of the A1111 generation features, named as A1111's API fields: variation seeds (every
mode but image variations), the hires fix (txt2img), mask blur and "inpaint only masked" (inpaint), folders of
inputs (img2img, inpaint) and the X/Y grid (txt2img, img2img, inpaint; :mod:`ldm.xy_grid`)."""

from __future__ import annotations

import argparse
from typing import Any

from ldm.hires import UPSCALERS

FOLDER_MODES = ("img2img", "inpaint")  # the modes that take --indir (ldm.folders)


def add_feature_arguments(parser: argparse.ArgumentParser, mode: str) -> None:
    """Add the flags of ``mode``'s features to ``parser``."""
    if mode == "image_variation":
        return
    group = parser.add_argument_group("A1111 features")
    add = group.add_argument
    add("--subseed", type=int, default=None, help="variation seed; image k gets subseed + k (default: drawn)")
    add(
        "--subseed_strength", type=float, default=0.0,
        help="how far each image's noise moves toward its subseed's, 0..1 (0 = off); every image keeps --seed",
    )  # fmt: skip
    if mode == "txt2img":
        add("--enable_hr", action="store_true", help="hires fix: generate, upscale, then img2img at the larger size")
        add("--hr_scale", type=float, default=2.0, help="hires fix: upscale by this factor (default 2)")
        add("--hr_upscaler", type=str, default="Latent", metavar="NAME", help=f"one of: {', '.join(UPSCALERS)}")
        add("--hr_second_pass_steps", type=int, default=0, help="hires fix: second pass steps (0 = --steps)")
        add("--denoising_strength", type=float, default=0.7, help="hires fix: second pass strength (default 0.7)")
    if mode == "inpaint":
        add("--mask_blur", type=int, default=0, help="blur the mask by this many pixels when pasting back")
        add("--inpaint_full_res", action="store_true", help="inpaint only the masked region, at --H x --W")
        add("--inpaint_full_res_padding", type=int, default=32, help="pixels around the region (default 32)")
        # A1111's API name, as the other flags here; --invert_mask says it shorter.
        add("--inpainting_mask_invert", "--invert_mask", action="store_true", help="repaint where the mask is black")
    if mode in FOLDER_MODES:
        add("--indir", type=str, default=None, help="a folder of inputs instead of --init-img (see ldm.folders)")
    if mode in ("txt2img", "img2img", "inpaint"):
        add("--xy_x", type=str, default=None, metavar="AXIS:V1,V2", help="X/Y grid columns, e.g. 'steps:10,20'")
        add("--xy_y", type=str, default=None, metavar="AXIS:V1,V2", help="X/Y grid rows, e.g. 'cfg:5,7.5'")


def feature_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The GenerationRequest keywords of the feature flags given to ``args``."""
    names = (
        "subseed", "subseed_strength", "enable_hr", "hr_scale", "hr_upscaler", "hr_second_pass_steps",
        "denoising_strength", "mask_blur", "inpaint_full_res", "inpaint_full_res_padding", "inpainting_mask_invert",
    )  # fmt: skip
    return {name: getattr(args, name) for name in names if hasattr(args, name)}
