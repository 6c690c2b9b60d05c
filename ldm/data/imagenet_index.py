"""Where a local ImageNet (ILSVRC2012) copy is, which images it holds, and their class labels.

Two layouts of ``<root>`` are read, the first found wins:

- CompVis's cache (what the original code builds): ``<root>/ILSVRC2012_train/data/<wnid>/*.JPEG`` and
  ``<root>/ILSVRC2012_validation/data/<wnid>/*.JPEG``, with the optional ``filelist.txt``, ``synset_human.txt`` and
  ``index_synset.yaml`` beside each ``data`` folder;
- the standard one (torchvision's ImageFolder, the validation images sorted into class folders):
  ``<root>/train/<wnid>/*.JPEG`` and ``<root>/val/<wnid>/*.JPEG``, the optional label files at ``<root>``.

``<root>`` is the ``data_root`` parameter, else the environment variable ``LDM_IMAGENET_ROOT``, else CompVis's
``$XDG_CACHE_HOME/autoencoders/data`` (``~/.cache`` when XDG_CACHE_HOME is unset).

Labels: ``class_label`` numbers the classes present in sorted wnid order (CompVis's; for the full 1000 classes the
standard ImageNet index). ``human_label`` comes from ``synset_human.txt`` (``LOC_synset_mapping.txt`` of the Kaggle
copy has the same format: ``n01440764 tench, Tinca tinca``); without either it is the wnid.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from ldm.data.local import IMAGE_SUFFIXES, env_path, missing
from ldm.util import ConfigError, building_path

ENV_ROOT = "LDM_IMAGENET_ROOT"
COMPVIS_NAMES = {"train": "ILSVRC2012_train", "validation": "ILSVRC2012_validation"}
STANDARD_NAMES = {"train": "train", "validation": "val"}
HUMAN_LABEL_FILES = ("synset_human.txt", "LOC_synset_mapping.txt")
# A file CompVis leaves out of its file lists.
IGNORED = {"n06596364_9591.JPEG"}


def default_root() -> Path:
    """CompVis's cache folder, ``$XDG_CACHE_HOME/autoencoders/data``."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(cache) / "autoencoders" / "data"


def layout_text(split: str) -> str:
    return (
        f"<root>/{STANDARD_NAMES[split]}/<wnid>/*.JPEG, or CompVis's <root>/{COMPVIS_NAMES[split]}/data/<wnid>/*.JPEG"
    )


def find_split(split: str, data_root: str | os.PathLike | None) -> tuple[Path, list[Path]]:
    """``(image folder, folders to look for label files in)`` of ``split`` ("train" or "validation")."""
    root = Path(data_root).expanduser() if data_root else env_path(ENV_ROOT) or default_root()
    compvis = root / COMPVIS_NAMES[split]
    candidates = [(compvis / "data", [compvis, root]), (root / STANDARD_NAMES[split], [root])]
    for folder, label_dirs in candidates:
        if folder.is_dir():
            return folder, label_dirs
    raise missing(
        f"ImageNet {split} images",
        [folder for folder, _ in candidates],
        layout_text(split),
        f"Set data_root (the folder holding them) or the environment variable {ENV_ROOT}.",
    )


def list_images(folder: Path, split: str) -> list[str]:
    """Sorted ``<wnid>/<file>`` paths of the images under ``folder`` (from CompVis's ``filelist.txt`` if there)."""
    # CompVis's layout keeps the sorted list of its images beside the data folder: no scan of a million files.
    filelist = folder.parent / "filelist.txt"
    if folder.name == "data" and filelist.is_file():
        relpaths = [line for line in filelist.read_text(encoding="utf-8").splitlines() if line]
        return [r for r in relpaths if Path(r).name not in IGNORED]
    relpaths = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_dir():
            relpaths += [
                f"{entry.name}/{name}"
                for name in sorted(os.listdir(entry.path))
                if Path(name).suffix.lower() in IMAGE_SUFFIXES and name not in IGNORED
            ]
    if not relpaths:
        loose = any(Path(name).suffix.lower() in IMAGE_SUFFIXES for name in os.listdir(folder))
        hint = " Its images lie loose: sort them into one folder per wnid." if loose else ""
        raise ConfigError(
            f"{building_path()}: no ImageNet {split} images in class folders under '{folder}' "
            f"(expected {layout_text(split)}).{hint}"
        )
    return relpaths


def read_human_labels(label_dirs: list[Path]) -> dict[str, str]:
    """``{wnid: "tench, Tinca tinca"}`` from the first label file found; empty without one."""
    for directory in label_dirs:
        for name in HUMAN_LABEL_FILES:
            path = directory / name
            if path.is_file():
                lines = path.read_text(encoding="utf-8").splitlines()
                return dict(line.split(maxsplit=1) for line in lines if len(line.split(maxsplit=1)) == 2)
    return {}


def read_class_index(label_dirs: list[Path], wnids: list[str]) -> list[str]:
    """The wnids in class-index order: ``index_synset.yaml`` (``{index: wnid}``) where present, else sorted."""
    for directory in label_dirs:
        path = directory / "index_synset.yaml"
        if path.is_file():
            mapping = yaml.safe_load(path.read_text(encoding="utf-8"))
            return [str(mapping[i]) for i in sorted(mapping)]
    return sorted(set(wnids))


def parse_sub_indices(text: str) -> list[int]:
    """Class indices from taming's ``sub_indices`` string, ``"0-10,20"``: a range ``a-b`` is ``a .. b - 1``."""
    indices: list[int] = []
    try:
        for part in str(text).split(","):
            bounds = [int(b) for b in part.split("-")]
            indices += bounds if len(bounds) == 1 else list(range(bounds[0], bounds[1]))
    except ValueError as err:
        raise ConfigError(f"{building_path()}: sub_indices '{text}' is not like '0-10,20' ({err}).") from err
    return sorted(indices)


@dataclass
class ImageNetIndex:
    """The images of one split with their labels, parallel lists in sorted path order."""

    folder: Path
    relpaths: list[str]
    synsets: list[str]
    class_labels: list[int]
    human_labels: list[str]

    @classmethod
    def build(
        cls,
        split: str,
        data_root: str | os.PathLike | None = None,
        sub_indices: str | None = None,
        keep_orig_class_label: bool = False,
    ) -> ImageNetIndex:
        folder, label_dirs = find_split(split, data_root)
        relpaths = list_images(folder, split)
        synsets = [r.split("/")[0] for r in relpaths]
        class_index = read_class_index(label_dirs, synsets)
        if sub_indices is not None:
            keep = {class_index[i] for i in parse_sub_indices(sub_indices) if i < len(class_index)}
            chosen = [i for i, s in enumerate(synsets) if s in keep]
            relpaths, synsets = [relpaths[i] for i in chosen], [synsets[i] for i in chosen]
            if not relpaths:
                raise ConfigError(f"{building_path()}: sub_indices '{sub_indices}' select no images in '{folder}'.")
        if keep_orig_class_label:
            number = {wnid: i for i, wnid in enumerate(class_index)}
        else:
            number = {wnid: i for i, wnid in enumerate(sorted(set(synsets)))}
        human = read_human_labels(label_dirs)
        return cls(
            folder=folder,
            relpaths=relpaths,
            synsets=synsets,
            class_labels=[number[s] for s in synsets],
            human_labels=[human.get(s, s) for s in synsets],
        )

    def labels(self, i: int) -> dict[str, object]:
        """Item ``i``'s keys other than the image, as CompVis names them."""
        return {
            "relpath": self.relpaths[i],
            "synsets": self.synsets[i],
            "class_label": self.class_labels[i],
            "human_label": self.human_labels[i],
            "file_path_": str(self.folder / self.relpaths[i]),
        }
