"""A1111 infotext back to a request: the :class:`~ldm.request.GenerationRequest` keywords of a parsed
``parameters`` text (:func:`ldm.outputs.parse_parameters`), so that PNG Info reproduces an image.

    fields = parse_parameters(read_parameters("00000.png"))
    settings, unread = request_settings(fields)
    pipe.run(GenerationRequest(**settings))  # img2img / inpainting: add init_image= and mask=, not in infotext

The entries this reads are those :class:`~ldm.inference.GenerationResult` writes for the settings of the core and
of the A1111 features (variation seeds, hires fix, mask blur, only masked, mask mode); any others come back in
``unread``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ldm.errors import UserError


def _size(text: str) -> dict[str, int]:
    width, _, height = text.partition("x")
    return {"width": int(width), "height": int(height)}


def _number(text: str) -> float:
    return float(text)


# A1111 key -> (GenerationRequest keywords of its value)
READERS: dict[str, Callable[[str], dict[str, Any]]] = {
    "Steps": lambda v: {"steps": int(v)},
    "Sampler": lambda v: {"sampler": v},
    "CFG scale": lambda v: {"scale": _number(v)},
    "Seed": lambda v: {"seed": int(v)},
    "Size": _size,
    "Clip skip": lambda v: {"clip_skip": int(v)},
    "Eta": lambda v: {"eta": _number(v)},
    "Variation seed": lambda v: {"subseed": int(v)},
    "Variation seed strength": lambda v: {"subseed_strength": _number(v)},
    "Hires upscale": lambda v: {"enable_hr": True, "hr_scale": _number(v)},
    "Hires steps": lambda v: {"hr_second_pass_steps": int(v)},
    "Hires upscaler": lambda v: {"hr_upscaler": v},
    "Mask blur": lambda v: {"mask_blur": int(v)},
    "Inpaint area": lambda v: {"inpaint_full_res": v == "Only masked"},
    "Masked area padding": lambda v: {"inpaint_full_res_padding": int(v)},
    "Mask mode": lambda v: {"inpainting_mask_invert": v == "Inpaint not masked"},
}
TEXTS = ("Prompt", "Negative prompt")


def request_settings(fields: Mapping[str, str]) -> tuple[dict[str, Any], list[str]]:
    """(GenerationRequest keywords, the keys not read) of parsed infotext ``fields``.

    ``Denoising strength`` is the hires fix's ``denoising_strength`` when ``Hires upscale`` is there, else the
    img2img ``strength``. A value that does not read raises UserError naming the key.
    """
    settings: dict[str, Any] = {"prompts": fields.get("Prompt", ""), "negative_prompts": fields.get("Negative prompt")}
    unread = []
    for key, value in fields.items():
        try:
            if key in READERS:
                settings.update(READERS[key](value))
            elif key == "Denoising strength":
                settings["denoising_strength" if "Hires upscale" in fields else "strength"] = _number(value)
            elif key not in TEXTS:
                unread.append(key)
        except ValueError:
            raise UserError(f"the infotext's '{key}: {value}' does not read as a {key.lower()} value.") from None
    return settings, unread
