"""What the first stages' training losses share: the L1 + LPIPS reconstruction term and the patch GAN.

:class:`~ldm.modules.losses.contperceptual.LPIPSWithDiscriminator` (KL autoencoder) and
:class:`~ldm.modules.losses.vqperceptual.VQLPIPSWithDiscriminator` (VQ-GAN) differ only in how the reconstruction
term is normalised and in their regulariser (KL or codebook loss).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.discriminator.model import NLayerDiscriminator
from ldm.modules.losses.lpips import LPIPS

DISC_LOSSES = ("hinge", "vanilla")


def adopt_weight(weight: float, global_step: int, threshold: int = 0, value: float = 0.0) -> float:
    """``weight`` from step ``threshold`` on, ``value`` before it (switches the GAN terms on at ``disc_start``)."""
    return value if global_step < threshold else weight


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


class PerceptualGANLoss(nn.Module):
    """LPIPS network ``perceptual_loss`` and PatchGAN ``discriminator`` (CompVis key names), with the parts of the
    loss both autoencoders compute the same way.

    ``perceptual_weights``: local file(s) with the pretrained LPIPS weights (see
    :func:`ldm.modules.losses.lpips.load_lpips_weights`). Without them the perceptual term is off, with one warning.
    The LPIPS network is built either way, so checkpoints keep the CompVis key layout (``loss.perceptual_loss.*``).
    """

    def __init__(
        self,
        disc_start: int,
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
        disc_ndf: int = 64,
    ) -> None:
        super().__init__()
        if disc_loss not in DISC_LOSSES:
            raise ValueError(f"disc_loss '{disc_loss}' is not one of {DISC_LOSSES}.")
        self.pixel_weight = pixelloss_weight
        self.perceptual_loss = LPIPS(weights=perceptual_weights)
        if perceptual_weight > 0 and perceptual_weights is None:
            warnings.warn(
                f"{type(self).__name__}: no perceptual_weights given, so the perceptual (LPIPS) term is off. To enable "
                "it, set lossconfig.params.perceptual_weights to local file(s) with the LPIPS weights (VGG16 features "
                "+ LPIPS linear layers, or a CompVis autoencoder checkpoint holding loss.perceptual_loss.*).",
                stacklevel=3,
            )
            perceptual_weight = 0.0
        self.perceptual_weight = perceptual_weight
        self.discriminator = NLayerDiscriminator(
            input_nc=disc_in_channels, ndf=disc_ndf, n_layers=disc_num_layers, use_actnorm=use_actnorm
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

    def reconstruction_loss(
        self, inputs: torch.Tensor, reconstructions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rec_loss, p_loss)``: per pixel ``pixelloss_weight * |x - x_rec| + perceptual_weight * p_loss``,
        (B, C, H, W), and the LPIPS distance p_loss, (B, 1, 1, 1) (zeros while the perceptual term is off)."""
        rec_loss = self.pixel_weight * (inputs.float() - reconstructions.float()).abs()
        if self.perceptual_weight <= 0:
            return rec_loss, torch.zeros(inputs.shape[0], 1, 1, 1, device=inputs.device)
        p_loss = self.perceptual_loss(inputs.contiguous(), reconstructions.contiguous()).float()
        return rec_loss + self.perceptual_weight * p_loss, p_loss

    def generator_terms(
        self,
        nll_loss: torch.Tensor,
        reconstructions: torch.Tensor,
        global_step: int,
        last_layer: torch.Tensor | None,
        cond: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(g_loss, d_weight, disc_factor)``: the autoencoder's GAN term is ``d_weight * disc_factor * g_loss``.

        ``d_weight`` is 0 before ``disc_start`` and where it cannot be computed (no gradients: validation).
        """
        disc_factor = adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start)
        g_loss = -self._discriminate(reconstructions, cond).float().mean()
        adaptive = disc_factor > 0 and torch.is_grad_enabled() and last_layer is not None
        if adaptive:
            d_weight = self.calculate_adaptive_weight(nll_loss, g_loss, last_layer)
        else:
            d_weight = torch.zeros((), device=reconstructions.device)
        return g_loss, d_weight, disc_factor

    def discriminator_step(
        self,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        global_step: int,
        cond: torch.Tensor | None,
        split: str,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The discriminator's loss (``optimizer_idx=1``): ``disc_factor`` times the hinge / vanilla loss of D on
        real inputs vs reconstructions, from ``disc_start`` on; and its ``{split}/...`` metrics."""
        disc_factor = adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start)
        logits_real = self._discriminate(inputs.detach(), cond)
        logits_fake = self._discriminate(reconstructions.detach(), cond)
        d_loss = disc_factor * self.disc_loss(logits_real.float(), logits_fake.float())
        return d_loss, {
            f"{split}/disc_loss": d_loss.detach(),
            f"{split}/logits_real": logits_real.detach().float().mean(),
            f"{split}/logits_fake": logits_fake.detach().float().mean(),
        }
