"""img2img and inpainting over a folder of images (``--indir``).

img2img takes every image file of the folder (PNG, JPEG, WebP) except masks (``*_mask.png``), sorted by name;
inpainting every ``name.png`` / ``name_mask.png`` pair, the layout CompVis's ``scripts/inpaint.py`` reads
(:mod:`ldm.concat_inpainting`).
Each input is a run of its own with the same seeds (as A1111's batch tab), sized from its own image; every output is
a new numbered sample with its own infotext, so nothing already in the output folder is overwritten.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ldm.concat_inpainting import MASK_SUFFIX, image_mask_pairs
from ldm.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
Input = tuple[Path, Path | None]  # (image, its mask or None)


def folder_inputs(indir: str | Path, inpaint: bool) -> list[Input]:
    """The inputs of ``indir``, checked to be there and not empty."""
    folder = Path(indir)
    if not folder.is_dir():
        raise UserError(f"--indir '{indir}' is not a folder; give the folder of input images.")
    if inpaint:
        inputs: list[Input] = list(image_mask_pairs(folder))
        what = f"name.png / name{MASK_SUFFIX} pairs"
    else:
        files = sorted(
            p for p in folder.iterdir()
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.endswith(MASK_SUFFIX)
        )  # fmt: skip
        inputs = [(p, None) for p in files]
        what = "images (" + ", ".join(IMAGE_SUFFIXES) + ")"
    if not inputs:
        raise UserError(f"--indir '{indir}' has no {what}; put the inputs there.")
    return inputs


def resolve_inputs(args: Any, mode: str) -> list[Input] | None:
    """``--indir``'s inputs, or None for a single ``--init-img``; UserError for a missing or doubled input."""
    indir, init, mask = getattr(args, "indir", None), getattr(args, "init_img", None), getattr(args, "mask", None)
    if mode not in ("img2img", "inpaint"):
        return None
    if indir is None and init is None:
        raise UserError("the following arguments are required: --init-img (or --indir, a folder of inputs)")
    if indir is not None and init is not None:
        raise UserError("give --init-img or --indir (a folder of inputs), not both.")
    if indir is None:
        if mode == "inpaint" and mask is None:
            raise UserError("the following arguments are required: --mask")
        return None
    if mask is not None:
        raise UserError(f"--mask goes with --init-img; in --indir each image's mask is beside it as name{MASK_SUFFIX}.")
    return folder_inputs(indir, inpaint=mode == "inpaint")
