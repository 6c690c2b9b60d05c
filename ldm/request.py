"""What a user asks for, checked once: how to run the model (:class:`RuntimeOptions`) and what to generate
(:class:`GenerationRequest`).

Both are frozen and check themselves when made, so a value of either type is a valid request: the scripts, the
Python API and the server build one at the top, before any model is loaded, and hand it on. Bad input raises
:class:`~ldm.errors.UserError` naming the fix. What depends on the model (step count, image sizes) is checked by
:meth:`GenerationRequest.for_model` against the model's :class:`~ldm.geometry.LatentGeometry`, read from its config.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from ldm.control import ControlSpec, check_controls
from ldm.devices import check_compile, check_precision, resolve_device, warn_about_slow_precision
from ldm.errors import UserError
from ldm.geometry import LatentGeometry, prepare_init_image
from ldm.hires import check_hires
from ldm.masking import check_masking
from ldm.models.diffusion.guidance import check_guidance_rescale
from ldm.models.diffusion.handoff import check_switch
from ldm.models.diffusion.noise import MAX_SEED, Noise, check_seed, check_subseed_strength
from ldm.models.diffusion.samplers import check_sampler_options, check_sampling_arguments, resolve_sampler
from ldm.modules.attention import check_slice_size
from ldm.openvino_engine import check_engine
from ldm.outputs import load_image
from ldm.sdxl_conditioning import SIZE_FIELDS, check_size_fields

ImageInput = Image.Image | str | os.PathLike

# CompVis's img2img default, also A1111's; inpainting repaints the masked region from scratch.
IMG2IMG_STRENGTH = 0.75
INPAINT_STRENGTH = 1.0


@dataclass(frozen=True)
class RuntimeOptions:
    """Where and how a model runs; see :mod:`ldm.inference` for what each speed and memory option does.

    ``device=None`` picks the best available (CUDA, then MPS, then the CPU); after construction ``device`` and
    ``idle_device`` are torch.devices.
    """

    device: torch.device | str | None = None
    precision: str = "autocast"
    idle_device: torch.device | str | None = None
    channels_last: bool = False
    compile: bool = False
    attention_slicing: int | str | None = None
    vae_tiling: bool = False
    engine: str = "torch"

    def __post_init__(self) -> None:
        device = resolve_device(self.device)
        object.__setattr__(self, "device", device)
        if self.idle_device is not None:
            object.__setattr__(self, "idle_device", resolve_device(self.idle_device, option="--idle_device"))
        check_precision(self.precision, device)
        check_slice_size(self.attention_slicing)
        check_engine(self.engine, device, self.precision, self.compile)
        warn_about_slow_precision(self.precision, device, self.engine)
        if self.compile:
            check_compile(device)

    @property
    def half(self) -> bool:
        """Whether the UNet computes in 16 bits."""
        return self.precision in ("fp16", "bf16") or (self.precision == "autocast" and self.device.type == "cuda")


def _texts(value: str | Sequence[str] | None, what: str) -> tuple[str, ...]:
    if value is None:
        return ()
    texts = (value,) if isinstance(value, str) else tuple(value)
    if not all(isinstance(text, str) for text in texts):
        raise UserError(f"{what} must be strings, got {[type(t).__name__ for t in texts]}.")
    return texts


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{what} must be an integer of at least 1, got {value!r}.")
    return value


@dataclass(frozen=True)
class GenerationRequest:
    """One call's worth of images: ``n`` per prompt, image ``i`` from ``prompts[i // n]`` with ``seeds[i]``.

    Attributes:
        prompts: A1111 prompt syntax (``(word:1.3)``, ``[word]``, ``BREAK``, any length); a string is one prompt.
        negative_prompts: one for all or one per prompt; empty means none.
        steps, sampler, schedule, scale, eta: sampling settings (``ldm.models.diffusion.samplers``); ``schedule``
            overrides the sampler name's (A1111's "Schedule type"), eta None means the sampler's default.
        sampler_options: the sampler's own options (``ldm.models.diffusion.samplers.sampler_options``), e.g.
            ``{"s_churn": 1.0}`` for Euler / Heun.
        guidance_rescale: Lin et al.'s rescale of the guided prediction's std, in [0, 1] (0 = off, 0.7 suggested).
        seed: image i gets ``seed + i``; a list gives each image's seed; None draws one. After construction,
            ``seeds`` holds every image's seed.
        height, width: the image size; None: the model's trained size, or the init image's (see
            :func:`~ldm.geometry.output_size`), filled in by :meth:`for_model`.
        n: images per prompt.
        init_image, mask: img2img / inpainting input (PIL image or path); the mask is white where to repaint.
        depth_map: for depth-to-image models, a depth map (PIL image or path; brighter = nearer, any bit depth and
            size: it is resized to the image) used instead of the one the model estimates from ``init_image``.
        strength: how much of the schedule img2img runs (0 keeps the input, 1 starts from noise); default 0.75 for
            img2img, 1.0 for inpainting, None (and nothing else) for txt2img.
        clip_skip: 1 = the text encoder's configured layer, 2 = one layer earlier (A1111's CLIP skip).
        noise_level: for models conditioned on the init image's CLIP embedding (unCLIP image variation): how much
            the embedding is noised, 0 (the image as it is) up to the model's maximum (999); such a request
            takes no strength (sampling starts from noise). None: an ordinary img2img / inpainting request.
        class_labels: for class-conditional models (:mod:`ldm.class_labels`), the class of every image, or one for
            all; the prompts are then not encoded. The model checks that the labels are its classes.
        original_size, crops_coords_top_left, target_size (and ``negative_`` ones for the unconditional branch),
        aesthetic_score, negative_aesthetic_score: SDXL's micro-conditioning, (height, width) / (top, left) pixel
            pairs and refiner scores; None: SDXL's defaults (the output size, (0, 0), the positive values, the
            model's 6.0 / 2.5). See :mod:`ldm.sdxl_conditioning`; other models refuse them.
        controls: ControlNets (:class:`ldm.control.ControlSpec`, or dicts of its fields), each with its control
            image, strength and guidance range.
        loras: LoRAs to merge besides the prompts' ``<lora:...>`` tags: ``("name", weight)``, ``("name", te, unet)``
            or ``"name:weight"``, looked up in the pipeline's LoRA folder (:mod:`ldm.adapters.lora_prompts`).
        subseed, subseed_strength: A1111's variation seed: each image's starting noise is its seed's slerped toward
            its subseed's by ``subseed_strength`` in [0, 1] (:mod:`ldm.models.diffusion.noise`). As in A1111, with a
            strength above 0 every image of an integer ``seed`` gets that seed and image i the subseed
            ``subseed + i``; a list gives each image's. None draws one. After construction ``subseeds`` holds them.
        enable_hr, hr_scale, hr_upscaler, hr_second_pass_steps, denoising_strength: A1111's hires fix (txt2img):
            generate, upscale by ``hr_scale`` with ``hr_upscaler`` (a latent or an image upscaler), then img2img at
            ``denoising_strength`` for ``hr_second_pass_steps`` steps (0: ``steps``); see :mod:`ldm.hires`.
        mask_blur, inpaint_full_res, inpaint_full_res_padding: inpainting (:mod:`ldm.masking`): the pixels' std of
            the Gaussian blur of the mask the result is pasted back with; "inpaint only masked" (the mask's bounding
            box plus the padding in pixels is cut out, inpainted at height x width and pasted back).
        inpainting_mask_invert: repaint where the mask is black (A1111's "Mask mode: Inpaint not masked").
        refiner_switch: with a refiner attached to the pipeline (:mod:`ldm.refiner`), the share of the steps the
            base runs before the refiner takes over, in (0, 1] (A1111's "Refiner switch at").
    """

    prompts: str | Sequence[str]
    negative_prompts: str | Sequence[str] | None = None
    steps: int = 50
    sampler: str = "ddim"
    schedule: str | None = None
    scale: float = 7.5
    eta: float | None = None
    guidance_rescale: float = 0.0
    sampler_options: Mapping[str, float] = dataclasses.field(default_factory=dict)
    seed: int | Sequence[int] | None = None
    height: int | None = None
    width: int | None = None
    n: int = 1
    init_image: ImageInput | None = None
    mask: ImageInput | None = None
    depth_map: ImageInput | None = None
    strength: float | None = None
    clip_skip: int = 1
    noise_level: int | None = None
    class_labels: int | Sequence[int] | None = None
    original_size: tuple[int, int] | None = None
    crops_coords_top_left: tuple[int, int] | None = None
    target_size: tuple[int, int] | None = None
    negative_original_size: tuple[int, int] | None = None
    negative_crops_coords_top_left: tuple[int, int] | None = None
    negative_target_size: tuple[int, int] | None = None
    aesthetic_score: float | None = None
    negative_aesthetic_score: float | None = None
    refiner_switch: float = 0.8
    controls: Sequence[ControlSpec | Mapping[str, Any]] = ()
    loras: Sequence[Any] = ()
    subseed: int | Sequence[int] | None = None
    subseed_strength: float = 0.0
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str = "Latent"
    hr_second_pass_steps: int = 0
    denoising_strength: float = 0.7
    mask_blur: int = 0
    inpaint_full_res: bool = False
    inpaint_full_res_padding: int = 32
    inpainting_mask_invert: bool = False
    seeds: tuple[int, ...] = dataclasses.field(init=False, default=())
    subseeds: tuple[int, ...] | None = dataclasses.field(init=False, default=None)

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: the normalised values are set once, here
        prompts = _texts(self.prompts, "prompts")
        if not prompts:
            raise UserError("give at least one prompt (an empty string generates without one).")
        negatives = _texts(self.negative_prompts, "negative prompts") or ("",)
        if len(negatives) == 1:
            negatives *= len(prompts)
        if len(negatives) != len(prompts):
            raise UserError(f"got {len(negatives)} negative prompts for {len(prompts)} prompts; give one or one each.")
        set_(self, "prompts", prompts)
        set_(self, "negative_prompts", negatives)
        _positive_int(self.n, "the number of images per prompt")
        _positive_int(self.clip_skip, "clip_skip (1 = last layer)")
        if self.mask is not None and self.init_image is None:
            raise UserError("a mask needs an init image to inpaint.")
        if self.depth_map is not None and self.init_image is None:
            raise UserError("a depth map goes with the init image it describes: give an init image too.")
        strength = self.strength
        if self.init_image is None and strength is not None:
            raise UserError("strength is for img2img and inpainting: give an init image too.")
        if self.noise_level is not None:
            self._check_variation()
        elif self.init_image is not None and strength is None:
            strength = INPAINT_STRENGTH if self.mask is not None else IMG2IMG_STRENGTH
        set_(self, "strength", strength)
        if isinstance(self.scale, bool) or not isinstance(self.scale, int | float):
            raise UserError(f"the guidance scale must be a number, got {self.scale!r}.")
        if self.eta is not None and (not isinstance(self.eta, int | float) or not math.isfinite(self.eta)):
            raise UserError(f"eta must be a number >= 0, got {self.eta!r}.")
        spec, _ = resolve_sampler(self.sampler, self.schedule)
        check_sampler_options(spec, self.sampler_options)
        set_(self, "sampler_options", dict(self.sampler_options))
        check_guidance_rescale(self.guidance_rescale)
        for field, value in check_size_fields({f: getattr(self, f) for f in SIZE_FIELDS}).items():
            set_(self, field, value)
        check_switch(self.refiner_switch)
        set_(self, "controls", check_controls(self.controls))
        check_hires(self.enable_hr, self.hr_scale, self.hr_upscaler, self.hr_second_pass_steps, self.denoising_strength)
        if self.enable_hr and self.init_image is not None:
            raise UserError("the hires fix (enable_hr) is for txt2img; for img2img give the larger size instead.")
        check_masking(self.mask_blur, self.inpaint_full_res, self.inpaint_full_res_padding, self.inpainting_mask_invert)
        set_(self, "subseed_strength", check_subseed_strength(self.subseed_strength))
        set_(self, "seeds", self._image_seeds())
        set_(self, "subseeds", self._image_subseeds())
        set_(self, "class_labels", self._image_classes())

    def _image_classes(self) -> tuple[int, ...] | None:
        if self.class_labels is None:
            return None
        labels = (self.class_labels,) if isinstance(self.class_labels, int) else tuple(self.class_labels)
        if not labels or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in labels):
            raise UserError(f"class labels must be integers >= 0, got {self.class_labels!r}.")
        if len(labels) == 1:
            labels *= len(self.seeds)
        if len(labels) != len(self.seeds):
            raise UserError(f"got {len(labels)} class labels for {len(self.seeds)} images; give one or one each.")
        return labels

    def _check_variation(self) -> None:
        """An image-variation request (``noise_level`` given): an init image, no mask, no strength."""
        level = self.noise_level
        if isinstance(level, bool) or not isinstance(level, int) or level < 0:
            raise UserError(f"noise_level must be a whole number of at least 0, got {level!r}.")
        if self.init_image is None:
            raise UserError("noise_level is for image variations (unCLIP models): give the init image to vary.")
        if self.mask is not None or self.strength is not None:
            raise UserError("an image variation (noise_level) starts from noise: give no mask and no strength.")

    def _image_seeds(self) -> tuple[int, ...]:
        count = len(self.prompts) * self.n
        if self.seed is None:
            # Drawn once and kept, so that a copy of this request (dataclasses.replace) makes the same images.
            object.__setattr__(self, "seed", Noise.from_seed(None, 1).seeds[0])
        if isinstance(self.seed, int):
            first = check_seed(self.seed)
            if first + count - 1 > MAX_SEED:
                raise UserError(
                    f"seed {first} would give the last of {count} images the seed {first + count - 1}, past the "
                    f"largest seed {MAX_SEED}; use a seed of at most {MAX_SEED - count + 1}."
                )
            # A1111: a variation run keeps the seed and varies the subseed.
            return tuple(first + (i if self.subseed_strength == 0 else 0) for i in range(count))
        seeds = tuple(check_seed(int(s)) for s in self.seed)
        if len(seeds) != count:
            raise UserError(f"got {len(seeds)} seeds for {count} images; give one per image, or a single seed.")
        return seeds

    def _image_subseeds(self) -> tuple[int, ...] | None:
        if self.subseed_strength == 0:
            return None
        if self.noise_level is not None:
            raise UserError("variation seeds change the starting noise; an image variation (noise_level) takes none.")
        count = len(self.seeds)
        if self.subseed is None:
            object.__setattr__(self, "subseed", Noise.from_seed(None, 1).seeds[0])  # kept, as the seed is
        if isinstance(self.subseed, int):
            first = check_seed(self.subseed, "subseed")
            return tuple(check_seed(first + i, "the last image's subseed") for i in range(count))
        subseeds = tuple(check_seed(int(s), "subseed") for s in self.subseed)
        if len(subseeds) != count:
            raise UserError(f"got {len(subseeds)} subseeds for {count} images; give one per image, or a single one.")
        return subseeds

    @property
    def batch(self) -> int:
        return len(self.seeds)

    @property
    def image_prompts(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(prompt, negative prompt) of every image, ``n`` copies of each in turn."""
        return (
            tuple(p for p in self.prompts for _ in range(self.n)),
            tuple(p for p in self.negative_prompts for _ in range(self.n)),
        )

    def for_model(self, geometry: LatentGeometry) -> GenerationRequest:
        """This request checked against a model and completed: sizes filled in, init image and mask loaded and
        sized (PIL "RGB" and binary "L"). Idempotent, so a checked request can be checked again for free.

        An image variation keeps its image's own size (the image encoder resizes it) and is made at the model's
        trained size unless height/width are given."""
        strength = 1.0 if self.strength is None else self.strength
        variation = self.noise_level is not None
        check_sampling_arguments(
            self.sampler, self.steps, geometry.timesteps, strength, self.eta,
            self.init_image is not None and not variation, self.scale, self.schedule, self.guidance_rescale,
            self.sampler_options,
        )  # fmt: skip
        height, width, image, mask, depth = self.height, self.width, self.init_image, self.mask, self.depth_map
        if image is not None and variation:
            image = image.convert("RGB") if isinstance(image, Image.Image) else load_image(image, "init image")
        elif image is not None:
            image, mask = prepare_init_image(image, mask, geometry, height, width)
            width, height = image.size
        if depth is not None and not isinstance(depth, Image.Image):
            depth = load_image(depth, "depth map", mode="F")
        height = geometry.default_size if height is None else height
        width = geometry.default_size if width is None else width
        geometry.check_size(height, width)
        return dataclasses.replace(self, height=height, width=width, init_image=image, mask=mask, depth_map=depth)
