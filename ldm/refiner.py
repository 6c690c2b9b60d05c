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

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ldm.errors import UserError
from ldm.models.diffusion.handoff import Handoff
from ldm.prompts import encode_prompts

if TYPE_CHECKING:
    from ldm.inference import Pipeline
    from ldm.request import GenerationRequest

__all__ = ["attach_refiner", "load_refiner", "refiner_fields", "refiner_handoff"]


def _is_plain_text_model(model: Any) -> bool:
    return not (model.conditions_on_image or model.image_is_condition)


def attach_refiner(pipe: Pipeline, refiner: Pipeline | None) -> None:
    """Make ``refiner`` finish ``pipe``'s runs (None detaches it); UserError unless the two can hand over."""
    if refiner is not None:
        if "cond_stage" not in refiner.stages or not _is_plain_text_model(refiner.model):
            raise UserError(f"the refiner must be a text-to-image model; got a {type(refiner.model).__name__}.")
        ours, theirs = pipe.geometry, refiner.geometry
        if (ours.channels, ours.factor, ours.timesteps) != (theirs.channels, theirs.factor, theirs.timesteps):
            raise UserError(
                f"the refiner's latents ({theirs.channels} channels, factor {theirs.factor}, {theirs.timesteps} "
                f"steps) are not the base's ({ours.channels}, {ours.factor}, {ours.timesteps}): use a matching pair "
                "(SDXL base 1.0 with SDXL refiner 1.0)."
            )
        Handoff(refiner.model, None, None).check(pipe.model)
    pipe.refiner = refiner


def load_refiner(
    pipe: Pipeline, ckpt: str | os.PathLike, config: str | os.PathLike | None = None, **kwargs: Any
) -> Pipeline:
    """Load the refiner checkpoint (its config detected unless given) with ``pipe``'s runtime options, attach it
    (:func:`attach_refiner`) and return it."""
    refiner = type(pipe).from_config(config, ckpt, pipe.options, **kwargs)
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
        cond, uncond = encode_prompts(refiner.model, list(prompts), list(negatives), request.clip_skip)
    return Handoff(refiner.model, cond, uncond, request.refiner_switch)


def refiner_fields(pipe: Pipeline, request: GenerationRequest) -> dict[str, Any]:
    """The A1111 infotext entries of a refined run: ``Refiner: NAME [hash]`` and ``Refiner switch at: 0.8``."""
    refiner = getattr(pipe, "refiner", None)
    if refiner is None:
        return {}
    name = refiner.ckpt.stem if refiner.ckpt is not None else type(refiner.model).__name__
    label = f"{name} [{refiner.model_hash}]" if refiner.model_hash else name
    return {"Refiner": label, "Refiner switch at": request.refiner_switch}
