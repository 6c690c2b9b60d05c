"""Finding a local copy of a standard dataset: folders, file lists, and the errors that say what is missing.

The dataset classes of the CompVis configs (ImageNet, LSUN, CelebA-HQ, FFHQ) read data the user has already
downloaded; nothing here downloads. When a folder or list is missing, the ConfigError names the config node, the
path looked at, the layout expected there and the parameter or environment variable that points elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path

from ldm.util import ConfigError, building_path

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".webp", ".bmp")


def missing(what: str, looked_at: list[Path] | Path, layout: str, fix: str) -> ConfigError:
    """The error for a dataset not found: ``what`` is not at ``looked_at``; ``layout`` shows the expected files."""
    places = looked_at if isinstance(looked_at, list) else [looked_at]
    where = ", ".join(f"'{p}'" for p in places)
    return ConfigError(
        f"{building_path()}: {what} not found (looked in {where}). Expected layout: {layout}. {fix} "
        "This project never downloads datasets: get a copy from the dataset's site first."
    )


def env_path(variable: str) -> Path | None:
    """The path in environment variable ``variable``, None where it is unset or empty."""
    value = os.environ.get(variable, "")
    return Path(value).expanduser() if value else None


def read_file_list(list_file: Path, root: Path, what: str, layout: str, fix: str) -> list[str]:
    """The relative paths listed in ``list_file`` (one a line, blank lines skipped) of files inside ``root``;
    ConfigError naming the list or folder that is missing, an entry leading outside ``root``, or a listed file
    missing among the first, middle and last."""
    if not list_file.is_file():
        raise missing(f"{what} file list", list_file, layout, fix)
    if not root.is_dir():
        raise missing(f"{what} image folder", root, layout, fix)
    relpaths = [line.strip() for line in list_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not relpaths:
        raise ConfigError(f"{building_path()}: the {what} file list '{list_file}' is empty.")
    for relpath in relpaths:
        # A string check, not a resolve() per file: lists hold millions of entries.
        if Path(relpath).is_absolute() or ".." in Path(relpath).parts:
            raise ConfigError(f"{building_path()}: '{list_file}' lists '{relpath}', which leads outside '{root}'.")
    # Spot checks (first, middle, last): a stat per file would take minutes on the full datasets.
    for relpath in dict.fromkeys((relpaths[0], relpaths[len(relpaths) // 2], relpaths[-1])):
        if not (root / relpath).is_file():
            raise ConfigError(
                f"{building_path()}: '{list_file}' lists '{relpath}', but '{root / relpath}' does not exist; "
                f"the list and the images in '{root}' must come from the same copy."
            )
    return relpaths
