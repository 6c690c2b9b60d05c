"""First-stage models: the KL-regularised autoencoder that maps images to Stable Diffusion's latent space, and an
identity stand-in for models that diffuse in pixel space."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from ldm.errors import UserError
from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.ema import LitEma
from ldm.util import ConfigError, instantiate_from_config


class AutoencoderKL(pl.LightningModule):
    """VAE with a diagonal Gaussian posterior: images (B, C, H, W) in [-1, 1] <-> latents (B, embed_dim, H/f, W/f).

    ``ddconfig`` holds the :class:`Encoder` / :class:`Decoder` arguments (``double_z`` must be true: the encoder
    predicts a mean and a log-variance). ``lossconfig`` is a ``target``/``params`` node for the training loss
    (``torch.nn.Identity`` for inference-only configs). ``ckpt_path`` loads weights through
    ``ldm.checkpoint.init_from_ckpt``, dropping keys that start with any of ``ignore_keys``.

    Training (Lightning 2.x, manual optimization): each batch steps the autoencoder's Adam, then the discriminator's
    when the loss has one (``LPIPSWithDiscriminator``), both at ``learning_rate`` (set by ``main.py``). Lightning
    counts both steps in ``global_step``, so the loss is given ``global_step // number of optimizers``: training
    batches, the unit of ``disc_start``. ``ema_decay`` keeps an EMA of all trainable weights (``model_ema.*``);
    validation reports both the trained and the EMA weights.
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
        self.automatic_optimization = False
        self.learning_rate: float | None = None
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
        self.use_ema = ema_decay is not None
        if self.use_ema:
            self.model_ema = LitEma(self, decay=ema_decay)

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

    def get_input(self, batch: Mapping[str, torch.Tensor], k: str) -> torch.Tensor:
        """``batch[k]``, stored channels-last (B, H, W[, C]) by the data loader, as contiguous float (B, C, H, W)."""
        x = batch[k]
        if x.ndim == 3:
            x = x[..., None]
        return x.permute(0, 3, 1, 2).to(memory_format=torch.contiguous_format).float()

    # -- training --

    @contextmanager
    def ema_scope(self, context: str | None = None) -> Iterator[None]:
        """Run the block with the EMA weights (when ``ema_decay`` is set), restoring the trained ones afterwards."""
        if self.use_ema:
            self.model_ema.store(self.parameters())
            self.model_ema.copy_to(self)
        try:
            yield
        finally:
            if self.use_ema:
                self.model_ema.restore(self.parameters())

    def get_last_layer(self) -> torch.Tensor:
        """The decoder's output convolution weight, where the GAN weight is balanced against reconstruction."""
        return self.decoder.conv_out.weight

    def _has_discriminator(self) -> bool:
        return isinstance(getattr(self.loss, "discriminator", None), nn.Module)

    def _batches_seen(self) -> int:
        return self.global_step // (2 if self._has_discriminator() else 1)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        """One autoencoder step, then one discriminator step. batch[image_key]: (B, H, W, C) in [-1, 1]."""
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        inputs = self.get_input(batch, self.image_key).to(self.dtype)
        reconstructions, posterior = self(inputs)
        step = self._batches_seen()
        last_layer = self.get_last_layer()
        aeloss, logs = self.loss(inputs, reconstructions, posterior, 0, step, last_layer=last_layer, split="train")
        optimizers[0].zero_grad()
        self.manual_backward(aeloss)
        optimizers[0].step()
        self.log("aeloss", aeloss.detach(), prog_bar=True, on_step=True, on_epoch=True, batch_size=len(inputs))
        if len(optimizers) > 1:
            discloss, log_disc = self.loss(inputs, reconstructions, posterior, 1, step, split="train")
            optimizers[1].zero_grad()
            self.manual_backward(discloss)
            optimizers[1].step()
            self.log("discloss", discloss.detach(), prog_bar=True, on_step=True, on_epoch=True, batch_size=len(inputs))
            logs = {**logs, **log_disc}
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=len(inputs))

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        if self.use_ema:
            self.model_ema(self)

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        """Log ``val/rec_loss``, ``val/total_loss``, ... and, with ``ema_decay``, the same as ``val_ema/...``."""
        self._log_validation(batch, "val")
        if self.use_ema:
            with self.ema_scope():
                self._log_validation(batch, "val_ema")

    def _log_validation(self, batch: Mapping[str, Any], split: str) -> None:
        inputs = self.get_input(batch, self.image_key).to(self.dtype)
        reconstructions, posterior = self(inputs)
        step = self._batches_seen()
        _, logs = self.loss(inputs, reconstructions, posterior, 0, step, last_layer=self.get_last_layer(), split=split)
        if self._has_discriminator():
            logs = {**logs, **self.loss(inputs, reconstructions, posterior, 1, step, split=split)[1]}
        self.log_dict(logs, batch_size=len(inputs), sync_dist=True)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        """Adam(0.5, 0.9) at ``learning_rate`` for the autoencoder (+ ``loss.logvar`` if ``learn_logvar``), and one
        for the discriminator when the loss has one."""
        if self.learning_rate is None:
            raise RuntimeError("set model.learning_rate before training (main.py sets it from base_learning_rate).")
        if isinstance(self.loss, nn.Identity):
            raise ConfigError(
                "this AutoencoderKL config has no training loss (lossconfig is torch.nn.Identity); use "
                "ldm.modules.losses.LPIPSWithDiscriminator to train it."
            )
        params = [
            *self.encoder.parameters(),
            *self.decoder.parameters(),
            *self.quant_conv.parameters(),
            *self.post_quant_conv.parameters(),
        ]
        if self.learn_logvar:
            params.append(self.loss.logvar)
        optimizers = [torch.optim.Adam(params, lr=self.learning_rate, betas=(0.5, 0.9))]
        if self._has_discriminator():
            discriminator = self.loss.discriminator.parameters()
            optimizers.append(torch.optim.Adam(discriminator, lr=self.learning_rate, betas=(0.5, 0.9)))
        return optimizers

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

    def to_rgb(self, x: torch.Tensor) -> torch.Tensor:
        """Images to (B, 3, H, W) in [-1, 1]: clamped, or for label maps (C > 3) a fixed random colour projection."""
        if x.shape[1] <= 3:
            return x.float().clamp(-1.0, 1.0)
        if not hasattr(self, "colorize"):
            self.register_buffer("colorize", torch.randn(3, x.shape[1], 1, 1, device=x.device))
        x = F.conv2d(x.float(), weight=self.colorize)
        return 2.0 * (x - x.min()) / (x.max() - x.min()) - 1.0


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
