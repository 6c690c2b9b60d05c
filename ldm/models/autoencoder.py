"""First-stage models: the KL-regularised autoencoder that maps images to Stable Diffusion's latent space, and an
identity stand-in for models that diffuse in pixel space."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import instantiate_from_config


class AutoencoderKL(pl.LightningModule):
    """VAE with a diagonal Gaussian posterior: images (B, C, H, W) in [-1, 1] <-> latents (B, embed_dim, H/f, W/f).

    ``ddconfig`` holds the :class:`Encoder` / :class:`Decoder` arguments (``double_z`` must be true: the encoder
    predicts a mean and a log-variance). ``lossconfig`` is a ``target``/``params`` node for the training loss
    (``torch.nn.Identity`` for inference-only configs). ``ckpt_path`` loads weights through
    ``ldm.checkpoint.init_from_ckpt``, dropping keys that start with any of ``ignore_keys``.
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
            raise ValueError("AutoencoderKL needs ddconfig.double_z: true (the encoder must output mean and logvar).")
        if ema_decay is not None:
            raise NotImplementedError("an EMA of the autoencoder's weights (ema_decay) is not supported yet.")
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
