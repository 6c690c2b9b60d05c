"""DreamBooth-style prior preservation: every training example of the subject (an *instance* image) comes with an
example of its class (``class_data_root``, captioned ``class_prompt``), and the loss is
``mean(instance losses) + prior_loss_weight * mean(class losses)`` (``model.params.prior_loss_weight``, 1.0 by
default as in DreamBooth), so that fine-tuning on a few images of one dog does not make every dog that dog.

Batches hold the instance examples first, then as many class examples, with :data:`CLASS_KEY` (B,) True for the
class ones; the model's loss reads it (:func:`class_mask`). Each class image is placed in its instance partner's
bucket (resized to cover it and centre-cropped), so a batch still has one size. Where ``class_data_root`` holds
fewer than ``num_class_images`` images, the missing ones are generated with the model itself from ``class_prompt``
when training starts, as diffusers' DreamBooth script does (:mod:`ldm.data.class_images`; main.py runs it before the
latents are cached), and saved into the folder with their infotext, so a later run finds them there.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, default_collate

from ldm.data.buckets import Size
from ldm.data.captions import IMAGE_EXTENSIONS, KohyaFolder, subfolders
from ldm.data.latent_cache import Encoder
from ldm.errors import UserError

CLASS_KEY = "is_class_image"
# Options that shape images (not captions), which the class images take from the instance folder's.
IMAGE_OPTIONS = (
    "resolution",
    "enable_bucket",
    "min_bucket_reso",
    "max_bucket_reso",
    "bucket_reso_steps",
    "bucket_no_upscale",
    "flip_p",
    "interpolation",
    "caption_extension",
    "image_key",
    "caption_key",
    "cache_latents",
    "size_conditioning",
)


def class_mask(batch: Mapping[str, Any]) -> torch.Tensor | None:
    """(B,) bool, True for the class examples of a prior-preservation batch; None for any other batch."""
    return batch.get(CLASS_KEY)


class PriorPreservation(Dataset):
    """Instance examples from a :class:`~ldm.data.captions.KohyaFolder` built with ``instance`` (its params),
    each paired with a class example from ``class_data_root``.

    The class folder is read like the instance one (captions from caption files, else ``class_prompt``), with the
    instance folder's image options; ``num_class_images`` (default: all) is how many of its images are used. A folder
    with fewer (or none, or no folder yet) is filled up before training (:attr:`missing_class_images`,
    :func:`ldm.data.class_images.fill_class_folder`) with images generated from ``class_prompt`` with
    ``class_sampling`` (:class:`~ldm.request.GenerationRequest` settings such as ``steps``, ``sampler``,
    ``scale``, ``negative_prompt``; default 30 steps at the instance ``resolution``), unless
    ``generate_class_images`` is off. The dataset is as long as the larger of the two sets (as DreamBooth's): item
    ``i`` pairs instance item ``i mod n_instance`` with class image ``i mod n_class``. Items are
    ``(instance, class)`` pairs; :meth:`collate` batches them.
    """

    def __init__(
        self,
        instance: Mapping[str, Any],
        class_data_root: str | os.PathLike,
        class_prompt: str,
        num_class_images: int | None = None,
        class_cache_dir: str | os.PathLike | None = None,
        generate_class_images: bool = True,
        class_sampling: Mapping[str, Any] | None = None,
    ) -> None:
        if not class_prompt:
            raise UserError("class_prompt is empty; give the class the subject belongs to, e.g. 'a photo of a dog'.")
        if num_class_images is not None and num_class_images < 1:
            raise UserError(f"num_class_images must be 1 or more, got {num_class_images}.")
        self.instance = KohyaFolder(**instance)
        self.class_data_root = Path(class_data_root)
        self.class_prompt = class_prompt
        self.class_sampling = dict(class_sampling or {})
        self.resolution = int(instance.get("resolution", 512))
        found = count_images(self.class_data_root)
        self.num_class_images = num_class_images if num_class_images is not None else found
        if found < self.num_class_images and not generate_class_images:
            raise UserError(
                f"class_data_root '{class_data_root}' has {found} images but num_class_images is {num_class_images}; "
                "set generate_class_images: true to make the rest with the model, or add images to the folder."
            )
        self._class_options = {name: instance[name] for name in IMAGE_OPTIONS if name in instance}
        self._class_cache_dir = class_cache_dir
        self.classes: KohyaFolder | None = None
        if found >= self.num_class_images:
            self.load_class_images()

    @property
    def missing_class_images(self) -> int:
        """How many class images the folder lacks (0 once :meth:`load_class_images` has read it)."""
        return 0 if self.classes is not None else self.num_class_images - count_images(self.class_data_root)

    def load_class_images(self) -> None:
        """Read the class folder, which must now hold ``num_class_images`` images."""
        self.classes = KohyaFolder(
            self.class_data_root,
            default_caption=self.class_prompt,
            max_images=self.num_class_images,
            cache_dir=self._class_cache_dir,
            **self._class_options,
        )
        if len(self.classes.records) < self.num_class_images:
            raise UserError(
                f"class_data_root '{self.class_data_root}' has {len(self.classes.records)} images but "
                f"num_class_images is {self.num_class_images}; add images to the folder or lower num_class_images."
            )

    def _class_folder(self) -> KohyaFolder:
        if self.classes is None:
            raise UserError(
                f"class_data_root '{self.class_data_root}' lacks {self.missing_class_images} class images: they are "
                "generated when training starts (main.py), or call ldm.data.class_images.fill_class_folder first."
            )
        return self.classes

    def __len__(self) -> int:
        return max(len(self.instance), self.num_class_images)

    @property
    def caches_latents(self) -> bool:
        return self.instance.caches_latents

    def _pair(self, index: int) -> tuple[int, int]:
        """(instance item, class image) of item ``index``."""
        return index % len(self.instance), index % self.num_class_images

    def bucket_keys(self) -> list[Size]:
        """Every item's bucket: its instance example's."""
        buckets = self.instance.bucket_keys()
        return [buckets[self._pair(i)[0]] for i in range(len(self))]

    def __getitem__(self, index: int) -> tuple[dict[str, Any], dict[str, Any]]:
        item, class_image = self._pair(index)
        record = self.instance.index[item]
        bucket = self.instance.placements[record].bucket
        return self.instance.example(record), self._class_folder().example(class_image, bucket)

    @staticmethod
    def collate(pairs: Sequence[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, Any]:
        """A batch of ``2 * len(pairs)`` examples, instances first, with :data:`CLASS_KEY`."""
        batch = default_collate([pair[0] for pair in pairs] + [pair[1] for pair in pairs])
        batch[CLASS_KEY] = torch.arange(2 * len(pairs)) >= len(pairs)
        return batch

    def prepare_latents(
        self,
        encode: Encoder,
        encoder_id: str,
        rank: int = 0,
        world_size: int = 1,
        barrier: Callable[[], None] | None = None,
    ) -> int:
        """Cache both sets' latents (with ``cache_latents``), the class images in every bucket they are paired
        into; returns how many this rank encoded."""
        built = self.instance.prepare_latents(encode, encoder_id, rank, world_size, barrier)
        pairs = []
        for index in range(len(self)):
            item, class_image = self._pair(index)
            pairs.append((class_image, self.instance.placements[self.instance.index[item]].bucket))
        return built + self._class_folder().prepare_latents(encode, encoder_id, rank, world_size, barrier, pairs)


def count_images(root: Path) -> int:
    """The images of a caption folder in kohya's layout (0 where the folder does not exist)."""
    if not root.is_dir():
        return 0
    return sum(
        1
        for folder, _, _ in subfolders(root)
        for path in folder.iterdir()
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS
    )
