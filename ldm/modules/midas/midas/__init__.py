"""The MiDaS networks: the ViT backbones (``vit``), the DPT decoder's blocks (``blocks``) and ``DPTDepthModel``."""
