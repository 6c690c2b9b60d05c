"""The output step: what happens to generated images before they are kept, the same for the scripts, a notebook and
the server. The optional Stable Diffusion safety checker and invisible watermark (both off unless their weights or
package are here; nothing is downloaded), A1111 metadata, CompVis's numbered files and the grid.

    step = OutputStep.load("outputs/txt2img-samples", device, safety_dir="models/safety_checker")
    for path in step.save(pipe.generate("a fox", n=3)):
        print("wrote", path)
    step.finish()  # the grid, if one was asked for
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ldm.outputs import make_grid, save_numbered

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def safety_weights(directory: Path) -> Path | None:
    """The weights file of a local safety checker copy, or None when ``directory`` does not hold one."""
    if not (directory / "config.json").is_file():
        return None
    return next((directory / n for n in ("model.safetensors", "pytorch_model.bin") if (directory / n).is_file()), None)


class SafetyChecker:
    """The Stable Diffusion NSFW filter (the ``CompVis/stable-diffusion-safety-checker`` weights), run locally.

    A CLIP vision tower embeds each image; an image is flagged when its cosine similarity to any of the stored
    concept embeddings exceeds that concept's threshold (thresholds are lowered by 0.01 once an image comes close to
    a "special care" concept). Flagged images are replaced by black ones.

    Args:
        directory: a local copy of the weights repository: ``config.json`` (a ``CLIPConfig``) and
            ``model.safetensors`` or ``pytorch_model.bin``. Nothing is downloaded.
        device: where the check runs.
    """

    HEAD_KEYS = (
        "visual_projection.weight",
        "concept_embeds",
        "concept_embeds_weights",
        "special_care_embeds",
        "special_care_embeds_weights",
    )

    def __init__(self, directory: str | os.PathLike, device: torch.device | str = "cpu") -> None:
        from transformers import CLIPConfig, CLIPVisionModel

        from ldm.checkpoint import CheckpointError, load_state_dict_into, read_checkpoint

        directory = Path(directory)
        weights = safety_weights(directory)
        if weights is None:
            raise FileNotFoundError(f"no safety checker weights in '{directory}' (config.json + model.safetensors).")
        config = CLIPConfig.from_json_file(str(directory / "config.json"))
        state_dict, _ = read_checkpoint(weights)
        missing = [k for k in self.HEAD_KEYS if k not in state_dict]
        if missing:
            raise CheckpointError(
                f"{weights} is not a CompVis/stable-diffusion-safety-checker file: it lacks {', '.join(missing)}."
            )
        self.vision = CLIPVisionModel(config.vision_config)
        own = self.vision.state_dict()
        # Files saved with transformers < 5 nest the tower once more (``vision_model.vision_model.*``).
        tower = {}
        for key, value in state_dict.items():
            if key.startswith("vision_model."):
                name = key[len("vision_model.") :]
                tower[name if name in own else name.removeprefix("vision_model.")] = value
        try:
            load_state_dict_into(self.vision, tower)
        except CheckpointError as err:
            raise CheckpointError(f"{weights} does not fit {directory / 'config.json'}: {err}") from None
        self.projection = state_dict["visual_projection.weight"]
        self.concepts = state_dict["concept_embeds"]
        self.concept_thresholds = state_dict["concept_embeds_weights"]
        self.special = state_dict["special_care_embeds"]
        self.special_thresholds = state_dict["special_care_embeds_weights"]
        self.size = config.vision_config.image_size
        self.device = torch.device(device)
        self.vision.to(self.device).eval()

    def _pixels(self, image: Image.Image) -> torch.Tensor:
        """CLIP preprocessing: shorter side to ``size`` (bicubic), centre crop, normalise -> (3, size, size)."""
        scale = self.size / min(image.size)
        w, h = max(self.size, round(image.width * scale)), max(self.size, round(image.height * scale))
        image = image.resize((w, h), Image.Resampling.BICUBIC)
        left, top = (w - self.size) // 2, (h - self.size) // 2
        image = image.crop((left, top, left + self.size, top + self.size))
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]

    @torch.no_grad()
    def flags(self, images: Sequence[Image.Image]) -> list[bool]:
        """True for each image the filter flags as NSFW."""
        pixels = torch.stack([self._pixels(im) for im in images]).to(self.device)
        pooled = self.vision(pixel_values=pixels).pooler_output.float().cpu()
        embeds = torch.nn.functional.normalize(pooled @ self.projection.float().T, dim=-1)
        special = embeds @ torch.nn.functional.normalize(self.special.float(), dim=-1).T - self.special_thresholds
        adjustment = (special > 0).any(dim=1, keepdim=True).float() * 0.01
        concepts = embeds @ torch.nn.functional.normalize(self.concepts.float(), dim=-1).T - self.concept_thresholds
        return ((concepts + adjustment) > 0).any(dim=1).tolist()

    def __call__(self, images: Sequence[Image.Image]) -> tuple[list[Image.Image], list[bool]]:
        """(images with flagged ones blacked out, the flags)."""
        flagged = self.flags(images)
        return [Image.new("RGB", im.size) if bad else im for im, bad in zip(images, flagged, strict=True)], flagged


class Watermarker:
    """The invisible watermark CompVis's scripts embed (``"StableDiffusionV1"``, DWT-DCT), via ``imwatermark``."""

    TEXT = "StableDiffusionV1"
    # The DWT-DCT embedding needs enough 4x4 blocks to hold the watermark's bits.
    MIN_SIZE = 256

    def __init__(self, encoder: Any = None) -> None:
        """``encoder``: an ``imwatermark.WatermarkEncoder`` already holding its mark; by default one with ``TEXT``."""
        if encoder is None:
            from imwatermark import WatermarkEncoder

            encoder = WatermarkEncoder()
            encoder.set_watermark("bytes", self.TEXT.encode())
        self.encoder = encoder

    def __call__(self, image: Image.Image) -> Image.Image:
        """The watermarked image; images smaller than ``MIN_SIZE`` are returned unchanged."""
        if min(image.size) < self.MIN_SIZE:
            return image
        bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
        return Image.fromarray(np.ascontiguousarray(self.encoder.encode(bgr, "dwtDct")[:, :, ::-1]))


def load_post_processing(
    safety_dir: str | os.PathLike | None, device: torch.device | str = "cpu"
) -> tuple[SafetyChecker | None, Watermarker | None, list[str]]:
    """The safety checker and watermarker where their weights/packages are here, and a notice for each that is not.

    Never downloads: the safety checker needs its files in ``safety_dir``, the watermark the ``invisible-watermark``
    package (module ``imwatermark``).
    """
    notices: list[str] = []
    checker = watermarker = None
    safety_dir = Path(safety_dir) if safety_dir is not None else None
    if safety_dir is not None and safety_weights(safety_dir) is not None:
        checker = SafetyChecker(safety_dir, device)
    else:
        notices.append(
            f"safety checker off: put the CompVis/stable-diffusion-safety-checker files (config.json, "
            f"model.safetensors) in {safety_dir} to enable it."
        )
    try:
        watermarker = Watermarker()
    except ImportError:
        notices.append("invisible watermark off: pip install invisible-watermark to enable it.")
    return checker, watermarker, notices


@dataclass
class OutputStep:
    """Safety check, watermark, metadata and numbered saving of :class:`~ldm.inference.GenerationResult` s.

    Args:
        outdir: samples go to ``outdir/samples/NNNNN.png``, the grid to ``outdir/grid-NNNN.png`` (CompVis's layout;
            existing files are never overwritten).
        safety_checker, watermarker: the post-processing to apply (None: off).
        save_samples: write each image.
        grid_images_per_row: collect the images into a grid of this width, written by :meth:`finish`; None: no grid.
        on_flagged: called with the seed of each image the safety checker blacks out.
    """

    outdir: Path
    safety_checker: SafetyChecker | None = None
    watermarker: Watermarker | None = None
    save_samples: bool = True
    grid_images_per_row: int | None = None
    on_flagged: Callable[[int], None] | None = None
    _grid: list[Image.Image] = field(default_factory=list, init=False)
    _grid_parameters: str | None = field(default=None, init=False)

    @classmethod
    def load(
        cls, outdir: str | os.PathLike, device: torch.device | str = "cpu", *, safety_dir: str | os.PathLike | None,
        **options: Any,
    ) -> tuple[OutputStep, list[str]]:  # fmt: skip
        """The step with whatever post-processing is available here, and a notice for each part that is not."""
        checker, watermarker, notices = load_post_processing(safety_dir, device)
        return cls(Path(outdir), safety_checker=checker, watermarker=watermarker, **options), notices

    def process(self, images: Sequence[Image.Image], seeds: Sequence[int]) -> list[Image.Image]:
        """The images as they are kept: flagged ones blacked out, then watermarked."""
        images = list(images)
        if self.safety_checker is not None:
            images, flagged = self.safety_checker(images)
            for seed, bad in zip(seeds, flagged, strict=True):
                if bad and self.on_flagged is not None:
                    self.on_flagged(seed)
        if self.watermarker is not None:
            images = [self.watermarker(image) for image in images]
        return images

    def save(self, result: Any) -> Iterator[Path]:
        """Process one result's images, write each with its A1111 ``parameters`` and keep them for the grid.

        ``result``: a :class:`~ldm.inference.GenerationResult` (``images``, ``seeds``, ``parameters(i)``). Yields
        each file as it is written.
        """
        images = self.process(result.images, result.seeds)
        self._grid_parameters = self._grid_parameters or result.parameters(0)
        for i, image in enumerate(images):
            if self.save_samples:
                yield save_numbered(image, self.outdir / "samples", result.parameters(i))
        if self.grid_images_per_row is not None:
            self._grid.extend(images)

    def finish(self) -> Iterator[Path]:
        """Write the grid of every image saved so far (with the first image's parameters), if one was asked for."""
        if self.grid_images_per_row is not None and self._grid:
            yield save_numbered(
                make_grid(self._grid, self.grid_images_per_row), self.outdir, self._grid_parameters, grid=True
            )
            self._grid = []
