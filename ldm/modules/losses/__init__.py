"""Training losses; configs name ``ldm.modules.losses.LPIPSWithDiscriminator``."""

from ldm.modules.losses.contperceptual import LPIPSWithDiscriminator

__all__ = ["LPIPSWithDiscriminator"]
