"""The tiny unCLIP model the unCLIP tests share: ``tiny_config`` mirrors v2-1-stable-unclip-h-inference.yaml at toy
size (tiny UNet with a vector input, VAE, OpenCLIP text tower and OpenCLIP image tower), built here."""

from __future__ import annotations

import torch

SIZE, LATENT = 32, 8  # image side and latent side: the tiny VAE has f = 4
EMBED = 16  # the tiny image embedding's width, and of its noise-level embedding
TINY_VISION = {
    "embed_dim": EMBED,
    "vision_cfg": {"image_size": 28, "patch_size": 14, "width": 32, "layers": 2, "head_width": 16},
    "text_cfg": {"width": 32, "heads": 4, "layers": 1, "context_length": 77, "vocab_size": 1000},
}


def noise_aug_config(**params) -> dict:
    return {
        "target": "ldm.modules.encoders.modules.CLIPEmbeddingNoiseAugmentation",
        "params": {
            "timestep_dim": EMBED,
            "noise_schedule_config": {"timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"},
            **params,
        },
    }


def tiny_config(**params) -> dict:
    """v2-1-stable-unclip-h-inference.yaml's structure at toy size."""
    unet = {
        "image_size": LATENT,
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": 32,
        "attention_resolutions": [2],
        "num_res_blocks": 1,
        "channel_mult": [1, 2],
        "num_classes": "sequential",
        "adm_in_channels": 2 * EMBED,
        "num_head_channels": 16,
        "use_spatial_transformer": True,
        "use_linear_in_transformer": True,
        "transformer_depth": 1,
        "context_dim": 32,
        "legacy": False,
    }
    ddconfig = {
        "double_z": True, "z_channels": 4, "resolution": SIZE, "in_channels": 3, "out_ch": 3, "ch": 32,
        "ch_mult": [1, 1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0,
    }  # fmt: skip
    text = {"width": 32, "heads": 4, "layers": 2, "context_length": 77, "vocab_size": 49408}
    return {
        "target": "ldm.models.diffusion.ddpm.ImageEmbeddingConditionedLatentDiffusion",
        "params": {
            "embedding_dropout": 0.25,
            "parameterization": "v",
            "linear_start": 0.00085,
            "linear_end": 0.012,
            "first_stage_key": "jpg",
            "cond_stage_key": "txt",
            "image_size": LATENT,
            "channels": 4,
            "conditioning_key": "crossattn-adm",
            "scale_factor": 0.18215,
            "use_ema": False,
            "embedder_config": {
                "target": "ldm.modules.encoders.modules.FrozenOpenCLIPImageEmbedder",
                "params": {"model_cfg": TINY_VISION},
            },
            "noise_aug_config": noise_aug_config(),
            "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
            "first_stage_config": {
                "target": "ldm.models.autoencoder.AutoencoderKL",
                "params": {"embed_dim": 4, "ddconfig": ddconfig, "lossconfig": {"target": "torch.nn.Identity"}},
            },
            "cond_stage_config": {
                "target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                "params": {"layer": "penultimate", "text_cfg": text},
            },
            **params,
        },
    }


def wake(model: torch.nn.Module) -> torch.nn.Module:
    # The UNet's output convolutions start at zero; an untrained model must still depend on its inputs.
    with torch.no_grad():
        for p in model.model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(std=0.05)
    return model


def smooth_images(n: int, size: int, seed: int) -> torch.Tensor:
    """(n, 3, size, size) smooth images in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=g) * 2 - 1, size=size, mode="bilinear")


def batch() -> dict:
    return {"jpg": smooth_images(2, SIZE, 1).permute(0, 2, 3, 1), "txt": ["a red circle", "a blue square"]}
