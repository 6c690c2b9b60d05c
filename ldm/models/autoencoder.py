"""First-stage models: the KL-regularised autoencoder that maps images to Stable Diffusion's latent space, the
vector-quantized VQ-GAN autoencoder of the LDM paper's VQ models, and an identity stand-in for models that diffuse in
pixel space."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ldm.errors import UserError
from ldm.models.autoencoder_training import GANAutoencoder
from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.vqvae.quantize import VectorQuantizer
from ldm.util import ConfigError, instantiate_from_config

# The EMA decay of ``use_ema: true`` VQ models (LitEma's default, as the originals use).
VQ_EMA_DECAY = 0.9999


class AutoencoderKL(GANAutoencoder):
    """VAE with a diagonal Gaussian posterior: images (B, C, H, W) in [-1, 1] <-> latents (B, embed_dim, H/f, W/f).

    ``ddconfig`` holds the :class:`Encoder` / :class:`Decoder` arguments (``double_z`` must be true: the encoder
    predicts a mean and a log-variance). ``lossconfig`` is a ``target``/``params`` node for the training loss
    (``torch.nn.Identity`` for inference-only configs). ``ckpt_path`` loads weights through
    ``ldm.checkpoint.init_from_ckpt``, dropping keys that start with any of ``ignore_keys``.

    Training (:class:`~ldm.models.autoencoder_training.GANAutoencoder`): the autoencoder's Adam, then the
    discriminator's when the loss has one (``LPIPSWithDiscriminator``), both at ``learning_rate``. ``ema_decay``
    keeps an EMA of all trainable weights (``model_ema.*``); validation reports both the trained and the EMA weights.
    """

    def __init__(
        self,
        ddconfig: Mapping[str, Any],
        lossconfig: Mapping[str, Any],
        embed_dim: int,
        ckpt_path: str | None = None,
        ignore_keys: Sequence[str] = (),
        image_key: str = "image",
        colorize_nlabels: int | None = None,
        monitor: str | None = None,
        ema_decay: float | None = None,
        learn_logvar: bool = False,
    ) -> None:
        super().__init__()
        if not ddconfig["double_z"]:
            raise UserError("AutoencoderKL needs ddconfig.double_z: true (the encoder must output mean and logvar).")
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ConfigError(f"ema_decay must be in (0, 1), got {ema_decay}.")
        self.image_key = image_key
        self.embed_dim = embed_dim
        self.learn_logvar = learn_logvar
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.loss = instantiate_from_config(lossconfig)
        z_channels = ddconfig["z_channels"]
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, kernel_size=1)
        if colorize_nlabels is not None:
            # A fixed random projection of segmentation labels to RGB for logging; it is part of the checkpoints of
            # label-map autoencoders, so it must exist for their weights to load strictly.
            self.register_buffer("colorize", torch.randn(3, colorize_nlabels, 1, 1))
        if monitor is not None:
            self.monitor = monitor
        if ckpt_path is not None:
            from ldm.checkpoint import init_from_ckpt

            init_from_ckpt(self, ckpt_path, ignore_keys=ignore_keys)
        # Built after loading so that it starts from the loaded weights; resuming restores it from the checkpoint.
        if ema_decay is not None:
            self._init_ema(ema_decay)

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Posterior over latents for images ``x: (B, in_channels, H, W)``; its mean is (B, embed_dim, H/f, W/f)."""
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images (B, out_ch, h*f, w*f) from latents ``z: (B, embed_dim, h, w)``."""
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, input: torch.Tensor, sample_posterior: bool = True
    ) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        """Reconstruct ``input: (B, C, H, W)`` through a sampled (or, if not ``sample_posterior``, the mean) latent.

        Returns ``(reconstruction (B, out_ch, H, W), posterior)``.
        """
        posterior = self.encode(input)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def _reconstruct(self, inputs: torch.Tensor) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        return self(inputs)

    def _loss(
        self,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        extra: DiagonalGaussianDistribution,
        optimizer_idx: int,
        step: int,
        split: str,
        last_layer: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.loss(inputs, reconstructions, extra, optimizer_idx, step, last_layer=last_layer, split=split)

    def _autoencoder_parameters(self) -> list[nn.Parameter]:
        """Encoder, decoder, the 1x1 convolutions, and ``loss.logvar`` if ``learn_logvar``."""
        params = [
            *self.encoder.parameters(),
            *self.decoder.parameters(),
            *self.quant_conv.parameters(),
            *self.post_quant_conv.parameters(),
        ]
        if self.learn_logvar:
            params.append(self.loss.logvar)
        return params

    @torch.no_grad()
    def log_images(
        self, batch: Mapping[str, Any], N: int = 8, only_inputs: bool = False, log_ema: bool = False, **kwargs: Any
    ) -> dict[str, torch.Tensor]:
        """``inputs``, ``reconstructions`` and ``samples`` (decoded standard-normal latents), each (N, 3, H, W) in
        [-1, 1]; with ``log_ema`` also ``reconstructions_ema`` / ``samples_ema``."""
        x = self.get_input(batch, self.image_key)[:N].to(self.device, self.dtype)
        log = {"inputs": x}
        if not only_inputs:
            reconstructions, posterior = self(x)
            log["reconstructions"] = reconstructions
            log["samples"] = self.decode(torch.randn_like(posterior.mean))
            if log_ema and self.use_ema:
                with self.ema_scope():
                    reconstructions, posterior = self(x)
                    log["reconstructions_ema"] = reconstructions
                    log["samples_ema"] = self.decode(torch.randn_like(posterior.mean))
        return {k: self.to_rgb(v) for k, v in log.items()}


class VQModel(GANAutoencoder):
    """VQ-GAN autoencoder: images (B, C, H, W) in [-1, 1] <-> quantized latents (B, embed_dim, H/f, W/f), each
    latent vector one of ``n_embed`` codebook entries (``quantize.embedding.weight``: (n_embed, embed_dim)).

    ``ddconfig``: the :class:`Encoder` / :class:`Decoder` arguments (``double_z: false``). ``lossconfig``: the
    training loss, ``VQLPIPSWithDiscriminator`` (configs name it by its taming-transformers path) or
    ``torch.nn.Identity`` for inference. ``remap`` / ``sane_index_shape``: see :class:`VectorQuantizer` (beta 0.25,
    legacy loss, as the released models). ``batch_resize_range: [lo, hi]`` trains on batches resized (bicubic) to a
    random size ``lo + 16 k`` up to ``hi`` (``hi`` for the first steps). ``lr_g_factor`` scales the autoencoder's
    learning rate against the discriminator's; ``scheduler_config`` schedules both; ``use_ema`` keeps an EMA
    (``model_ema.*``).
    """

    _training_loss_name = "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator"

    def __init__(
        self,
        ddconfig: Mapping[str, Any],
        lossconfig: Mapping[str, Any],
        n_embed: int,
        embed_dim: int,
        ckpt_path: str | None = None,
        ignore_keys: Sequence[str] = (),
        image_key: str = "image",
        colorize_nlabels: int | None = None,
        monitor: str | None = None,
        batch_resize_range: Sequence[int] | None = None,
        scheduler_config: Mapping[str, Any] | None = None,
        lr_g_factor: float = 1.0,
        remap: str | None = None,
        sane_index_shape: bool = False,
        use_ema: bool = False,
    ) -> None:
        super().__init__()
        if ddconfig.get("double_z", False):
            raise UserError(f"{type(self).__name__} needs ddconfig.double_z: false (the encoder outputs one latent).")
        if batch_resize_range is not None:
            low, high = (int(v) for v in batch_resize_range)
            if not 0 < low <= high:
                raise ConfigError(f"batch_resize_range must be [low, high] with 0 < low <= high, got {low, high}.")
            self.batch_resize_range = (low, high)
        else:
            self.batch_resize_range = None
        self.embed_dim = embed_dim
        self.n_embed = n_embed
        self.image_key = image_key
        self.scheduler_config = scheduler_config
        self.lr_g_factor = lr_g_factor
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.loss = instantiate_from_config(lossconfig)
        self.quantize = VectorQuantizer(n_embed, embed_dim, beta=0.25, remap=remap, sane_index_shape=sane_index_shape)
        self.quant_conv = nn.Conv2d(ddconfig["z_channels"], embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], kernel_size=1)
        if colorize_nlabels is not None:
            self.register_buffer("colorize", torch.randn(3, colorize_nlabels, 1, 1))
        if monitor is not None:
            self.monitor = monitor
        if ckpt_path is not None:
            from ldm.checkpoint import init_from_ckpt

            init_from_ckpt(self, ckpt_path, ignore_keys=ignore_keys)
        if use_ema:
            self._init_ema(VQ_EMA_DECAY)

    def encode_to_prequant(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``x: (B, in_channels, H, W)`` -> latents before quantization (B, embed_dim, H/f, W/f)."""
        return self.quant_conv(self.encoder(x))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """Images -> ``(quantized latents (B, embed_dim, H/f, W/f), codebook loss, (perplexity, None, indices))``."""
        return self.quantize(self.encode_to_prequant(x))

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        """Images (B, out_ch, h*f, w*f) from quantized latents ``quant: (B, embed_dim, h, w)``."""
        return self.decoder(self.post_quant_conv(quant))

    def decode_code(self, code_b: torch.Tensor) -> torch.Tensor:
        """Images (B, out_ch, h*f, w*f) from codebook indices ``code_b: (B, h, w)`` (positions in ``used`` with a
        remap)."""
        batch, height, width = code_b.shape
        quant = self.quantize.get_codebook_entry(code_b.reshape(-1), shape=(batch, height, width, self.embed_dim))
        return self.decode(quant)

    def forward(
        self, input: torch.Tensor, return_pred_indices: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruct ``input: (B, C, H, W)``: ``(reconstruction, codebook loss)``, and the indices if asked."""
        # Not through self.encode, which VQModelInterface redefines to stop before quantization.
        quant, diff, (_, _, indices) = self.quantize(self.encode_to_prequant(input))
        reconstruction = VQModel.decode(self, quant)
        return (reconstruction, diff, indices) if return_pred_indices else (reconstruction, diff)

    def get_input(self, batch: Mapping[str, torch.Tensor], k: str) -> torch.Tensor:
        """As the KL autoencoder's, then resized when training with ``batch_resize_range``."""
        x = super().get_input(batch, k)
        if self.batch_resize_range is None or not self.training:
            return x
        low, high = self.batch_resize_range
        # The first batches at the largest size, so that running out of memory shows at once rather than later.
        size = high if self.global_step <= 4 else low + 16 * int(torch.randint(0, (high - low) // 16 + 1, ()))
        if size != x.shape[2]:
            x = F.interpolate(x, size=size, mode="bicubic")
        return x.detach()

    def _reconstruct(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self(inputs)

    def _loss(
        self,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        extra: torch.Tensor,
        optimizer_idx: int,
        step: int,
        split: str,
        last_layer: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.loss(extra, inputs, reconstructions, optimizer_idx, step, last_layer=last_layer, split=split)

    def _autoencoder_parameters(self) -> list[nn.Parameter]:
        """Encoder, decoder, codebook and the 1x1 convolutions."""
        return [
            *self.encoder.parameters(),
            *self.decoder.parameters(),
            *self.quantize.parameters(),
            *self.quant_conv.parameters(),
            *self.post_quant_conv.parameters(),
        ]

    @torch.no_grad()
    def log_images(
        self, batch: Mapping[str, Any], N: int = 8, only_inputs: bool = False, plot_ema: bool = False, **kwargs: Any
    ) -> dict[str, torch.Tensor]:
        """``inputs`` and ``reconstructions``, each (N, 3, H, W) in [-1, 1]; with ``plot_ema`` (and EMA on) also
        ``reconstructions_ema``."""
        x = self.get_input(batch, self.image_key)[:N].to(self.device, self.dtype)
        log = {"inputs": x}
        if not only_inputs:
            log["reconstructions"] = self(x)[0]
            if plot_ema and self.use_ema:
                with self.ema_scope():
                    log["reconstructions_ema"] = self(x)[0]
        return {k: self.to_rgb(v) for k, v in log.items()}


class VQModelInterface(VQModel):
    """A :class:`VQModel` as a latent diffusion first stage: ``encode`` stops before quantization, and ``decode``
    quantizes first (unless ``force_not_quantize``), so the diffusion model works on continuous latents."""

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, in_channels, H, W) -> pre-quantization latents (B, embed_dim, H/f, W/f)."""
        return self.encode_to_prequant(x)

    def decode(self, h: torch.Tensor, force_not_quantize: bool = False) -> torch.Tensor:
        """Latents ``h: (B, embed_dim, h, w)`` -> images, snapping ``h`` to the codebook first unless
        ``force_not_quantize`` (for latents that are already codebook vectors)."""
        quant = h if force_not_quantize else self.quantize(h)[0]
        return super().decode(quant)


class IdentityFirstStage(nn.Module):
    """A first stage that does nothing, for diffusion directly in pixel space.

    With ``vq_interface=True``, ``quantize`` returns the VQ-style triple ``(x, None, (None, None, None))``.
    """

    def __init__(self, *args, vq_interface: bool = False, **kwargs) -> None:
        super().__init__()
        self.vq_interface = vq_interface

    def encode(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return x

    def decode(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return x

    def quantize(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor | tuple[torch.Tensor, None, tuple]:
        if self.vq_interface:
            return x, None, (None, None, None)
        return x

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return x
