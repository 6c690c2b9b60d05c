"""A folder of captioned images, the usual fine-tuning data.

Two layouts (``metadata.jsonl`` wins when present):

- ``metadata.jsonl`` at the top, one JSON object a line with ``file_name`` (relative to the folder) and ``text``
  (the layout of Hugging Face's image-folder datasets)::

      {"file_name": "images/0001.png", "text": "a photo of a fox"}

  A ``file_name`` must lead to a file inside the folder: ``../``, absolute paths and symbolic links out of it are
  errors, so that a downloaded dataset cannot make training read other files.

- pairs: every image (searched recursively) with a caption file of the same name next to it,
  ``fox.png`` + ``fox.txt``.

Every image's header is read when the dataset is built, so a file that is not an image stops the run at set-up,
naming it, instead of in the middle of training.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from ldm.data.base import ImageTransform
from ldm.errors import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def inside(root: Path, file_name: str, where: str) -> Path:
    """``root / file_name``, which must resolve (through any ``..`` and symbolic links) to a path inside ``root``."""
    path = root / file_name
    if "\0" in file_name or not path.resolve().is_relative_to(root.resolve()):
        raise UserError(f"{where}: file_name '{file_name}' leads outside the folder '{root}'; give a path inside it.")
    return path


def check_image(path: Path, where: str | None = None) -> None:
    """Raise ValueError naming ``path`` (and ``where`` it is listed) unless PIL recognises it as an image; reads the
    header, not the pixels."""
    try:
        with Image.open(path):
            pass
    except (OSError, Image.DecompressionBombError) as err:  # UnidentifiedImageError is an OSError
        listed = f"{where}: " if where else ""
        raise UserError(f"{listed}'{path}' is not an image ({err}); remove it or replace it.") from err


def read_metadata(root: Path, default_caption: str | None) -> list[tuple[Path, str]]:
    """``(image path, caption)`` pairs from ``root/metadata.jsonl``."""
    items = []
    metadata = root / "metadata.jsonl"
    for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{metadata} line {number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{where} is not JSON: {err}") from err
        if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str):
            raise UserError(f"{where} has no 'file_name' (a path relative to the folder).")
        path = inside(root, entry["file_name"], where)
        if not path.is_file():
            raise FileNotFoundError(f"{where}: image '{path}' does not exist.")
        check_image(path, where)
        caption = entry.get("text", default_caption)
        if caption is None:
            raise UserError(f"{where} has no 'text' (set default_caption to allow images without captions).")
        items.append((path, str(caption)))
    return items


def pair_captions(root: Path, default_caption: str | None) -> list[tuple[Path, str]]:
    """``(image path, caption)`` pairs from images with a ``.txt`` file of the same name beside them."""
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    items, missing = [], []
    for path in images:
        check_image(path)
        caption_file = path.with_suffix(".txt")
        if caption_file.is_file():
            items.append((path, caption_file.read_text(encoding="utf-8").strip()))
        elif default_caption is not None:
            items.append((path, default_caption))
        else:
            missing.append(path)
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} image(s) in '{root}' have no caption file (e.g. '{missing[0].with_suffix('.txt')}'); "
            "add them, or set default_caption."
        )
    return items


class CaptionFolder(Dataset):
    """Captioned images from ``root`` (see the module docstring for the two layouts).

    Items are ``{image_key: float32 (size, size, 3) in [-1, 1], caption_key: str}``; ``image_key`` / ``caption_key``
    default to ``jpg`` / ``txt``, the keys SD configs read. Images are resized (shorter side to ``size``), cropped to
    a square (centre, or random with ``random_crop``) and flipped with probability ``flip_p``, as
    :class:`ldm.data.base.ImageTransform` does. Images without a caption get ``default_caption``; when that is None
    (the default) they are an error, so a typo in a caption file's name does not silently train on empty prompts.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        size: int | None = 512,
        random_crop: bool = False,
        flip_p: float = 0.0,
        interpolation: str = "bicubic",
        image_key: str = "jpg",
        caption_key: str = "txt",
        default_caption: str | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder '{self.root}' does not exist.")
        if (self.root / "metadata.jsonl").is_file():
            self.items = read_metadata(self.root, default_caption)
        else:
            self.items = pair_captions(self.root, default_caption)
        if not self.items:
            raise UserError(f"image folder '{self.root}' has no images ({', '.join(IMAGE_EXTENSIONS)}).")
        self.transform = ImageTransform(size, random_crop, flip_p, interpolation)
        self.image_key = image_key
        self.caption_key = caption_key

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, caption = self.items[index]
        with Image.open(path) as image:
            pixels = self.transform(image)
        return {self.image_key: pixels, self.caption_key: caption}
