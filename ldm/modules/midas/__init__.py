"""MiDaS monocular depth estimation (DPT networks), at Stability's module paths, for SD 2 depth-to-image."""
