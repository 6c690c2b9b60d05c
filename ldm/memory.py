"""How much memory a generation needs, estimated from the model's config before anything is loaded or allocated.

Activations, not weights, are what a large request runs out of: they grow with the batch and the image area, and an
8192x8192 Stable Diffusion image needs hundreds of GiB however small the model. :func:`estimate` counts them per
batch from the widths in the config; :func:`ldm.devices.available_memory` says what the device has free. The
estimate is of the order the measurements below give, not an upper bound: what it misses is still caught as an
allocation failure (:func:`ldm.devices.is_out_of_memory`).

The formula, in elements (4 bytes each; 2 for the UNet when it computes in float16/bfloat16). B is the batch,
H x W the image, h x w = H/f x W/f the latent, L the context length (one 77-token chunk per 75 prompt tokens):

- unet, one step: ``40 * C0 * h * w * 2B + 16 * B * c * h * w``, and its attention: ``4 * 2B * L * Ca``. The
  UNet runs cond and uncond as one batch of 2B. C0 = model_channels * channel_mult[0] is its width at full latent
  resolution, where it keeps its skip connections and its working set peaks (the transformer's GEGLU feed-forward
  alone is 16 C0 wide); SD's layout measured 31-41 C0 a latent pixel on the CPU at 256-2048 px. Ca = model_channels
  * max(channel_mult) is the widest cross-attention, whose keys and values (and their per-head copies) are 4
  tensors of L tokens. The sampler keeps up to 16 latents of c channels (multistep histories, noise).
- context: ``4 * B * L * D``: cond, uncond and their batched copy, held through sampling (D = context_dim).
- decoder: ``B * H * W * (3 * V1 + 2 * V0) + 15 * B * H * W``. The VAE upsamples its level-1 width V1 = ch *
  ch_mult[1] to full resolution, where its ResnetBlocks narrow it to V0 = ch * ch_mult[0]: SD's VAE measured 7.3-7.6
  V0 a pixel (the formula gives 8). With tiling only one 64x64-latent tile is at full width. The second term is the
  decoded batch and its conversion to 8-bit pixels. The VAE is counted at 4 bytes whatever the precision:
  autocast runs its GroupNorms in float32.
- control, with N ControlNets: ``2B * R * h * w + N * 2B * 3 * H * W``. A ControlNet is a copy of the UNet's input
  half, run before the UNet in each model call, and the ControlNets run one after another: each one's working set is
  freed before the next and the UNet start, and is less than the UNet's (the encoder's full-resolution transformer
  is a part of the UNet step's working set; the hint block's full-pixel convolutions are 16 channels, some 3 * 16 *
  f^2 = 10 C0 a latent pixel for SD against the step's 40 C0), so it adds no peak of its own. What stays through the
  UNet's step are the residuals, summed over the ControlNets (one set whatever N): one tensor per UNet input block
  and the middle block, R = sum_i C_i / 4^k_i elements a latent pixel for block i of width C_i at level k_i (the
  skip widths; 5.1 C0 for SD: SD's step grows ~13%), in the UNet's precision; and each ControlNet's control image,
  batched with cond and uncond into 2B copies at full pixel size, in float32. Weights are not counted, as the UNet's
  are not.
- encoder (img2img and inpainting, batch 1): ``7 * H * W * V0``; measured 6.2.
- grid: the run's images kept for the grid, and the grid itself, at 4 bytes a pixel (PIL's RGB).

Attention scores (queries x keys per head) are not counted: torch's fused attention kernels (flash and
memory-efficient on CUDA, flash on the CPU) never hold them. The phases follow each other, so the peak is the
context and the grid plus the largest of unet with attention and control, encoder and decoder.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, fields
from typing import Any

import torch

from ldm.devices import gib
from ldm.errors import UserError
from ldm.geometry import DDPM_DEFAULT_CHANNELS, UNET_DEFAULT_CHANNEL_MULT
from ldm.prompts import BREAK, parse_prompt_attention
from ldm.util import config_value, positive_int, positive_ints

UNET_ACTIVATIONS = 40
CROSS_ATTENTION_COPIES = 4
SAMPLER_LATENTS = 16
CONTEXT_COPIES = 4
DECODED_PIXEL_FLOATS = 15  # 3 channels, 5 float32 copies: the decoder's output, the clamp/scale/round steps
ENCODER_ACTIVATIONS = 7
TILE = 64  # ldm.modules.tiling.tiled_decode's default tile, in latents
PIXEL_BYTES = 4
CHUNK_TOKENS = 75  # prompt tokens a CLIP chunk holds (77 with its start and end tokens)


@dataclass(frozen=True)
class Footprint:
    """The widths of a latent diffusion model that set its activation memory, read from its config."""

    factor: int  # the VAE's downsampling f
    latent_channels: int
    unet_width: int  # C0 = model_channels * channel_mult[0]
    attention_width: int  # Ca = model_channels * max(channel_mult)
    context_dim: int | None  # None: no cross-attention
    vae_width: int  # V0 = ch * ch_mult[0]; 0 without a VAE config
    vae_upsampled: int  # V1 = ch * ch_mult[1] (ch_mult[0] for a single level)
    chunk_length: int  # the text encoder's max_length: 77 tokens a chunk
    residual_width: float = 0.0  # R: a ControlNet's residuals, elements a latent pixel (see residual_width())

    @classmethod
    def from_config(cls, config: Any) -> Footprint:
        """From a full config (with ``model:``); ConfigError naming a key that is not a positive integer (list)."""
        at = "model." if "model" in config else ""

        def read(key: str, check: Any, default: Any = None) -> Any:
            return check(config_value(config, at + key, default), at + key)

        unet = "params.unet_config.params"
        model_channels = read(f"{unet}.model_channels", positive_int)
        channel_mult = read(f"{unet}.channel_mult", positive_ints, UNET_DEFAULT_CHANNEL_MULT)
        res_blocks = config_value(config, f"{at}{unet}.num_res_blocks")
        check = positive_int if isinstance(res_blocks, int) else positive_ints
        res_blocks = check(res_blocks, f"{at}{unet}.num_res_blocks")
        context_dim = config_value(config, f"{at}{unet}.context_dim")
        vae = "params.first_stage_config.params.ddconfig"
        has_vae = config_value(config, at + vae) is not None
        ch = read(f"{vae}.ch", positive_int) if has_vae else 0
        ch_mult = read(f"{vae}.ch_mult", positive_ints) if has_vae else [1]
        return cls(
            factor=2 ** (len(ch_mult) - 1),
            latent_channels=read("params.channels", positive_int, DDPM_DEFAULT_CHANNELS),
            unet_width=model_channels * channel_mult[0],
            attention_width=model_channels * max(channel_mult),
            context_dim=positive_int(context_dim, at + f"{unet}.context_dim") if context_dim is not None else None,
            vae_width=ch * ch_mult[0],
            vae_upsampled=ch * ch_mult[min(1, len(ch_mult) - 1)],
            chunk_length=read("params.cond_stage_config.params.max_length", positive_int, CHUNK_TOKENS + 2),
            residual_width=residual_width(model_channels, channel_mult, res_blocks),
        )


def residual_width(model_channels: int, channel_mult: list[int], num_res_blocks: int | list[int]) -> float:
    """R: the elements a latent pixel of a ControlNet's residuals, one (B, C_i, h / 2^k, w / 2^k) tensor per UNet
    input block i (at level k) and one for the middle block (at the last level)."""
    blocks = [num_res_blocks] * len(channel_mult) if isinstance(num_res_blocks, int) else list(num_res_blocks)
    total = float(model_channels)  # the input convolution
    for level, mult in enumerate(channel_mult):
        total += mult * model_channels * blocks[level] / 4**level
        if level < len(channel_mult) - 1:
            total += mult * model_channels / 4 ** (level + 1)  # the downsampler keeps the width, halves the side
    return total + model_channels * channel_mult[-1] / 4 ** (len(channel_mult) - 1)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one batch needs, by the part a user can shrink (see the module docstring for each)."""

    context: int
    attention: int  # the UNet's cross-attention keys and values, during a step
    unet: int  # the rest of a UNet step
    control: int  # the ControlNets' residuals and control images, during a step
    encoder: int
    decoder: int
    grid: int

    @property
    def peak(self) -> int:
        return self.context + self.grid + max(self.unet + self.attention + self.control, self.encoder, self.decoder)

    @property
    def largest(self) -> str:
        """The name of the part that needs the most."""
        return max((f.name for f in fields(self)), key=lambda name: getattr(self, name))


def estimate(
    footprint: Footprint,
    *,
    batch: int,
    height: int,
    width: int,
    chunks: int = 1,
    half: bool = False,
    vae_tiling: bool = False,
    encode: bool = False,
    kept_images: int = 0,
    controlnets: int = 0,
) -> MemoryEstimate:
    """The memory one batch of ``batch`` images of ``height`` x ``width`` needs.

    chunks: 77-token prompt chunks (see :func:`min_chunks`). half: the UNet computes in float16/bfloat16.
    encode: an init image is encoded (img2img, inpainting). kept_images: images held for a grid. controlnets: the
    ControlNets acting on the run.
    """
    f = footprint
    h, w = height // f.factor, width // f.factor
    pixels = height * width
    tokens = chunks * f.chunk_length if f.context_dim is not None else 0
    unet = UNET_ACTIVATIONS * f.unet_width * h * w * 2 * batch
    attention = CROSS_ATTENTION_COPIES * 2 * batch * tokens * f.attention_width
    tile_pixels = min(h, TILE) * min(w, TILE) * f.factor**2 if vae_tiling else pixels
    residuals = 2 * batch * f.residual_width * h * w if controlnets else 0
    hints = controlnets * 2 * batch * 3 * pixels
    decoder = batch * tile_pixels * (3 * f.vae_upsampled + 2 * f.vae_width) + DECODED_PIXEL_FLOATS * batch * pixels
    return MemoryEstimate(
        context=4 * CONTEXT_COPIES * batch * tokens * (f.context_dim or 0),
        attention=(2 if half else 4) * attention,
        unet=(2 if half else 4) * unet + 4 * SAMPLER_LATENTS * batch * f.latent_channels * h * w,
        control=round((2 if half else 4) * residuals) + 4 * hints,
        encoder=4 * ENCODER_ACTIVATIONS * pixels * f.vae_width if encode else 0,
        decoder=4 * decoder,
        grid=2 * PIXEL_BYTES * kept_images * pixels,
    )


def with_refiner(base: MemoryEstimate, refiner: MemoryEstimate) -> MemoryEstimate:
    """The estimate of a base -> refiner run: both models' prompt embeddings are held through sampling, a step is
    the larger UNet's (the SDXL refiner's is the wider one), and the base's VAE decodes."""
    return dataclasses.replace(
        base,
        context=base.context + refiner.context,
        attention=max(base.attention, refiner.attention),
        unet=max(base.unet, refiner.unet),
    )


def min_chunks(prompt: str) -> int:
    """A lower bound on the 77-token chunks ``prompt`` becomes, without a tokenizer: each BREAK starts a chunk, and
    every word is at least one token (chunks hold 75)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # what the prompt has to say is said once, when it is encoded
        fragments = parse_prompt_attention(prompt)
    segments = [0]
    for fragment in fragments:
        if fragment == BREAK:
            segments.append(0)
        else:
            segments[-1] += len(fragment[0].split())
    return sum(max(1, math.ceil(words / CHUNK_TOKENS)) for words in segments)


SHORTER_PROMPT = "shorten the prompt (each BREAK adds 77 tokens to attend to) or lower --n_samples"
# What each part of a MemoryEstimate is, and what makes it smaller.
MEMORY_PARTS = {
    "context": ("the prompt embeddings", SHORTER_PROMPT),
    "attention": ("the cross-attention to the prompt", SHORTER_PROMPT),
    "unet": ("the UNet", "lower --H/--W or --n_samples"),
    "control": ("the ControlNets", "use fewer ControlNets, or lower --H/--W or --n_samples"),
    "encoder": ("encoding the init image", "give a smaller --H/--W (the init image is resized to it)"),
    "decoder": ("the VAE decoder", "add --vae_tiling, or lower --H/--W or --n_samples"),
    "grid": ("the grid of all the run's images", "add --skip_grid, or lower --n_iter or --n_samples"),
}


def check_memory(memory: MemoryEstimate, available: int | None, device: torch.device, vae_tiling: bool) -> None:
    """ValueError naming the scripts' flag to lower when a batch needs more than ``available`` bytes (None:
    unknown)."""
    if available is None or memory.peak <= available:
        return
    part = memory.largest
    what, advice = MEMORY_PARTS[part]
    if part == "decoder" and vae_tiling:
        advice = "lower --H/--W or --n_samples"
    raise UserError(
        f"out of memory: this run needs about {gib(memory.peak)} on {device}, most of it for {what} "
        f"({gib(getattr(memory, part))}), but {gib(available)} is available; {advice}."
    )
