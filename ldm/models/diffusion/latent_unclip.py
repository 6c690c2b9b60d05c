"""``ImageEmbeddingConditionedLatentDiffusion``: SD 2.1 unCLIP (stable-unclip H and L), a :class:`LatentDiffusion`
whose UNet is also given a CLIP image embedding, so it makes variations of an image (optionally steered by a
prompt).

Configs and checkpoints name it ``ldm.models.diffusion.ddpm.ImageEmbeddingConditionedLatentDiffusion``
(Stability's path), which resolves to this class.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ldm.errors import UserError
from ldm.models.diffusion.ddpm import DDPM
from ldm.models.diffusion.latent_diffusion import LatentDiffusion, frozen
from ldm.util import ConfigError, config_value, instantiate_from_config

# The conditioning keys that pass c_adm to the UNet as its vector input y.
ADM_KEYS = ("crossattn-adm", "hybrid-adm", "adm")


class ImageEmbeddingConditionedLatentDiffusion(LatentDiffusion):
    """Latent diffusion conditioned on a prompt (cross-attention) and on a CLIP image embedding (the UNet's ``y``,
    ``num_classes: sequential`` with ``adm_in_channels`` its width).

    ``embedder_config`` builds the image embedder (``FrozenOpenCLIPImageEmbedder``, ``ClipImageEmbedder``), which
    maps images (B, 3, H, W) in [-1, 1] to (B, D). With ``noise_aug_config`` (``CLIPEmbeddingNoiseAugmentation``)
    the embedding is noised to a level and the level's sinusoidal embedding (B, D') appended, so ``y`` is
    (B, D + D'): 2048 for stable-unclip-h (ViT-H/14, 1024 + 1024), 1536 for -l (ViT-L/14, 768 + 768). Training
    draws the levels at random and zeroes a sample's whole ``y`` with probability ``embedding_dropout`` (the
    "no image" condition classifier-free guidance uses: the unconditional ``y`` is zeros). Training batches hold the
    images to embed under ``embedding_key`` ((B, H, W, 3) in [-1, 1]; the first stage's images by default).
    """

    # The init image of a generation request is this model's condition, not the start of sampling.
    image_is_condition = True
    conditions_beyond_prompt = True

    def __init__(
        self,
        embedder_config: Any,
        embedding_key: str = "jpg",
        embedding_dropout: float = 0.5,
        freeze_embedder: bool = True,
        noise_aug_config: Any = None,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        ckpt_path = kwargs.pop("ckpt_path", None)
        ignore_keys = kwargs.pop("ignore_keys", ())
        super().__init__(*args, **kwargs)
        if self.cond_stage_trainable:
            raise ConfigError(
                "ImageEmbeddingConditionedLatentDiffusion takes a frozen cond stage: set cond_stage_trainable: false."
            )
        if self.model.conditioning_key not in ADM_KEYS:
            raise ConfigError(
                f"conditioning_key '{self.model.conditioning_key}' does not pass the image embedding to the UNet; "
                "use crossattn-adm (as the stable-unclip configs do)."
            )
        if not 0.0 <= float(embedding_dropout) <= 1.0:
            raise ConfigError(f"embedding_dropout must be in [0, 1], got {embedding_dropout}.")
        self.embed_key = embedding_key
        self.embedding_dropout = float(embedding_dropout)
        self.freeze_embedder = freeze_embedder
        embedder = instantiate_from_config(embedder_config)
        self.embedder = frozen(embedder) if freeze_embedder else embedder.requires_grad_(True)
        self.noise_augmentor = None
        if noise_aug_config is not None:
            self.noise_augmentor = frozen(instantiate_from_config(noise_aug_config))
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys)

    # -- the image embedding --

    def embed_image(self, image: torch.Tensor) -> torch.Tensor:
        """image: (B, 3, H, W) in [-1, 1] -> CLIP image embedding (B, D), float32."""
        return self.embedder(image).float()

    def augment_embedding(
        self, embedding: torch.Tensor, noise_level: torch.Tensor | int | None = None, noise: torch.Tensor | None = None
    ) -> torch.Tensor:
        """embedding: (B, D) -> the UNet's ``y``: the embedding noised to ``noise_level`` (one for all, or (B,);
        None draws them, as in training) with the level's embedding appended, (B, D + D'); ``noise`` (B, D) fixes the
        augmentation's eps. Without a noise augmentor, the embedding itself."""
        if self.noise_augmentor is None:
            if noise_level is not None and bool(torch.as_tensor(noise_level).ne(0).any()):
                raise UserError("this model has no embedding noise augmentation (noise_aug_config); use noise_level 0.")
            return embedding
        noised, level_embedding = self.noise_augmentor(embedding, noise_level=noise_level, noise=noise)
        return torch.cat([noised, level_embedding], dim=1)

    # -- training --

    def batch_conditioning(
        self, batch: Mapping[str, Any], c: Any, x: torch.Tensor, z: torch.Tensor, bs: int | None
    ) -> dict[str, Any]:
        """``{"c_crossattn": [c], "c_adm": (B, adm_in_channels)}``: the embedding of ``batch[embedding_key]``,
        noise-augmented at random levels and, in training mode, zeroed per sample with probability
        ``embedding_dropout``. Only an embedder trained with the UNet (``freeze_embedder: false``) gets gradients."""
        if self.embed_key not in batch:
            raise UserError(f"the batch has no images to embed under '{self.embed_key}' (embedding_key).")
        images = DDPM.get_input(batch, self.embed_key)
        images = images[:bs] if bs is not None else images
        with torch.enable_grad() if self.training and not self.freeze_embedder else contextlib.nullcontext():
            adm = self.augment_embedding(self.embed_image(images.to(self.device, self.dtype)))
        if self.training and self.embedding_dropout > 0:
            keep = torch.bernoulli(torch.full((adm.shape[0], 1), 1.0 - self.embedding_dropout, device=adm.device))
            adm = adm * keep
        return {"c_crossattn": [c], "c_adm": adm.to(self.dtype)}

    def trainable_parameters(self) -> list[nn.Parameter]:
        """:meth:`LatentDiffusion.trainable_parameters`, plus the image embedder unless ``freeze_embedder``."""
        params = super().trainable_parameters()
        if not self.freeze_embedder:
            params += list(self.embedder.parameters())
        return params

    def unconditional_like(self, cond: Any, batch_size: int, null_label: Any = None) -> Any:
        """``cond`` (a conditioning dict) with the null prompt and the zero image embedding, the "no condition" that
        embedding dropout trained (Stability's unCLIP demos guide with it)."""
        return {
            "c_crossattn": [self.get_unconditional_conditioning(batch_size, null_label)],
            "c_adm": torch.zeros_like(cond["c_adm"]),
        }

    # -- what a sampling pipeline asks of the model --

    def stages(self) -> dict[str, nn.Module]:
        """:meth:`LatentDiffusion.stages` plus ``embedder``, the CLIP image encoder."""
        return {**super().stages(), "embedder": self.embedder}

    def image_conditioning(
        self,
        image: torch.Tensor | None,
        mask: torch.Tensor | None = None,
        *,
        noise_level: torch.Tensor | int = 0,
        noise: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The image condition: image (B, 3, H, W) in [-1, 1] (any size; the embedder resizes it) embedded and
        augmented to ``noise_level`` (0 keeps the embedding as it is, up to the schedule's first step; higher levels
        follow the image less). ``noise`` (B, D) fixes the augmentation's eps.

        Returns ``{"c_adm": (B, adm_in_channels)}`` for :meth:`sampling_conditioning`; compute it once per image.
        """
        if image is None:
            raise UserError("an unCLIP model makes variations of an image: give the image (--init-img).")
        if mask is not None:
            raise UserError("an unCLIP model does not inpaint: give no mask.")
        if image.dim() != 4 or image.shape[1] != 3:
            raise UserError(f"the image must be (B, 3, H, W) in [-1, 1], got shape {tuple(image.shape)}.")
        embedding = self.embed_image(image.to(self.device))
        return {"c_adm": self.augment_embedding(embedding, noise_level=noise_level, noise=noise)}

    def null_image_conditioning(self, image_cond: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The "no image" counterpart of :meth:`image_conditioning`'s result, for the unconditional branch of
        classifier-free guidance: the zero embedding."""
        return {"c_adm": torch.zeros_like(image_cond["c_adm"])}

    def sampling_conditioning(self, cond: Any, image_cond: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """``{"c_crossattn": [cond], "c_adm": y}`` from an encoded prompt ``cond`` (B, L, D) and
        :meth:`image_conditioning` (or :meth:`null_image_conditioning`); an image of batch 1 is shared by every
        sample of ``cond``."""
        if image_cond is None:
            raise UserError("an unCLIP model samples with image_conditioning(image); give its result.")
        adm = image_cond["c_adm"]
        if adm.shape[0] == 1 and cond.shape[0] > 1:
            adm = adm.expand(cond.shape[0], -1)
        elif adm.shape[0] != cond.shape[0]:
            raise UserError(f"the image embedding has batch {adm.shape[0]}, the prompt embedding {cond.shape[0]}.")
        return {"c_crossattn": [cond], "c_adm": adm}


def check_variation_config(config: Any, noise_level: int) -> None:
    """UserError unless ``config`` (a full config, with ``model:``) is an unCLIP model that takes ``noise_level``:
    what a script checks before loading any weights."""
    params = config_value(config, "model.params", {}) or {}
    if "embedder_config" not in params:
        raise UserError(
            "image variations need an unCLIP model (ImageEmbeddingConditionedLatentDiffusion), e.g. --config "
            "configs/stable-diffusion/v2-1-stable-unclip-h-inference.yaml; for other models use img2img."
        )
    aug = params.get("noise_aug_config")
    if aug is None:
        if noise_level != 0:
            raise UserError("this model has no embedding noise augmentation (noise_aug_config); use noise_level 0.")
        return
    steps = config_value(aug, "params.noise_schedule_config.timesteps", 1000)
    if not 0 <= noise_level < steps:
        raise UserError(f"noise_level must be in 0..{steps - 1} (0 keeps the image's embedding), got {noise_level}.")
