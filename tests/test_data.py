"""ldm.data: the image transform, caption folders (both layouts), WebDataset shards, shapes and the datamodule."""

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data import shapes
from ldm.data.base import DataModuleFromConfig, ImageTransform
from ldm.data.folder import CaptionFolder
from ldm.data.shapes import COLORS, COMBINATIONS, HOLDOUT, SHAPES, ShapesDataset
from ldm.data.webdataset import CaptionShards
from ldm.util import ConfigError


def halves(width: int, height: int) -> Image.Image:
    """Left half red, right half blue."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2] = (255, 0, 0)
    pixels[:, width // 2 :] = (0, 0, 255)
    return Image.fromarray(pixels)


def as_uint8(image: np.ndarray) -> np.ndarray:
    return np.round((image + 1.0) * 127.5).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------------------
# ImageTransform


def test_transform_resizes_the_shorter_side_and_crops_the_centre():
    out = ImageTransform(size=8, interpolation="nearest")(halves(32, 16))
    assert out.shape == (8, 8, 3) and out.dtype == np.float32
    assert out.min() >= -1.0 and out.max() <= 1.0
    # 32x16 -> 16x8, centre crop = columns 4..11: left half red, right half blue.
    assert (as_uint8(out[:, :4]) == (255, 0, 0)).all() and (as_uint8(out[:, 4:]) == (0, 0, 255)).all()


def test_transform_random_crop_and_flip_follow_torch_seed():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (10, 40, 3), dtype=np.uint8))
    crop = ImageTransform(size=10, random_crop=True)
    torch.manual_seed(0)
    first = [crop(image) for _ in range(6)]
    torch.manual_seed(0)
    again = [crop(image) for _ in range(6)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert len({a.tobytes() for a in first}) > 1  # not always the same window
    flipped = ImageTransform(flip_p=1.0)(halves(8, 4))
    assert (as_uint8(flipped[:, :4]) == (0, 0, 255)).all()


def test_transform_rejects_bad_arguments():
    with pytest.raises(ValueError, match="interpolation"):
        ImageTransform(interpolation="cubic")
    with pytest.raises(ValueError, match="flip_p"):
        ImageTransform(flip_p=2.0)


# ---------------------------------------------------------------------------------------------------------------------
# CaptionFolder


def test_caption_folder_pairs_layout(tmp_path):
    (tmp_path / "sub").mkdir()
    for name, caption in [("b", "a blue fox"), ("a", "a red fox"), ("sub/c", "a green fox\n")]:
        halves(24, 16).save(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(caption)
    data = CaptionFolder(tmp_path, size=8, image_key="image", caption_key="caption")
    assert len(data) == 3
    assert [data[i]["caption"] for i in range(3)] == ["a red fox", "a blue fox", "a green fox"]
    item = data[0]
    assert item["image"].shape == (8, 8, 3) and item["image"].dtype == np.float32


def test_caption_folder_needs_a_caption_for_every_image(tmp_path):
    halves(8, 8).save(tmp_path / "a.png")
    halves(8, 8).save(tmp_path / "b.jpg")
    (tmp_path / "a.txt").write_text("a fox")
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\).*b\.txt"):
        CaptionFolder(tmp_path)
    data = CaptionFolder(tmp_path, size=None, default_caption="")
    assert [data[i]["txt"] for i in range(2)] == ["a fox", ""]
    assert data[0]["jpg"].shape == (8, 8, 3)


def test_caption_folder_metadata_layout(tmp_path):
    (tmp_path / "images").mkdir()
    halves(16, 16).save(tmp_path / "images" / "x.png")
    halves(16, 16).save(tmp_path / "y.png")
    lines = [{"file_name": "images/x.png", "text": "first"}, {"file_name": "y.png", "text": "second"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    data = CaptionFolder(tmp_path, size=4)
    assert [data[i]["txt"] for i in range(len(data))] == ["first", "second"]
    assert data[1]["jpg"].shape == (4, 4, 3)

    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "missing.png", "text": "x"}))
    with pytest.raises(FileNotFoundError, match="line 1.*missing.png"):
        CaptionFolder(tmp_path)
    (tmp_path / "metadata.jsonl").write_text('{"text": "no file"}')
    with pytest.raises(ValueError, match="line 1 has no 'file_name'"):
        CaptionFolder(tmp_path)


def write_metadata(root: Path, *file_names: str) -> None:
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": n}) + "\n" for n in file_names))


def test_caption_folder_metadata_stays_inside_the_folder(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    halves(8, 8).save(root / "x.png")
    halves(8, 8).save(tmp_path / "secret.png")
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    for name in ("../secret.png", str(tmp_path / "secret.png"), "link.png", "x/../../secret.png", "x.png\0"):
        write_metadata(root, "x.png", name)
        with pytest.raises(ValueError, match=rf"line 2: file_name '{re.escape(name)}' leads outside the folder"):
            CaptionFolder(root)


def test_caption_folder_rejects_non_images_when_built(tmp_path):
    halves(8, 8).save(tmp_path / "a.png")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"notes\.png' is not an image"):
        CaptionFolder(tmp_path, default_caption="")
    write_metadata(tmp_path, "a.png", "notes.png")
    node = {"target": "ldm.data.folder.CaptionFolder", "params": {"root": str(tmp_path)}}
    with pytest.raises(ConfigError, match=r"^data\.params\.train: .*jsonl line 2: .*notes\.png' is not an image"):
        DataModuleFromConfig(batch_size=1, train=node).setup()


def test_caption_folder_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CaptionFolder(tmp_path / "nope")
    with pytest.raises(ValueError, match="has no images"):
        CaptionFolder(tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# WebDataset shards


def write_shard(path: Path, samples: list[tuple[str, str, dict[str, bytes]]]) -> None:
    """A tar shard: each sample is (key, image extension, {extension: bytes}) with the image added."""
    with tarfile.open(path, "w") as tar:
        for key, ext, files in samples:
            buffer = io.BytesIO()
            halves(12, 8).save(buffer, format="PNG" if ext == "png" else "JPEG")
            for extension, data in {ext: buffer.getvalue(), **files}.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def shards(tmp_path) -> list[str]:
    write_shard(
        tmp_path / "shard-000.tar",
        [("000", "jpg", {"txt": b"a fox"}), ("001", "png", {"txt": b"a cat\n", "json": b'{"caption": "unused"}'})],
    )
    write_shard(
        tmp_path / "shard-001.tar",
        [("002", "png", {"json": b'{"caption": "from json"}'}), ("003", "jpg", {"txt": b"a dog"})],
    )
    return [str(tmp_path / "shard-000.tar"), str(tmp_path / "shard-001.tar")]


def test_webdataset_shards_in_order(shards):
    data = CaptionShards(shards, size=4, shuffle=0)
    items = list(data)
    assert [item["txt"] for item in items] == ["a fox", "a cat", "from json", "a dog"]
    assert all(item["jpg"].shape == (4, 4, 3) and item["jpg"].dtype == np.float32 for item in items)
    assert all(-1.0 <= item["jpg"].min() and item["jpg"].max() <= 1.0 for item in items)
    braced = str(Path(shards[0]).parent / "shard-{000..001}.tar")
    assert len(list(CaptionShards(braced, size=4, shuffle=0))) == 4


def test_webdataset_shuffled_and_resampled(shards):
    shuffled = [item["txt"] for item in CaptionShards(shards, size=4, shuffle=10, seed=0)]
    assert sorted(shuffled) == sorted(["a fox", "a cat", "from json", "a dog"])
    endless = CaptionShards(shards, size=4, resampled=True, epoch_length=7, seed=0)
    assert len(list(endless)) == 7


def test_webdataset_through_the_datamodule_with_workers(shards):
    node = {"target": "ldm.data.webdataset.CaptionShards", "params": {"urls": shards, "size": 4, "shuffle": 0}}
    data = DataModuleFromConfig(batch_size=2, train=node, num_workers=2)
    data.setup("fit")
    batches = list(data.train_dataloader())
    captions = sorted(c for batch in batches for c in batch["txt"])
    assert captions == sorted(["a fox", "a cat", "from json", "a dog"])  # each worker read its own shard
    assert batches[0]["jpg"].shape == (2, 4, 4, 3)


# ---------------------------------------------------------------------------------------------------------------------
# Shapes


def test_shapes_vocabulary_is_documented():
    assert len(COLORS) >= 6 and {"circle", "square", "triangle"} <= set(SHAPES)
    for word in [*COLORS, *SHAPES]:
        assert word in shapes.__doc__
    assert len(COMBINATIONS) == len(COLORS) * len(SHAPES) * (len(COLORS) - 1)
    assert len(HOLDOUT) >= 10 and len(set(HOLDOUT)) == len(HOLDOUT) and set(HOLDOUT) <= set(COMBINATIONS)
    train = set(ShapesDataset(split="train").combinations)
    for color, shape, background in HOLDOUT:  # each part of a held-out combination is seen in training
        assert any(c == color for c, _, _ in train) and any(s == shape for _, s, _ in train)
        assert any(b == background for _, _, b in train)


def test_shapes_items_are_deterministic_per_index_and_seed():
    a, b = ShapesDataset(size=32, length=50), ShapesDataset(size=32, length=50)
    for i in (0, 7, 49):
        assert np.array_equal(a[i]["jpg"], b[i]["jpg"]) and a[i]["txt"] == b[i]["txt"]
    other_seed = ShapesDataset(size=32, length=50, seed=1)
    assert any(not np.array_equal(a[i]["jpg"], other_seed[i]["jpg"]) for i in range(5))
    assert len({a[i]["jpg"].tobytes() for i in range(20)}) == 20
    with pytest.raises(IndexError):
        a[50]


def test_shapes_images_match_their_captions():
    data = ShapesDataset(size=64, length=40)
    for i in range(len(data)):
        item = data[i]
        color, shape, background = item["color"], item["shape"], item["background"]
        assert item["txt"] == f"a {color} {shape} on a {background} background"
        assert color != background and COMBINATIONS[item["class_label"]] == (color, shape, background)
        pixels = as_uint8(item["jpg"]).reshape(-1, 3)
        values, counts = np.unique(pixels, axis=0, return_counts=True)
        assert tuple(values[counts.argmax()]) == COLORS[background]  # the background covers most of the image
        shape_pixels = (np.abs(pixels.astype(int) - COLORS[color]).sum(axis=1) <= 3).sum()
        assert shape_pixels >= 0.02 * len(pixels)  # the smallest star covers 3%


def test_shapes_positions_and_sizes_vary_within_bounds():
    data = ShapesDataset(size=64, length=30, min_scale=0.3, max_scale=0.6)
    areas, centres = [], []
    for i in range(len(data)):
        item = data[i]
        mask = np.abs(as_uint8(item["jpg"]).astype(int) - COLORS[item["color"]]).sum(axis=-1) <= 3
        ys, xs = np.nonzero(mask)
        assert ys.min() >= 0 and xs.max() < 64 and (ys.max() - ys.min()) <= 0.6 * 64
        areas.append(mask.sum())
        centres.append((xs.mean(), ys.mean()))
    assert np.std(areas) > 20 and np.std([c[0] for c in centres]) > 3 and np.std([c[1] for c in centres]) > 3


def test_shapes_holdout_split():
    train = ShapesDataset(size=16, length=400, split="train")
    holdout = ShapesDataset(size=16, length=60, split="holdout")
    seen = {(train[i]["color"], train[i]["shape"], train[i]["background"]) for i in range(len(train))}
    assert not seen & set(HOLDOUT)
    held = {(holdout[i]["color"], holdout[i]["shape"], holdout[i]["background"]) for i in range(len(holdout))}
    assert held <= set(HOLDOUT) and len(held) >= 10
    with pytest.raises(ValueError, match="split"):
        ShapesDataset(split="validation")


# ---------------------------------------------------------------------------------------------------------------------
# DataModuleFromConfig


def shapes_node(**params) -> dict:
    return {"target": "ldm.data.shapes.ShapesDataset", "params": {"size": 8, **params}}


def test_datamodule_builds_the_configured_loaders_only():
    from pytorch_lightning.utilities.model_helpers import is_overridden

    data = DataModuleFromConfig(
        batch_size=4, train=shapes_node(length=10), validation=shapes_node(length=6, seed=1), num_workers=0
    )
    data.setup("fit")
    train = data.train_dataloader()
    batch = next(iter(train))
    assert batch["jpg"].shape == (4, 8, 8, 3) and len(batch["txt"]) == 4 and batch["class_label"].shape == (4,)
    assert len(data.val_dataloader()) == 2
    assert is_overridden("train_dataloader", data) and is_overridden("val_dataloader", data)
    assert not is_overridden("test_dataloader", data) and not is_overridden("predict_dataloader", data)
    assert DataModuleFromConfig(batch_size=3).num_workers == 6  # CompVis default: 2 x batch size


def test_datamodule_wrap_and_errors():
    data = DataModuleFromConfig(batch_size=2, train=shapes_node(length=3), wrap=True, num_workers=0)
    data.setup()
    assert type(data.datasets["train"]).__name__ == "WrappedDataset" and len(data.datasets["train"]) == 3
    bad = DataModuleFromConfig(batch_size=2, train=shapes_node(split="nope"))
    with pytest.raises(ConfigError, match=r"data\.params\.train: split 'nope'"):
        bad.setup()
    typo = DataModuleFromConfig(
        batch_size=2, validation={"target": "ldm.data.shapes.ShapesDataset", "params": {"sise": 8}}
    )
    with pytest.raises(ConfigError, match=r"data\.params\.validation\.params\.sise.*'size'"):
        typo.setup()


def test_training_loader_resumes_mid_epoch_without_touching_the_global_generator():
    data = DataModuleFromConfig(batch_size=2, train=shapes_node(length=7), num_workers=0)
    data.setup()

    def epoch(loader, number: int) -> list[torch.Tensor]:
        loader.sampler.set_epoch(number)  # as Lightning does at the start of every epoch
        return [batch["jpg"] for batch in loader]

    generator = torch.get_rng_state()
    stopped = data.train_dataloader()
    whole = epoch(stopped, 1)
    assert torch.equal(torch.get_rng_state(), generator)
    assert len(whole) == 4 and not all(torch.equal(a, b) for a, b in zip(whole, epoch(stopped, 2), strict=True))

    stopped.sampler.set_epoch(1)
    batches = iter(stopped)
    next(batches), next(batches)
    state = stopped.state_dict()
    assert state == {"batches": 2}
    resumed = data.train_dataloader()
    resumed.load_state_dict(state)
    rest = epoch(resumed, 1)
    assert len(rest) == 2 and all(torch.equal(a, b) for a, b in zip(rest, whole[2:], strict=True))
    assert resumed.state_dict() == {"batches": 4} and len(epoch(resumed, 2)) == 4  # later epochs are whole

    resumed.load_state_dict({"batches": 4})  # saved at the end of an epoch: the next one starts from its beginning
    assert len(epoch(resumed, 2)) == 4
