"""The autoencoder's training loss: reconstruction (L1 + LPIPS) under a learned scale, KL, and a patch GAN."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.discriminator.model import NLayerDiscriminator
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.losses.lpips import LPIPS

DISC_LOSSES = ("hinge", "vanilla")


def adopt_weight(weight: float, global_step: int, threshold: int = 0, value: float = 0.0) -> float:
    """``weight`` from step ``threshold`` on, ``value`` before it (switches the GAN terms on at ``disc_start``)."""
    return value if global_step < threshold else weight


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


class LPIPSWithDiscriminator(nn.Module):
    """Loss of ``AutoencoderKL`` training, one call per optimizer (CompVis API).

    ``optimizer_idx=0`` (autoencoder): ``rec / exp(logvar) + logvar`` summed over pixels and averaged over the
    batch, with ``rec = pixelloss_weight * |x - x_rec| + perceptual_weight * LPIPS(x, x_rec)``;
    ``+ kl_weight * KL(posterior || N(0, I))``; and, from step ``disc_start`` on,
    ``+ d_weight * disc_factor * (-mean(D(x_rec)))`` where ``d_weight`` balances the GAN gradient against the
    reconstruction gradient at the decoder's last layer (times ``disc_weight``).
    ``optimizer_idx=1`` (discriminator): ``disc_factor`` times the hinge (or ``vanilla``: softplus) loss of
    D on real inputs vs reconstructions, from ``disc_start`` on.

    ``perceptual_weights``: local file(s) with the pretrained LPIPS weights (see
    :func:`ldm.modules.losses.lpips.load_lpips_weights`). Without them the perceptual term is off, with one warning.
    The LPIPS network is built either way, so checkpoints keep the CompVis key layout (``loss.perceptual_loss.*``).
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
        super().__init__()
        if disc_loss not in DISC_LOSSES:
            raise ValueError(f"disc_loss '{disc_loss}' is not one of {DISC_LOSSES}.")
        self.kl_weight = kl_weight
        self.pixel_weight = pixelloss_weight
        self.perceptual_loss = LPIPS(weights=perceptual_weights)
        if perceptual_weight > 0 and perceptual_weights is None:
            warnings.warn(
                "LPIPSWithDiscriminator: no perceptual_weights given, so the perceptual (LPIPS) term is off. To enable "
                "it, set lossconfig.params.perceptual_weights to local file(s) with the LPIPS weights (VGG16 features "
                "+ LPIPS linear layers, or a CompVis autoencoder checkpoint holding loss.perceptual_loss.*).",
                stacklevel=2,
            )
            perceptual_weight = 0.0
        self.perceptual_weight = perceptual_weight
        self.logvar = nn.Parameter(torch.full((), float(logvar_init)))
        self.discriminator = NLayerDiscriminator(
            input_nc=disc_in_channels, n_layers=disc_num_layers, use_actnorm=use_actnorm
        )
        self.discriminator_iter_start = disc_start
        self.disc_loss = hinge_d_loss if disc_loss == "hinge" else vanilla_d_loss
        self.disc_factor = disc_factor
        self.discriminator_weight = disc_weight
        self.disc_conditional = disc_conditional

    def calculate_adaptive_weight(
        self, nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor
    ) -> torch.Tensor:
        """``|grad nll| / |grad g|`` at ``last_layer``, so the GAN term pushes the decoder as hard as reconstruction."""
        nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
        g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        d_weight = torch.clamp(nll_grads.norm() / (g_grads.norm() + 1e-4), 0.0, 1e4).detach()
        return d_weight * self.discriminator_weight

    def _discriminate(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if cond is None:
            if self.disc_conditional:
                raise ValueError("disc_conditional is set: pass cond, the image the discriminator conditions on.")
            return self.discriminator(x.contiguous())
        return self.discriminator(torch.cat([x.contiguous(), cond], dim=1))

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
        disc_factor = adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start)
        if optimizer_idx == 1:
            logits_real = self._discriminate(inputs.detach(), cond)
            logits_fake = self._discriminate(reconstructions.detach(), cond)
            d_loss = disc_factor * self.disc_loss(logits_real.float(), logits_fake.float())
            return d_loss, {
                f"{split}/disc_loss": d_loss.detach(),
                f"{split}/logits_real": logits_real.detach().float().mean(),
                f"{split}/logits_fake": logits_fake.detach().float().mean(),
            }
        if optimizer_idx != 0:
            raise ValueError(f"optimizer_idx must be 0 (autoencoder) or 1 (discriminator), got {optimizer_idx}.")

        rec_loss = self.pixel_weight * (inputs.float() - reconstructions.float()).abs()
        if self.perceptual_weight > 0:
            p_loss = self.perceptual_loss(inputs.contiguous(), reconstructions.contiguous()).float()
            rec_loss = rec_loss + self.perceptual_weight * p_loss
        nll_loss = rec_loss / torch.exp(self.logvar) + self.logvar
        weighted_nll_loss = nll_loss if weights is None else weights * nll_loss
        batch = inputs.shape[0]
        weighted_nll_loss = weighted_nll_loss.sum() / batch
        nll_loss = nll_loss.sum() / batch
        kl_loss = posteriors.kl().float().sum() / batch

        g_loss = -self._discriminate(reconstructions, cond).float().mean()
        adaptive = self.disc_factor > 0 and torch.is_grad_enabled() and last_layer is not None
        d_weight = (
            self.calculate_adaptive_weight(nll_loss, g_loss, last_layer)
            if adaptive and disc_factor > 0
            else torch.zeros((), device=inputs.device)
        )
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
