"""``SDXLDiffusion``: Stable Diffusion XL (base and refiner) as a :class:`LatentDiffusion`.

Why a ``LatentDiffusion`` subclass rather than a re-implementation of Stability's ``sgm.DiffusionEngine``: SDXL is an
eps-prediction model on the same 1000-step "legacy DDPM" schedule as SD 1.x/2.x (betas linear in sqrt space from
0.00085 to 0.012), so the discrete schedule, ``apply_model``, every sampler, classifier-free guidance, the Pipeline
and the training loop (``main.py``) apply unchanged. What differs is confined here: the conditioning comes from a
:class:`~ldm.modules.encoders.conditioner.GeneralConditioner` that reads the whole batch (prompts plus size, crop and
aesthetic-score entries) and gives the UNet both ``context`` and the ADM vector ``y`` (``conditioning_key``
``crossattn-adm``); and the state dict has ``sgm``'s layout. Stability's original config builds this class through
:func:`ldm.models.diffusion.sgm_compat.DiffusionEngine`.

State dict: exactly ``model.diffusion_model.*``, ``conditioner.embedders.*``, ``first_stage_model.*`` and
``denoiser.sigmas`` (sgm's table of the 1000 sigmas, ascending; recomputed from the schedule, so files may omit it).
The schedule buffers the SD classes save are kept out of it (non-persistent), as sgm has none.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from ldm.data.latent_cache import LATENT_KEY, MOMENTS_KEY
from ldm.models.diffusion.latent_diffusion import LatentDiffusion
from ldm.models.diffusion.schedules import zero_terminal_snr_betas
from ldm.modules.diffusionmodules.util import make_beta_schedule
from ldm.modules.encoders.conditioner import GeneralConditioner
from ldm.util import ConfigError, instantiate_from_config

# SDXL's micro-conditioning keys; a batch without them gets the values of an uncropped image of the output size.
SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")
AESTHETIC_KEY = "aesthetic_score"


class SigmaTable(nn.Module):
    """``sgm``'s denoiser state: ``sigmas`` (T,) float32, ``sqrt((1 - a_t) / a_t)`` for t = 0 .. T-1 (ascending),
    from the float64 ``alphas_cumprod`` (T,)."""

    def __init__(self, alphas_cumprod: np.ndarray) -> None:
        super().__init__()
        # sgm rounds the ratio to float32 before the square root; so does this, to give its exact values.
        ratio = torch.tensor((1 - alphas_cumprod) / alphas_cumprod, dtype=torch.float32)
        self.register_buffer("sigmas", ratio**0.5)


class SDXLDiffusion(LatentDiffusion):
    """SDXL: ``cond_stage_config`` is a ``GeneralConditioner``, kept as ``self.conditioner`` (also reachable as
    ``cond_stage_model``). Conditioning for ``apply_model`` is ``{"c_crossattn": [(B, 77, D_c)], "c_adm": (B, D_v)}``.

    Args (besides :class:`LatentDiffusion`'s):
        aesthetic_score / negative_aesthetic_score: the refiner's ``aesthetic_score`` for prompts and for the
            unconditional branch when a batch gives none (sgm's sampling defaults 6.0 and 2.5).
    """

    conditions_on_batch = True
    # SDXL 1.0's VAE overflows float16 in its decoder (NaN / black images): pipelines decode in float32 when the model
    # runs in float16, unless given an fp16-fixed VAE (ldm.vae; diffusers' force_upcast).
    vae_needs_float32 = True

    def __init__(
        self, *args: Any, aesthetic_score: float = 6.0, negative_aesthetic_score: float = 2.5, **kwargs: Any
    ) -> None:
        kwargs.setdefault("conditioning_key", "crossattn-adm")
        kwargs.setdefault("cond_stage_key", "txt")
        if kwargs.get("cond_stage_trainable"):
            raise ConfigError(
                "SDXLDiffusion trains the embedders marked is_trainable in cond_stage_config's emb_models; "
                "set cond_stage_trainable: false and mark those instead."
            )
        self.aesthetic_score = aesthetic_score
        self.negative_aesthetic_score = negative_aesthetic_score
        super().__init__(*args, **kwargs)
        # With a trainable embedder, the batch is encoded in forward (with gradients), not in get_input.
        self.cond_stage_trainable = any(e.is_trainable for e in self.conditioner.embedders)

    # The conditioner is registered once, as ``conditioner`` (sgm's key prefix); ``cond_stage_model`` names it too.
    @property
    def cond_stage_model(self) -> GeneralConditioner | None:
        return self._modules.get("conditioner")

    @cond_stage_model.setter
    def cond_stage_model(self, value: nn.Module | None) -> None:
        if value is not None:
            self.conditioner = value

    def instantiate_cond_stage(self, config: Any) -> None:
        conditioner = instantiate_from_config(config)
        if not isinstance(conditioner, GeneralConditioner):
            raise ConfigError(
                f"SDXLDiffusion's cond_stage_config must build a GeneralConditioner, got {type(conditioner).__name__}"
            )
        # Frozen embedders froze themselves (is_trainable: false); the conditioner itself follows train/eval, so
        # that its ucg_rate dropout applies in training only.
        self.conditioner = conditioner

    def register_schedule(
        self,
        given_betas: list[float] | None = None,
        beta_schedule: str = "linear",
        timesteps: int = 1000,
        linear_start: float = 1e-4,
        linear_end: float = 2e-2,
        cosine_s: float = 8e-3,
    ) -> None:
        super().register_schedule(given_betas, beta_schedule, timesteps, linear_start, linear_end, cosine_s)
        for name in list(self._buffers):
            self.register_buffer(name, self._buffers[name], persistent=False)
        if given_betas is not None:
            betas = np.asarray(given_betas, dtype=np.float64)
        else:
            betas = make_beta_schedule(beta_schedule, timesteps, linear_start, linear_end, cosine_s)
        if self.zero_terminal_snr:
            betas = zero_terminal_snr_betas(torch.from_numpy(betas)).numpy()
        self.denoiser = SigmaTable(np.cumprod(1.0 - betas))

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The UNet, the embedders marked ``is_trainable`` and ``logvar`` if learned."""
        params = list(self.model.parameters())
        params += [p for e in self.conditioner.embedders if e.is_trainable for p in e.parameters()]
        if self.learn_logvar:
            params.append(self.logvar)
        return params

    # -- conditioning --

    @property
    def output_size(self) -> tuple[int, int]:
        """(height, width) in pixels of a latent of ``image_size``: the size conditioning prompts get by default."""
        factor = 2 ** (self.first_stage_model.decoder.num_resolutions - 1)
        return self.image_size * factor, self.image_size * factor

    def size_conditioning(
        self,
        batch: Mapping[str, Any],
        height: int,
        width: int,
        aesthetic_score: float | None = None,
    ) -> dict[str, Any]:
        """``batch`` with every size / crop / aesthetic entry the conditioner reads as a (B, 2) or (B,) float tensor
        on the model's device; missing ones are those of an uncropped ``height`` x ``width`` image and
        ``aesthetic_score`` (default ``self.aesthetic_score``). B is the number of prompts."""
        wanted = self.conditioner.input_keys
        size = len(batch[self.cond_stage_key])
        defaults = {
            "original_size_as_tuple": [height, width],
            "crop_coords_top_left": [0, 0],
            "target_size_as_tuple": [height, width],
            AESTHETIC_KEY: self.aesthetic_score if aesthetic_score is None else aesthetic_score,
        }
        out = dict(batch)
        for key, default in defaults.items():
            if key not in wanted:
                continue
            value = batch[key] if key in batch else [default] * size
            out[key] = torch.as_tensor(value, dtype=torch.float32).to(self.device)
        return out

    def to_unet_conditioning(self, embeddings: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """The conditioner's ``{"crossattn", "vector"}`` as ``apply_model`` takes it."""
        return {"c_crossattn": [embeddings["crossattn"]], "c_adm": embeddings["vector"]}

    def get_learned_conditioning(self, c: Any) -> dict[str, Any]:
        """Encode a batch (a mapping with the prompts under ``cond_stage_key`` and any size entries) or prompts
        (str or list: the size conditioning of :attr:`output_size`) -> ``{"c_crossattn": [...], "c_adm": ...}``."""
        if not isinstance(c, Mapping):
            c = {self.cond_stage_key: [c] if isinstance(c, str) else list(c)}
        c = self.size_conditioning(c, *self.output_size)
        return self.to_unet_conditioning(self.conditioner(c))

    def get_unconditional_conditioning(self, batch_size: int, null_label: Any = None) -> dict[str, Any]:
        """The guidance counterpart: with no (or an empty) negative prompt the text embeddings are zeros, as sgm's
        SDXL sampling (``force_uc_zero_embeddings=["txt"]``) and diffusers' ``force_zeros_for_empty_prompt`` do;
        otherwise the encoded ``null_label``. Size conditioning as for prompts; the refiner's aesthetic score is
        ``negative_aesthetic_score``."""
        prompts = [null_label or ""] * batch_size
        batch = self.size_conditioning(
            {self.cond_stage_key: prompts}, *self.output_size, aesthetic_score=self.negative_aesthetic_score
        )
        zeroed = [] if null_label else [self.cond_stage_key]
        return self.to_unet_conditioning(self.conditioner(batch, force_zero_embeddings=zeroed))

    @torch.no_grad()
    def get_input(self, batch: Mapping[str, Any], k: str, *args: Any, **kwargs: Any) -> list[Any]:
        """:meth:`LatentDiffusion.get_input`, with size conditioning that a batch lacks taken from its images
        (``batch[k]``: (B, H, W, 3), or cached latents (:mod:`ldm.data.latent_cache`) of H/f x W/f): original and
        target size (H, W), crop (0, 0)."""
        if k in batch:
            height, width = batch[k].shape[1:3]
        else:
            latents = next(batch[key] for key in (MOMENTS_KEY, LATENT_KEY) if key in batch)
            factor = self.output_size[0] // self.image_size
            height, width = (side * factor for side in latents.shape[-2:])
        return super().get_input(self.size_conditioning(batch, int(height), int(width)), k, *args, **kwargs)
