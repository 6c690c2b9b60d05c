"""Inpainting with CompVis latent-diffusion's ``inpainting_big`` model, as its ``scripts/inpaint.py`` does.

The model is a ``LatentDiffusion`` whose cond stage is its first stage (``__is_first_stage__``) and whose UNet takes
the latent, the encoded masked image and the mask (``conditioning_key: concat``; 3 + 3 + 1 = 7 channels):

- image and mask are read in [0, 1], the mask made binary at 0.5 (1 = repaint), the masked image is
  ``(1 - mask) * image``, and all three are mapped to [-1, 1];
- the conditioning is ``first_stage.encode(masked image)`` (the VQ encoder's output before quantization) with the
  [-1, 1] mask resized to the latent's size (nearest) after it;
- DDIM (eta 0) samples a latent of the first stage's channels, which is decoded, and the known pixels are pasted
  back: ``(1 - mask) * image + mask * decoded``.

Differences from CompVis: each image has its own seed (``seed + k``) rather than the global generator's state, and
the result is rounded to 8 bits where CompVis truncates.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from ldm.errors import UserError
from ldm.inference import image_to_tensor, tensor_to_images
from ldm.models.diffusion.noise import Noise
from ldm.models.diffusion.samplers import sample
from ldm.upscale import unet_multiple

MASK_SUFFIX = "_mask.png"


def check_inpainting_model(model: torch.nn.Module) -> None:
    """UserError unless ``model`` is shaped like inpainting_big: concat conditioning on its own first stage, its
    UNet taking the latent, the encoded masked image and the mask."""
    unet = getattr(getattr(model, "model", None), "diffusion_model", None)
    if (
        unet is None
        or model.model.conditioning_key != "concat"
        or model.cond_stage_model is not model.first_stage_model
        or unet.in_channels != 2 * model.channels + 1
    ):
        raise UserError(
            "this inpainting needs an LDM like models/ldm/inpainting_big: cond_stage_config __is_first_stage__, "
            "conditioning_key concat and a UNet of 2 * channels + 1 input channels."
        )


def image_mask_pairs(indir: str | Path) -> list[tuple[Path, Path]]:
    """(``name.png``, ``name_mask.png``) of every ``*_mask.png`` in ``indir``, sorted by name."""
    folder = Path(indir)
    if not folder.is_dir():
        raise UserError(f"--indir '{indir}' is not a folder; give the folder of name.png / name_mask.png pairs.")
    pairs = []
    for mask in sorted(folder.glob(f"*{MASK_SUFFIX}")):
        image = mask.with_name(mask.name.removesuffix(MASK_SUFFIX) + ".png")
        if not image.is_file():
            raise UserError(f"'{mask}' has no image beside it; put '{image.name}' in '{folder}'.")
        pairs.append((image, mask))
    return pairs


def binary_mask(mask: Image.Image) -> torch.Tensor:
    """A mask image -> (1, 1, H, W) float32, 1 where its grey value is at least half white (repaint)."""
    grey = torch.frombuffer(bytearray(mask.convert("L").tobytes()), dtype=torch.uint8)
    return (grey.view(1, 1, mask.height, mask.width).float() / 255.0 >= 0.5).float()


@torch.no_grad()
def inpaint(
    model: torch.nn.Module,
    image: Image.Image,
    mask: Image.Image,
    *,
    steps: int = 50,
    sampler: str = "ddim",
    eta: float | None = None,
    seed: int | None = None,
    callback: Callable[[int, torch.Tensor], None] | None = None,
    progress: bool = True,
) -> Image.Image:
    """Repaint the white region of ``mask`` in ``image`` (same size, sides multiples of the model's multiple)."""
    check_inpainting_model(model)
    if mask.size != image.size:
        raise UserError(f"the mask is {mask.width}x{mask.height} but the image {image.width}x{image.height}.")
    factor = 2 ** (model.first_stage_model.decoder.num_resolutions - 1)
    multiple = factor * unet_multiple(model)
    if image.width % multiple or image.height % multiple:
        raise UserError(
            f"the image is {image.width}x{image.height}; this model needs sides that are multiples of {multiple}."
        )
    device = model.alphas_cumprod.device
    pixels = image_to_tensor(image.convert("RGB")).to(device)  # [-1, 1]
    repaint = binary_mask(mask).to(device)
    masked = (1.0 - repaint) * (pixels + 1.0) - 1.0  # (1 - mask) * image in [0, 1], mapped to [-1, 1]
    c = model.cond_stage_model.encode(masked)
    c = torch.cat([c, F.interpolate(repaint * 2.0 - 1.0, size=c.shape[-2:])], dim=1)
    latents = sample(
        model,
        sampler,
        steps,
        c,
        shape=(1, model.channels, *c.shape[-2:]),
        noise=Noise.from_seed(seed, 1, device),
        eta=eta,
        callback=callback,
        progress=progress,
    )
    (generated,) = tensor_to_images(model.decode_first_stage(latents))
    return Image.composite(generated, image.convert("RGB"), Image.fromarray(repaint[0, 0].byte().cpu().numpy() * 255))
