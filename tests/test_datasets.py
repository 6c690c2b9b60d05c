"""The CompVis datasets (ImageNet, ImageNet super-resolution, LSUN, CelebA-HQ, FFHQ) on tiny fake copies of their
standard layouts in tmp_path."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.faces import CelebAHQTrain, FFHQValidation
from ldm.data.imagenet import ImageNetSRTrain, ImageNetSRValidation, ImageNetTrain, ImageNetValidation
from ldm.data.lsun import LSUNBedroomsValidation, LSUNChurchesTrain
from ldm.util import ConfigError, instantiate_from_config, load_config

WNIDS = ("n01440764", "n01443537", "n01484850")
HUMAN = {"n01440764": "tench, Tinca tinca", "n01443537": "goldfish, Carassius auratus", "n01484850": "great white"}


def picture(path: Path, width: int = 40, height: int = 30, seed: int = 0) -> np.ndarray:
    """Write a smooth RGB image (JPEG or PNG by the suffix) to ``path``; returns what was written."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.random((1, 3, 4, 4), dtype=np.float32))
    smooth = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear")[0]
    pixels = (smooth.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=95) if path.suffix.lower() == ".jpeg" else Image.fromarray(pixels).save(
        path
    )
    return pixels


def imagenet_split(folder: Path, per_class: int = 2, wnids=WNIDS) -> None:
    for c, wnid in enumerate(wnids):
        for k in range(per_class):
            picture(folder / wnid / f"{wnid}_{k}.JPEG", seed=10 * c + k)


@pytest.fixture
def imagenet(tmp_path, monkeypatch) -> Path:
    """The standard layout: train/<wnid>/*.JPEG, val/<wnid>/*.JPEG and synset_human.txt."""
    monkeypatch.delenv("LDM_IMAGENET_ROOT", raising=False)
    root = tmp_path / "imagenet"
    imagenet_split(root / "train")
    imagenet_split(root / "val", per_class=1)
    (root / "synset_human.txt").write_text("".join(f"{w} {h}\n" for w, h in HUMAN.items()))
    return root


def test_imagenet_items_carry_compvis_keys_and_sorted_wnid_labels(imagenet):
    data = ImageNetTrain(data_root=str(imagenet), config={"size": 16})
    assert len(data) == 6
    item = data[3]
    assert set(item) == {"image", "class_label", "human_label", "synsets", "relpath", "file_path_"}
    assert item["image"].shape == (16, 16, 3) and item["image"].dtype == np.float32
    assert -1.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert item["synsets"] == "n01443537" and item["class_label"] == 1 and item["human_label"] == HUMAN["n01443537"]
    assert item["relpath"] == "n01443537/n01443537_1.JPEG"
    assert item["file_path_"] == str(imagenet / "train" / item["relpath"])
    assert [data[i]["class_label"] for i in range(6)] == [0, 0, 1, 1, 2, 2]
    assert data.random_crop and not ImageNetValidation(data_root=imagenet).random_crop
    assert len(ImageNetValidation(data_root=imagenet, config={"size": 16})) == 3


def test_validation_crop_is_central_and_deterministic(imagenet):
    data = ImageNetValidation(data_root=imagenet, config={"size": 20})
    first = data[0]["image"]
    assert np.array_equal(first, data[0]["image"])
    with Image.open(data[0]["file_path_"]) as image:  # 40x30 -> 27x20 (bilinear), then the centre 20x20
        expected = np.asarray(image.convert("RGB").resize((27, 20), Image.Resampling.BILINEAR))[:, 3:23]
    np.testing.assert_allclose(first, expected / 127.5 - 1.0, atol=1e-6)


def test_compvis_cache_layout_and_its_filelist(tmp_path, monkeypatch):
    monkeypatch.delenv("LDM_IMAGENET_ROOT", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    split = tmp_path / "cache" / "autoencoders" / "data" / "ILSVRC2012_validation"
    imagenet_split(split / "data", per_class=2)
    (split / "synset_human.txt").write_text("n01440764 tench, Tinca tinca\n")
    data = ImageNetValidation(config={"size": 8})
    assert len(data) == 6 and data[0]["human_label"] == "tench, Tinca tinca"
    assert data[5]["human_label"] == "n01484850"  # not in the label file: the wnid
    # A filelist.txt beside the data folder is what CompVis reads instead of scanning.
    (split / "filelist.txt").write_text("n01484850/n01484850_1.JPEG\nn01440764/n01440764_0.JPEG\n")
    assert [ImageNetValidation()[i]["relpath"] for i in range(2)] == [
        "n01484850/n01484850_1.JPEG",
        "n01440764/n01440764_0.JPEG",
    ]


def test_environment_variable_root(imagenet, monkeypatch):
    monkeypatch.setenv("LDM_IMAGENET_ROOT", str(imagenet))
    assert len(ImageNetTrain(config={"size": 8})) == 6


def test_missing_or_loose_imagenet_is_a_config_error_naming_the_layout(tmp_path, monkeypatch):
    monkeypatch.delenv("LDM_IMAGENET_ROOT", raising=False)
    with pytest.raises(ConfigError) as err:
        ImageNetTrain(data_root=tmp_path / "nowhere")
    message = str(err.value)
    assert str(tmp_path / "nowhere" / "train") in message and "ILSVRC2012_train/data/<wnid>/*.JPEG" in message
    assert "data_root" in message and "LDM_IMAGENET_ROOT" in message and "never downloads" in message
    picture(tmp_path / "flat" / "val" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(ConfigError, match="one folder per wnid"):
        ImageNetValidation(data_root=tmp_path / "flat")


def test_sub_indices_and_the_original_class_index(imagenet):
    data = ImageNetTrain(data_root=imagenet, config={"size": 8, "sub_indices": "1-3"})  # classes 1 and 2
    assert [data[i]["synsets"] for i in range(len(data))] == ["n01443537"] * 2 + ["n01484850"] * 2
    assert [data[i]["class_label"] for i in range(4)] == [0, 0, 1, 1]
    kept = ImageNetTrain(data_root=imagenet, config={"size": 8, "sub_indices": "2", "keep_orig_class_label": True})
    assert {kept[i]["class_label"] for i in range(len(kept))} == {2}
    (imagenet / "index_synset.yaml").write_text("0: n01484850\n1: n01443537\n2: n01440764\n")
    reordered = ImageNetTrain(data_root=imagenet, config={"size": 8, "keep_orig_class_label": True})
    assert reordered[0]["synsets"] == "n01440764" and reordered[0]["class_label"] == 2
    with pytest.raises(ConfigError, match="sub_indices"):
        ImageNetTrain(data_root=imagenet, config={"sub_indices": "a-b"})


# ---------------------------------------------------------------------------------------------------------------------
# Super-resolution pairs


@pytest.mark.parametrize(
    "degradation", ["bsrgan", "bsrgan_light", "pil_bicubic", "cv_area", "cv_bicubic", "cv_lanczos"]
)
def test_sr_pairs_have_the_sizes_and_ranges(imagenet, degradation):
    data = ImageNetSRTrain(data_root=imagenet, size=16, degradation=degradation, downscale_f=4)
    assert len(data) == 6
    item = data[0]
    assert {"image", "LR_image", "class_label", "human_label", "file_path_"} <= set(item)
    assert item["image"].shape == (16, 16, 3) and item["LR_image"].shape == (4, 4, 3)
    for key in ("image", "LR_image"):
        assert item[key].dtype == np.float32 and -1.0 <= item[key].min() and item[key].max() <= 1.0


def test_sr_low_resolution_image_is_the_named_resize_of_the_crop(imagenet):
    data = ImageNetSRValidation(
        data_root=imagenet, size=15, degradation="pil_bicubic", downscale_f=3, min_crop_f=1.0, random_crop=False
    )
    item = data[1]
    with Image.open(item["file_path_"]) as image:  # the centre 30x30 square, area-averaged to 15x15: 2x2 means
        square = np.asarray(image.convert("RGB"), dtype=np.float64)[:, 5:35]
    means = square.reshape(15, 2, 15, 2, 3).mean(axis=(1, 3))
    np.testing.assert_allclose((item["image"] + 1.0) * 127.5, means, atol=0.5 + 1e-4)  # within rounding
    target = np.round((item["image"] + 1.0) * 127.5).astype(np.uint8)
    low = np.asarray(Image.fromarray(target).resize((5, 5), Image.Resampling.BICUBIC))
    np.testing.assert_allclose(item["LR_image"], low / 127.5 - 1.0, atol=1e-6)


def test_sr_random_crops_follow_torchs_seed(imagenet):
    data = ImageNetSRTrain(data_root=imagenet, size=16, degradation="bsrgan_light", min_crop_f=0.5)
    torch.manual_seed(0)
    first = data[2]
    torch.manual_seed(0)
    again = data[2]
    assert np.array_equal(first["image"], again["image"]) and np.array_equal(first["LR_image"], again["LR_image"])
    draws = [data[2]["image"] for _ in range(4)]
    assert any(not np.array_equal(draws[0], d) for d in draws[1:])


def test_hr_indices_from_text_or_a_plain_pickle(imagenet, tmp_path):
    text = tmp_path / "indices.txt"
    text.write_text("4\n1\n")
    data = ImageNetSRTrain(data_root=imagenet, size=8, degradation="pil_nearest", hr_indices=str(text))
    assert len(data) == 2 and data[0]["relpath"] == "n01484850/n01484850_0.JPEG"
    plain = tmp_path / "indices.p"
    plain.write_bytes(pickle.dumps([0, 5]))
    assert len(ImageNetSRTrain(data_root=imagenet, size=8, degradation="pil_nearest", hr_indices=plain)) == 2
    array = tmp_path / "array.p"
    array.write_bytes(pickle.dumps(np.array([2, 3, 4])))
    assert ImageNetSRTrain(data_root=imagenet, size=8, degradation="pil_nearest", hr_indices=array).indices == [2, 3, 4]
    risky = tmp_path / "risky.p"
    risky.write_bytes(pickle.dumps(Path("x")))  # names a class: refused, whatever it would build
    with pytest.raises(ConfigError, match="not a list of image indices"):
        ImageNetSRTrain(data_root=imagenet, size=8, degradation="pil_nearest", hr_indices=risky)
    text.write_text("9\n")
    with pytest.raises(ConfigError, match="outside the 6 images"):
        ImageNetSRTrain(data_root=imagenet, size=8, degradation="pil_nearest", hr_indices=text)


@pytest.mark.parametrize(
    "params, match",
    [
        ({"size": 16, "degradation": "bicubic"}, "not one of bsrgan, bsrgan_light"),
        ({"size": 18, "degradation": "pil_bicubic"}, "must divide size 18"),
        ({"size": None, "degradation": "pil_bicubic"}, "size"),
        ({"size": 16, "degradation": "pil_bicubic", "max_crop_f": 1.5}, "max_crop_f"),
    ],
)
def test_bad_sr_params_are_config_errors(imagenet, params, match):
    with pytest.raises(ConfigError, match=match):
        ImageNetSRTrain(data_root=imagenet, **params)


# ---------------------------------------------------------------------------------------------------------------------
# LSUN and the faces


def lsun_copy(root: Path) -> None:
    for k in range(3):
        picture(root / "churches" / f"img{k}.png", width=48, height=32, seed=k)
    (root / "church_outdoor_train.txt").write_text("img0.png\nimg1.png\n")
    (root / "church_outdoor_val.txt").write_text("img2.png\n")


def test_lsun_reads_compvis_lists_crops_the_centre_and_flips(tmp_path, monkeypatch):
    monkeypatch.delenv("LDM_LSUN_ROOT", raising=False)
    lsun_copy(tmp_path / "lsun")
    train = LSUNChurchesTrain(size=16, location=tmp_path / "lsun", flip_p=0.0)
    assert len(train) == 2
    item = train[1]
    assert set(item) == {"image", "relative_file_path_", "file_path_"} and item["relative_file_path_"] == "img1.png"
    with Image.open(item["file_path_"]) as image:
        expected = np.asarray(image.convert("RGB").crop((8, 0, 40, 32)).resize((16, 16), Image.Resampling.BICUBIC))
    np.testing.assert_allclose(item["image"], expected / 127.5 - 1.0, atol=1e-6)
    flipped = LSUNChurchesTrain(size=16, location=tmp_path / "lsun", flip_p=1.0)[1]["image"]
    np.testing.assert_array_equal(flipped, item["image"][:, ::-1])
    assert LSUNChurchesTrain(location=tmp_path / "lsun").flip_p == 0.5
    monkeypatch.setenv("LDM_LSUN_ROOT", str(tmp_path / "lsun"))
    from ldm.data.lsun import LSUNChurchesValidation

    validation = LSUNChurchesValidation(size=8)
    assert validation.flip_p == 0.0 and len(validation) == 1


def test_lsun_missing_list_or_image_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.delenv("LDM_LSUN_ROOT", raising=False)
    config = {"target": "ldm.data.lsun.LSUNBedroomsValidation", "params": {"size": 8, "location": str(tmp_path)}}
    with pytest.raises(ConfigError) as err:
        instantiate_from_config(config, path="data.params.validation")
    message = str(err.value)
    assert message.startswith("data.params.validation: LSUN file list not found")
    assert str(tmp_path / "bedrooms_val.txt") in message and "LDM_LSUN_ROOT" in message
    lsun_copy(tmp_path)
    (tmp_path / "church_outdoor_val.txt").write_text("gone.png\n")
    with pytest.raises(ConfigError, match="lists 'gone.png'"):
        instantiate_from_config({"target": "ldm.data.lsun.LSUNChurchesValidation", "params": {"location": tmp_path}})
    (tmp_path / "church_outdoor_val.txt").write_text("../outside.png\n")
    with pytest.raises(ConfigError, match="leads outside"):
        instantiate_from_config({"target": "ldm.data.lsun.LSUNChurchesValidation", "params": {"location": tmp_path}})
    assert LSUNBedroomsValidation.FOLDER == "bedrooms"


def faces_copy(root: Path) -> np.ndarray:
    pixels = picture(root / "ffhq" / "00000.png", width=24, height=24)
    (root / "ffhqvalidation.txt").write_text("00000.png\n")
    (root / "celebahq").mkdir(parents=True)
    np.save(root / "celebahq" / "000001.npy", pixels.transpose(2, 0, 1)[None])
    (root / "celebahqtrain.txt").write_text("000001.npy\n")
    return pixels


def test_faces_read_npy_and_image_files_and_the_taming_names(tmp_path):
    pixels = faces_copy(tmp_path)
    celeba = CelebAHQTrain(size=12, location=tmp_path)[0]
    ffhq = FFHQValidation(size=12, location=tmp_path)[0]
    assert set(celeba) == set(ffhq) == {"image", "file_path_"}
    np.testing.assert_allclose(celeba["image"], ffhq["image"])  # the same pixels through .npy and .png
    expected = np.asarray(Image.fromarray(pixels).resize((12, 12), Image.Resampling.BILINEAR))
    np.testing.assert_allclose(celeba["image"], expected / 127.5 - 1.0, atol=1e-6)
    config = {
        "target": "taming.data.faceshq.FFHQValidation",
        "params": {"size": 12, "keys": ["image"], "location": tmp_path},
    }
    built = instantiate_from_config(config)
    assert isinstance(built, FFHQValidation) and set(built[0]) == {"image"}
    np.save(tmp_path / "celebahq" / "000001.npy", np.zeros((3, 8, 8), np.float32))
    with pytest.raises(ConfigError, match=r"uint8 \(1, 3, H, W\)"):
        CelebAHQTrain(size=12, location=tmp_path)[0]


# ---------------------------------------------------------------------------------------------------------------------
# The originals' data sections


def imagenet_copy(root: Path) -> None:
    imagenet_split(root / "train")
    imagenet_split(root / "val", per_class=1)


def faces_copies(root: Path) -> None:
    faces_copy(root)
    (root / "ffhqtrain.txt").write_text("00000.png\n")
    (root / "celebahqvalidation.txt").write_text("000001.npy\n")


LDM = "stable-diffusion/configs/latent-diffusion"
AUTOENCODER = "stable-diffusion/configs/autoencoder"


@pytest.mark.parametrize(
    "name, location_key, make",
    [
        (f"{LDM}/cin-ldm-vq-f8.yaml", "data_root", imagenet_copy),
        (f"{LDM}/lsun_churches-ldm-kl-8.yaml", "location", lsun_copy),
        (f"{LDM}/ffhq-ldm-vq-4.yaml", "location", faces_copies),
        (f"{LDM}/celebahq-ldm-vq-4.yaml", "location", faces_copies),
        (f"{AUTOENCODER}/autoencoder_kl_32x32x4.yaml", "data_root", imagenet_copy),
    ],
)
def test_original_data_sections_build_on_a_local_copy(reference_dir, tmp_path, name, location_key, make):
    make(tmp_path)
    overrides = [f"data.params.{split}.params.{location_key}={tmp_path}" for split in ("train", "validation")]
    config = load_config(
        reference_dir / "original" / name, [*overrides, "data.params.num_workers=0", "data.params.batch_size=1"]
    )
    data = instantiate_from_config(config.data, path="data")
    data.setup("fit")
    for loader in (data.train_dataloader(), data.val_dataloader()):
        batch = next(iter(loader))
        assert batch["image"].shape == (1, 256, 256, 3)
        if "LR_image" in batch:  # the autoencoder configs train on ImageNetSR's high-resolution images
            assert batch["LR_image"].shape == (1, 64, 64, 3)
