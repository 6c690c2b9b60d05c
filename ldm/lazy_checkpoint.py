"""A checkpoint's state dict read one tensor at a time, so that loading never holds the file's tensors and the model's
at once (SDXL: 6.9 GB of fp16 file beside 13 GB of fp32 model).

:func:`open_checkpoint` checks the file as :func:`ldm.serialization.read_file` does (format by content, safetensors
header bounds, torch.save storages against their records, TorchScript refused, the pickle read with meta-device
storages only) and returns a :class:`LazyStateDict`: its ``layout`` (names, shapes, dtypes) is known at once, and
each tensor's bytes are read from the file when that tensor is asked for. The file is read with plain reads, not
mapped: the pages of a mapped file count towards the process's resident memory for as long as the mapping lives.
"""

from __future__ import annotations

import os
import struct
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from ldm.serialization import (
    CheckpointError,
    _meta_tensor,
    _safetensors_header,
    open_regular,
    read_file,
    read_zip_layout,
    sniff_format,
)

ZIP_LOCAL_HEADER = 30  # bytes before a zip record's name and extra field


class LazyStateDict(Mapping[str, torch.Tensor]):
    """``{name: tensor}`` whose tensors are read when indexed, each into memory of its own (nothing shared with the
    file or the other tensors). ``layout`` holds the same names as meta-device tensors (shape, dtype).

    ``read(name, buffer)`` reads a tensor into memory of its own (``buffer`` None) or as a view of ``buffer``, which
    holds at least ``sizes[name]`` bytes; without ``sizes`` every tensor is in memory already.
    """

    def __init__(
        self,
        layout: dict[str, torch.Tensor],
        read: Callable[[str, bytearray | None], torch.Tensor],
        sizes: dict[str, int] | None = None,
    ) -> None:
        self.layout = layout
        self._read = read
        self._sizes = sizes
        self._staging: bytearray | None = None

    def converted(
        self, key: str, dtype: torch.dtype, check: Callable[[torch.Tensor], None] | None = None
    ) -> torch.Tensor:
        """The tensor ``key`` in ``dtype``, in memory of its own; ``check`` sees the file's values first.

        A tensor to convert is read into one staging buffer, reused for every tensor (as large as the largest): a
        temporary buffer per tensor, freed between the converted tensors that stay, leaves holes in the C heap
        that are never given back (0.55 GiB of 14.3 GiB for SDXL into float32).
        """
        if self._sizes is None or self.layout[key].dtype == dtype:
            tensor = self[key]
        else:
            if self._staging is None:
                self._staging = bytearray(max(self._sizes.values()))
            tensor = self._read(key, self._staging)
        if check is not None:
            check(tensor)
        return tensor.to(dtype)

    def view(
        self,
        names: Mapping[str, str],
        edits: Mapping[str, tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]] | None = None,
    ) -> LazyStateDict:
        """The tensors under new names (``{new: old}``), still read when indexed; ``edits`` ``{new: (layout, edit)}``
        change a tensor as it is read (``layout``: the result's meta tensor), e.g. widen an input convolution."""
        edits = dict(edits or {})
        layout = {new: edits[new][0] if new in edits else self.layout[old] for new, old in names.items()}

        def read(key: str, buffer: bytearray | None) -> torch.Tensor:
            if key in edits:
                return edits[key][1](self._read(names[key], None))
            return self._read(names[key], buffer)

        sizes = None if self._sizes is None else {new: self._sizes[old] for new, old in names.items()}
        return LazyStateDict(layout, read, sizes)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.layout:
            raise KeyError(key)
        return self._read(key, None)

    def __iter__(self) -> Iterator[str]:
        return iter(self.layout)

    def __len__(self) -> int:
        return len(self.layout)


def split_state_dict(path: Path, data: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(state dict, info)`` of a file's contents: a Lightning checkpoint's ``state_dict`` and its plain metadata
    (``global_step`` ...), or a bare state dict; only string keys with tensor values are kept."""
    info: dict[str, Any] = {}
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        info = {k: v for k, v in data.items() if isinstance(v, int | float | str) and k != "state_dict"}
        data = data["state_dict"]
    if not isinstance(data, Mapping):
        raise CheckpointError(f"checkpoint '{path}' holds no state dict (found {type(data).__name__}).")
    state_dict = {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not state_dict:
        raise CheckpointError(f"checkpoint '{path}' holds no tensors.")
    return state_dict, info


def open_checkpoint(path: str | os.PathLike, warn: bool = True) -> tuple[LazyStateDict, dict[str, Any]]:
    """``(tensors, info)`` of a ``.safetensors`` or torch.save checkpoint, as :func:`ldm.checkpoint.read_checkpoint`
    gives them but read lazily. A legacy torch.save stream or a big-endian archive (no SD checkpoint is either) is
    read in full. ``warn``: name the non-tensor objects of a pickle that were skipped."""
    path = Path(path)
    with open_regular(path) as file:
        stat = os.fstat(file.fileno())
        size = stat.st_size
        kind = sniff_format(file.read(512), size)
        try:
            if kind == "safetensors":
                header = _safetensors_header(path, file, size)
                file.seek(0)
                (length,) = struct.unpack("<Q", file.read(8))
                stored = {
                    name: (_meta_tensor(entry), 8 + length + entry["data_offsets"][0])
                    for name, entry in header.items()
                    if name != "__metadata__"
                }
                state_dict, info = split_state_dict(path, {k: meta for k, (meta, _) in stored.items()})
                offsets = {k: (off, meta.nbytes) for k, (meta, off) in stored.items()}
            elif kind == "zip" and _little_endian(file):
                contents, storage_keys = read_zip_layout(path, file, size, warn=warn)
                state_dict, info = split_state_dict(path, contents)
                records = _record_offsets(file)
                offsets = {}
                for key, meta in state_dict.items():
                    storage = meta.untyped_storage()
                    offsets[key] = (records[storage_keys[storage._cdata]], storage.nbytes())
            else:
                state_dict, info = split_state_dict(path, read_file(path)[1])
                layout = {k: v.to("meta") for k, v in state_dict.items()}
                return LazyStateDict(layout, lambda key, buffer: state_dict[key]), info
        except CheckpointError:
            raise
        except Exception as err:  # what the parsers raise on a malformed file is a property of the file
            raise _damaged(path, err) from None
    identity = (stat.st_dev, stat.st_ino, size, stat.st_mtime_ns)

    def read(key: str, buffer: bytearray | None) -> torch.Tensor:
        offset, nbytes = offsets[key]
        meta = state_dict[key]
        with open_regular(path) as file:
            now = os.fstat(file.fileno())
            if (now.st_dev, now.st_ino, now.st_size, now.st_mtime_ns) != identity:
                raise CheckpointError(f"checkpoint '{path}' changed while it was being read; load it again.")
            data = bytearray(nbytes) if buffer is None else memoryview(buffer)[:nbytes]
            file.seek(offset)
            if file.readinto(data) != nbytes:
                raise CheckpointError(f"cannot read checkpoint '{path}': it ends inside tensor '{key}'.")
        try:
            storage = torch.frombuffer(data, dtype=meta.dtype) if nbytes else torch.empty(0, dtype=meta.dtype)
            tensor = storage.as_strided(meta.shape, meta.stride(), meta.storage_offset())
        except Exception as err:
            raise _damaged(path, err) from None
        if buffer is not None:
            return tensor
        # A view of part of a storage (or of one shared with other tensors) gets memory of its own.
        whole = meta.storage_offset() == 0 and meta.is_contiguous() and meta.nbytes == nbytes
        return tensor if whole else tensor.clone()

    sizes = {key: nbytes for key, (_, nbytes) in offsets.items()}
    return LazyStateDict({k: v.to("meta") for k, v in state_dict.items()}, read, sizes), info


def read_tensor(path: str | os.PathLike, name: str) -> torch.Tensor:
    """The data of the one tensor ``name`` of a checkpoint's state dict, reading only its bytes; KeyError if there is
    no such tensor. For the heuristics of :mod:`ldm.model_detection`, which need one small tensor of a big file."""
    tensors, _ = open_checkpoint(path, warn=False)
    return tensors[name]


def _little_endian(file: Any) -> bool:
    file.seek(0)
    with zipfile.ZipFile(file) as archive:
        order = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/byteorder")]
        return not order or archive.read(order[0]).strip() == b"little"


def _record_offsets(file: Any) -> dict[str, int]:
    """``{storage key: offset of its bytes in the file}`` of a (checked, uncompressed) torch.save archive."""
    file.seek(0)
    offsets = {}
    with zipfile.ZipFile(file) as archive:
        for info in archive.infolist():
            folder, _, key = info.filename.partition("/data/")
            if not key or "/" in folder:
                continue
            file.seek(info.header_offset)
            local = file.read(ZIP_LOCAL_HEADER)
            if len(local) != ZIP_LOCAL_HEADER or not local.startswith(b"PK\x03\x04"):
                raise CheckpointError(f"record '{info.filename}' has no zip header where the archive says")
            name_length, extra_length = struct.unpack("<HH", local[26:30])
            offsets[key] = info.header_offset + ZIP_LOCAL_HEADER + name_length + extra_length
    return offsets


def _damaged(path: Path, err: Exception) -> CheckpointError:
    reason = " ".join(str(err).split())[:300] or type(err).__name__
    return CheckpointError(
        f"cannot read checkpoint '{path}': {type(err).__name__}: {reason}. The file is damaged or was not written by "
        "torch.save / safetensors."
    )
