"""``LatentDiffusion``: the diffusion process of :class:`~ldm.models.diffusion.ddpm.DDPM` in the latent space of a
frozen first stage (the VAE), conditioned by a cond stage (a text encoder, a class embedder ...).

Configs, scripts and checkpoints name it ``ldm.models.diffusion.ddpm.LatentDiffusion`` (CompVis's path), which
resolves to this class.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any

import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import nn

from ldm.data.latent_cache import cached_first_stage
from ldm.data.layout import plot_layouts
from ldm.data.prior import class_mask
from ldm.errors import UserError
from ldm.models.autoencoder import VQModelInterface
from ldm.models.diffusion.ddpm import DDPM
from ldm.models.diffusion.samplers import sample as run_sampler
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import ConfigError, instantiate_from_config


def disabled_train(self: nn.Module, mode: bool = True) -> nn.Module:
    """Replaces ``.train`` on frozen stages so that Lightning switching the model to train mode leaves them in eval."""
    return self


def frozen(model: nn.Module) -> nn.Module:
    """``model`` in eval mode for good (``.train`` disabled) and without gradients: a stage that is not trained."""
    model = model.eval()
    model.train = disabled_train.__get__(model)
    return model.requires_grad_(False)


def _take(value: Any, n: int) -> Any:
    """The first ``n`` entries of a batch value (tensor, list, or dict of them); other values unchanged."""
    if isinstance(value, Mapping):
        return {k: _take(v, n) for k, v in value.items()}
    return value[:n] if isinstance(value, torch.Tensor | list | tuple) else value


class LatentDiffusion(DDPM):
    """Diffusion in the latent space of a frozen first stage (``AutoencoderKL``, or ``VQModelInterface``: its
    pre-quantization latents, quantized when decoded), conditioned by a cond stage.

    ``scale_factor`` maps latents to unit variance (0.18215 for the SD VAE); with ``scale_by_std`` it is instead
    estimated as 1 / std of the first training batch's latents (unless training resumes or starts from a checkpoint).
    The cond stage is a text encoder (``cond_stage_config``), a class embedder (``cond_stage_key: class_label``),
    ``__is_first_stage__`` (condition on the encoded image) or ``__is_unconditional__``. With
    ``cond_stage_trainable`` the cond stage is trained with the UNet (its parameters are unfrozen).

    Training batches hold images under ``first_stage_key``, (B, H, W, 3) in [-1, 1], and the conditioning under
    ``cond_stage_key`` (a list of captions for ``txt``).
    """

    def __init__(
        self,
        first_stage_config: Any,
        cond_stage_config: Any,
        num_timesteps_cond: int | None = None,
        cond_stage_key: str = "image",
        cond_stage_trainable: bool = False,
        concat_mode: bool = True,
        cond_stage_forward: str | None = None,
        conditioning_key: str | None = None,
        scale_factor: float = 1.0,
        scale_by_std: bool = False,
        force_null_conditioning: bool = False,
        *args: Any,
        **kwargs: Any,
    ) -> None:
        self.num_timesteps_cond = num_timesteps_cond or 1
        if self.num_timesteps_cond > 1:
            raise ConfigError(
                "num_timesteps_cond > 1 (noising the conditioning on a shortened schedule) is not supported; use 1."
            )
        self.scale_by_std = scale_by_std
        if conditioning_key is None:
            conditioning_key = "concat" if concat_mode else "crossattn"
        if cond_stage_config == "__is_unconditional__" and not force_null_conditioning:
            conditioning_key = None
        ckpt_path = kwargs.pop("ckpt_path", None)
        ignore_keys = kwargs.pop("ignore_keys", ())
        super().__init__(*args, conditioning_key=conditioning_key, **kwargs)
        self.concat_mode = concat_mode
        self.cond_stage_trainable = cond_stage_trainable
        self.cond_stage_key = cond_stage_key
        self.cond_stage_forward = cond_stage_forward
        self.force_null_conditioning = force_null_conditioning
        if scale_by_std:
            # Estimated from the first training batch, so it must travel with the checkpoint.
            self.register_buffer("scale_factor", torch.tensor(float(scale_factor)))
        else:
            self.scale_factor = scale_factor
        self.instantiate_first_stage(first_stage_config)
        self.instantiate_cond_stage(cond_stage_config)
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys)

    def instantiate_first_stage(self, config: Any) -> None:
        self.first_stage_model = frozen(instantiate_from_config(config))

    def instantiate_cond_stage(self, config: Any) -> None:
        if config == "__is_first_stage__":
            self.cond_stage_model = self.first_stage_model
            return
        if config == "__is_unconditional__":
            self.cond_stage_model = None
            return
        model = instantiate_from_config(config)
        if self.cond_stage_trainable:
            # Encoders such as FrozenCLIPEmbedder freeze themselves by default; training them overrides that.
            model.requires_grad_(True)
        else:
            model = frozen(model)
        self.cond_stage_model = model

    def get_learned_conditioning(self, c: Any) -> Any:
        """Encode raw conditioning (a list of prompts, class labels, ...) with the cond stage: e.g. -> (B, 77, D)."""
        if self.cond_stage_model is None:
            raise RuntimeError("this model is unconditional (__is_unconditional__); it takes no conditioning.")
        if self.cond_stage_forward is not None:
            return getattr(self.cond_stage_model, self.cond_stage_forward)(c)
        encode = getattr(self.cond_stage_model, "encode", None)
        c = encode(c) if callable(encode) else self.cond_stage_model(c)
        return c.mode() if isinstance(c, DiagonalGaussianDistribution) else c

    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor) -> Any:
        """Image x: (B, 3, H, W) in [-1, 1] -> what the first stage's ``encode`` gives: the posterior over latents
        (B, C, H/f, W/f) of a KL autoencoder, the pre-quantization latent of a ``VQModelInterface``, the
        ``(quantized latent, loss, info)`` triple of a plain ``VQModel``."""
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(
        self, encoder_posterior: Any, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """A scaled latent: a sample of the posterior (or the tensor itself, or a VQ triple's quantized latent)
        times ``scale_factor``."""
        if isinstance(encoder_posterior, DiagonalGaussianDistribution):
            z = encoder_posterior.sample(generator=generator)
        elif isinstance(encoder_posterior, torch.Tensor):
            z = encoder_posterior
        elif isinstance(encoder_posterior, tuple) and isinstance(encoder_posterior[0], torch.Tensor):
            z = encoder_posterior[0]
        else:
            raise TypeError(f"cannot take a latent from a {type(encoder_posterior).__name__}.")
        return self.scale_factor * z

    @torch.no_grad()
    def decode_first_stage(
        self, z: torch.Tensor, predict_cids: bool = False, force_not_quantize: bool = False
    ) -> torch.Tensor:
        """Scaled latent z: (B, C, h, w) -> image (B, 3, h*f, w*f), roughly in [-1, 1].

        VQ first stages: with ``predict_cids`` z holds per-position codebook logits (B, n_embed, h, w) or indices
        (B, h, w), looked up in the codebook; a ``VQModelInterface`` quantizes z before decoding unless
        ``force_not_quantize`` (or ``predict_cids``: the latent already is codebook vectors).
        """
        if predict_cids:
            if z.dim() == 4:
                z = z.argmax(dim=1)
            z = self.first_stage_model.quantize.get_codebook_entry(z, shape=None).permute(0, 3, 1, 2).contiguous()
        z = z / self.scale_factor
        if isinstance(self.first_stage_model, VQModelInterface):
            return self.first_stage_model.decode(z, force_not_quantize=predict_cids or force_not_quantize)
        return self.first_stage_model.decode(z)

    # -- what a sampling pipeline asks of the model --

    # Ordinary models inpaint by keeping the known latent during sampling; inpainting models are told by conditioning.
    inpaints_by_conditioning = False
    # Whether the UNet also sees image_conditioning's result (inpainting and depth models), and whether that takes a
    # depth map (depth models).
    conditions_on_image = False
    takes_depth_map = False
    # An init image is where img2img starts; for unCLIP models it is the condition (made variations of) instead.
    image_is_condition = False

    def stages(self) -> dict[str, nn.Module]:
        """The model's networks by role: ``unet`` (the DiffusionWrapper), ``first_stage`` (the VAE) and, when it has
        one, ``cond_stage`` (the text encoder; the first stage itself for ``__is_first_stage__`` models)."""
        parts = {"unet": self.model, "first_stage": self.first_stage_model, "cond_stage": self.cond_stage_model}
        return {role: module for role, module in parts.items() if module is not None}

    @torch.no_grad()
    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """image: (B, 3, H, W) in [-1, 1] -> scaled latent (B, C, H/f, W/f), float32: the posterior's mode, so no
        randomness (img2img and inpainting start from it)."""
        posterior = self.encode_first_stage(image)
        if isinstance(posterior, DiagonalGaussianDistribution):
            posterior = posterior.mode()
        return self.get_first_stage_encoding(posterior).float()

    def image_conditioning(self, image: torch.Tensor | None, mask: torch.Tensor | None) -> torch.Tensor | None:
        """The image input the UNet sees besides the noisy latent, for an init image and a mask (image: (B, 3, H, W)
        in [-1, 1], mask: (B, 1, H, W), 1 = repaint): none for this model; inpainting models have one."""
        return None

    def sampling_conditioning(self, cond: Any, image_cond: torch.Tensor | None = None) -> Any:
        """What ``apply_model`` takes for sampling, from an encoded prompt ``cond`` and :meth:`image_conditioning`."""
        return cond

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """The UNet's prediction for latents x_noisy: (B, C, h, w) at timesteps t: (B,).

        ``cond`` is a dict with ``c_concat`` / ``c_crossattn`` / ``c_adm`` lists, or a tensor (or list of tensors)
        that goes where ``conditioning_key`` says: e.g. the text embedding (B, 77, D) for cross-attention.
        """
        if not isinstance(cond, Mapping):
            if cond is None:
                cond = {}
            else:
                cond = cond if isinstance(cond, list) else [cond]
                cond = {"c_concat" if self.model.conditioning_key == "concat" else "c_crossattn": cond}
        out = self.model(x_noisy, t, **cond)
        return out[0] if isinstance(out, tuple) else out

    # -- training --

    @torch.no_grad()
    def get_input(
        self,
        batch: Mapping[str, Any],
        k: str,
        return_first_stage_outputs: bool = False,
        force_c_encode: bool = False,
        cond_key: str | None = None,
        return_original_cond: bool = False,
        bs: int | None = None,
        return_x: bool = False,
    ) -> list[Any]:
        """``[z, c]`` for a batch: scaled latents z (B, 4, H/f, W/f) of the images ``batch[k]`` ((B, H, W, 3) in
        [-1, 1]) and the conditioning ``c``, encoded unless the cond stage is trainable (then it is encoded in
        :meth:`forward`, with gradients) and ``force_c_encode`` is off. ``c`` is None for unconditional models.

        Appended as asked (CompVis order): the images x and their reconstruction, x again, the raw conditioning.
        ``bs`` keeps the first ``bs`` samples.
        """
        encoded, x = self.first_stage_input(batch, k, bs)
        z = self.get_first_stage_encoding(encoded).detach()
        if x is None and (return_first_stage_outputs or return_x or (cond_key or self.cond_stage_key) == k):
            # A batch of cached latents has no pixels: the images it stands for are their decoding.
            x = self.decode_first_stage(z)
        c = xc = None
        if self.model.conditioning_key is not None and not self.force_null_conditioning:
            cond_key = cond_key or self.cond_stage_key
            if self.conditions_on_batch:
                xc = batch
            elif cond_key == k:
                xc = x
            elif cond_key in ("caption", "coordinates_bbox", "txt"):
                xc = batch[cond_key]
            elif cond_key in ("class_label", "cls"):
                xc = batch
            else:
                xc = DDPM.get_input(batch, cond_key).to(self.device, self.dtype)
            if bs is not None:
                xc = _take(xc, bs)
            encode = force_c_encode or not self.cond_stage_trainable or self.conditions_beyond_prompt
            c = self.get_learned_conditioning(xc) if encode else xc
        if self.conditions_beyond_prompt:
            c = self.batch_conditioning(batch, c, x, z, bs)
        out = [z, c]
        if return_first_stage_outputs:
            out += [x, self.decode_first_stage(z)]
        if return_x:
            out.append(x)
        if return_original_cond:
            out.append(xc)
        return out

    # Models whose cond stage reads the whole batch (SDXL's conditioner: prompts, sizes, crops) get it as ``xc``.
    conditions_on_batch = False

    # Models conditioned on more than the prompt (depth, upscaler, unCLIP) always encode it and add the rest of a
    # training batch's conditioning in batch_conditioning.
    conditions_beyond_prompt = False

    def batch_conditioning(
        self, batch: Mapping[str, Any], c: Any, x: torch.Tensor, z: torch.Tensor, bs: int | None
    ) -> Any:
        """A training batch's whole conditioning, from the encoded prompt ``c``, the images x (B, 3, H, W), their
        latents z (B, C, h, w) and the batch; ``bs`` as in :meth:`get_input`. Only for ``conditions_beyond_prompt``."""
        raise NotImplementedError(f"{type(self).__name__} sets conditions_beyond_prompt but has no batch_conditioning")

    @torch.no_grad()
    def first_stage_input(
        self, batch: Mapping[str, Any], k: str, bs: int | None = None
    ) -> tuple[Any, torch.Tensor | None]:
        """``(first-stage output, images)`` for ``batch[k]`` (the first ``bs``): the images (B, 3, H, W) in the
        model's device and dtype with their encoding, or, for a batch whose latents were cached
        (:mod:`ldm.data.latent_cache`), the encoding it carries and None."""
        cached = cached_first_stage(batch, bs, self.device, self.dtype) if k == self.first_stage_key else None
        if cached is not None:
            return cached, None
        x = DDPM.get_input(batch, k)
        if bs is not None:
            x = x[:bs]
        # The model's dtype: float32 under mixed precision, bfloat16/float16 when Lightning runs it in "true" precision.
        x = x.to(self.device, self.dtype)
        return self.encode_first_stage(x), x

    def shared_step(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z, c = self.get_input(batch, self.first_stage_key)
        mask = class_mask(batch)  # prior preservation: which samples are class images
        return self(z, c) if mask is None else self(z, c, class_mask=mask)

    def forward(self, x: torch.Tensor, c: Any, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        """The loss for latents x: (B, C, h, w) at uniformly drawn timesteps; ``c`` as :meth:`get_input` gives it."""
        if self.model.conditioning_key is not None and c is None:
            raise UserError(f"this model is conditioned ({self.model.conditioning_key}); the batch gave no condition.")
        if self.cond_stage_trainable and c is not None:
            c = self.get_learned_conditioning(c)
        return self.p_losses(x, c, self.sample_timesteps(x.shape[0]), *args, **kwargs)

    def p_losses(
        self,
        x_start: torch.Tensor,
        cond: Any,
        t: torch.Tensor,
        noise: torch.Tensor | None = None,
        class_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """:meth:`DDPM.p_losses` with the conditioning ``cond`` passed to :meth:`apply_model`."""
        noise = self.draw_noise(x_start) if noise is None else noise
        model_output = self.apply_model(self.q_sample(x_start, t, noise), t, cond)
        return self.diffusion_loss(model_output, x_start, noise, t, class_mask)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The UNet, the cond stage if ``cond_stage_trainable``, and ``logvar`` if learned."""
        params = list(self.model.parameters())
        if self.cond_stage_trainable and self.cond_stage_model is not None:
            params += list(self.cond_stage_model.parameters())
        if self.learn_logvar:
            params.append(self.logvar)
        return params

    @torch.no_grad()
    def on_train_batch_start(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        """With ``scale_by_std``, set ``scale_factor`` to 1 / std of the first batch's latents (all ranks pooled)."""
        if not self.scale_by_std or self.global_step != 0 or batch_idx != 0 or self.restarted_from_ckpt:
            return
        encoded, _ = self.first_stage_input(batch, self.first_stage_key)
        z = (self.get_first_stage_encoding(encoded) / self.scale_factor).float().flatten()
        # Each rank's count, mean and squared deviations, pooled (Chan et al.) rather than gathering the latents:
        # ranks' batches can differ in shape (aspect-ratio buckets).
        mean = z.mean()
        stats = torch.stack([z.new_tensor(z.numel()), mean, (z - mean).square().sum()])
        counts, means, deviations = self.all_gather(stats).reshape(-1, 3).unbind(dim=1)
        pooled = (counts * means).sum() / counts.sum()
        squares = (deviations + counts * (means - pooled).square()).sum()
        std = (squares / (counts.sum() - 1)).sqrt()  # torch.std's, with Bessel's correction
        self.scale_factor.copy_(1.0 / std)
        rank_zero_info(f"scale_by_std: scale_factor set to {float(self.scale_factor):.5f}")

    def get_unconditional_conditioning(self, batch_size: int, null_label: Any = None) -> Any:
        """The encoded "no condition" for classifier-free guidance: the cond stage's own (class embedders),
        ``null_label``, or the ``ucg_training`` replacement value (default the empty prompt)."""
        if null_label is None and hasattr(self.cond_stage_model, "get_unconditional_conditioning"):
            return self.get_learned_conditioning(self.cond_stage_model.get_unconditional_conditioning(batch_size))
        if null_label is None:
            null_label = (self.ucg_training.get(self.cond_stage_key) or {}).get("val") or ""
        return self.get_learned_conditioning([null_label] * batch_size)

    def unconditional_like(self, cond: Any, batch_size: int, null_label: Any = None) -> Any:
        """The guidance counterpart of a conditioning ``cond`` as :meth:`get_input` gives it: here simply
        :meth:`get_unconditional_conditioning`; models whose conditioning also holds an image keep that part."""
        return self.get_unconditional_conditioning(batch_size, null_label)

    @torch.no_grad()
    def log_images(
        self,
        batch: Mapping[str, Any],
        N: int = 8,
        sample: bool = True,
        ddim_steps: int = 20,
        ddim_eta: float = 0.0,
        unconditional_guidance_scale: float = 1.0,
        unconditional_guidance_label: Any = None,
        use_ema_scope: bool = True,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        """Images for the ImageLogger, each (N, 3, H, W) clamped to [-1, 1]: ``inputs``, ``reconstruction``
        (through the first stage), for layout models the ``conditioning`` layouts drawn as boxes, and, with
        ``sample``, DDIM ``samples`` for the batch's conditioning; with ``unconditional_guidance_scale > 1`` also
        ``samples_cfg`` (classifier-free guidance). Sampling uses the EMA weights (``use_ema_scope``) and eval mode.
        """
        was_training = self.training
        self.eval()
        try:
            z, c, x, xrec, xc = self.get_input(
                {key: _take(value, N) for key, value in batch.items()},
                self.first_stage_key,
                return_first_stage_outputs=True,
                force_c_encode=True,
                return_original_cond=True,
            )
            log = {"inputs": x, "reconstruction": xrec}
            if self.cond_stage_key == "coordinates_bbox" and xc is not None:
                log["conditioning"] = plot_layouts(self.cond_stage_model, xc, (x.shape[3], x.shape[2])).to(x)
            guided = unconditional_guidance_scale > 1.0 and c is not None
            with self.ema_scope() if use_ema_scope else nullcontext():
                settings = {"shape": tuple(z.shape), "eta": ddim_eta, "progress": False}
                if sample:
                    log["samples"] = self.decode_first_stage(run_sampler(self, "ddim", ddim_steps, c, **settings))
                if guided:
                    uc = self.unconditional_like(c, len(z), unconditional_guidance_label)
                    latents = run_sampler(self, "ddim", ddim_steps, c, uc, unconditional_guidance_scale, **settings)
                    log["samples_cfg"] = self.decode_first_stage(latents)
        finally:
            self.train(was_training)
        return {k: v.float().clamp(-1.0, 1.0) for k, v in log.items()}
