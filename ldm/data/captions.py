"""Caption folders in kohya-ss sd-scripts' layout, with aspect-ratio buckets and optional latent caching.

Layout: images (``.png``, ``.jpg``, ``.jpeg``, ``.webp``, ``.bmp``) directly in ``root``, or in subfolders named
``N_words`` (kohya's DreamBooth convention): ``10_sks dog`` repeats each of its images 10 times per epoch, and
``sks dog`` is the caption of those of its images that have no caption file. A caption file has the image's stem
and ``caption_extension`` (``.txt``; kohya's default is ``.caption``), UTF-8 text whose first line is the caption.
Folders whose names start with ``.`` (the default latent cache ``.latent-cache``) are skipped; any other subfolder
must follow the convention, so a misnamed folder is an error rather than images silently left out.

Captions, as kohya's ``process_caption``: ``caption_dropout_rate`` empties the whole caption; otherwise, with
``shuffle_caption`` or ``caption_tag_dropout_rate``, the caption is split at ``caption_separator`` into tags, the
first ``keep_tokens`` stay in front, the others are shuffled and each dropped with ``caption_tag_dropout_rate``, and
the tags are joined with ``", "``.

Images: with ``enable_bucket`` each image goes to a kohya bucket (:mod:`ldm.data.buckets`), is resized to cover it
and cropped (centred, or random with ``random_crop``); without, to a ``resolution`` square the same way. Batches must
then come from one bucket at a time: ``DataModuleFromConfig`` sees :meth:`KohyaFolder.bucket_keys` and draws the
training batches with a :class:`~ldm.data.buckets.BucketBatchSampler`.

``cache_latents``: the images are encoded once by the model's first stage before training (:mod:`ldm.data.latent_cache`;
main.py does it at the start of fitting) and items carry the stored encoding instead of pixels. A cached latent
fixes the crop, so ``random_crop`` is refused; ``flip_p`` is kept by caching each image flipped too (as kohya does):
flipping a latent is not the latent of the flipped image, since the VAE is not mirror-symmetric, so the flipped
image is encoded in its own right, at twice the caching cost.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from ldm.data import latent_cache
from ldm.data.base import INTERPOLATIONS
from ldm.data.buckets import Bucketer, Size, cover, crop_box
from ldm.data.latent_cache import Encoder, LatentCache, Placement
from ldm.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
REPEATS_NAME = re.compile(r"^(\d+)_(.*)$")
DEFAULT_CACHE = ".latent-cache"


@dataclass(frozen=True)
class Record:
    """One image file: its ``caption`` (before processing), ``size`` (width, height) and ``repeats`` per epoch."""

    path: Path
    caption: str
    size: Size
    repeats: int


@dataclass(frozen=True)
class CaptionRules:
    """kohya's caption options (see the module docstring)."""

    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_separator: str = ","
    caption_dropout_rate: float = 0.0
    caption_tag_dropout_rate: float = 0.0

    def __post_init__(self) -> None:
        for name in ("caption_dropout_rate", "caption_tag_dropout_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UserError(f"{name} must be in [0, 1], got {getattr(self, name)}.")
        if self.keep_tokens < 0:
            raise UserError(f"keep_tokens must be 0 or more, got {self.keep_tokens}.")
        if not self.caption_separator:
            raise UserError("caption_separator must not be empty (kohya's default is ',').")

    def apply(self, caption: str, generator: torch.Generator | None = None) -> str:
        """The caption to train on this time; random choices from ``generator`` (torch's global one by default)."""
        if self.caption_dropout_rate > 0 and float(torch.rand((), generator=generator)) < self.caption_dropout_rate:
            return ""
        if not (self.shuffle_caption or self.caption_tag_dropout_rate > 0):
            return caption
        tags = [tag.strip() for tag in caption.strip().split(self.caption_separator)]
        fixed, flexible = tags[: self.keep_tokens], tags[self.keep_tokens :]
        if self.shuffle_caption:
            flexible = [flexible[i] for i in torch.randperm(len(flexible), generator=generator).tolist()]
        if self.caption_tag_dropout_rate > 0:
            keep = torch.rand(len(flexible), generator=generator) >= self.caption_tag_dropout_rate
            flexible = [tag for tag, kept in zip(flexible, keep.tolist(), strict=True) if kept]
        return ", ".join(fixed + flexible)


def subfolders(root: Path) -> list[tuple[Path, int, str | None]]:
    """``(folder, repeats, folder caption)`` of ``root``'s image folders: itself (1, None) when it holds images,
    and every ``N_words`` subfolder."""
    if not root.is_dir():
        raise UserError(f"image folder '{root}' does not exist; give the folder of training images.")
    found = []
    if any(p.suffix.lower() in IMAGE_EXTENSIONS for p in root.iterdir() if p.is_file()):
        found.append((root, 1, None))
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        match = REPEATS_NAME.match(folder.name)
        if match is None:
            raise UserError(
                f"folder '{folder}' is not named N_words (kohya's layout, e.g. '10_sks dog': 10 repeats, caption "
                "'sks dog'); rename it, or move it out of the training folder."
            )
        repeats = int(match.group(1))
        if repeats < 1:
            raise UserError(f"folder '{folder}' asks for {repeats} repeats; use 1 or more.")
        found.append((folder, repeats, match.group(2).strip() or None))
    return found


def read_caption(path: Path) -> str:
    """The first line of a caption file, which must be non-empty UTF-8 text."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"caption file '{path}' is not UTF-8 text ({err.reason} at byte {err.start}).") from err
    if "\0" in text:
        raise UserError(f"caption file '{path}' is not text (it holds NUL bytes); replace it with the caption.")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise UserError(f"caption file '{path}' is empty; write the caption in it, or delete it.")
    return lines[0]


def image_size(path: Path) -> Size:
    """``(width, height)`` from the header; UserError naming the file when it is not a readable image."""
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, Image.DecompressionBombError) as err:  # UnidentifiedImageError is an OSError
        raise UserError(f"'{path}' is not a readable image ({err}); remove it or replace it.") from err


def find_records(
    root: Path, caption_extension: str, default_caption: str | None, max_images: int | None = None
) -> list[Record]:
    """Every image of ``root`` (see the module docstring), in name order within each folder."""
    records = []
    for folder, repeats, folder_caption in subfolders(root):
        images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        for path in images:
            size = image_size(path)
            caption_file = path.with_suffix(caption_extension)
            if caption_file.is_file():
                caption = read_caption(caption_file)
            elif folder_caption is not None or default_caption is not None:
                caption = folder_caption if folder_caption is not None else default_caption
            else:
                raise UserError(
                    f"image '{path}' has no caption file '{caption_file.name}'; add one, name its folder "
                    "N_caption (e.g. '1_sks dog'), or set default_caption."
                )
            records.append(Record(path, caption, size, repeats))
    if max_images is not None:
        records = records[:max_images]
    if not records:
        raise UserError(f"image folder '{root}' has no images ({', '.join(IMAGE_EXTENSIONS)}); add some.")
    return records


class KohyaFolder(Dataset):
    """A caption folder in kohya's layout (see the module docstring): one item per image and repeat.

    Items: ``{image_key: float32 (H, W, 3) in [-1, 1], caption_key: str}`` with (W, H) the item's bucket (or
    ``resolution`` square without buckets); with ``cache_latents``, the cached encoding
    (:data:`~ldm.data.latent_cache.MOMENTS_KEY`: (2C, H/f, W/f)) instead of the image. ``max_images`` keeps the first
    images only (prior preservation's ``num_class_images``). ``size_conditioning`` (for SDXL) adds kohya's
    ``original_size_as_tuple``, ``crop_coords_top_left`` and ``target_size_as_tuple`` (:meth:`size_entries`).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        resolution: int = 512,
        enable_bucket: bool = True,
        min_bucket_reso: int = 256,
        max_bucket_reso: int = 1024,
        bucket_reso_steps: int = 64,
        bucket_no_upscale: bool = False,
        random_crop: bool = False,
        flip_p: float = 0.0,
        interpolation: str = "bicubic",
        caption_extension: str = ".txt",
        default_caption: str | None = None,
        shuffle_caption: bool = False,
        keep_tokens: int = 0,
        caption_separator: str = ",",
        caption_dropout_rate: float = 0.0,
        caption_tag_dropout_rate: float = 0.0,
        image_key: str = "jpg",
        caption_key: str = "txt",
        cache_latents: bool = False,
        cache_dir: str | os.PathLike | None = None,
        max_images: int | None = None,
        size_conditioning: bool = False,
    ) -> None:
        if interpolation not in INTERPOLATIONS:
            raise UserError(f"interpolation '{interpolation}' is not one of {sorted(INTERPOLATIONS)}.")
        if not 0.0 <= flip_p <= 1.0:
            raise UserError(f"flip_p must be in [0, 1], got {flip_p}.")
        if not caption_extension.startswith("."):
            raise UserError(f"caption_extension '{caption_extension}' must start with a dot, e.g. '.txt'.")
        if cache_latents and random_crop:
            raise UserError(
                "random_crop cannot be used with cache_latents: a cached latent fixes the crop. Set random_crop: "
                "false, or cache_latents: false."
            )
        self.root = Path(root)
        self.rules = CaptionRules(
            shuffle_caption, keep_tokens, caption_separator, caption_dropout_rate, caption_tag_dropout_rate
        )
        self.records = find_records(self.root, caption_extension, default_caption, max_images)
        if enable_bucket:
            bucketer = Bucketer(resolution, min_bucket_reso, max_bucket_reso, bucket_reso_steps, bucket_no_upscale)
            self.placements = [bucketer.assign(*r.size) for r in self.records]
        else:
            if resolution < 1:
                raise UserError(f"resolution must be a positive number of pixels, got {resolution}.")
            self.placements = [cover(*r.size, (resolution, resolution)) for r in self.records]
        self.index = [i for i, record in enumerate(self.records) for _ in range(record.repeats)]
        self.random_crop = random_crop
        self.flip_p = flip_p
        self.interpolation = interpolation
        self.image_key = image_key
        self.caption_key = caption_key
        self.size_conditioning = size_conditioning
        folder = cache_dir if cache_dir is not None else self.root / DEFAULT_CACHE
        self.cache = LatentCache(folder) if cache_latents else None
        self.latent_keys: dict[Placement, str] | None = None

    def __len__(self) -> int:
        return len(self.index)

    @property
    def caches_latents(self) -> bool:
        """Whether items carry cached latents (``cache_latents``), which :meth:`prepare_latents` must make first."""
        return self.cache is not None

    def bucket_keys(self) -> list[Size]:
        """The bucket (width, height) of every item, for a :class:`~ldm.data.buckets.BucketBatchSampler`."""
        return [self.placements[i].bucket for i in self.index]

    def placement(self, record: int, bucket: Size | None = None, flip: bool = False) -> Placement:
        """Where image ``record`` goes, in its own bucket or in ``bucket``; the crop is random with ``random_crop``."""
        width, height = self.records[record].size
        placed = self.placements[record] if bucket is None else cover(width, height, bucket)
        corner = crop_box(placed.resized, placed.bucket, self.random_crop)
        return Placement(
            str(self.records[record].path), placed.resized, placed.bucket, corner, flip, self.interpolation
        )

    def example(self, record: int, bucket: Size | None = None) -> dict[str, Any]:
        """An item for image ``record`` placed in ``bucket`` (default: its own), flipped with ``flip_p``."""
        flip = self.flip_p > 0 and float(torch.rand(())) < self.flip_p
        placement = self.placement(record, bucket, flip)
        caption = self.rules.apply(self.records[record].caption)
        sizes = self.size_entries(record, placement) if self.size_conditioning else {}
        if self.cache is None:
            return {self.image_key: placement.pixels(), self.caption_key: caption, **sizes}
        if self.latent_keys is None:
            raise UserError(
                "cache_latents is on but the latents are not cached yet: call prepare_latents with the model's "
                "encoder first (main.py does it when training starts)."
            )
        kind, tensor = latent_cache.load_entry(self.cache, placement, self.latent_keys[placement])
        return {kind: tensor, self.caption_key: caption, **sizes}

    def size_entries(self, record: int, placement: Placement) -> dict[str, torch.Tensor]:
        """SDXL's micro-conditioning of an item, as kohya gives it: the image's own (height, width), the crop's
        (top, left) in the resized image (measured from the right edge when flipped), the bucket's (height, width)."""
        width, height = self.records[record].size
        left, top = placement.crop
        if placement.flip:
            left = placement.resized[0] - placement.bucket[0] - left
        return {
            "original_size_as_tuple": torch.tensor([height, width]),
            "crop_coords_top_left": torch.tensor([top, left]),
            "target_size_as_tuple": torch.tensor([placement.bucket[1], placement.bucket[0]]),
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.example(self.index[index])

    def cached_placements(self, pairs: Sequence[tuple[int, Size | None]] | None = None) -> list[Placement]:
        """The placements to cache for ``(record, bucket)`` pairs (default: every image in its own bucket), each
        also flipped when ``flip_p > 0``."""
        pairs = [(i, None) for i in range(len(self.records))] if pairs is None else pairs
        flips = (False, True) if self.flip_p > 0 else (False,)
        return list(dict.fromkeys(self.placement(i, b, f) for i, b in pairs for f in flips))

    def prepare_latents(
        self,
        encode: Encoder,
        encoder_id: str,
        rank: int = 0,
        world_size: int = 1,
        barrier: Callable[[], None] | None = None,
        pairs: Sequence[tuple[int, Size | None]] | None = None,
    ) -> int:
        """Cache the latents (a no-op without ``cache_latents``); returns how many this rank encoded."""
        if self.cache is None:
            return 0
        self.latent_keys, built = latent_cache.prepare(
            self.cache, self.cached_placements(pairs), encode, encoder_id, rank, world_size, barrier
        )
        return built
