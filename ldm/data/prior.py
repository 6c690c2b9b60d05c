"""DreamBooth-style prior preservation: every training example of the subject (an *instance* image) comes with an
example of its class (``class_data_root``, captioned ``class_prompt``), and the loss is
``mean(instance losses) + prior_loss_weight * mean(class losses)`` (``model.params.prior_loss_weight``, 1.0 by
default as in DreamBooth), so that fine-tuning on a few images of one dog does not make every dog that dog.

Batches hold the instance examples first, then as many class examples, with :data:`CLASS_KEY` (B,) True for the
class ones; the model's loss reads it (:func:`class_mask`). Each class image is placed in its instance partner's
bucket (resized to cover it and centre-cropped), so a batch still has one size. Class images are not generated
here: the folder must hold them (A1111 and diffusers make the missing ones with the model; make them first with
``scripts/txt2img.py``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset, default_collate

from ldm.data.buckets import Size
from ldm.data.captions import KohyaFolder
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
)


def class_mask(batch: Mapping[str, Any]) -> torch.Tensor | None:
    """(B,) bool, True for the class examples of a prior-preservation batch; None for any other batch."""
    return batch.get(CLASS_KEY)


class PriorPreservation(Dataset):
    """Instance examples from a :class:`~ldm.data.captions.KohyaFolder` built with ``instance`` (its params),
    each paired with a class example from ``class_data_root``.

    The class folder is read like the instance one (captions from caption files, else ``class_prompt``), with the
    instance folder's image options; ``num_class_images`` (default: all) is how many of its images are used, and
    the folder must have that many. The dataset is as long as the larger of the two sets (as DreamBooth's): item
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
    ) -> None:
        if not class_prompt:
            raise UserError("class_prompt is empty; give the class the subject belongs to, e.g. 'a photo of a dog'.")
        self.instance = KohyaFolder(**instance)
        options = {name: instance[name] for name in IMAGE_OPTIONS if name in instance}
        self.classes = KohyaFolder(
            class_data_root,
            default_caption=class_prompt,
            max_images=num_class_images,
            cache_dir=class_cache_dir,
            **options,
        )
        found = len(self.classes.records)
        if num_class_images is not None and found < num_class_images:
            raise UserError(
                f"class_data_root '{class_data_root}' has {found} images but num_class_images is "
                f"{num_class_images}. Generating class images is not implemented here: make them first, e.g. "
                f"scripts/txt2img.py --prompt '{class_prompt}' --outdir <folder>, and put them in class_data_root."
            )

    def __len__(self) -> int:
        return max(len(self.instance), len(self.classes.records))

    @property
    def caches_latents(self) -> bool:
        return self.instance.caches_latents

    def _pair(self, index: int) -> tuple[int, int]:
        """(instance item, class image) of item ``index``."""
        return index % len(self.instance), index % len(self.classes.records)

    def bucket_keys(self) -> list[Size]:
        """Every item's bucket: its instance example's."""
        buckets = self.instance.bucket_keys()
        return [buckets[self._pair(i)[0]] for i in range(len(self))]

    def __getitem__(self, index: int) -> tuple[dict[str, Any], dict[str, Any]]:
        item, class_image = self._pair(index)
        record = self.instance.index[item]
        return self.instance.example(record), self.classes.example(class_image, self.instance.placements[record].bucket)

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
        return built + self.classes.prepare_latents(encode, encoder_id, rank, world_size, barrier, pairs)
