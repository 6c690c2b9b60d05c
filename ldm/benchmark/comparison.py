"""diffusers' side of the benchmark, on the very same weights, and the checks that both engines compute the same
thing (without which their timings would compare nothing).

diffusers is imported only when :class:`DiffusersEngine` is built: the rest of the benchmark runs without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from ldm import to_diffusers
from ldm.benchmark.ldm_engine import LdmEngine
from ldm.benchmark.settings import DTYPES, GUIDANCE_SCALE, PROMPT, Settings
from ldm.checkpoint import read_checkpoint, to_original_layout
from ldm.geometry import LatentGeometry
from ldm.models.diffusion.noise import Noise

# Largest accepted max|ldm - diffusers| / max|ldm| of the UNet outputs. Half precision rounds differently in the two
# implementations; a conversion error (a swapped or missing tensor) gives differences of the output's own size.
CHECK_TOLERANCE = {"fp32": 1e-3, "bf16": 0.1, "fp16": 0.1}


class EnginesDiffer(RuntimeError):
    """The two engines do not compute the same thing from the same weights, so timing them would compare nothing."""


def start_noise(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The txt2img start latent (1, C, h, w) that ``Pipeline.generate`` draws for ``seed``, given to diffusers too."""
    return Noise([seed]).randn(shape)


class DiffusersEngine:
    """diffusers' ``StableDiffusionPipeline`` on the same weights, converted by diffusers' own functions."""

    def __init__(self, config: DictConfig, weights: Path, settings: Settings) -> None:
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import logging as diffusers_logging

        # The pipeline warns that it has no safety checker, which is on purpose here.
        diffusers_logging.set_verbosity_error()
        self.settings = settings
        self.device = torch.device(settings.device)
        self.dtype = DTYPES[settings.dtype]
        self.geometry = LatentGeometry.from_config(config)
        state_dict = to_original_layout(read_checkpoint(weights)[0])
        text_encoder, tokenizer = to_diffusers.text_encoder(config, state_dict)
        unet, vae = to_diffusers.unet_and_vae(config, state_dict)
        del state_dict
        self.pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=to_diffusers.ddim_scheduler(config),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        self.pipe.to(device=self.device, dtype=self.dtype)
        self.pipe.set_progress_bar_config(disable=True)
        apply_diffusers_fast_paths(self.pipe, settings)

    @torch.no_grad()
    def unet(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """As :meth:`LdmEngine.unet`; diffusers runs in the weights' dtype."""
        return self.pipe.unet(x.to(self.dtype), t, encoder_hidden_states=context.to(self.dtype), return_dict=False)[0]

    def txt2img(self, steps: int, size: int | None = None) -> np.ndarray:
        """As :meth:`LdmEngine.txt2img`, from the same start noise."""
        s = self.settings
        height, width = (size, size) if size else (s.height, s.width)
        shape = self.geometry.latent_shape(1, height, width)
        output = self.pipe(
            PROMPT,
            height=height,
            width=width,
            num_inference_steps=steps,
            guidance_scale=GUIDANCE_SCALE,
            eta=0.0,
            latents=start_noise(shape, s.seed).to(self.device, self.dtype),
            output_type="pil",
        )
        return np.asarray(output.images[0])

    def token_ids(self, prompt: str) -> list[int]:
        tokenizer = self.pipe.tokenizer
        return tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids


def apply_diffusers_fast_paths(pipe: Any, settings: Settings) -> None:
    """diffusers' counterparts of the fast paths given to our pipeline (see scripts/benchmark.py's docstring)."""
    if settings.channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if settings.attention_slicing is not None:
        pipe.enable_attention_slicing("auto")
    if settings.vae_tiling:
        pipe.vae.enable_tiling()
    if settings.compile:
        pipe.unet.compile()


def build_engine(name: str, config: DictConfig, weights: Path, settings: Settings) -> Any:
    """Load engine ``name`` (one of :data:`~ldm.benchmark.settings.ENGINES`) with the weights file and the settings'
    dtype and fast paths."""
    if name == "ldm":
        return LdmEngine(config, weights, settings)
    if name == "ldm-openvino":
        return LdmEngine(config, weights, settings, engine="openvino")
    if name == "diffusers":
        return DiffusersEngine(config, weights, settings)
    if name == "openvino-diffusers":
        from ldm.benchmark.openvino_diffusers import OpenVINODiffusersEngine

        return OpenVINODiffusersEngine(config, weights, settings)
    if name == "sdcpp":
        from ldm.benchmark.sdcpp_engine import SdCppEngine

        return SdCppEngine(config, weights, settings)
    raise ValueError(f"unknown engine {name!r}")


def check_unets(engines: dict[str, Any], inputs: tuple[torch.Tensor, ...], dtype: str) -> dict[str, Any]:
    """Run every engine's UNet on the same input (which also warms them up) against the first engine's (ldm's);
    EnginesDiffer when one disagrees. Engines without a UNet call of their own (sdcpp) are left out."""
    names = [name for name, engine in engines.items() if hasattr(engine, "unet")]
    reference, others = names[0], names[1:]
    ours = engines[reference].unet(*inputs).float()
    scale = ours.abs().max().item()
    differences = {}
    for name in others:
        theirs = engines[name].unet(*inputs).float()
        differences[name] = difference = (ours - theirs).abs().max().item()
        if not difference <= CHECK_TOLERANCE[dtype] * scale:
            raise EnginesDiffer(
                f"the UNets differ on the same input: max |{reference} - {name}| = {difference:.3g} against max "
                f"|output| = {scale:.3g} (allowed: {CHECK_TOLERANCE[dtype]:g} of it); the weight conversion or the "
                "architecture differs, so their timings would not be comparable."
            )
    if not others:
        return {}
    return {
        "unet_reference": reference,
        "unet_max_abs_diff": max(differences.values()),
        "unet_max_abs_diff_by_engine": differences,
        "unet_max_abs_output": scale,
        "unet_tolerance": CHECK_TOLERANCE[dtype],
    }


def check_tokenizers(engines: dict[str, Any]) -> None:
    """EnginesDiffer unless every pipeline with a tokenizer of its own tokenizes the benchmark prompt alike."""
    ids = {name: engine.token_ids(PROMPT) for name, engine in engines.items() if hasattr(engine, "token_ids")}
    (first, ours), *others = ids.items()
    for name, theirs in others:
        if ours != theirs:
            raise EnginesDiffer(
                f"the tokenizers of {first} and {name} disagree on '{PROMPT}': {ours[:12]}... against {theirs[:12]}..."
            )
