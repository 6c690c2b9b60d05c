"""The VQ-GAN loss: L1 + LPIPS reconstruction, the quantizer's codebook + commitment loss, and a patch GAN.

Configs name it ``taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator`` (taming-transformers' path, which
``ldm.util`` resolves to this class) or ``ldm.modules.losses.vqperceptual.VQLPIPSWithDiscriminator``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from ldm.modules.losses.gan import PerceptualGANLoss


class VQLPIPSWithDiscriminator(PerceptualGANLoss):
    """Loss of ``VQModel`` training, one call per optimizer (taming-transformers API).

    ``optimizer_idx=0`` (autoencoder): ``nll + d_weight * disc_factor * g_loss + codebook_weight * codebook_loss``
    with ``nll = mean(pixelloss_weight * |x - x_rec| + perceptual_weight * LPIPS(x, x_rec))`` (a plain mean over
    pixels and batch, unlike the KL loss's per-image sum), ``g_loss = -mean(D(x_rec))`` and ``d_weight`` the adaptive
    GAN weight (times ``disc_weight``), both from step ``disc_start`` on. ``codebook_loss`` is what the quantizer
    returns (its codebook and commitment terms). ``optimizer_idx=1`` (discriminator): as for the KL loss.

    ``perceptual_weights``: local file(s) with the pretrained LPIPS weights; see :class:`PerceptualGANLoss`.
    """

    def __init__(
        self,
        disc_start: int,
        codebook_weight: float = 1.0,
        pixelloss_weight: float = 1.0,
        disc_num_layers: int = 3,
        disc_in_channels: int = 3,
        disc_factor: float = 1.0,
        disc_weight: float = 1.0,
        perceptual_weight: float = 1.0,
        use_actnorm: bool = False,
        disc_conditional: bool = False,
        disc_ndf: int = 64,
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
            disc_ndf=disc_ndf,
        )
        self.codebook_weight = codebook_weight

    def forward(
        self,
        codebook_loss: torch.Tensor,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        optimizer_idx: int,
        global_step: int,
        last_layer: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
        split: str = "train",
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """codebook_loss: the quantizer's loss (a scalar); inputs, reconstructions: (B, C, H, W) in [-1, 1].

        Returns the loss for optimizer ``optimizer_idx`` and ``{split}/...`` metrics (taming's names:
        ``total_loss``, ``quant_loss``, ``nll_loss``, ``rec_loss``, ``p_loss``, ``d_weight``, ``disc_factor``,
        ``g_loss``; ``disc_loss``, ``logits_real``, ``logits_fake``). ``global_step`` counts training batches.
        """
        if optimizer_idx == 1:
            return self.discriminator_step(inputs, reconstructions, global_step, cond, split)
        if optimizer_idx != 0:
            raise ValueError(f"optimizer_idx must be 0 (autoencoder) or 1 (discriminator), got {optimizer_idx}.")
        rec_loss, p_loss = self.reconstruction_loss(inputs, reconstructions)
        nll_loss = rec_loss.mean()
        g_loss, d_weight, disc_factor = self.generator_terms(nll_loss, reconstructions, global_step, last_layer, cond)
        quant_loss = codebook_loss.float().mean()
        loss = nll_loss + d_weight * disc_factor * g_loss + self.codebook_weight * quant_loss
        return loss, {
            f"{split}/total_loss": loss.detach(),
            f"{split}/quant_loss": quant_loss.detach(),
            f"{split}/nll_loss": nll_loss.detach(),
            f"{split}/rec_loss": rec_loss.detach().mean(),
            f"{split}/p_loss": p_loss.detach().mean(),
            f"{split}/d_weight": d_weight.detach(),
            f"{split}/disc_factor": torch.tensor(disc_factor, device=inputs.device),
            f"{split}/g_loss": g_loss.detach(),
        }
