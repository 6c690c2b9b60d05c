"""The disk cache of converted OpenVINO models: one folder per (weights, architecture, input shapes) key.

A folder holds ``model.xml`` / ``model.bin`` (OpenVINO's IR) and ``manifest.json`` with their SHA-256 digests. It is
written under a temporary name and renamed into place, so a run killed while converting leaves no half entry; an
entry whose files do not match their manifest (a truncated or damaged file) is deleted and rebuilt, never read.

The cache lives in ``$LDM_OPENVINO_CACHE``, by default ``~/.cache/ldm/openvino``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

CACHE_ENV = "LDM_OPENVINO_CACHE"
MANIFEST = "manifest.json"
FILES = ("model.xml", "model.bin")


def cache_root() -> Path:
    """Where converted models are kept: ``$LDM_OPENVINO_CACHE`` or ``~/.cache/ldm/openvino``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "ldm" / "openvino")


def entry_key(parts: dict[str, Any]) -> str:
    """A folder name for everything the converted model depends on (JSON-able ``parts``)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _intact(folder: Path) -> bool:
    """Whether ``folder`` holds every file with the digest its manifest records."""
    try:
        manifest = _manifest(folder)
        return "made" in manifest and all(file_digest(folder / n) == manifest["sha256"][n] for n in FILES)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / MANIFEST).read_text())


def cached_model_path(
    root: Path, key: str, parts: dict[str, Any], convert: Callable[[Path], dict[str, Any]], what: str
) -> tuple[Path, dict[str, Any]]:
    """The ``model.xml`` of the entry ``key`` and what ``convert`` said of it, converting first where the entry is
    missing or damaged: ``convert(xml_path)`` writes the model and returns a JSON-able dict kept in the manifest.

    ``parts`` are written into the manifest too, so an entry says what it was made from.
    """
    folder = root / key
    if folder.exists():
        if _intact(folder):
            return folder / FILES[0], _manifest(folder)["made"]
        print(f"openvino: the cached {what} in {folder} is damaged; converting it again", file=sys.stderr)
        shutil.rmtree(folder, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
    try:
        made = convert(staging / FILES[0])
        digests = {name: file_digest(staging / name) for name in FILES}
        manifest = {"sha256": digests, "made": made, "made_from": parts}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
        try:
            staging.rename(folder)
        except OSError:  # another process finished the same entry first: theirs is as good
            if not _intact(folder):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder / FILES[0], made
