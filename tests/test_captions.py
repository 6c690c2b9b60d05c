"""Caption folders in kohya's layout (ldm/data/captions.py): repeats folders, caption files and rules, bucketed
items, the errors a user meets, and DataModuleFromConfig serving single-bucket batches of them."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.base import DataModuleFromConfig
from ldm.data.captions import CaptionRules, KohyaFolder
from ldm.errors import UserError


def write_image(path: Path, size: tuple[int, int], seed: int = 0) -> Path:
    """A random RGB image of ``size`` (width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def mixed_folder(root: Path) -> Path:
    """``root`` with ``3_sks dog`` (two wide, one tall image; one captioned) and ``1_sks cat`` (one square)."""
    dog = root / "3_sks dog"
    write_image(dog / "a.png", (220, 100), 1)
    write_image(dog / "b.jpg", (210, 100), 2)
    write_image(dog / "c.webp", (100, 190), 3)
    (dog / "a.txt").write_text("sks dog, running, grass\nsecond line is ignored\n", encoding="utf-8")
    write_image(root / "1_sks cat" / "d.png", (120, 120), 4)
    return root


def small(root: Path, **options) -> KohyaFolder:
    """Buckets of a 128x128 budget: (64, 192), (64, 256), (128, 128), (192, 64), (256, 64)."""
    return KohyaFolder(root, resolution=128, min_bucket_reso=64, max_bucket_reso=256, **options)


def test_repeats_folders_and_captions(tmp_path):
    data = small(mixed_folder(tmp_path))
    assert len(data) == 3 * 3 + 1
    captions = {r.path.name: (r.caption, r.repeats) for r in data.records}
    assert captions == {
        "a.png": ("sks dog, running, grass", 3),  # the caption file's first line
        "b.jpg": ("sks dog", 3),  # the folder's words
        "c.webp": ("sks dog", 3),
        "d.png": ("sks cat", 1),
    }
    # Folders in name order. 1 -> 128x128; 2.2 and 2.1 -> 192x64 (ratio 3) rather than 128x128 (1); 0.526 -> 64x192.
    assert [p.bucket for p in data.placements] == [(128, 128), (192, 64), (192, 64), (64, 192)]
    item = data[1]
    assert item["jpg"].shape == (64, 192, 3) and item["jpg"].dtype == np.float32
    assert -1.0 <= item["jpg"].min() and item["jpg"].max() <= 1.0 and item["txt"] == "sks dog, running, grass"


def test_centre_crop_matches_resize_then_trim(tmp_path):
    path = write_image(tmp_path / "x.png", (220, 100))
    data = small(tmp_path, interpolation="bicubic", default_caption="x")
    placement = data.placements[0]
    # Ratio 2.2 < 3: the width matches, 100 * 192 / 220 = 87.3 -> 87 high.
    assert placement.bucket == (192, 64) and placement.resized == (192, 87)
    with Image.open(path) as image:
        resized = image.resize((192, 87), Image.Resampling.BICUBIC)
    expected = np.asarray(resized, dtype=np.float32)[11:75] / 127.5 - 1.0  # (87 - 64) // 2 = 11 from the top
    np.testing.assert_array_equal(data[0]["jpg"], expected)


def test_root_images_and_caption_extension(tmp_path):
    write_image(tmp_path / "one.png", (64, 64))
    (tmp_path / "one.caption").write_text("from the caption file", encoding="utf-8")
    (tmp_path / "one.txt").write_text("not this one", encoding="utf-8")
    data = small(tmp_path, caption_extension=".caption")
    assert len(data) == 1 and data[0]["txt"] == "from the caption file"


def test_without_buckets_images_are_resolution_squares(tmp_path):
    mixed_folder(tmp_path)
    data = KohyaFolder(tmp_path, resolution=96, enable_bucket=False)
    assert {p.bucket for p in data.placements} == {(96, 96)}
    assert data[0]["jpg"].shape == (96, 96, 3)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: None, "has no images"),
        (lambda root: (root / "cat.png").write_bytes(b"not a png"), "cat.png' is not a readable image"),
        (lambda root: write_image(root / "x.png", (64, 64)), "has no caption file 'x.txt'"),
        (
            lambda root: (write_image(root / "x.png", (64, 64)), (root / "x.txt").write_bytes(b"\xff\xfe\x00\x01")),
            "x.txt' is not UTF-8 text",
        ),
        (
            lambda root: (write_image(root / "x.png", (64, 64)), (root / "x.txt").write_bytes(b"abc\x00def")),
            "x.txt' is not text",
        ),
        (lambda root: (write_image(root / "x.png", (64, 64)), (root / "x.txt").write_text("  \n")), "x.txt' is empty"),
        (lambda root: write_image(root / "dogs" / "x.png", (64, 64)), "is not named N_words"),
        (lambda root: write_image(root / "0_dog" / "x.png", (64, 64)), "asks for 0 repeats"),
    ],
)
def test_bad_folders_are_one_line_errors_naming_the_file(tmp_path, make, message):
    make(tmp_path)
    with pytest.raises(UserError, match=message) as info:
        small(tmp_path)
    assert "\n" not in str(info.value)


def test_missing_folder_and_bad_options(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        small(tmp_path / "nope")
    write_image(tmp_path / "1_x" / "a.png", (64, 64))
    with pytest.raises(UserError, match="random_crop cannot be used with cache_latents"):
        small(tmp_path, random_crop=True, cache_latents=True)
    with pytest.raises(UserError, match="caption_extension"):
        small(tmp_path, caption_extension="txt")


def test_shuffle_keeps_the_first_tokens():
    rules = CaptionRules(shuffle_caption=True, keep_tokens=2)
    generator = torch.Generator().manual_seed(0)
    caption = "sks, dog, a, b, c, d, e"
    results = {rules.apply(caption, generator) for _ in range(50)}
    assert len(results) > 10
    for result in results:
        tags = result.split(", ")
        assert tags[:2] == ["sks", "dog"] and sorted(tags[2:]) == ["a", "b", "c", "d", "e"]
    again = torch.Generator().manual_seed(0)
    assert rules.apply(caption, again) == rules.apply(caption, torch.Generator().manual_seed(0))


def test_caption_dropout_and_tag_dropout():
    assert CaptionRules(caption_dropout_rate=1.0).apply("a, b") == ""
    assert CaptionRules(caption_tag_dropout_rate=1.0, keep_tokens=1).apply("a, b, c") == "a"
    assert CaptionRules(keep_tokens=1).apply("a,b ,  c") == "a,b ,  c"  # no shuffle or tag dropout: unchanged
    assert CaptionRules(shuffle_caption=True, caption_separator=";", keep_tokens=3).apply("a;b;c") == "a, b, c"
    generator = torch.Generator().manual_seed(1)
    kept = [CaptionRules(caption_dropout_rate=0.3).apply("x", generator) for _ in range(2000)]
    assert kept.count("") / len(kept) == pytest.approx(0.3, abs=0.04)
    with pytest.raises(UserError, match="caption_dropout_rate"):
        CaptionRules(caption_dropout_rate=1.5)


def test_datamodule_serves_single_bucket_batches(tmp_path):
    mixed_folder(tmp_path)
    params = {"root": str(tmp_path), "resolution": 128, "min_bucket_reso": 64, "max_bucket_reso": 256}
    data = DataModuleFromConfig(
        batch_size=2, num_workers=0, train={"target": "ldm.data.captions.KohyaFolder", "params": params}
    )
    loader = data.loader("train")
    batches = list(loader)
    assert len(loader) == len(batches) == 3 + 2 + 1  # (192, 64): 6 items, (64, 192): 3, (128, 128): 1
    assert sum(len(b["txt"]) for b in batches) == 10
    shapes = sorted(tuple(b["jpg"].shape) for b in batches)
    assert shapes == [(1, 128, 128, 3), (1, 192, 64, 3)] + [(2, 64, 192, 3)] * 3 + [(2, 192, 64, 3)]
