"""LDM super-resolution (CompVis's ``bsr_sr`` model): a low-resolution image in, one 4x larger out.

    config = load_config("models/ldm/bsr_sr/config.yaml")
    model = load_model_from_config(config, "models/ldm/bsr_sr/model.ckpt")  # on CUDA, MPS or the CPU
    big = superresolve(model, Image.open("small.png"), steps=100, eta=1.0, seed=0)[0]

As CompVis's ``notebook_helpers.run(model, path, task="superresolution", custom_steps=100)``: the low-res image,
in [-1, 1], is the UNet's extra input channels (``conditioning_key: concat`` through the ``torch.nn.Identity`` cond
stage), so the latent has the low-res image's size and the decoded image is the first stage's factor (4) times
larger; DDIM with eta 1 by default. Unlike the notebook, inputs of 128 pixels and more are not sampled in overlapping
patches (``split_input_params``): the UNet runs on the whole latent, which takes more memory for large inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image

from ldm.errors import UserError
from ldm.inference import image_to_tensor, tensor_to_images
from ldm.models.diffusion.noise import Noise
from ldm.models.diffusion.samplers import sample
from ldm.upscale import check_low_res, unet_multiple

# CompVis's notebook: 100 DDIM steps, eta 1.
DEFAULT_STEPS = 100
DEFAULT_ETA = 1.0


def check_superres_model(model: torch.nn.Module) -> None:
    """UserError unless ``model`` is an LDM conditioned by concatenating its low-res input to the latent."""
    wrapper = getattr(model, "model", None)
    if getattr(wrapper, "conditioning_key", None) != "concat" or getattr(model, "cond_stage_key", None) != "LR_image":
        raise UserError(
            "super-resolution needs an LDM conditioned on a low-res image (cond_stage_key LR_image, "
            "conditioning_key concat), such as models/ldm/bsr_sr."
        )


@torch.no_grad()
def superresolve(
    model: torch.nn.Module,
    image: Image.Image,
    *,
    n: int = 1,
    steps: int = DEFAULT_STEPS,
    eta: float = DEFAULT_ETA,
    sampler: str = "ddim",
    seed: int | None = None,
    callback: Callable[[int, torch.Tensor], None] | None = None,
    progress: bool = True,
) -> list[Image.Image]:
    """``n`` super-resolved versions of ``image`` (RGB, sides multiples of :func:`unet_multiple`), each the first
    stage's factor times larger; image ``i`` uses seed ``seed + i`` (drawn when None)."""
    check_superres_model(model)
    check_low_res(image, n, unet_multiple(model))
    device = model.alphas_cumprod.device
    low_res = image_to_tensor(image.convert("RGB")).to(device).expand(n, -1, -1, -1)
    cond = model.get_learned_conditioning(low_res)
    latents = sample(
        model,
        sampler,
        steps,
        cond,
        shape=(n, model.channels, *cond.shape[-2:]),
        noise=Noise.from_seed(seed, n, device),
        eta=eta,
        callback=callback,
        progress=progress,
    )
    return tensor_to_images(model.decode_first_stage(latents))
