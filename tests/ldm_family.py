"""Tiny versions of CompVis latent-diffusion's pretrained models: each ``models/ldm/<name>/config.yaml`` with its
networks shrunk by config overrides (16x16 images, f = 2 first stages, 8x8 latents), its wiring unchanged: the
conditioning key, the cond stage's kind, the UNet's input channels."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ldm.util import instantiate_from_config, load_config

MODELS = Path(__file__).resolve().parents[1] / "models" / "ldm"
IMAGE = 16  # pixels a side
LATENT = 8  # latent side, f = 2

_UNET = [
    f"model.params.image_size={LATENT}",
    f"model.params.unet_config.params.image_size={LATENT}",
    "model.params.unet_config.params.model_channels=32",
    "model.params.unet_config.params.channel_mult=[1,2]",
    "model.params.unet_config.params.attention_resolutions=[2]",
    "model.params.unet_config.params.num_res_blocks=1",
    "model.params.use_ema=false",
]
_FIRST_STAGE = [
    f"model.params.first_stage_config.params.ddconfig.resolution={IMAGE}",
    "model.params.first_stage_config.params.ddconfig.ch=32",
    "model.params.first_stage_config.params.ddconfig.ch_mult=[1,2]",
    "model.params.first_stage_config.params.ddconfig.num_res_blocks=1",
    "model.params.first_stage_config.params.ddconfig.attn_resolutions=[]",
]
_VQ = ["model.params.first_stage_config.params.n_embed=64"]
_CROSSATTN = ["model.params.unet_config.params.context_dim=32", "model.params.unet_config.params.transformer_depth=1"]

# Layout model: 3 objects a sequence (3 * 3 + 2 crop tokens), a 64-token vocabulary (an 8x8 grid).
LAYOUT_OBJECTS, LAYOUT_TOKENS = 3, 64
OVERRIDES = {
    "bsr_sr": _VQ,
    "celeba256": _VQ,
    "inpainting_big": _VQ,
    "lsun_churches256": [],
    "semantic_synthesis256": [*_VQ, "model.params.cond_stage_config.params.n_stages=1"],
    "cin256": [
        *_VQ,
        *_CROSSATTN,
        "model.params.cond_stage_config.params.embed_dim=32",
        "model.params.cond_stage_config.params.n_classes=11",
    ],
    "layout2img-openimages256": [
        *_VQ,
        *_CROSSATTN,
        "model.params.cond_stage_config.params.n_embed=32",
        "model.params.cond_stage_config.params.n_layer=1",
        f"model.params.cond_stage_config.params.vocab_size={LAYOUT_TOKENS}",
        f"model.params.cond_stage_config.params.max_seq_len={3 * LAYOUT_OBJECTS + 2}",
    ],
}


def tiny_config(name: str, *overrides: str) -> DictConfig:
    """The tiny version of ``models/ldm/<name>/config.yaml`` (a name of :data:`OVERRIDES`), then ``overrides``."""
    config = load_config(MODELS / name / "config.yaml", [*_UNET, *_FIRST_STAGE, *OVERRIDES[name], *overrides])
    # Data sections name datasets of the original repository; the tiny models are built, never trained here.
    config.pop("data", None)
    return config


def tiny_model(name: str, *overrides: str, seed: int = 0) -> torch.nn.Module:
    """A tiny model with seeded random weights (no zero layers), in eval mode."""
    torch.manual_seed(seed)
    model = instantiate_from_config(tiny_config(name, *overrides).model, path="model").eval()
    with torch.no_grad():
        # The UNet's zero-initialised layers (its output convolution among them) would make every prediction 0,
        # whatever the conditioning: a little noise on every weight makes the tiny model's outputs depend on it.
        for param in model.model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    return model


def save_model_folder(name: str, folder: Path, *overrides: str) -> Path:
    """A CompVis model folder (``config.yaml`` + ``model.ckpt``) of the tiny model; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    model = tiny_model(name, *overrides)
    torch.save({"state_dict": model.state_dict(), "global_step": 1}, folder / "model.ckpt")
    OmegaConf.save(tiny_config(name, *overrides), folder / "config.yaml")
    return folder
