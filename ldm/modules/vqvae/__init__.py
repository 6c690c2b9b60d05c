"""Vector quantization for VQ first stages (``VQModel``)."""
