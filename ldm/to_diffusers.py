"""The weights of an original-layout (CompVis) Stable Diffusion model in diffusers' classes, built from this project's
config, for side-by-side comparisons (``scripts/benchmark.py``). The conversion itself is diffusers' own
(``diffusers.loaders.single_file_utils``); this module fills in what those functions take from a model hub or leave
out: the model configs from our YAML, a CLIP tokenizer from the vocabulary bundled with open_clip, and per-level head
counts. Needs ``diffusers`` (``pip install -r requirements-bench.txt``), imported only when called.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ldm.util import instantiate_from_config

# The DDPM constructor's schedule defaults (CompVis), for configs that leave them out.
DDPM_DEFAULT_SCHEDULE = {"linear_start": 1e-4, "linear_end": 2e-2, "timesteps": 1000}


class ConversionError(RuntimeError):
    """diffusers' model has tensors that the converted checkpoint does not fill."""


def _ldm_text_encoder(config: DictConfig) -> Any:
    """Our SD 1.x text encoder built on the meta device (no memory): the source of its architecture."""
    with torch.device("meta"):
        return instantiate_from_config(config.model.params.cond_stage_config)


def text_encoder(config: DictConfig, state_dict: dict[str, torch.Tensor]) -> tuple[Any, Any]:
    """transformers' ``CLIPTextModel`` (our encoder's config, weights converted by diffusers) and ``CLIPTokenizer``."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
    from transformers import CLIPTextModel

    ours = _ldm_text_encoder(config)
    model = CLIPTextModel(ours.transformer.text_model.config)
    weights = convert_ldm_clip_checkpoint(state_dict)
    if not hasattr(model, "text_model"):  # transformers >= 5 keeps the layers at the top level of CLIPTextModel
        weights = {key.removeprefix("text_model."): value for key, value in weights.items()}
    # The position ids are a constant buffer that recent transformers releases do not keep in the state dict.
    weights = {key: value.float() for key, value in weights.items() if not key.endswith("position_ids")}
    model.load_state_dict(weights, strict=True)
    return model.eval(), clip_tokenizer(ours.max_length)


def clip_tokenizer(max_length: int) -> Any:
    """transformers' ``CLIPTokenizer`` with the OpenAI CLIP BPE vocabulary bundled in open_clip (no hub access).

    open_clip names the special tokens ``<start_of_text>`` / ``<end_of_text>``; transformers' vocabulary files use
    ``<|startoftext|>`` / ``<|endoftext|>`` (ids 49406 / 49407 either way). SD 1.x pads with ``<|endoftext|>``.
    """
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    bpe = SimpleTokenizer()
    special = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {special.get(token, token): index for token, index in bpe.encoder.items()}
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.__getitem__)
    with tempfile.TemporaryDirectory(prefix="clip-vocab-") as folder:
        (Path(folder) / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
        lines = "".join(f"{first} {second}\n" for first, second in merges)
        (Path(folder) / "merges.txt").write_text("#version: 0.2\n" + lines, encoding="utf-8")
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True, model_max_length=max_length)


def attention_heads(unet_params: Any) -> int | list[int]:
    """Heads per UNet level as diffusers' ``attention_head_dim`` (which, for SD, holds the number of heads).

    Our UNet takes ``num_head_channels`` (heads of that width) over ``num_heads`` when it is given; diffusers'
    converter reads only ``num_heads``, so the per-level count is worked out here.
    """
    head_channels = int(unet_params.get("num_head_channels", -1))
    if head_channels == -1:
        return int(unet_params["num_heads"])
    return [int(unet_params["model_channels"]) * int(mult) // head_channels for mult in unet_params["channel_mult"]]


def _assign_weights(cls: type, model_config: dict[str, Any], weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """``cls(**model_config)`` built without memory and given ``weights`` (strictly) as its tensors, in float32."""
    with torch.device("meta"):
        model = cls(**model_config)
    model.load_state_dict({key: value.float() for key, value in weights.items()}, strict=True, assign=True)
    # Strict loading fills every parameter; a buffer outside the state dict would be left without values.
    empty = [name for name, buffer in model.named_buffers() if buffer.is_meta and name not in weights]
    if empty:
        raise ConversionError(f"diffusers' {cls.__name__} has tensors that no checkpoint fills: {empty[:3]}")
    return model.eval()


def unet_and_vae(config: DictConfig, state_dict: dict[str, torch.Tensor]) -> tuple[Any, Any]:
    """diffusers' ``UNet2DConditionModel`` and ``AutoencoderKL`` from our config and an original-layout state dict."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as convert

    original = OmegaConf.to_container(config, resolve=True)
    unet_config = convert.create_unet_diffusers_config_from_ldm(original, state_dict)
    unet_config["attention_head_dim"] = attention_heads(config.model.params.unet_config.params)
    unet = _assign_weights(
        UNet2DConditionModel, unet_config, convert.convert_ldm_unet_checkpoint(state_dict, unet_config)
    )
    # Our model divides latents by its own scale factor (a buffer when it was measured, scale_by_std), else by the
    # config's (default 1.0, where diffusers' converter would assume SD's 0.18215).
    scale = state_dict.get("scale_factor", config.model.params.get("scale_factor", 1.0))
    vae_config = convert.create_vae_diffusers_config_from_ldm(original, state_dict, scaling_factor=float(scale))
    vae = _assign_weights(AutoencoderKL, vae_config, convert.convert_ldm_vae_checkpoint(state_dict, vae_config))
    return unet, vae


def ddim_scheduler(config: DictConfig) -> Any:
    """A ``DDIMScheduler`` stepping like our DDIM: SD's betas, timesteps i * (T // S) + 1, last step to alpha_0."""
    from diffusers import DDIMScheduler

    params = config.model.params
    schedule = {name: params.get(name, default) for name, default in DDPM_DEFAULT_SCHEDULE.items()}
    return DDIMScheduler(
        num_train_timesteps=int(schedule["timesteps"]),
        beta_start=float(schedule["linear_start"]),
        beta_end=float(schedule["linear_end"]),
        beta_schedule="scaled_linear",  # CompVis' "linear" schedule is linear in sqrt(beta)
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="v_prediction" if params.get("parameterization", "eps") == "v" else "epsilon",
    )
