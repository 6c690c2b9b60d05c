"""``LatentInpaintDiffusion``: the SD inpainting models, a :class:`LatentDiffusion` whose UNet also sees the mask and
the masked image's latent.

Configs, scripts and checkpoints name it ``ldm.models.diffusion.ddpm.LatentInpaintDiffusion`` (CompVis's path), which
resolves to this class.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from ldm.lazy_checkpoint import LazyStateDict
from ldm.models.diffusion.latent_diffusion import LatentDiffusion
from ldm.util import ConfigError


def widen_finetune_keys(
    state_dict: LazyStateDict, own: Mapping[str, torch.Tensor], keys: tuple[str, ...], keep: int
) -> LazyStateDict:
    """``state_dict`` with each of ``keys`` whose shape differs from the model's (``own``) widened to it as it is
    read: its first ``keep`` input channels (dim 1) from the checkpoint, the new ones zero, so the model starts as
    the checkpoint."""
    edits = {}
    for key in keys:
        if key in state_dict and state_dict.layout[key].shape != own[key].shape:
            shape = own[key].shape

            def widen(tensor: torch.Tensor, shape: torch.Size = shape) -> torch.Tensor:
                widened = tensor.new_zeros(shape)
                widened[:, :keep] = tensor[:, :keep]
                return widened

            edits[key] = (torch.empty(shape, dtype=state_dict.layout[key].dtype, device="meta"), widen)
    return state_dict.view({key: key for key in state_dict}, edits)


class WidensCheckpoint:
    """``init_from_ckpt`` for models whose UNet takes more input channels than the checkpoint they start from
    (inpainting, depth): ``self.finetune_keys`` are widened by :func:`widen_finetune_keys`, keeping the first
    ``self.keep_finetune_dims`` channels. Mixed in before ``LatentDiffusion``."""

    finetune_keys: tuple[str, ...] = ()
    keep_finetune_dims: int = 4

    def init_from_ckpt(
        self, path: str, ignore_keys: list[str] | tuple[str, ...] = (), only_model: bool = False
    ) -> None:
        from ldm.checkpoint import read_ckpt_path

        state_dict = widen_finetune_keys(read_ckpt_path(path), self.state_dict(), self.finetune_keys,
                                         self.keep_finetune_dims)  # fmt: skip
        self.load_checkpoint_state(state_dict, tuple(ignore_keys))


class LatentInpaintDiffusion(WidensCheckpoint, LatentDiffusion):
    """SD inpainting models: the UNet sees the noisy latent plus the mask and the masked image's latent.

    With ``conditioning_key: hybrid`` the 9 UNet input channels are the latent (4), the mask (1, 1 = repaint) and
    the latent of the image with the masked region blanked (4), concatenated in ``concat_keys`` order; the text
    embedding goes to cross-attention as usual.

    ``finetune_keys`` (with ``ckpt_path``) start an inpainting model from an ordinary checkpoint: those weights keep
    their first ``keep_finetune_dims`` input channels from the checkpoint and start the new ones at zero.
    """

    def __init__(
        self,
        *args: Any,
        concat_keys: tuple[str, ...] | list[str] = ("mask", "masked_image"),
        masked_image_key: str = "masked_image",
        finetune_keys: tuple[str, ...] | list[str] | None = None,
        keep_finetune_dims: int = 4,
        **kwargs: Any,
    ) -> None:
        ckpt_path = kwargs.pop("ckpt_path", None)
        ignore_keys = kwargs.pop("ignore_keys", ())
        super().__init__(*args, **kwargs)
        if masked_image_key not in concat_keys:
            raise ConfigError(f"masked_image_key '{masked_image_key}' must be one of concat_keys {list(concat_keys)}.")
        self.concat_keys = tuple(concat_keys)
        self.masked_image_key = masked_image_key
        self.finetune_keys = tuple(finetune_keys or ())
        self.keep_finetune_dims = keep_finetune_dims
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys)

    @torch.no_grad()
    def inpainting_conditioning(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The UNet's extra input channels for inpainting ``image`` where ``mask`` is 1.

        image: (B, 3, H, W) in [-1, 1]; mask: (B, 1, H, W) in {0, 1}, 1 = repaint -> (B, 1 + 4, H/f, W/f).
        The masked image is encoded with the posterior mode, so the result does not depend on a random draw.
        """
        mask = (mask >= 0.5).to(image.dtype)
        parts = {self.masked_image_key: self.scale_factor * self.encode_first_stage(image * (1.0 - mask)).mode()}
        size = parts[self.masked_image_key].shape[-2:]
        parts.update({k: F.interpolate(mask, size=size) for k in self.concat_keys if k != self.masked_image_key})
        return torch.cat([parts[k] for k in self.concat_keys], dim=1)

    inpaints_by_conditioning = True
    conditions_on_image = True

    def image_conditioning(self, image: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor:
        """:meth:`inpainting_conditioning`; without a mask the whole image is repainted, and without an image it is
        blank, which also makes txt2img work with these models. Returns (B, 1 + 4, H/f, W/f)."""
        if image is None and mask is None:
            raise ValueError("an inpainting model's image conditioning needs the image or the mask (for its size).")
        reference = image if image is not None else mask
        size, device = reference.shape[-2:], reference.device
        image = image if image is not None else torch.zeros(reference.shape[0], 3, *size, device=device)
        mask = mask if mask is not None else torch.ones(reference.shape[0], 1, *size, device=device)
        return self.inpainting_conditioning(image, mask)

    def sampling_conditioning(self, cond: Any, image_cond: torch.Tensor | None = None) -> Any:
        """``{"c_concat": [image_cond], "c_crossattn": [cond]}`` (``hybrid`` conditioning); an ``image_cond`` of batch 1
        is shared by every sample of ``cond`` (B, L, D)."""
        if image_cond is None:
            raise ValueError("an inpainting model samples with image_conditioning(image, mask); give its result.")
        if image_cond.shape[0] == 1 and isinstance(cond, torch.Tensor):
            image_cond = image_cond.expand(cond.shape[0], -1, -1, -1)
        return {"c_concat": [image_cond], "c_crossattn": [cond]}
