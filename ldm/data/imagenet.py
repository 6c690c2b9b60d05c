"""ImageNet (ILSVRC2012) at CompVis's paths: ``ImageNetTrain`` / ``ImageNetValidation`` (class-conditional
models) and the super-resolution pairs ``ImageNetSRTrain`` / ``ImageNetSRValidation``.

They read a local copy (see :mod:`ldm.data.imagenet_index` for the layouts and where it is looked for: the
``data_root`` parameter, ``$LDM_IMAGENET_ROOT``, CompVis's cache folder) and never download. Items:

- ``ImageNetTrain`` / ``ImageNetValidation``: ``image`` float32 ``(size, size, 3)`` in [-1, 1] (shorter side
  resized to ``size``, bilinear, then a random crop for train and a centre crop for validation, as CompVis),
  ``class_label`` (int), ``human_label``, ``synsets`` (the wnid), ``relpath``, ``file_path_``;
- ``ImageNetSR*``: those labels, ``image`` (the high-resolution crop) and ``LR_image`` (see
  :mod:`ldm.data.super_resolution`).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch.utils.data import Dataset

from ldm.data.base import ImageTransform
from ldm.data.imagenet_index import ImageNetIndex
from ldm.data.super_resolution import SRPair
from ldm.serialization import read_array_pickle
from ldm.util import ConfigError, building_path


def _plain(config: Mapping[str, Any] | DictConfig | None) -> dict[str, Any]:
    if config is None:
        return {}
    return OmegaConf.to_container(config) if isinstance(config, DictConfig) else dict(config)


def load_rgb(path: str) -> np.ndarray:
    """uint8 ``(H, W, 3)`` pixels of the image file at ``path``."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


class ImageNetBase(Dataset):
    """One split of a local ImageNet copy; subclasses name the split and its crop.

    ``config`` holds CompVis's options: ``size`` (default 256; null or 0 keeps the images as they are),
    ``<ClassName>/random_crop``, ``sub_indices`` (classes to keep, taming's ``"0-10,20"``, a range ``a-b`` being
    ``a .. b - 1``), ``keep_orig_class_label`` (number the classes by the full class index, ``index_synset.yaml``
    where present, instead of 0.. over those kept). ``process_images=False`` gives the labels without loading
    images (what the super-resolution datasets build on).
    """

    SPLIT = ""
    CONFIG_NAME = ""  # the config key of the split's own options, "ImageNetTrain/random_crop" in taming's retrieve
    RANDOM_CROP = False

    def __init__(
        self,
        config: Mapping[str, Any] | DictConfig | None = None,
        process_images: bool = True,
        data_root: str | os.PathLike | None = None,
    ) -> None:
        self.config = _plain(config)
        self.process_images = process_images
        self.index = ImageNetIndex.build(
            self.SPLIT,
            data_root,
            sub_indices=self.config.get("sub_indices"),
            keep_orig_class_label=bool(self.config.get("keep_orig_class_label", False)),
        )
        size = self.config.get("size", 256)
        crop_options = self.config.get(self.CONFIG_NAME, {}) or {}
        self.random_crop = bool(crop_options.get("random_crop", self.RANDOM_CROP))
        self.transform = ImageTransform(size or None, random_crop=self.random_crop, interpolation="bilinear")

    def __len__(self) -> int:
        return len(self.index.relpaths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        example = self.index.labels(i)
        if self.process_images:
            with Image.open(example["file_path_"]) as image:
                example["image"] = self.transform(image)
        return example


class ImageNetTrain(ImageNetBase):
    """The training split (random crops unless ``config.ImageNetTrain.random_crop`` is false)."""

    SPLIT, CONFIG_NAME = "train", "ImageNetTrain"
    RANDOM_CROP = True


class ImageNetValidation(ImageNetBase):
    """The validation split, its images in class folders (centre crops)."""

    SPLIT, CONFIG_NAME = "validation", "ImageNetValidation"
    RANDOM_CROP = False


def read_indices(path: Path) -> list[int]:
    """Image indices from a text file (one a line) or CompVis's pickle (a list or numpy array of ints)."""
    where = f"{building_path()}.params.hr_indices"
    if not path.is_file():
        raise ConfigError(f"{where}: '{path}' does not exist.")
    try:
        if path.suffix in (".p", ".pkl", ".pickle"):
            indices = read_array_pickle(path)
        else:
            indices = [line for line in path.read_text(encoding="utf-8").split() if line]
        return [int(i) for i in indices]
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError) as err:
        raise ConfigError(
            f"{where}: '{path}' is not a list of image indices ({err}); give a text file with one index a line."
        ) from err


class ImageNetSR(Dataset):
    """ImageNet super-resolution pairs: ``image`` ``(size, size, 3)`` and ``LR_image`` ``(size / downscale_f, ...)``,
    float32 in [-1, 1], with the base split's labels.

    ``degradation`` names how the low-resolution image is made (``bsrgan``, ``bsrgan_light``, ``pil_bicubic`` ...,
    see :mod:`ldm.data.super_resolution`); ``min_crop_f`` / ``max_crop_f`` bound the crop's side as a fraction of
    the image's shorter side. ``hr_indices``: a file of the base split's image indices to use (CompVis's
    ``data/imagenet_{train,val}_hr_indices.p``, which is taken from the working directory where present, as the
    original does); without one, every image. ``data_root``: as for ``ImageNetTrain``.
    """

    DEFAULT_INDICES = ""

    def __init__(
        self,
        size: int | None = None,
        degradation: str | None = None,
        downscale_f: int = 4,
        min_crop_f: float = 0.5,
        max_crop_f: float = 1.0,
        random_crop: bool = True,
        data_root: str | os.PathLike | None = None,
        hr_indices: str | os.PathLike | None = None,
    ) -> None:
        self.pair = SRPair(size, degradation, downscale_f, min_crop_f, max_crop_f, random_crop)
        self.size, self.LR_size = self.pair.size, self.pair.lr_size
        self.base = self.get_base(data_root)
        indices_file = Path(hr_indices) if hr_indices else Path(self.DEFAULT_INDICES)
        if hr_indices or (self.DEFAULT_INDICES and indices_file.is_file()):
            self.indices = read_indices(indices_file)
            bad = [i for i in self.indices if not 0 <= i < len(self.base)]
            if bad:
                raise ConfigError(
                    f"{building_path()}.params.hr_indices: index {bad[0]} of '{indices_file}' is outside the "
                    f"{len(self.base)} images found; the indices belong to another copy of ImageNet."
                )
        else:
            self.indices = list(range(len(self.base)))

    def get_base(self, data_root: str | os.PathLike | None) -> ImageNetBase:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        example = self.base[self.indices[i]]
        example["image"], example["LR_image"] = self.pair(load_rgb(example["file_path_"]))
        return example


class ImageNetSRTrain(ImageNetSR):
    """Super-resolution pairs from the training split."""

    DEFAULT_INDICES = "data/imagenet_train_hr_indices.p"

    def get_base(self, data_root: str | os.PathLike | None) -> ImageNetBase:
        return ImageNetTrain(process_images=False, data_root=data_root)


class ImageNetSRValidation(ImageNetSR):
    """Super-resolution pairs from the validation split."""

    DEFAULT_INDICES = "data/imagenet_val_hr_indices.p"

    def get_base(self, data_root: str | os.PathLike | None) -> ImageNetBase:
        return ImageNetValidation(process_images=False, data_root=data_root)
