"""What a generation request can be checked against before any model is loaded: how image sizes map to latents,
and the init image's size (:class:`ldm.request.GenerationRequest` checks the rest).

Read from the config alone (no weights), so every entry point can refuse a bad request in one line, at once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from PIL import Image

from ldm.errors import UserError
from ldm.outputs import load_image
from ldm.util import config_value, positive_int, positive_ints

# Models that generate from something else than a prompt alone, and what runs them.
OTHER_ENTRY_POINTS = {
    "LatentUpscaleDiffusion": "upscale an image with ldm.upscale.upscale(model, image, prompt)",
}

# Models conditioned on something else than a prompt, by their cond_stage_key, and what runs them.
CONDITION_ENTRY_POINTS = {
    "LR_image": "super-resolve an image with scripts/superres.py (ldm.superres.superresolve)",
    "masked_image": "inpaint image / mask pairs with scripts/inpaint.py --indir (ldm.concat_inpainting.inpaint)",
    "segmentation": "sample it with ldm.models.diffusion.samplers.sample, cond = get_learned_conditioning(one-hot map)",
    "coordinates_bbox": "sample it with ldm.models.diffusion.samplers.sample, cond = encoded ldm.data.layout tokens",
}

# Defaults of the UNet and DDPM constructors, for configs that leave these parameters out.
UNET_DEFAULT_CHANNEL_MULT = (1, 2, 4, 8)
DDPM_DEFAULT_CHANNELS = 3
DDPM_DEFAULT_TIMESTEPS = 1000
DDPM_DEFAULT_IMAGE_SIZE = 256


# ---------------------------------------------------------------------------------------------------------------------
# What can be checked before a model is loaded


@dataclass(frozen=True)
class LatentGeometry:
    """How image sizes map to latents for a model, read from its config (no weights needed).

    channels: latent channels C. factor: the VAE's downsampling f (image H = f * latent h). multiple: image sides
    must be multiples of this, f times the UNet's total downsampling (its skip connections need even sizes at every
    level). default_size: the side the model was trained at (the config's latent ``image_size`` times f).
    timesteps: the number of diffusion steps T (sampling steps are at most T).
    """

    channels: int
    factor: int
    multiple: int
    default_size: int
    timesteps: int

    @classmethod
    def from_config(cls, config: Any) -> LatentGeometry:
        """From a full config (with ``model:``) or its model node; ValueError unless it describes a latent model.

        The values read here are checked (ConfigError naming the key), as they are used before any model is built.
        """
        at = "model." if "model" in config else ""

        def read(key: str, default: Any = None) -> Any:
            return config_value(config, at + key, default)

        if read("params.first_stage_config") is None or read("params.unet_config") is None:
            raise UserError(
                "this config has no model.params.first_stage_config / unet_config; image generation needs a "
                "LatentDiffusion config such as configs/stable-diffusion/v1-inference.yaml."
            )
        kind = str(read("target", "")).rpartition(".")[2]
        if kind in OTHER_ENTRY_POINTS:
            raise UserError(f"this config is a {kind} model, not a text-to-image one: {OTHER_ENTRY_POINTS[kind]}.")
        condition = read("params.cond_stage_key")
        if condition in CONDITION_ENTRY_POINTS and read("params.cond_stage_config") != "__is_unconditional__":
            entry_point = CONDITION_ENTRY_POINTS[condition]
            raise UserError(f"this config's model is conditioned on {condition}, not on a prompt: {entry_point}.")
        ddconfig = "params.first_stage_config.params.ddconfig"
        ch_mult = read(f"{ddconfig}.ch_mult") if read(ddconfig) is not None else [1]  # no ddconfig: no downsampling
        factor = 2 ** (len(positive_ints(ch_mult, f"{at}{ddconfig}.ch_mult")) - 1)
        channel_mult = "params.unet_config.params.channel_mult"
        unet_levels = len(positive_ints(read(channel_mult, UNET_DEFAULT_CHANNEL_MULT), at + channel_mult))
        latent_size = read("params.image_size", DDPM_DEFAULT_IMAGE_SIZE)
        timesteps = read("params.timesteps", DDPM_DEFAULT_TIMESTEPS)
        return cls(
            channels=positive_int(read("params.channels", DDPM_DEFAULT_CHANNELS), f"{at}params.channels"),
            factor=factor,
            multiple=factor * 2 ** (unet_levels - 1),
            default_size=positive_int(latent_size, f"{at}params.image_size", " (the latent side, 64 for SD)") * factor,
            timesteps=positive_int(timesteps, f"{at}params.timesteps", " (the diffusion steps it was trained with)"),
        )

    def check_size(self, height: int, width: int) -> None:
        """ValueError naming the nearest valid sizes unless height and width are positive multiples of ``multiple``."""
        self.check_side("height", height)
        self.check_side("width", width)

    def check_side(self, name: str, value: int) -> None:
        """ValueError naming the nearest valid sizes unless ``value`` is a positive multiple of ``multiple``."""
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % self.multiple:
            lower = max(self.multiple, value // self.multiple * self.multiple) if isinstance(value, int) else 0
            positive = "positive " if isinstance(value, int) and value <= 0 else ""
            raise UserError(
                f"{name} {value} is not a {positive}multiple of {self.multiple} (this model's VAE downsamples by "
                f"{self.factor} and its UNet by {self.multiple // self.factor}); use {lower} or "
                f"{lower + self.multiple}."
            )

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        return (batch, self.channels, height // self.factor, width // self.factor)


def output_size(
    image_size: tuple[int, int], geometry: LatentGeometry, height: int | None = None, width: int | None = None
) -> tuple[int, int]:
    """The (width, height) an init image of ``image_size`` = (width, height) is generated at.

    Without height/width its own size, rounded down to the model's ``multiple`` (64 for SD), as CompVis's img2img
    did. With both, exactly those; with one, the other follows the image's aspect ratio, rounded to the multiple.
    """
    for name, side in (("height", height), ("width", width)):
        if side is not None:
            geometry.check_side(name, side)
    m = geometry.multiple
    if width is None and height is None:
        width, height = image_size[0] // m * m, image_size[1] // m * m
    elif width is None:
        width = max(m, round(image_size[0] * height / image_size[1] / m) * m)
    elif height is None:
        height = max(m, round(image_size[1] * width / image_size[0] / m) * m)
    if width == 0 or height == 0:
        raise UserError(
            f"the init image is {image_size[0]}x{image_size[1]}, smaller than this model's minimum {m}x{m}; "
            "give a larger image or --H/--W."
        )
    return width, height


def prepare_init_image(
    init_image: Image.Image | str | os.PathLike,
    mask: Image.Image | str | os.PathLike | None,
    geometry: LatentGeometry,
    height: int | None = None,
    width: int | None = None,
) -> tuple[Image.Image, Image.Image | None]:
    """Load (if paths) and size the img2img / inpainting inputs to :func:`output_size`.

    With both height and width the image is stretched if the aspect differs. The mask (white = repaint) must have
    the init image's size; it is resized alike and made binary at 50% grey.
    Returns (RGB image, "L" mask with values 0/255, or None).
    """
    image = load_image(init_image, "init image") if not isinstance(init_image, Image.Image) else init_image
    image = image.convert("RGB")
    if mask is not None:
        mask = load_image(mask, "mask", mode="L") if not isinstance(mask, Image.Image) else mask.convert("L")
        if mask.size != image.size:
            raise UserError(
                f"the mask is {mask.width}x{mask.height} but the init image is {image.width}x{image.height}; "
                "give a mask of the same size (white = repaint)."
            )
    width, height = output_size(image.size, geometry, height, width)
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
        if mask is not None:
            mask = mask.resize((width, height), Image.Resampling.BILINEAR)
    if mask is not None:
        mask = mask.point(lambda v: 255 if v >= 128 else 0)
    return image, mask
