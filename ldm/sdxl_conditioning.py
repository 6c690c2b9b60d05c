"""SDXL's conditioning for a generation request: size / crop / aesthetic-score micro-conditioning, and prompts through
both text encoders with A1111's attention weights, BREAK, 75-token chunks and CLIP skip.

Size conditioning has diffusers' names (``original_size``, ``crops_coords_top_left``, ``target_size`` and their
``negative_`` counterparts, all (height, width) / (top, left) pixel pairs; the refiner's ``aesthetic_score`` and
``negative_aesthetic_score``). Unset, they are SDXL's sampling defaults: original and target size = the output
size, crop (0, 0), the negative ones = the positive ones, aesthetic scores the model's (6.0 / 2.5). They map to the
batch keys of sgm's conditioner (``original_size_as_tuple``, ``crop_coords_top_left``, ``target_size_as_tuple``,
``aesthetic_score``); a model that has none of a given key refuses it.

Prompts (A1111 semantics for SDXL): each text encoder sees the same 75-token chunks (both use CLIP's BPE), encoded
with :func:`ldm.prompts.encode_chunks` and concatenated along the sequence; the pooled vector is the bigG encoder's
of the first chunk; CLIP skip moves both encoders' layer. Unconditional branch: an empty negative prompt gives zero
text embeddings (cross-attention and pooled), as sgm's sampling (``force_uc_zero_embeddings=["txt"]``) and
:meth:`SDXLDiffusion.get_unconditional_conditioning` do, while the size conditioning is kept; a negative prompt is
encoded like a prompt.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ldm.errors import UserError
from ldm.prompts import encode_chunks, prompt_chunks
from ldm.util import config_value

# Request field -> sgm batch key, for the positive branch; ``negative_<field>`` is the unconditional branch's.
PAIR_FIELDS = {
    "original_size": "original_size_as_tuple",
    "crops_coords_top_left": "crop_coords_top_left",
    "target_size": "target_size_as_tuple",
}
SCORE_FIELD, SCORE_KEY = "aesthetic_score", "aesthetic_score"
SIZE_FIELDS = (
    *PAIR_FIELDS,
    *(f"negative_{name}" for name in PAIR_FIELDS),
    SCORE_FIELD,
    f"negative_{SCORE_FIELD}",
)
CONDITIONER = "GeneralConditioner"


def _key(field: str) -> str:
    name = field.removeprefix("negative_")
    return PAIR_FIELDS.get(name, SCORE_KEY)


def check_size_fields(values: Mapping[str, Any]) -> dict[str, Any]:
    """The size-conditioning fields of a request (None = default), normalised: pairs as ``(int, int)``, scores as
    float. UserError naming the field for anything else (sizes must be positive, crops at least 0)."""
    out: dict[str, Any] = {}
    for field in SIZE_FIELDS:
        value = values.get(field)
        if value is None:
            out[field] = None
        elif _key(field) == SCORE_KEY:
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise UserError(f"{field} must be a number (the SDXL refiner's: 6.0, negative 2.5), got {value!r}.")
            out[field] = float(value)
        else:
            least = 0 if "crops" in field else 1
            pair = tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else (value,)
            if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < least for v in pair):
                what = "(top, left) pixels, at least 0" if least == 0 else "(height, width) in pixels, at least 1"
                raise UserError(f"{field} must be two whole numbers {what}, e.g. (1024, 1024); got {value!r}.")
            out[field] = pair
    return out


def config_size_keys(config: Any) -> set[str]:
    """The size / crop / aesthetic batch keys a model config's conditioner reads (none for non-SDXL models)."""
    at = "model." if "model" in config else ""
    cond = config_value(config, at + "params.cond_stage_config")
    if not isinstance(cond, Mapping) or not str(cond.get("target", "")).endswith(CONDITIONER):
        return set()
    keys = set()
    for entry in config_value(cond, "params.emb_models", []) or []:
        keys.update([entry["input_key"]] if "input_key" in entry else list(entry.get("input_keys", [])))
    return keys & {*PAIR_FIELDS.values(), SCORE_KEY}


def model_size_keys(model: Any) -> set[str]:
    """:func:`config_size_keys` of a built model."""
    conditioner = getattr(model, "conditioner", None)
    keys = getattr(conditioner, "input_keys", set()) if getattr(model, "conditions_on_batch", False) else set()
    return set(keys) & {*PAIR_FIELDS.values(), SCORE_KEY}


def fields_for(model: Any, values: Mapping[str, Any]) -> dict[str, Any]:
    """The size fields of ``values`` that ``model`` takes: in a base -> refiner hand-off each model gets its own
    (the base its sizes and crops, the refiner its original size, crop and aesthetic scores)."""
    keys = model_size_keys(model)
    return {field: value for field, value in values.items() if _key(field) in keys}


def check_model_takes(values: Mapping[str, Any], keys: set[str], model_name: str) -> None:
    """UserError unless the model (whose conditioner reads ``keys``) takes every size field given in ``values``."""
    given = [field for field in SIZE_FIELDS if values.get(field) is not None]
    refused = [field for field in given if _key(field) not in keys]
    if not refused:
        return
    if not keys:
        raise UserError(
            f"{', '.join(refused)}: size conditioning is for SDXL models; this {model_name} has none. Drop it."
        )
    takes = sorted({f for f in SIZE_FIELDS if _key(f) in keys})
    raise UserError(
        f"this {model_name} is not conditioned on {', '.join(refused)} (the SDXL base takes sizes and crops, the "
        f"refiner original size, crop and aesthetic score); it takes {', '.join(takes)}."
    )


def size_batches(
    model: Any, prompts: Sequence[str], negatives: Sequence[str], values: Mapping[str, Any], height: int, width: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The conditioner's batches for the prompts and for the unconditional branch: the texts under the model's
    ``cond_stage_key`` and the size entries (B, 2) / (B,) of the request's fields, the unset ones filled in by
    :meth:`SDXLDiffusion.size_conditioning` (an uncropped ``height`` x ``width`` image; the aesthetic scores the
    model's ``aesthetic_score`` / ``negative_aesthetic_score``)."""
    batches = []
    for texts, negative in ((prompts, False), (negatives, True)):
        entries: dict[str, Any] = {model.cond_stage_key: list(texts)}
        for name, key in PAIR_FIELDS.items():
            # The unconditional branch's own value, else the prompts'.
            value = (values.get(f"negative_{name}") if negative else None) or values.get(name)
            if value is not None:
                entries[key] = [list(value)] * len(texts)
        score = values.get(f"negative_{SCORE_FIELD}" if negative else SCORE_FIELD)
        if score is None and negative:
            score = model.negative_aesthetic_score
        batches.append(model.size_conditioning(entries, height, width, aesthetic_score=score))
    return batches[0], batches[1]


def _text_embedders(model: Any) -> dict[int, Any]:
    """The conditioner's per-token text encoders that read the prompts, by index."""
    return {
        index: embedder
        for index, embedder in enumerate(model.conditioner.embedders)
        if embedder.input_keys == [model.cond_stage_key] and getattr(embedder, "per_token", False)
    }


def encode_sdxl_prompts(
    model: Any,
    prompts: Sequence[str],
    negative_prompts: Sequence[str],
    clip_skip: int,
    sizes: Mapping[str, Any],
    height: int,
    width: int,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """cond and uncond of an SDXL model (``SDXLDiffusion``) for B prompts and B negative prompts.

    Returns ``{"c_crossattn": [(B, 77 * k, D_c)], "c_adm": (B, D_v)}`` each, k the largest number of chunks of any
    prompt or negative prompt. Rows whose negative prompt is empty have zero text embeddings in uncond.
    """
    if len(negative_prompts) != len(prompts):
        raise UserError(f"got {len(negative_prompts)} negative prompts for {len(prompts)} prompts")
    key = model.cond_stage_key
    encoders = _text_embedders(model)
    chunked = {i: (prompt_chunks(e, prompts), prompt_chunks(e, negative_prompts)) for i, e in encoders.items()}
    num_chunks = max((len(c) for pair in chunked.values() for side in pair for c in side), default=1)

    def encode(side: int) -> dict[int, Any]:
        return {
            i: encode_chunks(e, chunked[i][side], num_chunks, clip_skip, return_pooled=e.return_pooled)
            for i, e in encoders.items()
        }

    cond_batch, uncond_batch = size_batches(model, prompts, negative_prompts, sizes, height, width)
    cond_text = encode(0)
    cond = model.conditioner(cond_batch, embeddings=cond_text)
    empty = [not text for text in negative_prompts]
    if all(empty):
        # The prompts' encodings only give the shapes: every text embedding is zeroed.
        uncond = model.conditioner(uncond_batch, force_zero_embeddings=[key], embeddings=cond_text)
    else:
        uncond_text = {i: _zero_rows(out, empty) for i, out in encode(1).items()} if any(empty) else encode(1)
        uncond = model.conditioner(uncond_batch, embeddings=uncond_text)
    return model.to_unet_conditioning(cond), model.to_unet_conditioning(uncond)


def _zero_rows(out: torch.Tensor | tuple[torch.Tensor, ...], rows: list[bool]) -> Any:
    """An encoder's output (z, or (z, pooled)) with the samples flagged in ``rows`` set to zero."""
    if isinstance(out, tuple):
        return tuple(_zero_rows(t, rows) for t in out)
    keep = torch.tensor([not r for r in rows], device=out.device, dtype=out.dtype)
    return out * keep.reshape(-1, *[1] * (out.dim() - 1))
