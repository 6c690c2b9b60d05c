"""BSR image degradations for super-resolution training data, under CompVis's names."""

from ldm.modules.image_degradation.bsrgan import degradation_bsrgan_variant as degradation_fn_bsr
from ldm.modules.image_degradation.bsrgan_light import degradation_bsrgan_variant as degradation_fn_bsr_light

__all__ = ["degradation_fn_bsr", "degradation_fn_bsr_light"]
