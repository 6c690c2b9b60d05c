"""Aspect-ratio buckets (ldm/data/buckets.py): kohya-ss sd-scripts' bucket list and assignment, worked out by hand
here from kohya's rules, and the bucket batch sampler (single-bucket batches, every index once, disjoint ranks)."""

from collections import Counter

import pytest
import torch
from pytorch_lightning import Trainer
from pytorch_lightning.trainer.states import RunningStage

from ldm.data.base import ResumableLoader
from ldm.data.buckets import BatchedDataset, BucketBatchSampler, Bucketer, crop_box, make_buckets, round_to_steps
from ldm.errors import UserError

# kohya's list for resolution 512, min 256, max 1024, step 64: for each width w, the height
# min(1024, floor(512^2 / w / 64) * 64), e.g. w = 320: 262144 / 320 = 819.2 -> 12 steps -> 768.
KOHYA_512 = [
    (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576), (512, 512),
    (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256),
]  # fmt: skip


def test_bucket_list_for_512_is_kohyas():
    assert make_buckets(512) == KOHYA_512


@pytest.mark.parametrize(
    ("resolution", "min_reso", "max_reso", "steps"),
    [(512, 256, 1024, 64), (768, 256, 1536, 64), (1024, 512, 2048, 64), (640, 320, 1280, 64), (128, 64, 256, 64)],
)
def test_every_bucket_fits_the_area_and_the_step(resolution, min_reso, max_reso, steps):
    buckets = make_buckets(resolution, min_reso, max_reso, steps)
    square = resolution // steps * steps
    assert (square, square) in buckets
    for width, height in buckets:
        assert width * height <= resolution * resolution
        assert width % steps == 0 and height % steps == 0
        assert min_reso <= width <= max_reso and min_reso <= height <= max_reso
        assert (height, width) in buckets  # the list is symmetric


@pytest.mark.parametrize(
    ("size", "bucket", "resized"),
    [
        ((512, 512), (512, 512), (512, 512)),  # an exact bucket is kept
        ((1000, 600), (640, 384), (640, 384)),  # ratio 5/3 exactly: no overflow
        # 0.667: 384/640 = 0.6 (error 0.067) beats 448/576 = 0.778; wider than 0.6, so the height matches:
        # 640 / 1200 = 0.5333, width int(800 * 0.5333 + 0.5) = 427
        ((800, 1200), (384, 640), (427, 640)),
        # 3.0: 832/256 = 3.25 (error 0.25) beats 768/320 = 2.4; narrower, so the width matches: 1000 * 832/3000
        ((3000, 1000), (832, 256), (832, 277)),
        ((100, 100), (512, 512), (512, 512)),  # small images are scaled up
    ],
)
def test_assignment_follows_kohyas_select_bucket(size, bucket, resized):
    placement = Bucketer(512).assign(*size)
    assert placement.bucket == bucket and placement.resized == resized
    assert placement.ar_error == pytest.approx(bucket[0] / bucket[1] - size[0] / size[1])


def test_nearest_ratio_is_chosen_for_many_sizes():
    bucketer = Bucketer(512)
    for width, height in [(37, 91), (640, 480), (1920, 1080), (333, 1000), (1234, 567)]:
        placement = bucketer.assign(width, height)
        ratio = width / height
        best = min(abs(w / h - ratio) for w, h in KOHYA_512)
        assert abs(placement.bucket[0] / placement.bucket[1] - ratio) == pytest.approx(best)
        # Resized to cover: both sides at least the bucket's, one of them equal (up to rounding).
        assert placement.resized[0] >= placement.bucket[0] and placement.resized[1] >= placement.bucket[1]
        assert min(placement.resized[0] - placement.bucket[0], placement.resized[1] - placement.bucket[1]) <= 1


def test_no_upscale_only_shrinks():
    bucketer = Bucketer(512, no_upscale=True)
    # Small enough: kept, the bucket is the size rounded down to the step.
    small = bucketer.assign(300, 200)
    assert small.resized == (300, 200) and small.bucket == (256, 192)
    # 2000x1000 is over 512^2: scaled to sqrt(512^2 * 2) = 724.1 x 362.0; width rounded: 704 x round(352) = 320
    # (ratio 2.2), height rounded: 640 x 320 (ratio 2.0 exactly), which wins.
    big = bucketer.assign(2000, 1000)
    assert big.resized == (640, 320) and big.bucket == (640, 320)
    with pytest.raises(UserError, match="smaller than one bucket step"):
        bucketer.assign(40, 300)


def test_round_to_steps_rounds_half_up_then_down():
    assert round_to_steps(724.08, 64) == 704
    assert round_to_steps(63.5, 64) == 64
    assert round_to_steps(63.4, 64) == 0


def test_bad_settings_are_user_errors():
    with pytest.raises(UserError, match="min_bucket_reso <= resolution"):
        make_buckets(512, min_reso=768)
    with pytest.raises(UserError, match="multiple of bucket_reso_steps"):
        make_buckets(512, min_reso=300)


def test_crop_is_centred_or_uniform():
    assert crop_box((427, 640), (384, 640), random_crop=False) == (21, 0)  # kohya's trim_size // 2
    generator = torch.Generator().manual_seed(0)
    corners = {crop_box((427, 640), (384, 640), True, generator) for _ in range(200)}
    assert all(0 <= left <= 43 and top == 0 for left, top in corners) and len(corners) > 20


BUCKETS = ["a"] * 7 + ["b"] * 5 + ["c"] * 3 + ["d"]


def test_batches_hold_one_bucket_and_cover_the_dataset():
    sampler = BucketBatchSampler(BUCKETS, batch_size=2, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 4 + 3 + 2 + 1
    for batch in batches:
        assert len({BUCKETS[i] for i in batch}) == 1 and 1 <= len(batch) <= 2
    assert sorted(i for batch in batches for i in batch) == list(range(len(BUCKETS)))


def test_sampler_is_deterministic_and_changes_with_the_epoch():
    first, again = BucketBatchSampler(BUCKETS, 2, seed=5), BucketBatchSampler(BUCKETS, 2, seed=5)
    assert list(first) == list(again)
    again.set_epoch(1)
    assert list(again) != list(first)
    assert list(BucketBatchSampler(BUCKETS, 2, seed=6)) != list(first)


@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_get_equal_disjoint_shares(drop_last):
    buckets = ["a"] * 8 + ["b"] * 4 + ["c"] * 4  # 8 batches of 2: divisible by 2 and 4 ranks
    for world in (2, 4):
        samplers = [BucketBatchSampler(buckets, 2, world, rank, seed=1, drop_last=drop_last) for rank in range(world)]
        shares = [list(sampler) for sampler in samplers]
        assert len({len(share) for share in shares}) == 1
        seen = [i for share in shares for batch in share for i in batch]
        assert sorted(seen) == list(range(len(buckets)))  # disjoint and complete


def test_uneven_batches_are_padded_to_equal_shares():
    shares = [list(BucketBatchSampler(BUCKETS, 2, 4, rank, seed=1)) for rank in range(4)]
    assert [len(s) for s in shares] == [3, 3, 3, 3]  # 10 batches padded to 12
    counts = Counter(i for share in shares for batch in share for i in batch)
    assert set(counts) == set(range(len(BUCKETS)))
    dropped = [list(BucketBatchSampler(BUCKETS, 2, 4, rank, seed=1, drop_last=True)) for rank in range(4)]
    assert [len(s) for s in dropped] == [1, 1, 1, 1]  # 6 full batches, cut to 4
    assert all(len(batch) == 2 for share in dropped for batch in share)


def test_resume_skips_the_served_batches():
    sampler = BucketBatchSampler(BUCKETS, 2, seed=2)
    full = list(sampler)
    sampler.start = 3
    assert list(sampler) == full[3:]
    assert list(sampler) == full  # only the next pass is shortened


def test_loader_yields_collated_single_bucket_batches_lightning_leaves_alone():
    data = [{"x": torch.full((2, n), float(n))} for n in (1, 1, 1, 2, 2, 3)]
    buckets = [item["x"].shape for item in data]
    sampler = BucketBatchSampler(buckets, 2, seed=0)
    loader = ResumableLoader(BatchedDataset(data, torch.utils.data.default_collate), sampler=sampler, batch_size=None)
    batches = list(loader)
    assert len(loader) == len(batches) == 4
    assert sum(len(b["x"]) for b in batches) == len(data)
    # Lightning puts a DistributedSampler into loaders of DDP runs unless their sampler is one already.
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_checkpointing=False)
    prepared = trainer._data_connector._prepare_dataloader(loader, shuffle=True, mode=RunningStage.TRAINING)
    assert prepared is loader


def test_a_resumed_loader_goes_on_with_the_same_bucket_batches():
    data = [{"i": torch.tensor(i)} for i in range(len(BUCKETS))]

    def make() -> ResumableLoader:
        sampler = BucketBatchSampler(BUCKETS, 2, seed=4)
        return ResumableLoader(BatchedDataset(data, torch.utils.data.default_collate), sampler=sampler, batch_size=None)

    full = [b["i"].tolist() for b in make()]
    interrupted = make()
    served = iter(interrupted)
    first = [next(served)["i"].tolist() for _ in range(3)]
    state = interrupted.state_dict()
    assert state == {"batches": 3}
    resumed = make()
    resumed.load_state_dict(state)
    assert first + [b["i"].tolist() for b in resumed] == full
