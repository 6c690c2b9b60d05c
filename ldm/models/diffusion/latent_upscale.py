"""``LatentUpscaleDiffusion``: the SD 2.x x4 upscaler, a :class:`LatentDiffusion` whose UNet also sees the
low-resolution image (noise-augmented) and is told its noise level.

Configs and checkpoints name it ``ldm.models.diffusion.ddpm.LatentUpscaleDiffusion`` (Stability's path), which
resolves to this class.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ldm.errors import UserError
from ldm.models.diffusion.ddpm import DDPM
from ldm.models.diffusion.latent_diffusion import LatentDiffusion, _take, frozen
from ldm.util import ConfigError, instantiate_from_config

# Stability's demos upscale at noise level 20 (of the 0..350 the x4 model was trained on).
DEFAULT_NOISE_LEVEL = 20
# The conditioning keys that concatenate c_concat to the UNet input; the low-res image goes there.
CONCAT_KEYS = ("concat", "hybrid", "hybrid-adm")


class LatentUpscaleDiffusion(LatentDiffusion):
    """Latent diffusion conditioned on a low-res image: the UNet input is the noisy latent (B, 4, h, w)
    concatenated with the low-res image (B, 3, h, w) in [-1, 1] at the latent's size (the x4 model's VAE has
    f = 4, so the output image is 4x the low-res one).

    ``low_scale_config`` builds the low-scale model (``ImageConcatWithNoiseAugmentation``), which noises the image
    to a noise level; with ``conditioning_key: hybrid-adm`` that level is the UNet's class label ``y`` (``num_classes``
    in its config) and the prompt goes to cross-attention. Training batches hold the low-res images under
    ``low_scale_key`` ((B, h, w, 3) in [-1, 1]) and, with ``noise_level_key``, the levels to noise them to (else they
    are drawn at random). The low-scale model has no parameters; its schedule is part of the checkpoint.
    """

    conditions_beyond_prompt = True

    def __init__(
        self,
        *args: Any,
        low_scale_config: Any,
        low_scale_key: str = "LR",
        noise_level_key: str | None = None,
        **kwargs: Any,
    ) -> None:
        ckpt_path = kwargs.pop("ckpt_path", None)
        ignore_keys = kwargs.pop("ignore_keys", ())
        super().__init__(*args, **kwargs)
        if self.cond_stage_trainable:
            raise ConfigError("LatentUpscaleDiffusion takes a frozen cond stage: set cond_stage_trainable: false.")
        if self.model.conditioning_key not in CONCAT_KEYS:
            raise ConfigError(
                f"conditioning_key '{self.model.conditioning_key}' does not pass the low-res image to the UNet; "
                f"use one of {CONCAT_KEYS} (hybrid-adm for the SD 2.x x4 upscaler)."
            )
        self.instantiate_low_stage(low_scale_config)
        self.low_scale_key = low_scale_key
        self.noise_level_key = noise_level_key
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys)

    def instantiate_low_stage(self, config: Any) -> None:
        self.low_scale_model = frozen(instantiate_from_config(config))

    @staticmethod
    def _conditioning(cond: Any, low_res: torch.Tensor, noise_level: torch.Tensor) -> dict[str, Any]:
        """``apply_model``'s dict: the (augmented) low-res image to concatenate, the prompt embedding for
        cross-attention (absent for a null-conditioned model) and the noise levels (B,) as class labels."""
        out: dict[str, Any] = {"c_concat": [low_res], "c_adm": noise_level}
        if cond is not None:
            out["c_crossattn"] = [cond]
        return out

    # -- training --

    def batch_conditioning(
        self, batch: Mapping[str, Any], c: Any, x: torch.Tensor, z: torch.Tensor, bs: int | None
    ) -> dict[str, Any]:
        """The conditioning dict: the low-res image ``batch[low_scale_key]`` noise-augmented, the prompt embedding c
        and the noise levels (B,)."""
        if self.low_scale_key not in batch:
            raise UserError(f"the batch has no low-res image under '{self.low_scale_key}' (low_scale_key).")
        low_res = DDPM.get_input(batch, self.low_scale_key)
        noise_level = None
        if self.noise_level_key is not None:
            noise_level = torch.as_tensor(batch[self.noise_level_key])
        if bs is not None:
            low_res, noise_level = low_res[:bs], _take(noise_level, bs)
        low_res = low_res.to(self.device, self.dtype)
        augmented, noise_level = self.low_scale_model(low_res, noise_level=noise_level)
        return self._conditioning(c, augmented, noise_level)

    def unconditional_like(self, cond: Any, batch_size: int, null_label: Any = None) -> Any:
        """``cond`` (a conditioning dict) with the null prompt for cross-attention; the image and its noise level
        stay, as in Stability's upscaling demos, so guidance only pushes towards the prompt."""
        uncond = dict(cond)
        uncond["c_crossattn"] = [self.get_unconditional_conditioning(batch_size, null_label)]
        return uncond

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], N: int = 8, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """:meth:`LatentDiffusion.log_images` plus ``x_lr``, the low-res inputs (N, 3, h, w)."""
        log = super().log_images(batch, N, *args, **kwargs)
        log["x_lr"] = DDPM.get_input(batch, self.low_scale_key)[:N].float().clamp(-1.0, 1.0)
        return log

    # -- what a sampling pipeline asks of the model --

    def image_conditioning(
        self,
        image: torch.Tensor | None,
        mask: torch.Tensor | None = None,
        *,
        noise_level: torch.Tensor | int = DEFAULT_NOISE_LEVEL,
        noise: torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """The low-res image as the UNet sees it: image (B, 3, h, w) in [-1, 1], h and w the latent's size, noised
        to ``noise_level`` (one for all, or (B,)); ``noise`` (like image) fixes the augmentation's eps.

        Returns ``{"c_concat": [(B, 3, h, w)], "c_adm": (B,) long}`` for :meth:`sampling_conditioning`. Compute
        it once and use it for cond and uncond alike, so both see the same augmented image.
        """
        if image is None:
            raise UserError("an upscaler needs the low-resolution image to upscale.")
        if mask is not None:
            raise UserError("an upscaler does not inpaint: give no mask.")
        if image.dim() != 4 or image.shape[1] != 3:
            raise UserError(f"the low-res image must be (B, 3, h, w) in [-1, 1], got shape {tuple(image.shape)}.")
        # Where the schedule's buffers are (the model's device); a schedule-free low-scale model keeps the image's.
        device = next(self.low_scale_model.buffers(), image).device
        augmented, levels = self.low_scale_model(image.to(device, torch.float32), noise_level=noise_level, noise=noise)
        return {"c_concat": [augmented], "c_adm": levels}

    def sampling_conditioning(self, cond: Any, image_cond: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """``{"c_concat": [low-res], "c_crossattn": [cond], "c_adm": levels}`` from an encoded prompt ``cond``
        (B, L, D) and :meth:`image_conditioning`; an image of batch 1 is shared by every sample of ``cond``."""
        if image_cond is None:
            raise UserError("an upscaler samples with image_conditioning(low_res_image); give its result.")
        low_res, levels = image_cond["c_concat"][0], image_cond["c_adm"]
        batch = cond.shape[0] if isinstance(cond, torch.Tensor) else low_res.shape[0]
        if low_res.shape[0] == 1 and batch > 1:
            low_res, levels = low_res.expand(batch, -1, -1, -1), levels.expand(batch)
        elif low_res.shape[0] != batch:
            raise UserError(f"the low-res image has batch {low_res.shape[0]}, the prompt embedding {batch}.")
        return self._conditioning(cond, low_res, levels)

    def latent_shape(self, low_res: torch.Tensor) -> tuple[int, int, int, int]:
        """The latent shape (B, C, h, w) an upscale of ``low_res`` (B, 3, h, w) samples: the low-res image's size."""
        return (low_res.shape[0], self.channels, low_res.shape[-2], low_res.shape[-1])
