"""A tiny SDXL-shaped model for tests: the base's (or the refiner's) structure at toy widths.

UNet with per-level transformer depths and an ADM vector input, a 3-layer CLIP-L-shaped text model (hidden layer 2,
as SDXL takes layer 11 of 12), a 3-block bigG-shaped OpenCLIP text tower (penultimate, plus the pooled projection),
the Fourier size embeddings, and a 2-level KL VAE: 16 px images, 8 px latents.
"""

from __future__ import annotations

import copy
from typing import Any

from omegaconf import OmegaConf

CLIP_L = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2}
BIG_G = {"width": 32, "heads": 2, "layers": 3, "context_length": 77, "vocab_size": 49408}
POOLED = 16  # bigG's text_projection width (1280 in SDXL)
FOURIER = 8  # outdim of each size number (256 in SDXL)
LATENT = 8
IMAGE = 16
BASE_ADM = POOLED + 3 * 2 * FOURIER
REFINER_ADM = POOLED + 2 * 2 * FOURIER + FOURIER
TINY_VAE = {
    "double_z": True,
    "z_channels": 4,
    "resolution": IMAGE,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 32,
    "ch_mult": [1, 2],
    "num_res_blocks": 1,
    "attn_resolutions": [],
    "dropout": 0.0,
}


def fourier(key: str) -> dict[str, Any]:
    return {
        "is_trainable": False,
        "input_key": key,
        "target": "ldm.modules.encoders.fourier.ConcatTimestepEmbedderND",
        "params": {"outdim": FOURIER},
    }


def text_embedders(refiner: bool) -> list[dict[str, Any]]:
    big_g = {
        "is_trainable": False,
        "input_key": "txt",
        "target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
        "params": {
            "arch": "ViT-bigG-14",
            "layer": "penultimate",
            "always_return_pooled": True,
            "legacy": False,
            "text_cfg": BIG_G,
            "embed_dim": POOLED,
        },
    }
    if refiner:
        return [big_g]
    clip_l = {
        "is_trainable": False,
        "input_key": "txt",
        "target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
        "params": {"layer": "hidden", "layer_idx": 2, "text_config": CLIP_L},
    }
    return [clip_l, big_g]


def tiny_config(refiner: bool = False) -> Any:
    """An OmegaConf config (``model:``) of a tiny SDXL base, or with ``refiner`` a tiny refiner."""
    size_keys = ["original_size_as_tuple", "crop_coords_top_left"]
    size_keys.append("aesthetic_score" if refiner else "target_size_as_tuple")
    context_dim = BIG_G["width"] + (0 if refiner else CLIP_L["hidden_size"])
    unet = {
        "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
        "params": {
            "image_size": LATENT,
            "in_channels": 4,
            "out_channels": 4,
            "model_channels": 32,
            "attention_resolutions": [2, 4],
            "num_res_blocks": 1,
            "channel_mult": [1, 2, 2],
            "num_head_channels": 16,
            "use_spatial_transformer": True,
            "use_linear_in_transformer": True,
            "transformer_depth": [1, 1, 2],
            "context_dim": context_dim,
            "num_classes": "sequential",
            "adm_in_channels": REFINER_ADM if refiner else BASE_ADM,
            "legacy": False,
        },
    }
    model = {
        "target": "ldm.models.diffusion.sdxl.SDXLDiffusion",
        "params": {
            "linear_start": 0.00085,
            "linear_end": 0.012,
            "timesteps": 1000,
            "first_stage_key": "jpg",
            "cond_stage_key": "txt",
            "image_size": LATENT,
            "channels": 4,
            "conditioning_key": "crossattn-adm",
            "scale_factor": 0.13025,
            "use_ema": False,
            "unet_config": unet,
            "first_stage_config": {
                "target": "ldm.models.autoencoder.AutoencoderKL",
                "params": {
                    "embed_dim": 4,
                    "ddconfig": copy.deepcopy(TINY_VAE),
                    "lossconfig": {"target": "torch.nn.Identity"},
                },
            },
            "cond_stage_config": {
                "target": "ldm.modules.encoders.conditioner.GeneralConditioner",
                "params": {"emb_models": [*text_embedders(refiner), *(fourier(k) for k in size_keys)]},
            },
        },
    }
    return OmegaConf.create({"model": model})
