"""LSUN churches, bedrooms and cats at CompVis's paths (``ldm.data.lsun.LSUN*Train`` / ``LSUN*Validation``).

Each reads CompVis's file lists and the image folders they index, under ``location`` (default ``data/lsun``, the
original's path relative to the working directory; the environment variable ``LDM_LSUN_ROOT`` overrides it)::

    <location>/church_outdoor_train.txt   <location>/church_outdoor_val.txt   <location>/churches/<listed files>
    <location>/bedrooms_train.txt         <location>/bedrooms_val.txt         <location>/bedrooms/<listed files>
    <location>/cat_train.txt              <location>/cat_val.txt              <location>/cats/<listed files>

A list holds one path a line, relative to its image folder. Items: ``image`` float32 ``(size, size, 3)`` in [-1, 1]
(the central square, resized, flipped left-right with probability ``flip_p``: 0.5 for train, 0 for validation),
``relative_file_path_`` and ``file_path_``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ldm.data.local import env_path, read_file_list
from ldm.errors import UserError

ENV_ROOT = "LDM_LSUN_ROOT"
INTERPOLATIONS = {
    "linear": Image.Resampling.BILINEAR,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


class LSUNBase(Dataset):
    """The images listed in ``txt_file`` (paths relative to ``data_root``), centre-cropped to a square and resized
    to ``size`` (kept as they are when None)."""

    def __init__(
        self,
        txt_file: str | os.PathLike,
        data_root: str | os.PathLike,
        size: int | None = None,
        interpolation: str = "bicubic",
        flip_p: float = 0.5,
    ) -> None:
        if interpolation not in INTERPOLATIONS:
            raise UserError(f"interpolation '{interpolation}' is not one of {sorted(INTERPOLATIONS)}.")
        if not 0.0 <= flip_p <= 1.0:
            raise UserError(f"flip_p must be in [0, 1], got {flip_p}.")
        self.data_root = Path(data_root)
        layout = "<location>/<list>.txt with one path a line, relative to <location>/<category>/"
        fix = f"Set location (the folder holding the lists) or the environment variable {ENV_ROOT}."
        self.image_paths = read_file_list(Path(txt_file), self.data_root, "LSUN", layout, fix)
        self.size = size
        self.interpolation = INTERPOLATIONS[interpolation]
        self.flip_p = flip_p

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        relpath = self.image_paths[i]
        example: dict[str, Any] = {"relative_file_path_": relpath, "file_path_": str(self.data_root / relpath)}
        with Image.open(example["file_path_"]) as image:
            image = image.convert("RGB")
        width, height = image.size
        side = min(width, height)
        # The central square (score-sde's preprocessing), then the resize.
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
        if self.size is not None:
            image = image.resize((self.size, self.size), resample=self.interpolation)
        if self.flip_p > 0 and float(torch.rand(())) < self.flip_p:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        example["image"] = (np.asarray(image, dtype=np.float32) / 127.5 - 1.0).astype(np.float32)
        return example


def lsun_location(location: str | os.PathLike | None) -> Path:
    return Path(location) if location else env_path(ENV_ROOT) or Path("data/lsun")


class _LSUNSplit(LSUNBase):
    """A split of one category: ``LIST`` names its file list, ``FOLDER`` its image folder, under ``location``."""

    LIST = ""
    FOLDER = ""
    FLIP_P = 0.5

    def __init__(
        self,
        size: int | None = None,
        interpolation: str = "bicubic",
        flip_p: float | None = None,
        location: str | os.PathLike | None = None,
    ) -> None:
        root = lsun_location(location)
        super().__init__(
            txt_file=root / self.LIST,
            data_root=root / self.FOLDER,
            size=size,
            interpolation=interpolation,
            flip_p=self.FLIP_P if flip_p is None else flip_p,
        )


class LSUNChurchesTrain(_LSUNSplit):
    LIST, FOLDER = "church_outdoor_train.txt", "churches"


class LSUNChurchesValidation(_LSUNSplit):
    LIST, FOLDER, FLIP_P = "church_outdoor_val.txt", "churches", 0.0


class LSUNBedroomsTrain(_LSUNSplit):
    LIST, FOLDER = "bedrooms_train.txt", "bedrooms"


class LSUNBedroomsValidation(_LSUNSplit):
    LIST, FOLDER, FLIP_P = "bedrooms_val.txt", "bedrooms", 0.0


class LSUNCatsTrain(_LSUNSplit):
    LIST, FOLDER = "cat_train.txt", "cats"


class LSUNCatsValidation(_LSUNSplit):
    LIST, FOLDER, FLIP_P = "cat_val.txt", "cats", 0.0
