"""Generate images with a latent diffusion model: load once, then ``generate`` for txt2img, img2img and inpainting.

    pipe = Pipeline.from_checkpoint("models/ldm/stable-diffusion-v1/model.ckpt")  # the config is detected
    # or Pipeline.from_config("configs/stable-diffusion/v1-inference.yaml", ckpt) to name it
    result = pipe.generate("a painting of a fox", steps=20, sampler="Euler a", seed=42, n=3)
    result.images[0].save("fox.png", pnginfo=png_info(result.parameters(0)))  # image i was made with seed 42 + i

The scripts in ``scripts/`` are thin wrappers over this module and :mod:`ldm.cli`.

Precision (``precision=``):

- ``full``: float32 everywhere.
- ``autocast`` (the CompVis default): float32 weights, float16 compute via ``torch.autocast`` on CUDA. On the CPU and
  on MPS it is the same as ``full``, as the original's ``autocast("cuda")`` was.
- ``fp16`` / ``bf16``: the UNet, VAE and text encoder weights are converted and run under autocast in that type (half
  the memory). The schedule and the sampler's state stay float32. ``fp16`` needs a GPU.

Speed and memory options (``Pipeline.from_config`` arguments; each is within a stated tolerance of the plain path,
see tests/test_fast_paths.py):

- ``channels_last``: the UNet and VAE run in the ``torch.channels_last`` memory format, which most convolution
  kernels (cuDNN, oneDNN) prefer.
- ``compile``: ``torch.compile`` of the UNet, in place (the state dict keeps its keys). The first image is slow.
- ``attention_slicing``: attention in slices of N query rows, or ``"auto"``; bounds the attention scores' memory
  where no fused kernel does (see :func:`ldm.modules.attention.attention`).
- ``vae_tiling``: decode latents larger than 64x64 by overlapping tiles (:func:`ldm.modules.tiling.tiled_decode`),
  bounding the VAE's memory for large images. The image differs from a full decode: each tile normalises its
  activations with its own statistics.
- ``idle_device``: keep the text encoder and VAE (and a depth model's MiDaS) there (e.g. ``"cpu"``) except while
  they run, so the GPU holds little more than the UNet.
- ``engine="openvino"``: on x86 CPUs, the networks run through OpenVINO (:mod:`ldm.openvino_engine`), converted
  once per input shape and cached on disk; everything else stays this module's code.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from PIL import Image

from ldm.adapters.embeddings import attach_embeddings, load_embeddings, ti_hashes_field
from ldm.adapters.lora_prompts import Loras
from ldm.checkpoint import load_model_from_config
from ldm.control import ControlNetCache, ControlRun
from ldm.conversions import depth_to_tensor, image_to_tensor, mask_to_tensor, tensor_to_images
from ldm.errors import UserError
from ldm.features import feature_runner, request_fields
from ldm.geometry import LatentGeometry
from ldm.masking import paste_back, repaint_mask
from ldm.model_detection import Detection, detect_checkpoint
from ldm.models.diffusion.guidance import keep_known
from ldm.models.diffusion.noise import Noise
from ldm.models.diffusion.samplers import SCHEDULE_LABELS, resolve_sampler, sample
from ldm.modules.attention import set_attention_slicing
from ldm.modules.tiling import tiled_decode
from ldm.openvino_engine import DENOISER, attach_openvino
from ldm.outputs import format_parameters, model_hash
from ldm.prompts import unknown_words
from ldm.refiner import refiner_fields, refiner_handoff
from ldm.request import GenerationRequest, RuntimeOptions
from ldm.request_conditioning import encode_request
from ldm.util import apply_overrides, load_config
from ldm.vae import float32_decoder, prepare_first_stage, vae_fields

DTYPES = {"autocast": torch.float16, "fp16": torch.float16, "bf16": torch.bfloat16}

# ---------------------------------------------------------------------------------------------------------------------
# Labels


def sampler_label(name: str, schedule: str | None = None) -> str:
    """The A1111 label of a sampler name: ``"dpmpp_2m_karras"`` -> ``"DPM++ 2M Karras"``."""
    spec, schedule = resolve_sampler(name, schedule)
    return spec.label if schedule == spec.schedule else f"{spec.label} {SCHEDULE_LABELS[schedule]}"


# ---------------------------------------------------------------------------------------------------------------------
# The pipeline


@dataclass
class GenerationResult:
    """Images of one ``generate`` call and everything needed to reproduce them.

    ``images[i]`` was made from ``prompts[i]`` / ``negative_prompts[i]`` with noise seed ``seeds[i]``.
    ``strength`` is None for txt2img and image variations; ``noise_level`` is an image variation's (unCLIP).
    """

    images: list[Image.Image]
    seeds: list[int]
    prompts: list[str]
    negative_prompts: list[str]
    steps: int
    sampler: str
    scale: float
    width: int
    height: int
    strength: float | None
    eta: float | None
    clip_skip: int
    model_name: str | None
    model_hash: str | None
    noise_level: int | None = None
    class_labels: list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # further A1111 entries (the refiner's), written last
    image_extra: list[dict[str, Any]] = field(default_factory=list)  # image i's own further entries (subseed)
    latents: torch.Tensor | None = None  # (B, C, h, w), the decoded latents (the hires fix upscales them)

    def fields(self, i: int) -> dict[str, Any]:
        """The A1111 settings of image ``i``, in A1111's order (None values are left out when written)."""
        return {
            "Steps": self.steps,
            "Sampler": self.sampler,
            "CFG scale": self.scale,
            "Seed": self.seeds[i],
            "Class": self.class_labels[i] if self.class_labels is not None else None,
            "Size": f"{self.width}x{self.height}",
            "Model hash": self.model_hash,
            "Model": self.model_name,
            "Denoising strength": self.strength,
            "Clip skip": self.clip_skip if self.clip_skip != 1 else None,
            "Eta": self.eta,
            "Noise level": self.noise_level,
            **self.extra,
            **(self.image_extra[i] if self.image_extra else {}),
        }

    def parameters(self, i: int) -> str:
        """The A1111 ``parameters`` text of image ``i`` (see :func:`ldm.outputs.format_parameters`)."""
        return format_parameters(self.prompts[i], self.negative_prompts[i], self.fields(i))


class Pipeline:
    """A loaded latent diffusion model ready to generate images; see :meth:`from_config` and :meth:`generate`.

    Args:
        model: a ``LatentDiffusion`` (or ``LatentInpaintDiffusion``) in eval mode, already placed on its devices
            and, for fp16/bf16, converted to that dtype.
        geometry: its :class:`LatentGeometry`.
        options: where and how it runs (see the module docstring). ``channels_last``, ``compile`` and
            ``attention_slicing`` are applied to ``model`` in place here.
        ckpt: the checkpoint file, for the model name and hash written into image metadata.
        vocabulary: the words a model trained on a closed set of words knows (the bundled shapes model lists
            them in its config), for a warning about the others.
        vae: a VAE file to load into the first stage (:mod:`ldm.vae`); without one SDXL's stays float32 in fp16 runs.
    """

    def __init__(
        self,
        model: Any,
        geometry: LatentGeometry,
        options: RuntimeOptions,
        ckpt: str | os.PathLike | None = None,
        vocabulary: Sequence[str] | None = None,
        vae: str | os.PathLike | None = None,
    ) -> None:
        self.model = model
        self.geometry = geometry
        self.options = options
        self.device = options.device
        self.idle_device = options.idle_device
        self.ckpt = Path(ckpt) if ckpt is not None else None
        self.detection: Detection | None = None  # how from_config chose the config, when it detected it
        self.vocabulary = frozenset(w.lower() for w in vocabulary) if vocabulary else None
        self.refiner: Pipeline | None = None  # finishes runs from request.refiner_switch on (ldm.refiner)
        self.controlnets = ControlNetCache()  # the ControlNet files requests named (ldm.control)
        self.stages = model.stages()
        self.vae = Path(vae) if vae is not None else None
        self.loras = Loras(model)  # LoRAs merged for a run (ldm.adapters); set loras.directory for names
        self.vae_float32 = prepare_first_stage(model, options.precision, self.device, self.vae)
        set_attention_slicing(model, options.attention_slicing)
        if options.channels_last:
            for role in ("unet", "first_stage"):
                self.stages[role].to(memory_format=torch.channels_last)
        if options.compile:
            # In place (not torch.compile(module)), so the model's state dict keeps its keys.
            self.stages["unet"].compile()
        self.engine = attach_openvino(model, options.precision) if options.engine == "openvino" else None
        if self.engine is not None:
            self.controlnets.prepare = functools.partial(self.engine.attach, name="ControlNet", stage=DENOISER)

    @classmethod
    def from_checkpoint(cls, ckpt: str | os.PathLike, options: RuntimeOptions | None = None, **kwargs: Any) -> Pipeline:
        """:meth:`from_config` with the config detected from ``ckpt`` (:mod:`ldm.model_detection`)."""
        return cls.from_config(None, ckpt, options, **kwargs)

    @classmethod
    def from_config(
        cls,
        config: str | os.PathLike | DictConfig | None,
        ckpt: str | os.PathLike | None,
        options: RuntimeOptions | None = None,
        *,
        overrides: Sequence[str] = (),
        use_ema_weights: bool = False,
        vae: str | os.PathLike | None = None,
        park_unet: bool = False,
        embeddings_dir: str | os.PathLike | None = None,
        **runtime: Any,
    ) -> Pipeline:
        """Build the model of a config (path or OmegaConf, plus ``key=value`` overrides) and load ``ckpt`` strictly.

        ``config=None``: the config detected from ``ckpt``'s key layout, announced in one printed line (see
        :mod:`ldm.model_detection`; ``pipe.detection`` keeps it). ``options``, or the same as keyword arguments
        (``device="cpu", precision="full", ...``; see :class:`RuntimeOptions`). ``ckpt=None`` keeps random weights
        (for tests); ``vae``: a VAE file for the first stage; ``park_unet``: the UNet waits on ``idle_device`` too
        (a refiner's, brought over at the hand-off); ``embeddings_dir``: textual-inversion embeddings to use by name
        in prompts (:mod:`ldm.adapters.embeddings`). Raises UserError (ConfigError, CheckpointError) with a
        message naming the fix.
        """
        if options is not None and runtime:
            raise UserError(f"give RuntimeOptions or {', '.join(runtime)} as keywords, not both.")
        options = options if options is not None else RuntimeOptions(**runtime)
        detection = None
        if config is None:
            if ckpt is None:
                raise UserError("give a config, or a checkpoint to detect it from.")
            detection = detect_checkpoint(ckpt)
            print(detection.line())
            config, overrides = detection.path, [*detection.overrides, *overrides]
        if isinstance(config, str | os.PathLike):
            config = load_config(config, overrides)
        else:
            config = apply_overrides(config, overrides)
        geometry = LatentGeometry.from_config(config)
        # fp16 / bf16 weights are made in that precision straight from the file: the peak is the half-size model.
        dtype = DTYPES[options.precision] if options.precision in ("fp16", "bf16") else None
        model = load_model_from_config(config, ckpt, device="cpu", use_ema_weights=use_ema_weights, dtype=dtype)
        if dtype is not None:
            for stage in model.stages().values():
                stage.to(dtype)  # without a checkpoint (ckpt=None) the weights were made in float32
        _place(model, options.device, options.idle_device, park_unet)
        if embeddings_dir is not None:
            attach_embeddings(model, load_embeddings(embeddings_dir))
        pipe = cls(model, geometry, options, ckpt=ckpt, vocabulary=config.get("vocabulary"), vae=vae)
        pipe.detection = detection
        return pipe

    @functools.cached_property
    def model_hash(self) -> str | None:
        """A1111's hash of the checkpoint file (sha256[:10]); None without a checkpoint."""
        return model_hash(self.ckpt) if self.ckpt is not None else None

    def _autocast(self) -> Any:
        precision = self.options.precision
        if precision == "full" or (precision == "autocast" and self.device.type != "cuda"):
            return nullcontext()
        return torch.autocast(self.device.type, dtype=DTYPES[precision])

    @contextmanager
    def _active(self, stage: torch.nn.Module | None) -> Iterator[None]:
        """Bring a stage waiting on ``idle_device`` to the device for the duration of the block."""
        if self.idle_device is None or stage is None:
            yield
            return
        stage.to(self.device)
        try:
            yield
        finally:
            stage.to(self.idle_device)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, h, w) -> images (B, 3, f*h, f*w); by tiles with ``vae_tiling``."""
        decode = self.model.decode_first_stage
        decode = float32_decoder(decode, self.device) if self.vae_float32 else decode
        return tiled_decode(decode, latents, self.geometry.factor) if self.options.vae_tiling else decode(latents)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] on the device -> scaled latents (B, C, H/f, W/f)."""
        with self._autocast(), self._active(self.stages["first_stage"]):
            return self.model.encode_image(pixels)

    def _image_inputs(
        self, request: GenerationRequest, cond: Any, uncond: Any
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, Any, Any]:
        """What img2img, inpainting and depth-to-image add, for a request checked by ``for_model``.

        Returns the init latent (1, C, h, w), the sampler's keep-mask (1, 1, h, w) for models that inpaint by
        keeping the known latent, and cond / uncond as the model samples with them (an inpainting model's add the
        mask and the masked image, a depth model's the depth map).
        """
        model, image, mask = self.model, request.init_image, repaint_mask(request.mask, request.inpainting_mask_invert)
        if model.image_is_condition:
            raise UserError(
                "this unCLIP model makes variations of an image: give init_image and noise_level (0 = follow the "
                "image closely), or use scripts/image_variation.py."
            )
        if request.depth_map is not None and not model.takes_depth_map:
            raise UserError(f"a depth map is for depth-to-image models; this is a {type(model).__name__}.")
        if image is None and not model.conditions_on_image:
            return None, None, cond, uncond
        pixels = image_to_tensor(image).to(self.device) if image is not None else None
        repaint = mask_to_tensor(mask).to(self.device) if mask is not None else None
        with self._active(self.stages["first_stage"]):
            init_latent = model.encode_image(pixels) if pixels is not None else None
        if model.conditions_on_image:
            if model.inpaints_by_conditioning and pixels is None and repaint is None:
                repaint = torch.ones(1, 1, request.height, request.width, device=self.device)  # txt2img: all
            extra = {"depth": depth_to_tensor(request.depth_map)} if request.depth_map is not None else {}
            with self._active(self.stages["first_stage"]), self._active(self.stages.get("depth_stage")):
                image_cond = model.image_conditioning(pixels, repaint, **extra)
            return init_latent, None, *(model.sampling_conditioning(c, image_cond) for c in (cond, uncond))
        if repaint is None:
            return init_latent, None, cond, uncond
        # A latent cell is repainted when any of its pixels is, so no masked pixel is kept.
        area = F.interpolate(repaint, size=init_latent.shape[-2:], mode="area")
        return init_latent, (area <= 0).float(), cond, uncond

    def _variation_inputs(
        self, image: Image.Image, noise_level: int, noise: Noise, cond: Any, uncond: Any
    ) -> tuple[Any, Any]:
        """cond / uncond of an image variation: each with the image's CLIP embedding noised to ``noise_level``
        (the augmentation's eps drawn first from every image's own generator, so a batch never changes an image);
        the unconditional one with the zero embedding, the "no image" condition unCLIP models were trained with."""
        model = self.model
        if not model.image_is_condition:
            raise UserError(
                f"noise_level is for unCLIP models (image variations); this is a {type(model).__name__}: use img2img."
            )
        pixels = image_to_tensor(image).to(self.device)
        with self._active(self.stages.get("embedder")):
            embedding = model.embed_image(pixels)
        eps = noise.randn((len(noise), embedding.shape[1]))
        image_cond = {"c_adm": model.augment_embedding(embedding.expand(len(noise), -1), noise_level, eps)}
        return model.sampling_conditioning(cond, image_cond), model.sampling_conditioning(
            uncond, model.null_image_conditioning(image_cond)
        )

    def generate(self, prompt: str | Sequence[str], **settings: Any) -> GenerationResult:
        """Generate images: ``generate(prompt, steps=20, sampler="Euler a", seed=42, n=3)``.

        ``prompt`` and every keyword of :class:`GenerationRequest` (``negative_prompt`` for ``negative_prompts``),
        plus ``callback(step, denoised)`` after each sampler step (denoised: (B, C, h, w) latents) and ``progress``
        (show the sampler's progress bar). See :meth:`run`.
        """
        callback, progress = settings.pop("callback", None), settings.pop("progress", True)
        if "negative_prompt" in settings:
            settings["negative_prompts"] = settings.pop("negative_prompt")
        return self.run(GenerationRequest(prompt, **settings), callback=callback, progress=progress)

    @torch.no_grad()
    def run(
        self,
        request: GenerationRequest,
        callback: Callable[[int, torch.Tensor], None] | None = None,
        progress: bool = True,
        start: tuple[torch.Tensor, float] | None = None,
    ) -> GenerationResult:
        """Generate the images of ``request`` in one batch, with its ``loras`` and its prompts' ``<lora:...>`` merged.

        img2img keeps the init image's size rounded down to the model's multiple unless height/width are given
        (see :func:`prepare_init_image`). A mask (white = repaint) goes to 9-channel inpainting models
        (``LatentInpaintDiffusion``) as conditioning; other models keep the unmasked latent at every step. Either
        way the unmasked pixels of the init image are pasted back, as CompVis's inpainting did. ``start``: (latents
        (B, C, h, w), strength) to run img2img from instead (the hires fix's second pass, :mod:`ldm.hires`).
        """
        if (runner := feature_runner(request)) is not None:  # hires fix, inpaint only masked: runs in passes
            return runner(self, request, functools.partial(self.run, callback=callback, progress=progress))
        request = request.for_model(self.geometry)
        prompts, negatives = request.image_prompts
        texts, lora_fields = self.loras.prepare(prompts, request.loras)  # the prompts without their <lora:...> tags
        self._warn_unknown_words(dict.fromkeys(texts))
        batch, height, width = request.batch, request.height, request.width
        model = self.model
        noise = Noise(request.seeds, self.device, request.subseeds, request.subseed_strength)
        variation = request.noise_level is not None
        control = ControlRun(self, request)  # the request's ControlNets, on the UNet for the run (ldm.control)
        with self._autocast(), control.attached():
            with self._active(self.stages.get("cond_stage")):
                refiner = self.refiner.model if self.refiner is not None else None
                cond, uncond = encode_request(model, request, texts, negatives, self.device, refiner)
            if variation:
                init_latent = latent_mask = None
                cond, uncond = self._variation_inputs(request.init_image, request.noise_level, noise, cond, uncond)
            else:
                init_latent, latent_mask, cond, uncond = self._image_inputs(request, cond, uncond)
            cond, uncond = control.conditioning(cond, uncond)
            strength = request.strength
            if start is not None:
                init_latent, strength = start
            if init_latent is not None:
                init_latent = init_latent.expand(batch, -1, -1, -1)
            latents = sample(
                model,
                request.sampler,
                request.steps,
                cond,
                uncond,
                request.scale,
                shape=self.geometry.latent_shape(batch, height, width),
                noise=noise,
                init_latent=init_latent,
                strength=strength if init_latent is not None else 1.0,
                mask=latent_mask,
                eta=request.eta,
                schedule=request.schedule,
                guidance_rescale=request.guidance_rescale,
                options=request.sampler_options,
                handoff=refiner_handoff(self, request, texts, negatives),
                callback=control.callback(callback),
                progress=progress,
            )
            if latent_mask is not None:
                # Runs on the CompVis grids end just above sigma 0; the init latent is exact in the kept region.
                latents = keep_known(latents, init_latent, latent_mask)
            with self._active(self.stages["first_stage"]):
                images = tensor_to_images(self._decode(latents))
        if self.engine is not None:
            self.engine.release_memory()  # an idle pipeline holds no OpenVINO buffers (ldm.openvino_engine)
        if request.mask is not None:
            mask = repaint_mask(request.mask, request.inpainting_mask_invert)
            images = paste_back(images, request.init_image, mask, request.mask_blur)
        return GenerationResult(
            images=images,
            seeds=list(request.seeds),
            prompts=list(prompts),
            negative_prompts=list(negatives),
            steps=request.steps,
            sampler=sampler_label(request.sampler, request.schedule),
            scale=request.scale,
            width=width,
            height=height,
            strength=None if variation else request.strength,
            eta=request.eta,
            clip_skip=request.clip_skip,
            model_name=self.ckpt.stem if self.ckpt is not None else None,
            model_hash=self.model_hash,
            noise_level=request.noise_level,
            class_labels=list(request.class_labels) if request.class_labels is not None else None,
            extra={
                **vae_fields(self.vae),
                **refiner_fields(self, request),
                **ti_hashes_field(model, [*prompts, *negatives]),
                **control.fields(),
                **request_fields(request)[0],
                **lora_fields,
            },
            image_extra=request_fields(request)[1],
            latents=latents,
        )

    def _warn_unknown_words(self, prompts: Sequence[str]) -> None:
        if self.vocabulary is None:
            return
        known = self.vocabulary | {name.lower() for name in getattr(self.model, "textual_inversions", {})}
        for text in prompts:
            unknown = unknown_words(text, known)
            if unknown:
                warnings.warn(
                    f"this model was trained on a small vocabulary; it does not know {', '.join(unknown)} "
                    f"(in '{text}'). Known words: {', '.join(sorted(self.vocabulary))}.",
                    stacklevel=3,
                )


def _place(model: torch.nn.Module, device: torch.device, idle_device: torch.device | None, park_unet: bool) -> None:
    """Move the model to ``device``, except the text encoder and VAE (and the UNet with ``park_unet``), which go to
    ``idle_device`` when given.

    Each part moves straight to its place, so the stages never occupy the main device during loading.
    """
    if idle_device is None:
        model.to(device)
        return
    idle = {id(stage) for role, stage in model.stages().items() if role != "unet" or park_unet}
    for child in model.children():
        child.to(idle_device if id(child) in idle else device)
    for name, buffer in model.named_buffers(recurse=False):
        setattr(model, name, buffer.to(device))
