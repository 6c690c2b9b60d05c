"""A1111 request bodies -> checked :class:`~ldm.request.GenerationRequest` s, one per A1111 iteration (``n_iter``).

The values are checked by the same code as the command line (``GenerationRequest`` and ``for_model``); when it
refuses a value, the field is found by taking the settings away one at a time (:func:`blame`), so that every 422
names the A1111 field at fault.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageOps

from ldm.errors import UserError
from ldm.geometry import LatentGeometry
from ldm.masking import fill_masked
from ldm.models.diffusion.samplers import resolve_sampler, sampler_options
from ldm.request import GenerationRequest
from ldm.server.errors import FieldError
from ldm.server.images import decode_image
from ldm.server.schemas import Img2ImgBody, Txt2ImgBody

# A1111's "off" values of the fields this project has no counterpart for: anything else is refused by name.
OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "styles": ([],),
    "restore_faces": (False, None),
    "tiling": (False, None),
    "seed_resize_from_h": (-1, 0),
    "seed_resize_from_w": (-1, 0),
    "s_min_uncond": (None, 0, 0.0),
    "refiner_checkpoint": (None, "", "None"),
    "firstphase_width": (0,),
    "firstphase_height": (0,),
    "hr_checkpoint_name": (None, "", "Use same checkpoint"),
    "hr_sampler_name": (None, "", "Use same sampler"),
    "hr_scheduler": (None, "", "Use same scheduler"),
    "script_name": (None, "", "None"),
    "script_args": ([],),
    "initial_noise_multiplier": (None, 1, 1.0),
    "latent_mask": (None,),
    "image_cfg_scale": (None, 1.5, 1, 1.0),  # instruct-pix2pix's; A1111 ignores it for other models too
}
# A1111's inpainting_fill: 0 fill, 1 original, 2 latent noise, 3 latent nothing. resize_mode: 0 just resize,
# 1 crop and resize, 2 resize and fill, 3 just resize (latent upscale).
INPAINTING_FILLS = {0: "fill", 1: "original"}
RESIZE_MODES = {0: "just resize", 1: "crop and resize"}
SAMPLER_OPTION_FIELDS = ("s_churn", "s_tmin", "s_tmax", "s_noise")


@dataclass(frozen=True)
class Work:
    """A checked generation: its requests (one per iteration), and what the response carries."""

    mode: str  # "txt2img" or "img2img"
    requests: tuple[GenerationRequest, ...]
    send_images: bool
    save_images: bool
    init_images: tuple[Image.Image, ...] = ()  # returned with include_init_images

    @property
    def steps(self) -> int:
        """The sampler steps of one iteration, as the progress bar counts them."""
        request = self.requests[0]
        if request.init_image is None or request.strength is None:
            return request.steps
        return max(1, min(request.steps, int(request.strength * request.steps) + 1))


def check_off_fields(body: Txt2ImgBody) -> None:
    """FieldError for a field asking for something this server does not do (face restoration, scripts ...)."""
    for name, off in OFF_VALUES.items():
        if name in type(body).model_fields and getattr(body, name) not in off:
            raise FieldError(name, f"{name} is not supported by this server; leave it at {json.dumps(off[0])}.")
    if body.hr_prompt not in ("", body.prompt) or body.hr_negative_prompt not in ("", body.negative_prompt):
        raise FieldError("hr_prompt", "hr_prompt must be empty or the prompt itself: the hires pass uses the prompt.")
    for script, value in body.alwayson_scripts.items():
        if not isinstance(value, Mapping) or value.get("args"):
            message = f"alwayson_scripts: {script!r} is not available on this server; send no arguments."
            raise FieldError("alwayson_scripts", message)


def _eta(body: Txt2ImgBody, sampler: str, options: Mapping[str, Any]) -> float | None:
    """The request's eta where the sampler takes one (A1111 ignores it elsewhere), else the server's option; None
    for the sampler's own default."""
    spec, _ = resolve_sampler(sampler)
    if spec.eta is None:
        return None
    eta = body.eta
    if eta is None:
        eta = options["eta_ddim"] if spec.id == "ddim" else options["eta_ancestral"]
    return None if eta == spec.eta else eta  # the sampler's default: no "Eta" in the infotext, as A1111


def _sampler_options(body: Txt2ImgBody, sampler: str) -> dict[str, float]:
    """Karras' churn settings for the samplers that take them; A1111 reads ``s_tmax`` 0 as no upper bound."""
    known = sampler_options(resolve_sampler(sampler)[0])
    chosen = {}
    for name in SAMPLER_OPTION_FIELDS:
        value = getattr(body, name)
        if value is None or name not in known or (name == "s_tmax" and value == 0):
            continue
        chosen[name] = value
    return chosen


def settings(body: Txt2ImgBody, options: Mapping[str, Any]) -> dict[str, tuple[str, Any]]:
    """The GenerationRequest keywords of a txt2img body: ``{keyword: (A1111 field, value)}``."""
    check_off_fields(body)
    sampler_field = "sampler_name" if body.sampler_name else "sampler_index"
    sampler = body.sampler_name or body.sampler_index
    try:
        eta, sampler_settings = _eta(body, sampler, options), _sampler_options(body, sampler)
    except UserError as err:
        raise FieldError(sampler_field, f"{sampler_field}: {err}") from None
    chosen: dict[str, tuple[str, Any]] = {
        "prompts": ("prompt", body.prompt),
        "negative_prompts": ("negative_prompt", body.negative_prompt),
        "sampler": (sampler_field, sampler),
        "schedule": ("scheduler", body.scheduler or "automatic"),
        "steps": ("steps", body.steps),
        "scale": ("cfg_scale", body.cfg_scale),
        "seed": ("seed", None if body.seed == -1 else body.seed),
        "n": ("batch_size", body.batch_size),
        "height": ("height", body.height),
        "width": ("width", body.width),
        "clip_skip": ("override_settings", options["CLIP_stop_at_last_layers"]),
    }
    if eta is not None:
        chosen["eta"] = ("eta", eta)
    if sampler_settings:
        chosen["sampler_options"] = ("s_churn", sampler_settings)
    if body.subseed_strength != 0:
        chosen["subseed_strength"] = ("subseed_strength", body.subseed_strength)
        chosen["subseed"] = ("subseed", None if body.subseed == -1 else body.subseed)
    if body.enable_hr:
        chosen.update(_hires(body))
    return chosen


def _hires(body: Txt2ImgBody) -> dict[str, tuple[str, Any]]:
    scale = body.hr_scale
    if body.hr_resize_x or body.hr_resize_y:
        if not body.width or not body.height:
            raise FieldError("hr_resize_x", "hr_resize_x needs width and height: give hr_scale instead.")
        scales = {round(t / s, 6) for t, s in ((body.hr_resize_x, body.width), (body.hr_resize_y, body.height)) if t}
        if len(scales) != 1:
            message = "hr_resize_x and hr_resize_y must keep the aspect ratio; give hr_scale instead."
            raise FieldError("hr_resize_x", message)
        scale = scales.pop()
    chosen = {
        "enable_hr": ("enable_hr", True),
        "hr_scale": ("hr_scale" if scale == body.hr_scale else "hr_resize_x", scale),
        "hr_upscaler": ("hr_upscaler", body.hr_upscaler or "Latent"),
        "hr_second_pass_steps": ("hr_second_pass_steps", body.hr_second_pass_steps),
    }
    if body.denoising_strength is not None:
        chosen["denoising_strength"] = ("denoising_strength", body.denoising_strength)
    return chosen


def img2img_settings(body: Img2ImgBody, options: Mapping[str, Any]) -> dict[str, tuple[str, Any]]:
    """The GenerationRequest keywords of an img2img body (the init image and mask decoded and prepared)."""
    if body.enable_hr:
        raise FieldError("enable_hr", "enable_hr is for txt2img; for img2img give the larger width and height instead.")
    chosen = settings(body, options)
    if not body.init_images:
        raise FieldError("init_images", "init_images is empty: give the image to start from, base64 encoded.")
    if len(body.init_images) > 1:
        raise FieldError("init_images", "init_images holds several images; send one request per image.")
    if body.resize_mode not in RESIZE_MODES:
        message = f"resize_mode {body.resize_mode} is not supported; use 0 (just resize) or 1 (crop and resize)."
        raise FieldError("resize_mode", message)
    image = decode_image(body.init_images[0], "init_images[0]")
    mask = decode_image(body.mask, "mask", mode="L") if body.mask else None
    if mask is not None and mask.size != image.size:
        mask = mask.resize(image.size, Image.Resampling.BILINEAR)  # A1111 sizes the mask to the image
    if body.resize_mode == 1 and body.width and body.height:
        image = ImageOps.fit(image, (body.width, body.height), Image.Resampling.LANCZOS)
        mask = ImageOps.fit(mask, image.size, Image.Resampling.BILINEAR) if mask is not None else None
    chosen["init_image"] = ("init_images", image)
    if body.denoising_strength is not None:
        chosen["strength"] = ("denoising_strength", body.denoising_strength)
    if mask is None:
        return chosen
    if body.inpainting_fill not in INPAINTING_FILLS:
        message = f"inpainting_fill {body.inpainting_fill} is not supported; use 0 (fill) or 1 (original)."
        raise FieldError("inpainting_fill", message)
    if body.inpainting_fill == 0:
        repaint = ImageOps.invert(mask) if body.inpainting_mask_invert else mask
        chosen["init_image"] = ("init_images", fill_masked(image, repaint))
    blur = body.mask_blur
    if blur is None:
        if body.mask_blur_x != body.mask_blur_y:
            raise FieldError("mask_blur_x", "mask_blur_x and mask_blur_y must be equal here; give mask_blur.")
        blur = body.mask_blur_x
    chosen.update(
        mask=("mask", mask),
        mask_blur=("mask_blur", blur),
        inpaint_full_res=("inpaint_full_res", body.inpaint_full_res),
        inpaint_full_res_padding=("inpaint_full_res_padding", body.inpaint_full_res_padding),
        inpainting_mask_invert=("inpainting_mask_invert", bool(body.inpainting_mask_invert)),
    )
    return chosen


def _build(chosen: Mapping[str, tuple[str, Any]], geometry: LatentGeometry) -> GenerationRequest:
    return GenerationRequest(**{key: value for key, (_, value) in chosen.items()}).for_model(geometry)


def blame(chosen: Mapping[str, tuple[str, Any]], geometry: LatentGeometry, message: str) -> str | None:
    """The A1111 field behind a refused request: the settings are added one at a time, in order, and the field
    whose addition first brings the complaint ``message`` is the one it is about (the whole request brings it)."""
    partial: dict[str, tuple[str, Any]] = {}
    for key, item in chosen.items():
        partial[key] = item
        try:
            _build(partial, geometry)
        except UserError as err:
            if str(err) == message:
                return item[0]
    return None


def check_request(chosen: Mapping[str, tuple[str, Any]], geometry: LatentGeometry) -> GenerationRequest:
    """The request of ``chosen`` checked against the model; FieldError naming the field it refuses."""
    try:
        return _build(chosen, geometry)
    except FieldError:
        raise
    except UserError as err:
        raise FieldError(blame(chosen, geometry, str(err)), str(err)) from None


def iterations(first: GenerationRequest, n_iter: int) -> tuple[GenerationRequest, ...]:
    """A1111's ``n_iter`` batches: image k of the job gets seed ``seed + k`` (a variation run keeps the seed and
    counts the subseed up instead)."""
    if isinstance(n_iter, bool) or n_iter < 1:
        raise FieldError("n_iter", f"n_iter must be at least 1, got {n_iter}.")
    batch, vary = first.batch, first.subseed_strength > 0
    requests = [first]
    for k in range(1, n_iter):
        try:
            if vary:
                requests.append(dataclasses.replace(first, subseed=first.subseeds[0] + k * batch))
            else:
                requests.append(dataclasses.replace(first, seed=first.seeds[0] + k * batch))
        except UserError as err:
            raise FieldError("subseed" if vary else "seed", str(err)) from None
    return tuple(requests)


def translate(body: Txt2ImgBody, geometry: LatentGeometry, options: Mapping[str, Any]) -> Work:
    """A checked :class:`Work` from a txt2img or img2img body (``options``: the server's A1111 options with the
    body's ``override_settings`` applied)."""
    img2img = isinstance(body, Img2ImgBody)
    chosen = img2img_settings(body, options) if img2img else settings(body, options)
    first = check_request(chosen, geometry)
    return Work(
        mode="img2img" if img2img else "txt2img",
        requests=iterations(first, body.n_iter),
        send_images=body.send_images,
        save_images=body.save_images,
        init_images=(first.init_image,) if img2img and body.include_init_images else (),
    )
