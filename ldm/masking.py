"""Inpainting's A1111 extras: mask blur, "inpaint only masked" and the inverted mask.

- ``mask_blur``: the generated image is pasted back over the init image through the mask blurred by a Gaussian of
  that many pixels' std (OpenCV's kernel size ``2 * int(2.5 * sigma + 0.5) + 1`` and mirrored border, as A1111
  blurs), so the seam fades. The model still repaints the binary mask; 0 gives exactly the unblurred paste-back.
- ``inpaint_full_res`` ("Only masked"): the mask's bounding box, grown by ``inpaint_full_res_padding`` pixels and
  then to the aspect ratio of the generation size, is cut out of the init image, inpainted at height x width (the
  model's resolution, whatever the region's) and pasted back, through the blurred mask, into the full-size image.
  Outside the mask the init image's pixels are kept bit for bit.
- ``inpainting_mask_invert`` ("Mask mode: Inpaint not masked"): the black part of the mask is repainted. The
  request keeps the mask as given, since requests are checked more than once (the scripts' plan, then the run) and
  an inversion there would flip back; :func:`repaint_mask` inverts it where a run uses it: the model's mask and
  the paste-back in :meth:`ldm.inference.Pipeline.run`, the crop of "inpaint only masked" (whose inner request
  then holds the inverted mask, uninverted). As in A1111, the blur and the crop see the inverted mask.

Infotext (A1111's names): ``Mask blur``, ``Inpaint area: Only masked``, ``Masked area padding``, ``Mask mode: Inpaint
not masked``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from ldm.errors import UserError
from ldm.geometry import output_size
from ldm.outputs import load_image

Box = tuple[int, int, int, int]  # (left, top, right, bottom), right/bottom exclusive, as PIL's crop


def check_masking(mask_blur: int, inpaint_full_res: bool, padding: int, invert: bool = False) -> None:
    """UserError unless the blur and padding are whole numbers of pixels >= 0 and the switches are booleans."""
    for name, value in (("mask_blur", mask_blur), ("inpaint_full_res_padding", padding)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UserError(f"{name} is a number of pixels, a whole number >= 0; got {value!r}.")
    for name, value in (("inpaint_full_res", inpaint_full_res), ("inpainting_mask_invert", invert)):
        if not isinstance(value, bool):
            raise UserError(f"{name} is True or False, got {value!r}.")


def repaint_mask(mask: Image.Image | None, invert: bool) -> Image.Image | None:
    """The "L" mask a run repaints by (white = repaint): ``mask`` itself, or with ``invert`` its complement."""
    return ImageOps.invert(mask.convert("L")) if mask is not None and invert else mask


def blur_mask(mask: Image.Image, sigma: int) -> Image.Image:
    """An "L" mask blurred by a Gaussian of std ``sigma`` pixels along each axis (``sigma`` 0: the mask itself)."""
    if sigma == 0:
        return mask
    radius = int(2.5 * sigma + 0.5)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    values = np.asarray(mask, dtype=np.float64)
    for axis in (1, 0):
        pad = [(0, 0), (0, 0)]
        pad[axis] = (radius, radius)
        # numpy's "reflect" mirrors without repeating the edge, OpenCV's default border (BORDER_REFLECT_101).
        padded = np.pad(values, pad, mode="reflect")
        length = values.shape[axis]
        values = sum(w * np.take(padded, range(k, k + length), axis=axis) for k, w in enumerate(taps))
        values = np.clip(np.rint(values), 0, 255)  # 8 bits after each pass, as A1111's two cv2 calls
    return Image.fromarray(values.astype(np.uint8), "L")


def _smooth(values: np.ndarray, scale: int) -> np.ndarray:
    """(H, W) float32 values averaged over ``scale`` x ``scale`` cells and interpolated back: a cheap wide blur."""
    height, width = values.shape
    small = Image.fromarray(values, "F").resize((max(1, width // scale), max(1, height // scale)), Image.Resampling.BOX)
    return np.asarray(small.resize((width, height), Image.Resampling.BILINEAR))


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "fill" masked content: the pixels to repaint (``mask`` white) take the colours of the kept pixels
    around them, so img2img starts from the surroundings instead of what was there.

    Each repainted pixel gets the average of the kept pixels near it (a normalised blur), from the widest scale,
    which reaches every pixel, down to the finest scale that has kept pixels nearby.
    """
    known = (np.asarray(mask.convert("L")) < 128).astype(np.float32)
    if known.all() or not known.any():
        return image
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    filled = np.broadcast_to(pixels[known > 0].mean(axis=0), pixels.shape).copy()
    for scale in (64, 16, 4, 1):
        weight = _smooth(known, scale)
        reached = weight > 1e-2
        for c in range(3):
            colour = _smooth(pixels[..., c] * known, scale)
            filled[..., c] = np.where(reached, colour / np.maximum(weight, 1e-2), filled[..., c])
    result = np.where(known[..., None] > 0, pixels, filled)
    return Image.fromarray(np.clip(np.rint(result), 0, 255).astype(np.uint8), "RGB")


def paste_back(
    images: Sequence[Image.Image], init_image: Image.Image, mask: Image.Image, mask_blur: int
) -> list[Image.Image]:
    """The generated images over the init image through the (blurred) mask: white takes the generated pixels."""
    alpha = blur_mask(mask, mask_blur)
    return [Image.composite(generated, init_image, alpha) for generated in images]


def masking_fields(request: Any) -> dict[str, Any]:
    """The A1111 infotext entries of an inpainting request's mask settings (none without a mask)."""
    if request.mask is None:
        return {}
    only_masked = request.inpaint_full_res
    return {
        "Mask blur": request.mask_blur or None,
        "Inpaint area": "Only masked" if only_masked else None,
        "Masked area padding": request.inpaint_full_res_padding if only_masked else None,
        "Mask mode": "Inpaint not masked" if request.inpainting_mask_invert else None,
    }


def crop_region(mask: Image.Image, padding: int, aspect: float) -> Box:
    """The box "inpaint only masked" works on: the white pixels' bounding box grown by ``padding`` on each side,
    then along its short side to ``aspect`` (width / height of the generation size), kept inside the image. An
    empty mask gives the whole image."""
    bbox = mask.point(lambda v: 255 if v >= 128 else 0).getbbox()
    if bbox is None:
        return 0, 0, mask.width, mask.height
    left, top = max(bbox[0] - padding, 0), max(bbox[1] - padding, 0)
    right, bottom = min(bbox[2] + padding, mask.width), min(bbox[3] + padding, mask.height)
    width, height = right - left, bottom - top
    if width / height > aspect:
        top, bottom = _grow(top, bottom, round(width / aspect), mask.height)
    else:
        left, right = _grow(left, right, round(height * aspect), mask.width)
    return left, top, right, bottom


def _grow(start: int, end: int, length: int, limit: int) -> tuple[int, int]:
    """The span [start, end) grown about its centre to ``length`` (at most ``limit``), shifted to fit [0, limit)."""
    length = min(length, limit)
    extra = length - (end - start)
    start -= extra // 2
    start = min(max(start, 0), limit - length)
    return start, start + length


def run_only_masked(pipe: Any, request: Any, run: Callable[..., Any]) -> Any:
    """ "Inpaint only masked": cut the region out, inpaint it with ``run(inner_request)`` and paste each image back
    into the full init image. The result's images have the init image's size; its Size entry is the generation
    size, as A1111 writes it."""
    image = request.init_image
    image = load_image(image, "init image") if not isinstance(image, Image.Image) else image.convert("RGB")
    mask = request.mask
    mask = load_image(mask, "mask", mode="L") if not isinstance(mask, Image.Image) else mask.convert("L")
    if mask.size != image.size:
        raise UserError(
            f"the mask is {mask.width}x{mask.height} but the init image is {image.width}x{image.height}; "
            "give a mask of the same size (white = repaint)."
        )
    mask = repaint_mask(mask.point(lambda v: 255 if v >= 128 else 0), request.inpainting_mask_invert)
    padded = crop_region(mask, request.inpaint_full_res_padding, 1.0)
    size = (padded[2] - padded[0], padded[3] - padded[1])
    width, height = output_size(size, pipe.geometry, height=request.height, width=request.width)
    box = crop_region(mask, request.inpaint_full_res_padding, width / height)
    inner = dataclasses.replace(
        request,
        init_image=image.crop(box).resize((width, height), Image.Resampling.LANCZOS),
        mask=mask.crop(box).resize((width, height), Image.Resampling.BILINEAR),
        height=height,
        width=width,
        mask_blur=0,
        inpaint_full_res=False,
        inpainting_mask_invert=False,  # inverted above
    )
    result = run(inner)
    images = []
    for generated in result.images:
        canvas = image.copy()
        canvas.paste(generated.resize((box[2] - box[0], box[3] - box[1]), Image.Resampling.LANCZOS), box[:2])
        images.extend(paste_back([canvas], image, mask, request.mask_blur))
    return dataclasses.replace(result, images=images, extra={**result.extra, **masking_fields(request)})
