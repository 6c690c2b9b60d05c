"""Captioned images streamed from WebDataset tar shards, the format LAION-scale training data comes in.

A shard is a tar file of samples; the files of one sample share a basename: ``000123.jpg`` (or ``.jpeg``, ``.png``,
``.webp``) with ``000123.txt`` (the caption) and optionally ``000123.json`` (used for the caption, key ``caption``,
when there is no ``.txt``). Shards are read in sequence with the ``webdataset`` package, so the data never has to fit
on one disk: ``urls`` may be local paths or ``pipe:`` / http URLs, with brace ranges (``data/{000000..000999}.tar``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset

from ldm.data.base import ImageTransform
from ldm.errors import UserError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


class CaptionShards(IterableDataset):
    """Samples ``{image_key: float32 (size, size, 3) in [-1, 1], caption_key: str}`` from WebDataset shards.

    Shards are split across processes (DDP ranks, nodes) and DataLoader workers. ``shuffle`` is the size of the
    sample shuffle buffer (0: keep shard order; shards are then read in order too). For training on many processes
    use ``resampled: true`` with ``epoch_length``: each worker then draws shards at random without end and an epoch
    is ``epoch_length`` samples per worker, so every rank sees the same number of batches. ``seed`` fixes the shuffle
    order. Broken samples (undecodable images, no caption) are skipped with a warning, as large scraped datasets
    always have some.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        size: int | None = 512,
        random_crop: bool = False,
        flip_p: float = 0.0,
        interpolation: str = "bicubic",
        image_key: str = "jpg",
        caption_key: str = "txt",
        shuffle: int = 1000,
        resampled: bool = False,
        epoch_length: int | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        urls = urls if isinstance(urls, str) else list(urls)
        skip = wds.warn_and_continue
        self.transform = ImageTransform(size, random_crop, flip_p, interpolation)
        self.image_key = image_key
        self.caption_key = caption_key
        pipeline = wds.WebDataset(
            urls,
            resampled=resampled,
            shardshuffle=False if resampled or shuffle == 0 else 100,
            nodesplitter=wds.split_by_node,
            handler=skip,
            seed=seed,
        )
        if shuffle > 0:
            pipeline = pipeline.shuffle(shuffle)
        pipeline = pipeline.decode("pil", handler=skip).map(self.to_item, handler=skip)
        if epoch_length is not None:
            pipeline = pipeline.with_epoch(epoch_length)
        self.pipeline = pipeline

    def to_item(self, sample: Mapping[str, Any]) -> dict[str, Any]:
        """A decoded WebDataset sample (``{"__key__": ..., "jpg": PIL image, "txt": str, ...}``) -> a training item."""
        image = next((sample[ext] for ext in IMAGE_EXTENSIONS if isinstance(sample.get(ext), Image.Image)), None)
        if image is None:
            raise UserError(f"sample '{sample.get('__key__')}' has no image ({', '.join(IMAGE_EXTENSIONS)}).")
        caption = sample.get("txt")
        if caption is None and isinstance(sample.get("json"), Mapping):
            caption = sample["json"].get("caption")
        if caption is None:
            raise UserError(f"sample '{sample.get('__key__')}' has no caption (.txt, or 'caption' in .json).")
        return {self.image_key: self.transform(image), self.caption_key: str(caption).strip()}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.pipeline)
