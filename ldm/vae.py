"""A separate VAE for a model's first stage (A1111's ``--vae FILE``), and SDXL's float32 decode in float16 runs.

A VAE file is a ``.safetensors`` / ``.ckpt`` holding the autoencoder alone: either with the checkpoint's
``first_stage_model.`` prefix or as a bare ``AutoencoderKL`` state dict (``encoder.*``, ``decoder.*``,
``quant_conv.*``, ``post_quant_conv.*``; the training loss's ``loss.*`` and ``model_ema.*`` entries are ignored),
read with :func:`ldm.checkpoint.read_checkpoint` (no code in the file runs). It must have exactly the first stage's
keys and shapes: SD 1.x/2.x take the kl-f8 VAEs (``vae-ft-mse-840000-ema-pruned``), SDXL its own (``sdxl_vae``,
``sdxl-vae-fp16-fix``).

SDXL's VAE overflows float16 (a model sets ``vae_needs_float32``): a float16 run keeps that first stage in float32
and decodes with autocast off, as diffusers' ``force_upcast``. A VAE file given by the user is taken to be
fp16-safe (the point of ``sdxl-vae-fp16-fix``) and runs in the model's precision.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ldm.checkpoint import read_checkpoint
from ldm.errors import UserError
from ldm.outputs import model_hash

__all__ = [
    "check_vae_file",
    "decodes_in_float32",
    "float32_decoder",
    "load_vae",
    "prepare_first_stage",
    "vae_fields",
    "vae_state_dict",
]

PREFIX = "first_stage_model."
# Entries of a VAE training checkpoint that are not the autoencoder (the discriminator loss, the EMA counters).
IGNORED = ("loss.", "model_ema.")
# A diffusers-layout AutoencoderKL (diffusion_pytorch_model.safetensors) names its blocks so.
DIFFUSERS_BLOCKS = ("encoder.down_blocks.", "decoder.up_blocks.")


def vae_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The first-stage state dict in a VAE file's tensors: the ``first_stage_model.`` entries of a checkpoint, or a
    bare VAE state dict without its training entries. UserError for a diffusers-layout VAE."""
    if any(key.startswith(PREFIX) for key in state_dict):
        return {key[len(PREFIX) :]: value for key, value in state_dict.items() if key.startswith(PREFIX)}
    state = {key: value for key, value in state_dict.items() if not key.startswith(IGNORED)}
    if any(key.startswith(DIFFUSERS_BLOCKS) for key in state):
        raise UserError(
            f"'{path}' is a diffusers-layout VAE (encoder.down_blocks ...); give the original-layout file "
            "(e.g. sdxl_vae.safetensors or vae-ft-mse-840000-ema-pruned.safetensors, not diffusion_pytorch_model)."
        )
    return state


def _listed(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def check_vae_file(path: str | os.PathLike | None) -> Path | None:
    """``--vae``'s file as a Path (None stays None); FileNotFoundError when it does not exist."""
    if path is not None and not Path(path).is_file():
        raise FileNotFoundError(f"VAE file '{path}' does not exist; check --vae.")
    return Path(path) if path is not None else None


def load_vae(model: Any, path: str | os.PathLike) -> None:
    """Load the VAE file ``path`` into ``model.first_stage_model`` (in the stage's dtype); UserError naming what
    differs when the file is not a VAE of that stage's shape, FileNotFoundError when it does not exist."""
    check_vae_file(path)
    state = vae_state_dict(read_checkpoint(path)[0], path)
    stage = model.first_stage_model
    expected = stage.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    wrong = [
        f"{key} {tuple(state[key].shape)} (expected {tuple(expected[key].shape)})"
        for key in sorted(expected.keys() & state.keys())
        if state[key].shape != expected[key].shape
    ]
    problems = [
        f"{what}: {_listed(keys)}"
        for what, keys in (("missing", missing), ("not in this VAE", unexpected), ("of another shape", wrong))
        if keys
    ]
    if problems:
        raise UserError(
            f"'{path}' is not a VAE of this model's first stage ({'; '.join(problems)}); give a VAE made for this "
            "model family (SDXL's for SDXL, the kl-f8 VAEs for SD 1.x/2.x)."
        )
    stage.load_state_dict(state)


def decodes_in_float32(model: Any, precision: str, device: torch.device, vae_file: Any = None) -> bool:
    """Whether ``model``'s first stage must stay float32 and decode with autocast off: a model whose VAE needs it
    (``vae_needs_float32``), running in float16 (``fp16`` weights, or ``autocast`` on CUDA), without a VAE file."""
    float16 = precision == "fp16" or (precision == "autocast" and device.type == "cuda")
    return bool(getattr(model, "vae_needs_float32", False)) and float16 and vae_file is None


def prepare_first_stage(model: Any, precision: str, device: torch.device, vae_file: Path | None) -> bool:
    """Load ``vae_file`` (if any) into ``model``'s first stage and keep that stage float32 where
    :func:`decodes_in_float32` says so; returns whether it does (decode through :func:`float32_decoder` then)."""
    if vae_file is not None:
        load_vae(model, vae_file)
    upcast = decodes_in_float32(model, precision, device, vae_file)
    if upcast:
        model.first_stage_model.float()
    return upcast


def float32_decoder(decode: Callable[[torch.Tensor], torch.Tensor], device: torch.device) -> Callable:
    """``decode`` (scaled latents (B, C, h, w) -> images (B, 3, H, W)) on float32 latents with autocast off."""

    def decode_float32(z: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, enabled=False):
            return decode(z.float())

    return decode_float32


def vae_fields(path: Path | None) -> dict[str, Any]:
    """A1111's infotext entries of a VAE file: ``VAE hash`` (sha256[:10]) and ``VAE`` (the file name)."""
    return {} if path is None else {"VAE hash": model_hash(path), "VAE": path.name}
