"""Aspect-ratio bucketing with kohya-ss sd-scripts' rules, and a batch sampler that draws each batch from one bucket.

Buckets (``make_buckets``), as kohya's ``make_bucket_resolutions``: sides are multiples of ``reso_steps`` (64); the
square ``floor(resolution / step) * step`` is always one; then for every width ``w`` from ``min_reso`` to
``max_reso`` in steps, the tallest height ``h = min(max_reso, floor(resolution^2 / w / step) * step)`` is a bucket
(and its transpose) when ``h >= min_reso``. So no bucket has more pixels than ``resolution^2``.

Assignment (``Bucketer.assign``), as kohya's ``BucketManager.select_bucket``: an image whose exact size is a bucket
keeps it; otherwise it takes the bucket with the nearest aspect ratio (the first of the sorted list on ties), is
resized to cover it (the side whose ratio is tighter matches, ``int(x * scale + 0.5)``) and the overflow is cropped.
With ``no_upscale`` there is no bucket list: an image larger than ``resolution^2`` is scaled down to that area (its
width or height rounded to the step, whichever keeps the aspect ratio better), and the bucket is the resized size
rounded down to the step, so images are only ever shrunk and cropped by less than a step.

All sizes are ``(width, height)`` as in kohya and PIL.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, DistributedSampler

from ldm.errors import UserError

Size = tuple[int, int]


def make_buckets(resolution: int, min_reso: int = 256, max_reso: int = 1024, reso_steps: int = 64) -> list[Size]:
    """The sorted ``(width, height)`` buckets for a ``resolution x resolution`` pixel budget (kohya's rules)."""
    check_bucket_settings(resolution, min_reso, max_reso, reso_steps)
    area = resolution * resolution
    square = int(math.sqrt(area) // reso_steps) * reso_steps
    buckets = {(square, square)}
    for width in range(min_reso, max_reso + 1, reso_steps):
        height = min(max_reso, int(area // width // reso_steps) * reso_steps)
        if height >= min_reso:
            buckets.update({(width, height), (height, width)})
    return sorted(buckets)


def check_bucket_settings(resolution: int, min_reso: int, max_reso: int, reso_steps: int) -> None:
    """UserError unless the settings make buckets: positive step, ``min <= resolution <= max``, sides step-aligned."""
    if reso_steps < 1:
        raise UserError(f"bucket_reso_steps must be a positive number of pixels, got {reso_steps}.")
    if not reso_steps <= min_reso <= resolution <= max_reso:
        raise UserError(
            f"buckets need bucket_reso_steps <= min_bucket_reso <= resolution <= max_bucket_reso, got {reso_steps}, "
            f"{min_reso}, {resolution}, {max_reso}; change the one out of order."
        )
    for name, value in (("min_bucket_reso", min_reso), ("max_bucket_reso", max_reso)):
        if value % reso_steps:
            raise UserError(f"{name} {value} is not a multiple of bucket_reso_steps {reso_steps}.")


def round_to_steps(x: float, steps: int) -> int:
    """kohya's ``round_to_steps``: round half up, then down to a multiple of ``steps``."""
    value = int(x + 0.5)
    return value - value % steps


@dataclass(frozen=True)
class Placement:
    """Where an image goes: its ``bucket`` ``(width, height)``, the ``resized`` size it is scaled to before
    cropping (each side at least the bucket's), and the aspect-ratio error ``bucket ratio - image ratio``."""

    bucket: Size
    resized: Size
    ar_error: float


def cover(width: int, height: int, bucket: Size) -> Placement:
    """Place a ``width x height`` image in ``bucket``: scaled so that it covers the bucket (the side whose ratio is
    tighter matches, ``int(x * scale + 0.5)`` as kohya), the rest to be cropped."""
    ratio = width / height
    scale = bucket[1] / height if ratio > bucket[0] / bucket[1] else bucket[0] / width
    resized = (max(bucket[0], int(width * scale + 0.5)), max(bucket[1], int(height * scale + 0.5)))
    return Placement(bucket, resized, bucket[0] / bucket[1] - ratio)


class Bucketer:
    """Assigns images to buckets (see the module docstring). ``resolution`` is the side of the pixel budget."""

    def __init__(
        self,
        resolution: int,
        min_reso: int = 256,
        max_reso: int = 1024,
        reso_steps: int = 64,
        no_upscale: bool = False,
    ) -> None:
        check_bucket_settings(resolution, min_reso, max_reso, reso_steps)
        self.max_area = resolution * resolution
        self.reso_steps = reso_steps
        self.no_upscale = no_upscale
        self.buckets = [] if no_upscale else make_buckets(resolution, min_reso, max_reso, reso_steps)
        self.ratios = torch.tensor([w / h for w, h in self.buckets], dtype=torch.float64)

    def assign(self, width: int, height: int) -> Placement:
        """The bucket of an image of ``width x height`` pixels."""
        if width < 1 or height < 1:
            raise UserError(f"an image of {width}x{height} pixels cannot be bucketed.")
        ratio = width / height
        if self.no_upscale:
            return self._shrink_only(width, height, ratio)
        if (width, height) in self.buckets:
            bucket = (width, height)
        else:
            bucket = self.buckets[int((self.ratios - ratio).abs().argmin())]
        return cover(width, height, bucket)

    def _shrink_only(self, width: int, height: int, ratio: float) -> Placement:
        steps = self.reso_steps
        resized = (width, height)
        if width * height > self.max_area:
            new_width = math.sqrt(self.max_area * ratio)
            new_height = self.max_area / new_width
            by_width = round_to_steps(new_width, steps)
            by_height = round_to_steps(new_height, steps)
            width_error = abs(by_width / max(round_to_steps(by_width / ratio, steps), 1) - ratio)
            height_error = abs(round_to_steps(by_height * ratio, steps) / max(by_height, 1) - ratio)
            if width_error < height_error:
                resized = (by_width, int(by_width / ratio + 0.5))
            else:
                resized = (int(by_height * ratio + 0.5), by_height)
        bucket = (resized[0] - resized[0] % steps, resized[1] - resized[1] % steps)
        if min(bucket) < steps:
            raise UserError(
                f"an image of {width}x{height} pixels is smaller than one bucket step ({steps} px) on a side; "
                "remove it, or turn bucket_no_upscale off so that it is scaled up."
            )
        return Placement(bucket, resized, bucket[0] / bucket[1] - ratio)


def crop_box(resized: Size, bucket: Size, random_crop: bool, generator: torch.Generator | None = None) -> Size:
    """The ``(left, top)`` of the bucket-sized crop of an image resized to ``resized``: centred (kohya's
    ``trim_size // 2``), or uniform over the overflow with ``random_crop``."""
    room = (resized[0] - bucket[0], resized[1] - bucket[1])
    if min(room) < 0:
        raise ValueError(f"a {resized} image does not cover its bucket {bucket}.")
    if not random_crop:
        return room[0] // 2, room[1] // 2
    return tuple(int(torch.randint(r + 1, (), generator=generator)) for r in room)  # type: ignore[return-value]


class BucketBatchSampler(DistributedSampler):
    """Batches of dataset indices, each from a single bucket, for one rank of ``num_replicas``.

    ``buckets[i]`` is the bucket of index ``i`` (any hashable: ``(width, height)``). Every epoch, from a generator
    seeded with ``seed + epoch``, each bucket's indices are shuffled (with ``shuffle``) and cut into batches of
    ``batch_size`` (the last one of a bucket smaller, or dropped with ``drop_last``), the batches of all buckets are
    shuffled together, and rank ``r`` takes batches ``r, r + num_replicas, ...``. Every rank gets the same number of
    batches, as DDP needs: the list is padded by repeating its first batches (or, with ``drop_last``, cut) to a
    multiple of ``num_replicas``; without padding the ranks' shares are disjoint.

    Iterating yields lists of indices; a DataLoader takes it as its ``sampler`` with ``batch_size=None`` over a
    dataset that fetches whole batches (:class:`BatchedDataset`). It is a ``DistributedSampler`` so that Lightning
    sees the loader as already split across ranks and does not put its own sampler in. ``start`` batches are skipped
    on the next pass (a resumed epoch), as :class:`ldm.data.base.ResumableLoader` sets it.
    """

    start = 0

    def __init__(
        self,
        buckets: Sequence[Hashable],
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise UserError(f"batch_size must be at least 1, got {batch_size}.")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas}).")
        self.buckets = list(buckets)
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0

    def all_batches(self) -> list[list[int]]:
        """Every rank's batches of this epoch, before the split across ranks."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        groups: dict[Hashable, list[int]] = {}
        for index, bucket in enumerate(self.buckets):
            groups.setdefault(bucket, []).append(index)
        batches = []
        # Sorted buckets: the order of the groups, and so of the batches, does not depend on the dataset's order.
        for bucket in sorted(groups, key=repr):
            indices = groups[bucket]
            if self.shuffle:
                indices = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
            for begin in range(0, len(indices), self.batch_size):
                batch = indices[begin : begin + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        if self.drop_last:
            return batches[: len(batches) - len(batches) % self.num_replicas]
        padding = -len(batches) % self.num_replicas
        return batches + (batches * (padding // max(len(batches), 1) + 1))[:padding]

    def __iter__(self) -> Iterator[list[int]]:
        start, self.start = self.start, 0
        return iter(self.all_batches()[self.rank :: self.num_replicas][start:])

    def __len__(self) -> int:
        return len(self.all_batches()) // self.num_replicas


class BatchedDataset(Dataset):
    """A view of ``dataset`` indexed by lists of indices: ``view[[i, j]]`` is the collated batch of items ``i, j``
    (``collate`` of their list), for a DataLoader whose sampler yields whole batches."""

    def __init__(self, dataset: Dataset, collate: object) -> None:
        self.dataset = dataset
        self.collate = collate

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, indices: list[int]) -> object:
        return self.collate([self.dataset[i] for i in indices])  # type: ignore[operator]
