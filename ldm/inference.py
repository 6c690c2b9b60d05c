"""Generate images with a latent diffusion model: load once, then ``generate`` for txt2img, img2img and inpainting.

    config, ckpt = "configs/stable-diffusion/v1-inference.yaml", "models/ldm/stable-diffusion-v1/model.ckpt"
    pipe = Pipeline.from_config(config, ckpt)
    result = pipe.generate("a painting of a fox", steps=20, sampler="Euler a", seed=42, n=3)
    result.images[0].save("fox.png", pnginfo=png_info(result.parameters(0)))  # image i was made with seed 42 + i

The scripts in ``scripts/`` are thin wrappers over this module and :mod:`ldm.cli`.

Precision (``precision=``):

- ``full``: float32 everywhere.
- ``autocast`` (the CompVis default): float32 weights, float16 compute via ``torch.autocast`` on CUDA. On the CPU and
  on MPS it is the same as ``full``, as the original's ``autocast("cuda")`` was.
- ``fp16`` / ``bf16``: the UNet, VAE and text encoder weights are converted and run under autocast in that type (half
  the memory). The schedule and the sampler's state stay float32. ``fp16`` needs a GPU.

Speed and memory options (``Pipeline.from_config`` arguments; each is within a stated tolerance of the plain path,
see tests/test_fast_paths.py):

- ``channels_last``: the UNet and VAE run in the ``torch.channels_last`` memory format, which most convolution
  kernels (cuDNN, oneDNN) prefer.
- ``compile``: ``torch.compile`` of the UNet, in place (the state dict keeps its keys). The first image is slow.
- ``attention_slicing``: attention in slices of N query rows, or ``"auto"``; bounds the attention scores' memory
  where no fused kernel does (see :func:`ldm.modules.attention.attention`).
- ``vae_tiling``: decode latents larger than 64x64 by overlapping tiles (:func:`ldm.modules.tiling.tiled_decode`),
  bounding the VAE's memory for large images. The image differs from a full decode: each tile normalises its
  activations with its own statistics.
- ``idle_device``: keep the text encoder and VAE there (e.g. ``"cpu"``) except while they run, so the GPU holds
  little more than the UNet.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from PIL import Image

from ldm.checkpoint import load_model_from_config
from ldm.devices import check_compile, check_precision, resolve_device
from ldm.geometry import LatentGeometry, check_settings, prepare_init_image
from ldm.models.diffusion.latent_inpainting import LatentInpaintDiffusion
from ldm.models.diffusion.noise import Noise, check_seed
from ldm.models.diffusion.samplers import resolve_sampler, sample
from ldm.modules.attention import check_slice_size, set_attention_slicing
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.tiling import tiled_decode
from ldm.outputs import format_parameters, model_hash
from ldm.prompts import encode_prompts, unknown_words
from ldm.util import apply_overrides, load_config

DTYPES = {"autocast": torch.float16, "fp16": torch.float16, "bf16": torch.bfloat16}

# ---------------------------------------------------------------------------------------------------------------------
# Conversions


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (1, 3, H, W) float32 in [-1, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]


def mask_to_tensor(mask: Image.Image) -> torch.Tensor:
    """Binary "L" mask -> (1, 1, H, W) float32, 1 = repaint."""
    return torch.from_numpy((np.asarray(mask) >= 128).astype(np.float32))[None, None]


def tensor_to_images(x: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) roughly in [-1, 1] -> B RGB uint8 PIL images (clamped, rounded)."""
    pixels = ((x.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a) for a in pixels.permute(0, 2, 3, 1).cpu().numpy()]


def sampler_label(name: str) -> str:
    """The A1111 label of a sampler name: ``"dpmpp_2m_karras"`` -> ``"DPM++ 2M Karras"``."""
    spec, schedule = resolve_sampler(name)
    return spec.label if schedule == spec.schedule else f"{spec.label} {schedule.replace('_', ' ').title()}"


# ---------------------------------------------------------------------------------------------------------------------
# The pipeline


@dataclass
class GenerationResult:
    """Images of one ``generate`` call and everything needed to reproduce them.

    ``images[i]`` was made from ``prompts[i]`` / ``negative_prompts[i]`` with noise seed ``seeds[i]``.
    ``strength`` is None for txt2img.
    """

    images: list[Image.Image]
    seeds: list[int]
    prompts: list[str]
    negative_prompts: list[str]
    steps: int
    sampler: str
    scale: float
    width: int
    height: int
    strength: float | None
    eta: float | None
    clip_skip: int
    model_name: str | None
    model_hash: str | None

    def fields(self, i: int) -> dict[str, Any]:
        """The A1111 settings of image ``i``, in A1111's order (None values are left out when written)."""
        return {
            "Steps": self.steps,
            "Sampler": self.sampler,
            "CFG scale": self.scale,
            "Seed": self.seeds[i],
            "Size": f"{self.width}x{self.height}",
            "Model hash": self.model_hash,
            "Model": self.model_name,
            "Denoising strength": self.strength,
            "Clip skip": self.clip_skip if self.clip_skip != 1 else None,
            "Eta": self.eta,
        }

    def parameters(self, i: int) -> str:
        """The A1111 ``parameters`` text of image ``i`` (see :func:`ldm.outputs.format_parameters`)."""
        return format_parameters(self.prompts[i], self.negative_prompts[i], self.fields(i))


def _seeds(seed: int | Sequence[int] | None, count: int) -> list[int]:
    if seed is None or isinstance(seed, int):
        return Noise.from_seed(seed, count).seeds
    seeds = [check_seed(int(s)) for s in seed]
    if len(seeds) != count:
        raise ValueError(f"got {len(seeds)} seeds for {count} images; give one per image, or a single seed.")
    return seeds


class Pipeline:
    """A loaded latent diffusion model ready to generate images; see :meth:`from_config` and :meth:`generate`.

    Args:
        model: a ``LatentDiffusion`` (or ``LatentInpaintDiffusion``) in eval mode, already placed on its devices.
        geometry: its :class:`LatentGeometry`.
        device: where the UNet runs (and the other stages while they are used).
        precision: one of ldm.devices.PRECISIONS (see the module docstring); weights must already be in its dtype.
        idle_device: where the text encoder and VAE wait between uses (e.g. ``"cpu"`` to save GPU memory), or None
            to keep them on ``device``.
        ckpt: the checkpoint file, for the model name and hash written into image metadata.
        channels_last, compile, attention_slicing, vae_tiling: the speed and memory options of the module
            docstring. The first three change ``model`` in place; ``compile`` raises ValueError where
            torch.compile cannot run (see :func:`ldm.devices.check_compile`).
    """

    def __init__(
        self,
        model: Any,
        geometry: LatentGeometry,
        device: torch.device | str,
        precision: str = "full",
        idle_device: torch.device | str | None = None,
        ckpt: str | os.PathLike | None = None,
        vocabulary: Sequence[str] | None = None,
        channels_last: bool = False,
        compile: bool = False,
        attention_slicing: int | str | None = None,
        vae_tiling: bool = False,
    ) -> None:
        self.model = model
        # Models trained on a closed set of words (the bundled shapes model) list them in their config.
        self.vocabulary = frozenset(w.lower() for w in vocabulary) if vocabulary else None
        self.geometry = geometry
        self.device = torch.device(device)
        check_precision(precision, self.device)
        self.precision = precision
        self.idle_device = torch.device(idle_device) if idle_device is not None else None
        self.ckpt = Path(ckpt) if ckpt is not None else None
        self.inpainting = isinstance(model, LatentInpaintDiffusion)
        self.channels_last = channels_last
        self.compile = compile
        self.attention_slicing = attention_slicing
        self.vae_tiling = vae_tiling
        set_attention_slicing(model, attention_slicing)
        if channels_last:
            for stage in (model.model, model.first_stage_model):
                stage.to(memory_format=torch.channels_last)
        if compile:
            check_compile(self.device)
            # In place (not torch.compile(module)), so the model's state dict keeps its keys.
            model.model.diffusion_model.compile()

    @classmethod
    def from_config(
        cls,
        config: str | os.PathLike | DictConfig,
        ckpt: str | os.PathLike | None,
        device: str | torch.device | None = None,
        precision: str = "autocast",
        overrides: Sequence[str] = (),
        use_ema_weights: bool = False,
        idle_device: str | torch.device | None = None,
        channels_last: bool = False,
        compile: bool = False,
        attention_slicing: int | str | None = None,
        vae_tiling: bool = False,
    ) -> Pipeline:
        """Build the model of a config (path or OmegaConf, plus ``key=value`` overrides) and load ``ckpt`` strictly.

        ``ckpt=None`` keeps random weights (for tests). ``idle_device``, ``channels_last``, ``compile``,
        ``attention_slicing`` and ``vae_tiling``: see the module docstring. Raises ConfigError / CheckpointError /
        ValueError with a message naming the fix.
        """
        if isinstance(config, str | os.PathLike):
            config = load_config(config, overrides)
        else:
            config = apply_overrides(config, overrides)
        device = resolve_device(device)
        idle = resolve_device(idle_device, option="--idle_device") if idle_device is not None else None
        check_precision(precision, device)
        check_slice_size(attention_slicing)
        if compile:
            check_compile(device)  # here too, so that a failure comes before the (slow) loading
        geometry = LatentGeometry.from_config(config)
        model = load_model_from_config(config, ckpt, device="cpu", use_ema_weights=use_ema_weights)
        if precision in ("fp16", "bf16"):
            for stage in {id(s): s for s in (model.model, model.first_stage_model, model.cond_stage_model)}.values():
                if stage is not None:
                    stage.to(DTYPES[precision])
        _place(model, device, idle)
        vocabulary = config.get("vocabulary")
        return cls(
            model,
            geometry,
            device,
            precision=precision,
            idle_device=idle,
            ckpt=ckpt,
            vocabulary=vocabulary,
            channels_last=channels_last,
            compile=compile,
            attention_slicing=attention_slicing,
            vae_tiling=vae_tiling,
        )

    @functools.cached_property
    def model_hash(self) -> str | None:
        """A1111's hash of the checkpoint file (sha256[:10]); None without a checkpoint."""
        return model_hash(self.ckpt) if self.ckpt is not None else None

    def _autocast(self) -> Any:
        if self.precision == "full" or (self.precision == "autocast" and self.device.type != "cuda"):
            return nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[self.precision])

    @contextmanager
    def _active(self, stage: torch.nn.Module | None) -> Iterator[None]:
        """Bring a stage waiting on ``idle_device`` to the device for the duration of the block."""
        if self.idle_device is None or stage is None:
            yield
            return
        stage.to(self.device)
        try:
            yield
        finally:
            stage.to(self.idle_device)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, h, w) -> images (B, 3, f*h, f*w); by tiles with ``vae_tiling``."""
        if self.vae_tiling:
            return tiled_decode(self.model.decode_first_stage, latents, self.geometry.factor)
        return self.model.decode_first_stage(latents)

    def _encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """(1, 3, H, W) in [-1, 1] -> scaled latent (1, C, h, w), float32. The posterior mode, so no randomness."""
        posterior = self.model.encode_first_stage(image.to(self.device))
        if isinstance(posterior, DiagonalGaussianDistribution):
            posterior = posterior.mode()
        return self.model.get_first_stage_encoding(posterior).float()

    def _image_inputs(
        self,
        image: Image.Image | None,
        mask: Image.Image | None,
        size: tuple[int, int],
        cond: Any,
        uncond: Any,
        batch: int,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, Any, Any]:
        """What img2img and inpainting add, for ``size`` = (height, width) images.

        Returns the init latent (B, C, h, w), the sampler's keep-mask (1, 1, h, w) for ordinary models, and cond /
        uncond, which for 9-channel inpainting models become dicts that add the mask and the masked image's latent.
        """
        if image is None and not self.inpainting:
            return None, None, cond, uncond
        init_latent = None
        with self._active(self.model.first_stage_model):
            if image is not None:
                init_latent = self._encode_image(image_to_tensor(image)).repeat(batch, 1, 1, 1)
            if self.inpainting:
                # Without a mask the whole image is repainted, which also makes txt2img work with these models.
                pixels = image_to_tensor(image) if image is not None else torch.zeros(1, 3, *size)
                repaint = mask_to_tensor(mask) if mask is not None else torch.ones(1, 1, *size)
                c_cat = self.model.inpainting_conditioning(pixels.to(self.device), repaint.to(self.device))
                c_cat = c_cat.repeat(batch, 1, 1, 1)
                cond = {"c_concat": [c_cat], "c_crossattn": [cond]}
                uncond = {"c_concat": [c_cat], "c_crossattn": [uncond]}
                return init_latent, None, cond, uncond
        if mask is None:
            return init_latent, None, cond, uncond
        # A latent cell is repainted when any of its pixels is, so no masked pixel is kept.
        area = F.interpolate(mask_to_tensor(mask), size=init_latent.shape[-2:], mode="area")
        return init_latent, (area <= 0).float().to(self.device), cond, uncond

    @torch.no_grad()
    def generate(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        init_image: Image.Image | str | os.PathLike | None = None,
        mask: Image.Image | str | os.PathLike | None = None,
        strength: float | None = None,
        steps: int = 50,
        sampler: str = "ddim",
        scale: float = 7.5,
        seed: int | Sequence[int] | None = None,
        height: int | None = None,
        width: int | None = None,
        n: int = 1,
        eta: float | None = None,
        clip_skip: int = 1,
        callback: Callable[[int, torch.Tensor], None] | None = None,
        progress: bool = True,
    ) -> GenerationResult:
        """Generate ``n`` images per prompt in one batch.

        Args:
            prompt: a prompt, or a list of prompts (A1111 syntax: ``(word:1.3)``, ``[word]``, ``BREAK``, any length).
            negative_prompt: one for all, or one per prompt; None means empty.
            init_image: img2img / inpainting input (PIL image or path). Without height/width it keeps its size
                rounded down to the model's multiple; see :func:`prepare_init_image`.
            mask: inpainting mask of the init image's size, white = repaint. 9-channel inpainting models
                (``LatentInpaintDiffusion``) get it as conditioning; other models keep the unmasked latent at every
                step. Either way the unmasked pixels of the init image are pasted back, as CompVis's inpainting did.
            strength: how much of the schedule img2img/inpainting runs: 0 returns the init image (through the VAE),
                1 starts from noise. Default 0.75 for img2img (CompVis, and the scripts), 1.0 for inpainting.
            steps, sampler, scale, eta: sampling settings (any name of ``ldm.models.diffusion.samplers``).
            seed: image i gets ``seed + i`` (its own noise generator, so a batch equals single runs); a list gives
                each image's seed; None draws one.
            height, width: image size for txt2img; default the model's native size (512 for SD 1.x).
            n: images per prompt.
            clip_skip: 1 = the text encoder's configured layer, 2 = one layer earlier (A1111's CLIP skip).
            callback: ``callback(step, denoised)`` after each sampler step, denoised: (B, C, h, w) latents.
            progress: show the sampler's progress bar.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("give at least one prompt.")
        if self.vocabulary is not None:
            for text in prompts:
                unknown = unknown_words(text, self.vocabulary)
                if unknown:
                    warnings.warn(
                        f"this model was trained on a small vocabulary; it does not know {', '.join(unknown)} "
                        f"(in '{text}'). Known words: {', '.join(sorted(self.vocabulary))}.",
                        stacklevel=2,
                    )
        if negative_prompt is None or isinstance(negative_prompt, str):
            negatives = [negative_prompt or ""] * len(prompts)
        else:
            negatives = list(negative_prompt)
            if len(negatives) != len(prompts):
                raise ValueError(f"got {len(negatives)} negative prompts for {len(prompts)} prompts.")
        if mask is not None and init_image is None:
            raise ValueError("a mask needs an init image to inpaint.")
        if init_image is not None and strength is None:
            strength = 1.0 if mask is not None else 0.75
        check_settings(
            self.geometry,
            steps=steps,
            sampler=sampler,
            scale=scale,
            n=n,
            strength=strength,
            clip_skip=clip_skip,
            eta=eta,
        )
        image = mask_image = None
        if init_image is not None:
            image, mask_image = prepare_init_image(init_image, mask, self.geometry, height, width)
            width, height = image.size
        height = height if height is not None else self.geometry.default_size
        width = width if width is not None else self.geometry.default_size
        self.geometry.check_size(height, width)
        prompts = [p for p in prompts for _ in range(n)]
        negatives = [p for p in negatives for _ in range(n)]
        batch = len(prompts)
        seeds = _seeds(seed, batch)

        model = self.model
        with self._autocast():
            cond = uncond = None
            if model.cond_stage_model is not None:
                with self._active(model.cond_stage_model):
                    cond, uncond = encode_prompts(model, prompts, negatives, clip_skip)
            init_latent, latent_mask, cond, uncond = self._image_inputs(
                image, mask_image, (height, width), cond, uncond, batch
            )
            latents = sample(
                model,
                sampler,
                steps,
                cond,
                uncond,
                scale,
                shape=self.geometry.latent_shape(batch, height, width),
                noise=Noise(seeds, self.device),
                init_latent=init_latent,
                strength=strength if init_latent is not None else 1.0,
                mask=latent_mask,
                eta=eta,
                callback=callback,
                progress=progress,
            )
            if latent_mask is not None:
                # Discrete samplers end on the model's estimate of the kept region; the init latent is exact there.
                latents = latent_mask * init_latent + (1.0 - latent_mask) * latents
            with self._active(model.first_stage_model):
                images = tensor_to_images(self._decode(latents))
        if mask_image is not None:
            images = [Image.composite(generated, image, mask_image) for generated in images]
        return GenerationResult(
            images=images,
            seeds=seeds,
            prompts=prompts,
            negative_prompts=negatives,
            steps=steps,
            sampler=sampler_label(sampler),
            scale=scale,
            width=width,
            height=height,
            strength=strength if init_image is not None else None,
            eta=eta,
            clip_skip=clip_skip,
            model_name=self.ckpt.stem if self.ckpt is not None else None,
            model_hash=self.model_hash,
        )


def _place(model: torch.nn.Module, device: torch.device, idle_device: torch.device | None) -> None:
    """Move the model to ``device``, except the text encoder and VAE, which go to ``idle_device`` when given.

    Each part moves straight to its place, so the stages never occupy the main device during loading.
    """
    if idle_device is None:
        model.to(device)
        return
    idle = {id(model.first_stage_model), id(model.cond_stage_model)}
    for child in model.children():
        child.to(idle_device if id(child) in idle else device)
    for name, buffer in model.named_buffers(recurse=False):
        setattr(model, name, buffer.to(device))
