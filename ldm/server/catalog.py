"""The checkpoints a server may load, by name: the one it started with and those in its ``--ckpt_dir`` folders.

Requests choose a model by A1111's title (``"name.safetensors [hash]"``), name, model name or hash, never by path,
so no request can make the server open a file outside the folders it was given.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ldm.outputs import model_hash
from ldm.server.errors import FieldError

SUFFIXES = (".safetensors", ".ckpt")


@dataclass(frozen=True)
class Checkpoint:
    """One loadable model. ``name``: its path inside its folder; ``config``: None to detect it (a config file
    beside the checkpoint wins, see :mod:`ldm.model_detection`); ``overrides``: ``key=value`` config overrides."""

    path: Path
    name: str
    config: Path | None = None
    overrides: tuple[str, ...] = ()

    @property
    def model_name(self) -> str:
        """A1111's model name: the name without its suffix, folders joined by ``_``."""
        return os.path.splitext(self.name.replace("/", "_").replace("\\", "_"))[0]


class Catalog:
    """The checkpoints of ``folders`` (searched recursively) after the ``pinned`` ones; hashes as they are known."""

    def __init__(self, folders: list[Path], pinned: list[Checkpoint]) -> None:
        self.folders = [Path(f) for f in folders]
        self.pinned = list(pinned)
        self.hashes: dict[Path, str] = {}
        self.entries: list[Checkpoint] = []
        self.refresh()

    def refresh(self) -> None:
        """Scan the folders again (A1111's ``/refresh-checkpoints``)."""
        seen = {c.path.resolve() for c in self.pinned}
        entries = list(self.pinned)
        for folder in self.folders:
            for path in sorted(folder.rglob("*")):
                hidden = any(part.startswith(".") for part in path.relative_to(folder).parts)
                if path.suffix.lower() in SUFFIXES and path.is_file() and not hidden and path.resolve() not in seen:
                    seen.add(path.resolve())
                    entries.append(Checkpoint(path, path.relative_to(folder).as_posix()))
        self.entries = entries

    def hash(self, checkpoint: Checkpoint) -> str:
        """A1111's short hash of the file (computed once, then cached; see :func:`ldm.outputs.model_hash`)."""
        if checkpoint.path not in self.hashes:
            self.hashes[checkpoint.path] = model_hash(checkpoint.path)
        return self.hashes[checkpoint.path]

    def title(self, checkpoint: Checkpoint) -> str:
        """A1111's title: ``"name [hash]"`` once the hash is known (the model was loaded), else the name."""
        known = self.hashes.get(checkpoint.path)
        return f"{checkpoint.name} [{known}]" if known else checkpoint.name

    def find(self, name: str, field: str = "sd_model_checkpoint") -> Checkpoint:
        """The checkpoint a title, name, model name or short hash names; FieldError listing the titles."""
        wanted = name.strip()
        bare = wanted.rsplit(" [", 1)[0] if wanted.endswith("]") else wanted
        for checkpoint in self.entries:
            known = self.hashes.get(checkpoint.path)
            names = {self.title(checkpoint), checkpoint.name, checkpoint.model_name, checkpoint.path.name}
            if wanted in names or bare in names or (known and wanted == known):
                return checkpoint
        listed = ", ".join(self.title(c) for c in self.entries) or "none"
        raise FieldError(field, f"{field}: no checkpoint {name!r} on this server; choose one of: {listed}.")
