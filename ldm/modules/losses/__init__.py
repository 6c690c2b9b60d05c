"""Training losses; configs name ``ldm.modules.losses.LPIPSWithDiscriminator`` (KL autoencoder) and
``taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator`` (VQ-GAN, resolved to this package's)."""

from ldm.modules.losses.contperceptual import LPIPSWithDiscriminator
from ldm.modules.losses.vqperceptual import VQLPIPSWithDiscriminator

__all__ = ["LPIPSWithDiscriminator", "VQLPIPSWithDiscriminator"]
