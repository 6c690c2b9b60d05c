"""What a checked request's prompts or class labels become for the sampler: cond and uncond, per model kind.

Class-conditional models get their labels (:mod:`ldm.class_labels`), SDXL models prompts plus size conditioning
(:mod:`ldm.sdxl_conditioning`), other text-conditioned models prompts (:mod:`ldm.prompts`); unconditional models
get None for both.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch

from ldm.class_labels import class_embedder, encode_class_labels
from ldm.errors import UserError
from ldm.prompt_schedule import encode_scheduled, is_plain
from ldm.prompts import encode_prompts
from ldm.request import GenerationRequest
from ldm.sdxl_conditioning import (
    SIZE_FIELDS,
    check_model_takes,
    encode_sdxl_prompts,
    fields_for,
    model_size_keys,
)


def encode_request(
    model: Any,
    request: GenerationRequest,
    prompts: Sequence[str],
    negatives: Sequence[str],
    device: torch.device,
    refiner: Any = None,
) -> tuple[Any, Any]:
    """(cond, uncond) of the images' ``prompts`` / ``negatives`` (B each) for a request checked by ``for_model``;
    the caller has the cond stage on ``device``. UserError for settings the model does not take, nor ``refiner``
    (the model that finishes the run: a base -> refiner request may set the refiner's aesthetic scores)."""
    sizes = {field: getattr(request, field) for field in SIZE_FIELDS}
    taken = model_size_keys(model) | (model_size_keys(refiner) if refiner is not None else set())
    check_model_takes(sizes, taken, type(model).__name__)
    sizes = fields_for(model, sizes)
    if request.class_labels is not None or class_embedder(model) is not None:
        if request.class_labels is None:
            raise UserError("this model is class-conditional: give class labels (--classes), not prompts.")
        return encode_class_labels(model, request.class_labels, request.scale, device)
    if getattr(model, "conditions_on_batch", False) and getattr(model, "conditioner", None) is not None:
        encode = partial(encode_sdxl_prompts, model, clip_skip=request.clip_skip, sizes=sizes, height=request.height,
                         width=request.width)  # fmt: skip
        return encode_scheduled(encode, prompts, negatives, request.steps)
    if model.stages().get("cond_stage") is None:
        return None, None
    encode = partial(encode_prompts, model, clip_skip=request.clip_skip)
    if model.conditions_on_image or model.image_is_condition:
        # Their cond gets the image's conditioning added per image (sampling_conditioning), which a schedule's
        # per-step rows do not have.
        plain = all(is_plain(p, request.steps) for p in prompts) and all(
            is_plain(n, request.steps, compose=False) for n in negatives
        )
        if not plain:
            raise UserError(
                f"prompt editing ([a:b:when], [a|b]) and AND are for text-to-image and img2img models; this "
                f"{type(model).__name__} takes plain prompts."
            )
        return encode(list(prompts), list(negatives))
    return encode_scheduled(encode, prompts, negatives, request.steps)
