"""SDXL's base -> refiner hand-off: a second pipeline finishes the base's run from a share of its steps on.

    pipe = Pipeline.from_checkpoint("sd_xl_base_1.0.safetensors")
    load_refiner(pipe, "sd_xl_refiner_1.0.safetensors")
    pipe.generate("a lighthouse at dusk", steps=30, refiner_switch=0.8)

As A1111's ``--refiner`` / "Refiner switch at": the base runs the first ``ceil(0.8 * steps)`` steps, the refiner
the rest of the same sampler loop (one sigma grid, one noise sequence, the sampler's history kept; see
:mod:`ldm.models.diffusion.handoff`). The refiner has its own conditioner, so it encodes the prompts itself (with its
aesthetic scores); both models must share the latent space and the training noise schedule (SDXL's pair does).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from ldm.adapters.embeddings import attach_embeddings
from ldm.errors import UserError
from ldm.geometry import LatentGeometry
from ldm.model_detection import detect_checkpoint
from ldm.models.diffusion.handoff import Handoff
from ldm.prompt_schedule import encode_scheduled
from ldm.prompts import encode_prompts
from ldm.sdxl_conditioning import SIZE_FIELDS, encode_sdxl_prompts, fields_for, model_size_keys
from ldm.util import load_config

if TYPE_CHECKING:
    from ldm.inference import Pipeline
    from ldm.request import GenerationRequest

__all__ = [
    "RefinerPlan",
    "add_refiner_arguments",
    "attach_refiner",
    "load_refiner",
    "plan_refiner",
    "refiner_fields",
    "refiner_handoff",
]


def _is_plain_text_model(model: Any) -> bool:
    return not (model.conditions_on_image or model.image_is_condition)


def check_pair(base: LatentGeometry, refiner: LatentGeometry, base_scale: float, refiner_scale: float) -> None:
    """UserError unless the refiner's latents are the base's: channels, VAE factor, diffusion steps and the latent
    ``scale_factor`` (SD 1.x's 0.18215 and SDXL's 0.13025 are VAEs of different latent spaces)."""
    ours = (base.channels, base.factor, base.timesteps, round(float(base_scale), 6))
    theirs = (refiner.channels, refiner.factor, refiner.timesteps, round(float(refiner_scale), 6))
    if ours != theirs:
        raise UserError(
            f"the refiner's latents ({theirs[0]} channels, factor {theirs[1]}, {theirs[2]} steps, scale {theirs[3]}) "
            f"are not the base's ({ours[0]}, {ours[1]}, {ours[2]}, {ours[3]}): use a matching pair (SDXL base 1.0 "
            "with SDXL refiner 1.0)."
        )


def attach_refiner(pipe: Pipeline, refiner: Pipeline | None) -> None:
    """Make ``refiner`` finish ``pipe``'s runs (None detaches it); UserError unless the two can hand over."""
    if refiner is not None:
        if "cond_stage" not in refiner.stages or not _is_plain_text_model(refiner.model):
            raise UserError(f"the refiner must be a text-to-image model; got a {type(refiner.model).__name__}.")
        check_pair(pipe.geometry, refiner.geometry, pipe.model.scale_factor, refiner.model.scale_factor)
        Handoff(refiner.model, None, None).check(pipe.model)
        if pipe.idle_device is not None:
            refiner.stages["unet"].to(pipe.idle_device)  # comes to the device at the hand-off (_swap_unets)
    pipe.refiner = refiner


def _swap_unets(pipe: Pipeline, refiner: Pipeline) -> Callable[[bool], None] | None:
    """With ``idle_device``, the hand-off's ``on_change``: only the UNet in charge is on the device (SDXL's two are
    2.6 B and 2.3 B parameters); None without an idle device."""
    if pipe.idle_device is None:
        return None
    base, other = pipe.stages["unet"], refiner.stages["unet"]

    def on_change(refining: bool) -> None:
        (base if refining else other).to(pipe.idle_device)
        (other if refining else base).to(pipe.device)

    return on_change


def load_refiner(
    pipe: Pipeline, ckpt: str | os.PathLike, config: str | os.PathLike | None = None, **kwargs: Any
) -> Pipeline:
    """Load the refiner checkpoint (its config detected unless given) with ``pipe``'s runtime options, attach it
    (:func:`attach_refiner`) and return it. The base's textual-inversion embeddings go to the refiner too (SDXL
    files' ``clip_g`` vectors for its OpenCLIP encoder), so a name in a prompt means the same in both parts of a run;
    ``embeddings_dir=`` gives the refiner others."""
    refiner = type(pipe).from_config(config, ckpt, pipe.options, park_unet=pipe.idle_device is not None, **kwargs)
    if "embeddings_dir" not in kwargs:
        attach_embeddings(refiner.model, getattr(pipe.model, "textual_inversions", {}).values())
    attach_refiner(pipe, refiner)
    return refiner


def refiner_handoff(
    pipe: Pipeline, request: GenerationRequest, prompts: Sequence[str], negatives: Sequence[str]
) -> Handoff | None:
    """The hand-off of ``pipe.refiner`` for this request, with the prompts encoded by the refiner; None without one.

    Call within the base's autocast: the refiner's text encoders come to the device only while encoding.
    """
    refiner = getattr(pipe, "refiner", None)
    if refiner is None:
        return None
    if not _is_plain_text_model(pipe.model):
        raise UserError(f"a refiner finishes text-to-image and img2img runs, not a {type(pipe.model).__name__}'s.")
    with refiner._active(refiner.stages["cond_stage"]):
        if model_size_keys(refiner.model):
            sizes = fields_for(refiner.model, {field: getattr(request, field) for field in SIZE_FIELDS})
            encode = partial(encode_sdxl_prompts, refiner.model, clip_skip=request.clip_skip, sizes=sizes,
                             height=request.height, width=request.width)  # fmt: skip
        else:
            encode = partial(encode_prompts, refiner.model, clip_skip=request.clip_skip)
        cond, uncond = encode_scheduled(encode, prompts, negatives, request.steps)
    return Handoff(refiner.model, cond, uncond, request.refiner_switch, _swap_unets(pipe, refiner))


def refiner_fields(pipe: Pipeline, request: GenerationRequest) -> dict[str, Any]:
    """The A1111 infotext entries of a refined run: ``Refiner: NAME [hash]`` and ``Refiner switch at: 0.8``."""
    refiner = getattr(pipe, "refiner", None)
    if refiner is None:
        return {}
    name = refiner.ckpt.stem if refiner.ckpt is not None else type(refiner.model).__name__
    label = f"{name} [{refiner.model_hash}]" if refiner.model_hash else name
    return {"Refiner": label, "Refiner switch at": request.refiner_switch}


# -- the scripts' flags ----------------------------------------------------------------------------------------------


def add_refiner_arguments(parser: argparse.ArgumentParser) -> None:
    """``--refiner CKPT``, ``--refiner_config`` and ``--refiner_switch`` (A1111's flags and default)."""
    add = parser.add_argument
    add("--refiner", type=str, default=None, metavar="CKPT", help="a refiner checkpoint that finishes each image")
    add("--refiner_config", type=str, default=None, help="the refiner's config (default: detected from it)")
    add(
        "--refiner_switch",
        type=float,
        default=0.8,
        help="share of the steps the base runs before the refiner takes over, in (0, 1] (default 0.8)",
    )


@dataclass(frozen=True)
class RefinerPlan:
    """A checked ``--refiner``: its checkpoint and config, loaded once the base is (:meth:`load`)."""

    ckpt: Path
    config: DictConfig

    def load(self, pipe: Pipeline) -> Pipeline:
        """Load the refiner with ``pipe``'s runtime options and attach it to ``pipe``."""
        return load_refiner(pipe, self.ckpt, self.config)


def plan_refiner(args: argparse.Namespace, config: DictConfig) -> RefinerPlan | None:
    """The refiner the flags ask for, its config detected (and announced) unless ``--refiner_config`` names it and
    checked against the base's ``config`` (:func:`check_pair`); None without ``--refiner``. Loads no weights."""
    ckpt, refiner_config = getattr(args, "refiner", None), getattr(args, "refiner_config", None)
    if ckpt is None:
        if refiner_config is not None:
            raise UserError("--refiner_config goes with --refiner CKPT: give the refiner checkpoint too.")
        return None
    path = Path(ckpt)
    if not path.is_file():
        raise FileNotFoundError(f"refiner checkpoint '{ckpt}' does not exist; check --refiner.")
    if refiner_config is None:
        detection = detect_checkpoint(path)
        print(f"refiner: {detection.line()}")
        loaded = load_config(detection.path, list(detection.overrides))
    else:
        loaded = load_config(refiner_config)
    scales = (c.model.get("params", {}).get("scale_factor", 1.0) for c in (config, loaded))
    check_pair(LatentGeometry.from_config(config), LatentGeometry.from_config(loaded), *scales)
    return RefinerPlan(path, loaded)
