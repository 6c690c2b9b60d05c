"""The generation scripts' ControlNet flags, in repeatable groups: the n-th ``--control_model`` goes with the n-th
``--control_image``; ``--control_strength`` / ``--control_start`` / ``--control_end`` / ``--control_preprocessor``
are given once for all or once per ControlNet, in the same order.

    scripts/txt2img.py --prompt "a house" --control_model control_v11p_sd15_canny.pth --control_image photo.png \\
        --control_preprocessor canny --control_model control_v11f1p_sd15_depth.pth --control_image depth.png \\
        --control_strength 1.0 --control_strength 0.6 --control_end 1.0 --control_end 0.5

The names say "control" as A1111's ControlNet units and ComfyUI's "Apply ControlNet" node do (``--controlnet`` and
A1111's ``--control_weight`` are aliases); start and end are shares of the steps, as A1111's Guidance Start / End and
ComfyUI's start_percent / end_percent are.
"""

from __future__ import annotations

import argparse
from typing import Any

from ldm.control import ControlSpec
from ldm.control_preprocess import PREPROCESSORS
from ldm.errors import UserError

# (flag, ControlSpec field, type, help)
PER_CONTROL = (
    ("--control_strength", "strength", float, "scale of its residuals (A1111's Weight); 0 = off"),
    ("--control_start", "start", float, "share of the steps before it starts acting (A1111's Guidance Start)"),
    ("--control_end", "end", float, "share of the steps after which it stops (A1111's Guidance End)"),
    ("--control_preprocessor", "preprocessor", str, f"what makes the control image: {', '.join(PREPROCESSORS)}"),
)


def add_control_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("ControlNet (repeat each flag for several ControlNets)")
    group.add_argument(
        "--control_model", "--controlnet", action="append", default=[], help="a ControlNet file (cldm or diffusers)"
    )
    group.add_argument(
        "--control_image", action="append", default=[], help="its control image (or the image to preprocess)"
    )
    for flag, _, kind, text in PER_CONTROL:
        extra: dict[str, Any] = {"choices": PREPROCESSORS} if flag == "--control_preprocessor" else {}
        names = (flag, "--control_weight") if flag == "--control_strength" else (flag,)
        group.add_argument(*names, dest=flag[2:], action="append", type=kind, default=[], help=text, **extra)


def controls_from_args(args: argparse.Namespace) -> tuple[ControlSpec, ...]:
    """The ControlSpecs the flags ask for; UserError when the groups do not pair up."""
    models, images = getattr(args, "control_model", []), getattr(args, "control_image", [])
    if len(models) != len(images):
        raise UserError(f"got {len(models)} --control_model for {len(images)} --control_image; give one image each.")
    settings: dict[str, list[Any]] = {}
    for flag, field, _, _ in PER_CONTROL:
        values = getattr(args, flag[2:], [])
        if values and not models:
            raise UserError(f"{flag} needs a --control_model.")
        if len(values) not in (0, 1, len(models)):
            raise UserError(
                f"give {flag} once for all ControlNets or once each ({len(models)}), not {len(values)} times."
            )
        settings[field] = values * len(models) if len(values) == 1 else values
    return tuple(
        ControlSpec(model, image, **{field: values[i] for field, values in settings.items() if values})
        for i, (model, image) in enumerate(zip(models, images, strict=True))
    )
