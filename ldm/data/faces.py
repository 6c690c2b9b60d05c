"""CelebA-HQ and FFHQ, the data of the ``celebahq-ldm-vq-4`` / ``ffhq-ldm-vq-4`` configs, which name them
``taming.data.faceshq.CelebAHQTrain`` ... (mapped here by :data:`ldm.util.FOREIGN_TARGETS`).

Each reads taming-transformers' file lists and image folders under ``location`` (default ``data``, the original's
path relative to the working directory; the environment variable ``LDM_FACES_ROOT`` overrides it)::

    <location>/celebahqtrain.txt  <location>/celebahqvalidation.txt  <location>/celebahq/<listed .npy files>
    <location>/ffhqtrain.txt      <location>/ffhqvalidation.txt      <location>/ffhq/<listed image files>

CelebA-HQ images are taming's ``.npy`` arrays, uint8 ``(1, 3, H, W)``; FFHQ's are image files. Items: ``image``
float32 ``(size, size, 3)`` in [-1, 1] (shorter side resized to ``size``, bilinear, then the centre square) and
``file_path_``; ``keys`` keeps only the keys it lists.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from ldm.data.base import ImageTransform
from ldm.data.local import env_path, read_file_list
from ldm.util import ConfigError, building_path

ENV_ROOT = "LDM_FACES_ROOT"


def load_npy_image(path: Path) -> Image.Image:
    """A taming CelebA-HQ array, uint8 ``(1, 3, H, W)``, as an RGB image."""
    array = np.load(path, allow_pickle=False)
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[:2] != (1, 3):
        raise ConfigError(
            f"{building_path()}: '{path}' holds a {array.dtype} array of shape {array.shape}; "
            "CelebA-HQ files are uint8 (1, 3, H, W)."
        )
    return Image.fromarray(np.ascontiguousarray(array[0].transpose(1, 2, 0)), mode="RGB")


class FacesBase(Dataset):
    """The files listed in ``LIST`` under ``location``/``FOLDER``, as centre-cropped ``size`` squares."""

    LIST = ""
    FOLDER = ""
    NUMPY = False

    def __init__(self, size: int, keys: Sequence[str] | None = None, location: str | os.PathLike | None = None):
        super().__init__()
        root = Path(location) if location else env_path(ENV_ROOT) or Path("data")
        self.root = root / self.FOLDER
        layout = f"<location>/{self.LIST} with one path a line, relative to <location>/{self.FOLDER}/"
        fix = f"Set location (the folder holding the lists) or the environment variable {ENV_ROOT}."
        self.relpaths = read_file_list(root / self.LIST, self.root, self.FOLDER, layout, fix)
        self.transform = ImageTransform(size or None, random_crop=False, interpolation="bilinear")
        self.keys = list(keys) if keys is not None else None

    def __len__(self) -> int:
        return len(self.relpaths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path = self.root / self.relpaths[i]
        if self.NUMPY:
            image = self.transform(load_npy_image(path))
        else:
            with Image.open(path) as file:
                image = self.transform(file)
        example = {"image": image, "file_path_": str(path)}
        return {k: example[k] for k in self.keys} if self.keys is not None else example


class CelebAHQTrain(FacesBase):
    LIST, FOLDER, NUMPY = "celebahqtrain.txt", "celebahq", True


class CelebAHQValidation(FacesBase):
    LIST, FOLDER, NUMPY = "celebahqvalidation.txt", "celebahq", True


class FFHQTrain(FacesBase):
    LIST, FOLDER = "ffhqtrain.txt", "ffhq"


class FFHQValidation(FacesBase):
    LIST, FOLDER = "ffhqvalidation.txt", "ffhq"
