"""Upscale images with an SD 2.x x4 upscaler (``LatentUpscaleDiffusion``): the Python entry point.

    config = load_config("configs/stable-diffusion/x4-upscaling.yaml")
    model = load_model_from_config(config, "x4-upscaler-ema.ckpt")  # on CUDA, MPS or the CPU, the best there is
    big = upscale(model, Image.open("small.png"), "a photograph of a cat", seed=42)[0]  # 4x the input's size

The low-res image becomes the UNet's extra input channels at the latent's size, so the output is the VAE's factor
(4) times larger. ``noise_level`` (0..350 for the x4 model) noises that input first: higher levels let the model
invent more detail and follow the input less.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image

from ldm.errors import UserError
from ldm.inference import image_to_tensor, tensor_to_images
from ldm.models.diffusion.latent_upscale import DEFAULT_NOISE_LEVEL, LatentUpscaleDiffusion
from ldm.models.diffusion.noise import Noise
from ldm.models.diffusion.samplers import sample
from ldm.modules.diffusionmodules.openaimodel import Downsample
from ldm.modules.tiling import tiled_decode
from ldm.prompts import encode_prompts


def unet_multiple(model: LatentUpscaleDiffusion) -> int:
    """The side multiple the UNet needs of its input (its skip connections need even sizes at every level)."""
    return 2 ** sum(isinstance(m, Downsample) for m in model.model.diffusion_model.modules())


def check_low_res(image: Image.Image, n: int, multiple: int) -> None:
    """UserError unless ``n`` (images to make) is a positive int and the sides of ``image`` are multiples of
    ``multiple`` (what the model's UNet needs of its latent)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"n (the number of images) must be a positive integer, got {n!r}.")
    width, height = image.size
    if width % multiple or height % multiple:
        raise UserError(
            f"the image is {width}x{height}; the model needs sides that are multiples of {multiple}: crop or pad "
            f"it to {width - width % multiple or multiple}x{height - height % multiple or multiple}."
        )


def vae_factor(model: LatentUpscaleDiffusion) -> int:
    """How many times larger the output is than the low-res input: the first stage's downsampling."""
    return 2 ** (model.first_stage_model.decoder.num_resolutions - 1)


@torch.no_grad()
def upscale(
    model: LatentUpscaleDiffusion,
    image: Image.Image,
    prompt: str = "",
    *,
    negative_prompt: str = "",
    n: int = 1,
    noise_level: int = DEFAULT_NOISE_LEVEL,
    steps: int = 75,
    sampler: str = "ddim",
    scale: float = 10.0,
    seed: int | None = None,
    eta: float | None = None,
    schedule: str | None = None,
    vae_tiling: bool = False,
    callback: Callable[[int, torch.Tensor], None] | None = None,
    progress: bool = True,
) -> list[Image.Image]:
    """``n`` upscales of ``image`` (RGB, sides multiples of :func:`unet_multiple`), each :func:`vae_factor` times
    larger, guided towards ``prompt`` (away from ``negative_prompt``) at ``scale``.

    Image ``i`` uses seed ``seed + i`` (drawn when None) for both the input's noise augmentation and the sampler,
    so it equals a single run with that seed. The defaults are Stability's demo settings (75 DDIM steps, scale 10,
    noise level 20). ``vae_tiling`` decodes by tiles, which bounds the VAE's memory at large outputs.
    """
    if not isinstance(model, LatentUpscaleDiffusion):
        raise UserError(f"upscale needs an upscaler model (LatentUpscaleDiffusion), got {type(model).__name__}.")
    check_low_res(image, n, unet_multiple(model))
    device = model.alphas_cumprod.device
    low_res = image_to_tensor(image.convert("RGB")).to(device).expand(n, -1, -1, -1)
    noise = Noise.from_seed(seed, n, device)
    # Drawn from each sample's own generator before the sampler's noise, so a batch never changes an image.
    image_cond = model.image_conditioning(low_res, noise_level=noise_level, noise=noise.randn(low_res.shape))
    cond, uncond = encode_prompts(model, [prompt] * n, [negative_prompt] * n)
    latents = sample(
        model,
        sampler,
        steps,
        model.sampling_conditioning(cond, image_cond),
        model.sampling_conditioning(uncond, image_cond),
        scale,
        shape=model.latent_shape(low_res),
        noise=noise,
        eta=eta,
        schedule=schedule,
        callback=callback,
        progress=progress,
    )
    decoded = (
        tiled_decode(model.decode_first_stage, latents, vae_factor(model))
        if vae_tiling
        else model.decode_first_stage(latents)
    )
    return tensor_to_images(decoded)
