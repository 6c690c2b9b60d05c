"""Waiting txt2img jobs that differ only in prompts and seeds run as one batch, and their results are split again
(``scripts/serve.py --max_batch N``; off by default).

Every image has its own noise generator (:class:`~ldm.models.diffusion.noise.Noise`), so an image made in a batch is
the image its request makes alone up to the last bit of batched convolutions: at most one grey level apart. That is
why it is opt-in: with it, the same request may give bytes that differ slightly with the server's load. Batching
shares the UNet's calls, which on most devices costs far less per image than running requests one after another.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from ldm.inference import GenerationResult
from ldm.models.diffusion.samplers import resolve_sampler
from ldm.request import GenerationRequest

LORA_TAGS = ("<lora:", "<lyco:")


def batch_key(requests: Sequence[GenerationRequest], mode: str) -> GenerationRequest | None:
    """What a job must share with another to run in one batch with it: its request without prompts and seeds.

    None (never batched) for img2img, several iterations, LoRA tags (one batch is one set of merged weights) and
    samplers that choose their own steps (their batch shares the steps, so its images differ from single runs).
    """
    if mode != "txt2img" or len(requests) != 1:
        return None
    request = requests[0]
    texts = (*request.prompts, *request.negative_prompts)
    if any(tag in text for text in texts for tag in LORA_TAGS) or not resolve_sampler(request.sampler)[0].fixed_steps:
        return None
    return dataclasses.replace(request, prompts=("",), negative_prompts=("",), n=1, seed=0, subseed=0)


def merge(requests: Sequence[GenerationRequest]) -> GenerationRequest:
    """One request making every image of ``requests`` (which share a :func:`batch_key`), in order."""
    prompts, negatives = zip(*(pair for r in requests for pair in zip(*r.image_prompts, strict=True)), strict=True)
    seeds = [s for r in requests for s in r.seeds]
    subseeds = [s for r in requests for s in r.subseeds] if requests[0].subseeds is not None else None
    return dataclasses.replace(
        requests[0], prompts=prompts, negative_prompts=negatives, n=1, seed=seeds, subseed=subseeds
    )


def split(result: GenerationResult, counts: Sequence[int]) -> list[GenerationResult]:
    """The result of a merged request as the results of its parts (``counts`` images each)."""
    parts, start = [], 0
    for count in counts:
        part = slice(start, start + count)
        parts.append(
            dataclasses.replace(
                result,
                images=result.images[part],
                seeds=result.seeds[part],
                prompts=result.prompts[part],
                negative_prompts=result.negative_prompts[part],
                image_extra=result.image_extra[part] if result.image_extra else [],
                latents=None,
            )  # fmt: skip
        )
        start += count
    return parts
