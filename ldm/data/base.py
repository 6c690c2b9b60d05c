"""``DataModuleFromConfig`` (the ``data:`` section of training configs) and the image preprocessing datasets share."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from functools import partial
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, default_collate

from ldm.data.buckets import BatchedDataset, BucketBatchSampler
from ldm.errors import UserError
from ldm.util import ConfigError, instantiate_from_config

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}

SPLITS = ("train", "validation", "test", "predict")


class ImageTransform:
    """PIL image -> float32 ``(size, size, 3)`` in [-1, 1], the layout the models' ``get_input`` expects.

    The shorter side is resized to ``size`` and a square is cropped (centred, or at a random place with
    ``random_crop``), then flipped left-right with probability ``flip_p``. ``size=None`` keeps the image as it is
    (all images must then have one size to be batched). Random choices use torch's generator, which PyTorch seeds
    differently in every DataLoader worker.
    """

    def __init__(
        self, size: int | None = None, random_crop: bool = False, flip_p: float = 0.0, interpolation: str = "bicubic"
    ) -> None:
        if interpolation not in INTERPOLATIONS:
            raise UserError(f"interpolation '{interpolation}' is not one of {sorted(INTERPOLATIONS)}.")
        if not 0.0 <= flip_p <= 1.0:
            raise UserError(f"flip_p must be in [0, 1], got {flip_p}.")
        if size is not None and size < 1:
            raise UserError(f"size must be a positive number of pixels, got {size}.")
        self.size = size
        self.random_crop = random_crop
        self.flip_p = flip_p
        self.interpolation = INTERPOLATIONS[interpolation]

    def __call__(self, image: Image.Image) -> np.ndarray:
        image = image.convert("RGB")
        if self.size is not None:
            width, height = image.size
            scale = self.size / min(width, height)
            # Rounding up keeps the shorter side at least ``size`` whatever the aspect ratio.
            new_size = (max(self.size, round(width * scale)), max(self.size, round(height * scale)))
            if new_size != image.size:
                image = image.resize(new_size, resample=self.interpolation)
            left_room, top_room = new_size[0] - self.size, new_size[1] - self.size
            if self.random_crop:
                left = int(torch.randint(left_room + 1, ()))
                top = int(torch.randint(top_room + 1, ()))
            else:
                left, top = left_room // 2, top_room // 2
            image = image.crop((left, top, left + self.size, top + self.size))
        if self.flip_p > 0 and float(torch.rand(())) < self.flip_p:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.asarray(image, dtype=np.float32) / 127.5 - 1.0


class WrappedDataset(Dataset):
    """A torch ``Dataset`` over any object with ``__len__`` and ``__getitem__`` (``wrap: true`` in configs)."""

    def __init__(self, dataset: Any) -> None:
        self.data = dataset

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Any:
        return self.data[index]


class ResumableSampler(DistributedSampler):
    """A ``DistributedSampler`` (epoch ``e`` in an order drawn from ``seed + e``, one share per rank) whose next pass
    can start ``start`` indices in, where a resumed epoch left off."""

    start = 0

    def __iter__(self) -> Iterator[int]:
        start, self.start = self.start, 0
        return iter(list(super().__iter__())[start:])


class ResumableLoader(DataLoader):
    """A DataLoader over a :class:`ResumableSampler` that Lightning saves in checkpoints (its stateful-loader
    protocol) as the batches served in the current epoch; a resumed run then skips those batches by their indices,
    without loading them. Lightning sets the sampler's epoch, so the order of every epoch is the same in any run.
    """

    served = 0

    @property
    def indices_per_batch(self) -> int:
        """What the sampler's ``start`` counts per batch: indices, or 1 where it yields whole batches (buckets)."""
        return self.batch_size or 1

    def __iter__(self) -> Iterator[Any]:
        # A generator: the sampler is read at the first batch, after Lightning has set its epoch.
        self.served = self.sampler.start // self.indices_per_batch
        for batch in super().__iter__():
            self.served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"batches": self.served}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        batches = int(state["batches"])
        # A checkpoint from the end of an epoch resumes at the start of the next one.
        self.sampler.start = batches * self.indices_per_batch if batches < len(self) else 0


def global_seed() -> int:
    """The ``--seed`` given to ``seed_everything``, which Lightning also seeds its own distributed samplers with."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


class DataModuleFromConfig(pl.LightningDataModule):
    """Datasets built from ``target``/``params`` nodes, served in batches of ``batch_size``.

    Each of ``train``, ``validation``, ``test`` and ``predict`` is a dataset config; only the stages that have one
    get a loader, so Lightning skips the others. Map-style training data is shuffled, by a :class:`ResumableLoader`:
    a run resumed mid-epoch goes on with the batches the interrupted one would have drawn. Iterable datasets
    (WebDataset shards) shuffle themselves and split their shards across processes and workers. No loader draws from
    torch's global generator, so loading data leaves training's random numbers alone. ``num_workers`` defaults to
    ``2 * batch_size`` as in CompVis. ``use_worker_init_fn`` is accepted for CompVis configs only: PyTorch now seeds
    numpy in every worker, and the iterable datasets here split their own shards.
    """

    def __init__(
        self,
        batch_size: int,
        train: Mapping[str, Any] | None = None,
        validation: Mapping[str, Any] | None = None,
        test: Mapping[str, Any] | None = None,
        predict: Mapping[str, Any] | None = None,
        wrap: bool = False,
        num_workers: int | None = None,
        shuffle_test_loader: bool = False,
        use_worker_init_fn: bool = False,
        shuffle_val_dataloader: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {batch_size}.")
        self.batch_size = batch_size
        self.num_workers = num_workers if num_workers is not None else batch_size * 2
        self.wrap = wrap
        self.use_worker_init_fn = use_worker_init_fn
        self.shuffle = {"train": True, "validation": shuffle_val_dataloader, "test": shuffle_test_loader}
        configs = {"train": train, "validation": validation, "test": test, "predict": predict}
        self.dataset_configs = {split: config for split, config in configs.items() if config is not None}
        self.datasets: dict[str, Dataset] = {}
        # Lightning runs a stage only when the datamodule overrides that stage's loader method.
        loaders = {
            "train": "train_dataloader",
            "validation": "val_dataloader",
            "test": "test_dataloader",
            "predict": "predict_dataloader",
        }
        for split in self.dataset_configs:
            setattr(self, loaders[split], partial(self.loader, split))

    def setup(self, stage: str | None = None) -> None:
        """Build every configured dataset once (Lightning calls this per stage; main.py calls it early to fail fast)."""
        for split, config in self.dataset_configs.items():
            if split in self.datasets:
                continue
            path = f"data.params.{split}"
            try:
                dataset = instantiate_from_config(config, path=path)
            except ConfigError:
                raise
            except (OSError, ValueError, TypeError) as err:
                raise ConfigError(f"{path}: {err}") from err
            self.datasets[split] = WrappedDataset(dataset) if self.wrap else dataset

    def loader(self, split: str) -> DataLoader:
        """The DataLoader of ``split`` (one of ``train``, ``validation``, ``test``, ``predict``)."""
        self.setup()
        dataset = self.datasets[split]
        settings = {
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0 and split != "predict",
            # Without a generator of its own, every pass would take its worker seeds from the global one.
            "generator": torch.Generator().manual_seed(global_seed()),
        }
        # Datasets whose items are not single examples (prior-preservation pairs) say how to batch them.
        settings["collate_fn"] = getattr(dataset, "collate", default_collate)
        if isinstance(dataset, IterableDataset):
            return DataLoader(dataset, **settings)
        trainer = self.trainer
        ranks = {"num_replicas": trainer.world_size if trainer else 1, "rank": trainer.global_rank if trainer else 0}
        if callable(getattr(dataset, "bucket_keys", None)):
            # Aspect-ratio buckets (ldm.data.buckets): every batch from one bucket, so its images share a size.
            shuffle = self.shuffle.get(split, False)
            buckets = BucketBatchSampler(
                dataset.bucket_keys(), self.batch_size, seed=global_seed(), shuffle=shuffle, **ranks
            )
            batched = BatchedDataset(dataset, settings.pop("collate_fn"))
            kind = ResumableLoader if split == "train" else DataLoader
            return kind(batched, sampler=buckets, **(settings | {"batch_size": None}))
        if split == "train":
            sampler = ResumableSampler(dataset, seed=global_seed(), **ranks)
            return ResumableLoader(dataset, sampler=sampler, **settings)
        return DataLoader(dataset, shuffle=self.shuffle.get(split, False), **settings)
