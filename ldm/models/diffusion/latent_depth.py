"""``LatentDepth2ImageDiffusion``: SD 2 depth-to-image, a :class:`LatentDiffusion` whose UNet also sees the input
image's depth map (estimated by a frozen MiDaS, or given) at the latent's size.

Configs and checkpoints name it ``ldm.models.diffusion.ddpm.LatentDepth2ImageDiffusion`` (Stability's path), which
resolves to this class.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from ldm.errors import UserError
from ldm.models.diffusion.latent_diffusion import LatentDiffusion, _take, frozen
from ldm.models.diffusion.latent_inpainting import WidensCheckpoint
from ldm.modules.midas.api import prepare_midas_input
from ldm.util import ConfigError, instantiate_from_config

# Stability's normalisation adds this to the depth range, so a flat depth map gives -1 rather than 0 / 0.
DEPTH_RANGE_EPS = 1e-3


def depth_to_condition(depth: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A depth map (B, 1, H, W), any scale (larger = nearer for MiDaS), as the UNet sees it: resized bicubically
    (align_corners False) to ``size`` = (h, w), then per image 2 (d - min) / (max - min + 0.001) - 1, in [-1, 1)
    -> (B, 1, h, w) float32."""
    depth = depth.float()
    if tuple(depth.shape[-2:]) != tuple(size):
        depth = F.interpolate(depth, size=size, mode="bicubic", align_corners=False)
    low = depth.amin(dim=(1, 2, 3), keepdim=True)
    high = depth.amax(dim=(1, 2, 3), keepdim=True)
    return 2.0 * (depth - low) / (high - low + DEPTH_RANGE_EPS) - 1.0


class LatentDepth2ImageDiffusion(WidensCheckpoint, LatentDiffusion):
    """Latent diffusion conditioned on monocular depth (``conditioning_key: hybrid``): the UNet input is the noisy
    latent (B, 4, h, w) concatenated with the depth map (B, 1, h, w) from :func:`depth_to_condition`; the prompt
    goes to cross-attention.

    ``depth_stage_config`` builds the depth model (``MiDaSInference``), frozen: it is part of the checkpoint
    (``depth_model.*``) but never trained. Its input is the batch's ``concat_keys[0]`` (``midas_in``: (B, 3, h, w),
    as :func:`~ldm.modules.midas.api.prepare_midas_input` makes it), or, when the batch has none, is made from the
    batch's images. ``finetune_keys`` (with ``ckpt_path``) start the model from an ordinary checkpoint, keeping the
    first ``keep_finetune_dims`` input channels, as for inpainting.
    """

    # The UNet sees image_conditioning's result (the depth map), a depth map may be given instead of estimated, and
    # a mask is not part of the conditioning.
    conditions_on_image = True
    takes_depth_map = True
    conditions_beyond_prompt = True

    def __init__(
        self,
        *args: Any,
        depth_stage_config: Any,
        concat_keys: tuple[str, ...] | list[str] = ("midas_in",),
        finetune_keys: tuple[str, ...] | list[str] | None = None,
        keep_finetune_dims: int = 4,
        **kwargs: Any,
    ) -> None:
        ckpt_path = kwargs.pop("ckpt_path", None)
        ignore_keys = kwargs.pop("ignore_keys", ())
        super().__init__(*args, **kwargs)
        if self.cond_stage_trainable:
            raise ConfigError("LatentDepth2ImageDiffusion takes a frozen cond stage: set cond_stage_trainable: false.")
        if self.model.conditioning_key != "hybrid":
            raise ConfigError(
                f"conditioning_key '{self.model.conditioning_key}': a depth model concatenates the depth map and "
                "cross-attends to the prompt; use hybrid."
            )
        if len(concat_keys) != 1:
            raise ConfigError(f"concat_keys {list(concat_keys)}: a depth model takes one key, its MiDaS input.")
        if finetune_keys and ckpt_path is None:
            raise ConfigError("finetune_keys widen a checkpoint's weights: give ckpt_path too, or remove them.")
        self.concat_keys = tuple(concat_keys)
        self.depth_stage_key = self.concat_keys[0]
        self.finetune_keys = tuple(finetune_keys or ())
        self.keep_finetune_dims = keep_finetune_dims
        self.instantiate_depth_stage(depth_stage_config)
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys)

    def instantiate_depth_stage(self, config: Any) -> None:
        self.depth_model = frozen(instantiate_from_config(config))

    def stages(self) -> dict[str, torch.nn.Module]:
        """:meth:`LatentDiffusion.stages` plus ``depth_stage`` (MiDaS)."""
        return {**super().stages(), "depth_stage": self.depth_model}

    @property
    def midas_model_type(self) -> str:
        return getattr(self.depth_model, "model_type", "dpt_hybrid")

    @torch.no_grad()
    def estimate_depth(self, midas_in: torch.Tensor) -> torch.Tensor:
        """MiDaS input (B, 3, h, w) -> relative inverse depth (B, 1, h, w), in the depth model's dtype."""
        weights = next(self.depth_model.parameters(), None)
        if weights is not None:
            midas_in = midas_in.to(weights.device, weights.dtype)
        return self.depth_model(midas_in)

    @torch.no_grad()
    def depth_conditioning(self, midas_in: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
        """MiDaS input (B, 3, h', w') -> the UNet's extra channel (B, 1, h, w) for latents of ``latent_size``."""
        return depth_to_condition(self.estimate_depth(midas_in), latent_size)

    # -- training --

    def batch_conditioning(
        self, batch: Mapping[str, Any], c: Any, x: torch.Tensor, z: torch.Tensor, bs: int | None
    ) -> dict[str, list[torch.Tensor]]:
        """``{"c_concat": [depth (B, 1, h, w)], "c_crossattn": [c]}``: the depth is estimated from
        ``batch[concat_keys[0]]`` ((B, 3, h', w') MiDaS input) or, without it, from the images x."""
        if self.depth_stage_key in batch:
            midas_in = torch.as_tensor(batch[self.depth_stage_key])
            midas_in = midas_in[:bs] if bs is not None else midas_in
        else:
            midas_in = prepare_midas_input(x, self.midas_model_type)
        depth = self.depth_conditioning(midas_in.to(self.device), tuple(z.shape[-2:]))
        return {"c_concat": [depth.to(z.dtype)], "c_crossattn": [c]}

    def unconditional_like(self, cond: Any, batch_size: int, null_label: Any = None) -> Any:
        """``cond`` with the null prompt for cross-attention and the same depth map, as in Stability's demos."""
        uncond = self.get_unconditional_conditioning(batch_size, null_label)
        return {"c_concat": cond["c_concat"], "c_crossattn": [uncond]}

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], N: int = 8, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """:meth:`LatentDiffusion.log_images` plus ``depth``, the UNet's depth input (N, 3, h, w) in [-1, 1]."""
        log = super().log_images(batch, N, *args, **kwargs)
        _, c = self.get_input({key: _take(value, N) for key, value in batch.items()}, self.first_stage_key)
        log["depth"] = c["c_concat"][0].float().expand(-1, 3, -1, -1)
        return log

    # -- what a sampling pipeline asks of the model --

    @torch.no_grad()
    def image_conditioning(
        self, image: torch.Tensor | None, mask: torch.Tensor | None = None, *, depth: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The depth channel for the init image (B, 3, H, W) in [-1, 1]: MiDaS's estimate or, when given, ``depth``
        (B or 1, 1, H', W'; larger = nearer, any scale or size: it is resized and normalised) -> (B, 1, H/f, W/f)."""
        if mask is not None:
            raise UserError("a depth-to-image model does not inpaint: give no mask.")
        if image is None:
            raise UserError("a depth-to-image model needs an init image (its depth map conditions the result).")
        factor = 2 ** (self.first_stage_model.decoder.num_resolutions - 1)
        size = (image.shape[-2] // factor, image.shape[-1] // factor)
        if depth is None:
            return self.depth_conditioning(prepare_midas_input(image, self.midas_model_type), size)
        if depth.dim() != 4 or depth.shape[1] != 1:
            raise UserError(f"a depth map must be (B, 1, H, W), got shape {tuple(depth.shape)}.")
        return depth_to_condition(depth.to(image.device), size)

    def sampling_conditioning(self, cond: Any, image_cond: torch.Tensor | None = None) -> dict[str, Any]:
        """``{"c_concat": [depth], "c_crossattn": [cond]}`` from an encoded prompt ``cond`` (B, L, D) and
        :meth:`image_conditioning`; a depth map of batch 1 is shared by every sample of ``cond``."""
        if image_cond is None:
            raise UserError("a depth-to-image model samples with image_conditioning(image); give its result.")
        batch = cond.shape[0] if isinstance(cond, torch.Tensor) else image_cond.shape[0]
        if image_cond.shape[0] == 1 and batch > 1:
            image_cond = image_cond.expand(batch, -1, -1, -1)
        elif image_cond.shape[0] != batch:
            raise UserError(f"the depth map has batch {image_cond.shape[0]}, the prompt embedding {batch}.")
        return {"c_concat": [image_cond], "c_crossattn": [cond]}
