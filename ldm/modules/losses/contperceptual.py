"""The autoencoder's training loss: reconstruction (L1 + LPIPS) under a learned scale, KL, and a patch GAN."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn

from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.losses.gan import DISC_LOSSES, PerceptualGANLoss, adopt_weight, hinge_d_loss, vanilla_d_loss

__all__ = ["DISC_LOSSES", "DummyLoss", "LPIPSWithDiscriminator", "adopt_weight", "hinge_d_loss", "vanilla_d_loss"]


class DummyLoss(nn.Module):
    """No loss at all: the ``lossconfig`` of a first stage that is only used frozen (LDM's inpainting_big config)."""


class LPIPSWithDiscriminator(PerceptualGANLoss):
    """Loss of ``AutoencoderKL`` training, one call per optimizer (CompVis API).

    ``optimizer_idx=0`` (autoencoder): ``rec / exp(logvar) + logvar`` summed over pixels and averaged over the
    batch, with ``rec = pixelloss_weight * |x - x_rec| + perceptual_weight * LPIPS(x, x_rec)``;
    ``+ kl_weight * KL(posterior || N(0, I))``; and, from step ``disc_start`` on,
    ``+ d_weight * disc_factor * (-mean(D(x_rec)))`` where ``d_weight`` balances the GAN gradient against the
    reconstruction gradient at the decoder's last layer (times ``disc_weight``).
    ``optimizer_idx=1`` (discriminator): ``disc_factor`` times the hinge (or ``vanilla``: softplus) loss of
    D on real inputs vs reconstructions, from ``disc_start`` on.

    ``perceptual_weights``: local file(s) with the pretrained LPIPS weights; see :class:`PerceptualGANLoss`.
    """

    def __init__(
        self,
        disc_start: int,
        logvar_init: float = 0.0,
        kl_weight: float = 1.0,
        pixelloss_weight: float = 1.0,
        disc_num_layers: int = 3,
        disc_in_channels: int = 3,
        disc_factor: float = 1.0,
        disc_weight: float = 1.0,
        perceptual_weight: float = 1.0,
        use_actnorm: bool = False,
        disc_conditional: bool = False,
        disc_loss: str = "hinge",
        perceptual_weights: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    ) -> None:
        super().__init__(
            disc_start,
            pixelloss_weight=pixelloss_weight,
            disc_num_layers=disc_num_layers,
            disc_in_channels=disc_in_channels,
            disc_factor=disc_factor,
            disc_weight=disc_weight,
            perceptual_weight=perceptual_weight,
            use_actnorm=use_actnorm,
            disc_conditional=disc_conditional,
            disc_loss=disc_loss,
            perceptual_weights=perceptual_weights,
        )
        self.kl_weight = kl_weight
        self.logvar = nn.Parameter(torch.full((), float(logvar_init)))

    def forward(
        self,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        posteriors: DiagonalGaussianDistribution,
        optimizer_idx: int,
        global_step: int,
        last_layer: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
        split: str = "train",
        weights: torch.Tensor | float | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """inputs, reconstructions: (B, C, H, W) in [-1, 1]. Returns the loss for optimizer ``optimizer_idx`` and a
        dict of ``{split}/...`` metrics (CompVis names: ``rec_loss``, ``kl_loss``, ``g_loss``, ``disc_loss`` ...).

        ``global_step`` counts training batches (it gates ``disc_start``); ``last_layer`` is the decoder's output
        convolution weight, needed for the adaptive GAN weight while gradients are enabled.
        """
        if optimizer_idx == 1:
            return self.discriminator_step(inputs, reconstructions, global_step, cond, split)
        if optimizer_idx != 0:
            raise ValueError(f"optimizer_idx must be 0 (autoencoder) or 1 (discriminator), got {optimizer_idx}.")

        rec_loss, _ = self.reconstruction_loss(inputs, reconstructions)
        nll_loss = rec_loss / torch.exp(self.logvar) + self.logvar
        weighted_nll_loss = nll_loss if weights is None else weights * nll_loss
        batch = inputs.shape[0]
        weighted_nll_loss = weighted_nll_loss.sum() / batch
        nll_loss = nll_loss.sum() / batch
        kl_loss = posteriors.kl().float().sum() / batch

        g_loss, d_weight, disc_factor = self.generator_terms(nll_loss, reconstructions, global_step, last_layer, cond)
        loss = weighted_nll_loss + self.kl_weight * kl_loss + d_weight * disc_factor * g_loss
        return loss, {
            f"{split}/total_loss": loss.detach(),
            f"{split}/logvar": self.logvar.detach(),
            f"{split}/kl_loss": kl_loss.detach(),
            f"{split}/nll_loss": nll_loss.detach(),
            f"{split}/rec_loss": rec_loss.detach().mean(),
            f"{split}/d_weight": d_weight.detach(),
            f"{split}/disc_factor": torch.tensor(disc_factor, device=inputs.device),
            f"{split}/g_loss": g_loss.detach(),
        }
