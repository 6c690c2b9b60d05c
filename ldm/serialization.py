"""Reading checkpoint files without running anything they contain, and within the memory their contents declare.

Formats are told apart by their first bytes, never by the file name:

- safetensors: an 8-byte header length, a JSON header, then the raw tensors.
- ``torch.save``'s zip archive (PyTorch >= 1.6, every SD ``.ckpt``): ``data.pkl`` plus one ``data/<key>`` record per
  storage.
- ``torch.save``'s legacy stream (PyTorch < 1.6, e.g. the LPIPS weights): magic number, protocol, system info, the
  object pickle, the list of storage keys, then each storage as an element count and its bytes.

Refused with a :class:`CheckpointError` naming the reason: TorchScript archives (``torch.jit.save``; loading one runs
its code, so it is recognised by its ``constants.pkl`` record and never handed to ``torch.load``), the pre-1.0 tar
format, compressed zip records (``torch.save`` never compresses; a compressed record is how a tiny file claims
gigabytes), anything that is not a regular file (a FIFO would block forever), and any file whose structure does not
hold together.

Pickles are read only by ``torch.load(weights_only=True)``: it rebuilds tensors and plain containers and calls nothing
else. What it refuses, such as the Lightning callback objects and OmegaConf configs of real checkpoints, is listed by
a static scan of the pickle first and each name is bound to an inert stand-in (:class:`Ignored`), so the weights
load and nothing named in the file runs. Names from the modules ``torch.load`` blocks outright (``os``, ``sys``) are
an error: no checkpoint needs them.

Before ``torch.load`` allocates anything, a first pass over the pickle with storages on the meta device collects every
storage it declares; each must be backed by exactly that many bytes of the file.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import pickletools
import stat
import struct
import threading
import warnings
import zipfile
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from torch._weights_only_unpickler import Unpickler as WeightsOnlyUnpickler

from ldm.errors import UserError

# The first pickle of a legacy torch.save stream, and its protocol version.
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
# A JSON header this large would list some 100,000 tensors; real SD and SDXL files (and LoRAs with their training
# metadata) stay far below. Reading a larger one would cost gigabytes before safetensors could refuse it.
MAX_SAFETENSORS_HEADER = 16 << 20
SAFETENSORS_DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2, "I16": torch.int16, "U16": torch.uint16, "F16": torch.float16,
    "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32, "F32": torch.float32, "I64": torch.int64,
    "U64": torch.uint64, "F64": torch.float64,
}  # fmt: skip
# Containers Lightning pickles that are dicts underneath: read as dicts, so their contents stay usable.
DICT_LIKE = (
    "pytorch_lightning.utilities.parsing.AttributeDict",
    "lightning.pytorch.utilities.parsing.AttributeDict",
    "lightning_fabric.utilities.data.AttributeDict",
    "lightning.fabric.utilities.data.AttributeDict",
)
BLOCKED_MODULES = ("os", "sys", "posix", "nt")
TAR_MAGIC_OFFSET = 257

# torch.load's allow-list is process-wide; concurrent loads must not see each other's stand-ins come and go.
_allow_list_lock = threading.Lock()


class CheckpointError(UserError):
    """A checkpoint cannot be read or does not fit the model; the message says what to do."""


class Ignored:
    """Stands in for any object of a pickle that is not a tensor or a plain container; building it does nothing.

    Each name the pickle refers to gets its own subclass, whose ``original`` is that dotted name: a class that the
    pickle holds as a value (Lightning 1.x keyed callback states by class) can then be told apart without importing
    it."""

    original = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> Ignored:
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<ignored {type(self).__qualname__}>"


# ---------------------------------------------------------------------------------------------------------------------
# Opening and telling formats apart


@contextlib.contextmanager
def open_regular(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """Open ``path`` for reading only if it is a regular file (checked on the open file, so it cannot be swapped)."""
    path = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer before fstat could refuse it.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise CheckpointError(
            f"checkpoint '{path}' does not exist. Pass the path of a .ckpt or .safetensors file."
        ) from None
    except OSError as err:
        raise CheckpointError(f"cannot open checkpoint '{path}': {err.strerror}.") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(f"checkpoint '{path}' is not a regular file (a directory, device or pipe); give a file.")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    with os.fdopen(fd, "rb") as file:
        yield file


def sniff_format(head: bytes, size: int) -> str:
    """``"safetensors"``, ``"zip"``, ``"legacy"``, ``"tar"`` or ``"unknown"``, from a file's first 512 bytes."""
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if len(head) >= 9 and head[8:9] == b"{" and 0 < struct.unpack("<Q", head[:8])[0] <= size - 8:
        return "safetensors"
    if head[TAR_MAGIC_OFFSET : TAR_MAGIC_OFFSET + 5] == b"ustar":
        return "tar"
    if head[:2] == b"\x80\x02":  # the legacy stream starts with its magic number, pickled with protocol 2
        return "legacy"
    return "unknown"


def read_file(path: str | os.PathLike, layout_only: bool = False) -> tuple[str, Any]:
    """``(format, contents)`` of a checkpoint file: a dict of tensors for safetensors, the unpickled object else.

    ``layout_only``: every tensor is on the meta device (names, shapes and dtypes, no data), read from the safetensors
    header or the pickle alone; a legacy stream (no SD checkpoint is one) is read in full. Raises CheckpointError
    naming the file and the problem for anything refused or malformed.
    """
    path = Path(path)
    with open_regular(path) as file:
        size = os.fstat(file.fileno()).st_size
        head = file.read(512)
        kind = sniff_format(head, size)
        if kind == "tar":
            raise CheckpointError(
                f"'{path}' is in PyTorch's pre-1.0 tar format, which ldm does not read; load it in a trusted "
                "environment and save the state dict again with torch.save or safetensors."
            )
        if kind == "unknown":
            raise CheckpointError(
                f"cannot read checkpoint '{path}': it is neither a torch.save checkpoint nor a safetensors file "
                "(is it complete? a web page saved by mistake?)."
            )
        try:
            if kind == "safetensors":
                header = _safetensors_header(path, file, size)
                if layout_only:
                    return kind, {name: _meta_tensor(entry) for name, entry in header.items() if name != "__metadata__"}
                from safetensors.torch import load_file

                return kind, load_file(str(path), device="cpu")
            return kind, _read_pickled(path, file, size, kind, layout_only)
        except CheckpointError:
            raise
        except Exception as err:  # anything the parsers raise on a malformed file is a property of the file
            reason = " ".join(str(err).split())[:300] or type(err).__name__
            raise CheckpointError(
                f"cannot read checkpoint '{path}': {type(err).__name__}: {reason}. The file is damaged or was not "
                "written by torch.save / safetensors."
            ) from None


# ---------------------------------------------------------------------------------------------------------------------
# safetensors


def _safetensors_header(path: Path, file: BinaryIO, size: int) -> dict[str, Any]:
    """The JSON header, checked against the file before safetensors (which would allocate for any header) reads it."""
    (length,) = struct.unpack("<Q", _read_exactly(file, 0, 8))
    if length > MAX_SAFETENSORS_HEADER:
        raise CheckpointError(
            f"'{path}': its safetensors header is {length / 2**20:.0f} MiB (at most {MAX_SAFETENSORS_HEADER >> 20} "
            "MiB is accepted; real checkpoints need well under 1 MiB)."
        )
    header = json.loads(_read_exactly(file, 8, length))
    if not isinstance(header, dict):
        raise CheckpointError(f"'{path}': its safetensors header is not a JSON object.")
    data_size = size - 8 - length
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        start, end = entry["data_offsets"]
        numel = 1
        for n in entry["shape"]:
            numel *= int(n)
        if not 0 <= start <= end <= data_size or end - start != numel * SAFETENSORS_DTYPES[entry["dtype"]].itemsize:
            raise CheckpointError(f"'{path}': tensor '{name}' does not lie within the file; it is truncated or damaged")
    return header


def _meta_tensor(entry: dict[str, Any]) -> torch.Tensor:
    return torch.empty([int(n) for n in entry["shape"]], dtype=SAFETENSORS_DTYPES[entry["dtype"]], device="meta")


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """A safetensors file's ``__metadata__`` strings (e.g. ``modelspec.*``); ``{}`` for other formats."""
    path = Path(path)
    with open_regular(path) as file:
        size = os.fstat(file.fileno()).st_size
        is_safetensors = sniff_format(file.read(512), size) == "safetensors"
        metadata = _safetensors_header(path, file, size).get("__metadata__") if is_safetensors else None
    return {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}


def read_zip_layout(path: Path, file: BinaryIO, size: int, warn: bool = True) -> tuple[Any, dict[int, str]]:
    """The object of a checked torch.save archive with its tensors on the meta device, and ``{storage id (_cdata):
    storage key}``; nothing of the file's data is read. Checked as :func:`read_file` checks it (``warn``: name the
    objects skipped)."""
    data_pkl, records = _check_zip(path, file, size)
    names = _foreign_globals(path, file, data_pkl)
    with _allow_list_lock, torch.serialization.safe_globals(_stand_ins(names)):
        declared, contents, storage_keys = _declared_storages(io.BytesIO(data_pkl), legacy=False)
    _check_declared_storages(path, declared, records)
    if warn:
        _warn_skipped(path, names, stacklevel=5)
    return contents, storage_keys


def _read_exactly(file: BinaryIO, offset: int, n: int) -> bytes:
    file.seek(offset)
    data = file.read(n)
    if len(data) != n:
        raise EOFError(f"the file ends {n - len(data)} bytes early")
    return data


# ---------------------------------------------------------------------------------------------------------------------
# Pickled checkpoints (torch.save)


def _read_pickled(path: Path, file: BinaryIO, size: int, kind: str, layout_only: bool = False) -> Any:
    if kind == "zip":
        data_pkl, records = _check_zip(path, file, size)
    else:
        data_pkl, records = None, None
    names = _foreign_globals(path, file, data_pkl)
    with _allow_list_lock, torch.serialization.safe_globals(_stand_ins(names)):
        if kind == "zip":
            declared, layout, _ = _declared_storages(io.BytesIO(data_pkl), legacy=False)
            _check_declared_storages(path, declared, records)
        else:
            _check_legacy_storages(path, file, size)
        if kind == "zip" and layout_only:
            data = layout
        else:
            file.seek(0)  # the file already checked, not whatever the path names by now
            data = torch.load(file, map_location="cpu", weights_only=True)
    _warn_skipped(path, names, stacklevel=5)
    return data


def _warn_skipped(path: Path, names: list[str], stacklevel: int) -> None:
    ignored = sorted(set(names) - set(DICT_LIKE))
    if ignored:
        listed = ", ".join(ignored[:6]) + (" ..." if len(ignored) > 6 else "")
        warnings.warn(
            f"{path.name}: skipped {len(ignored)} kind(s) of non-tensor object ({listed}); checkpoints are read "
            "without running any code they contain.",
            stacklevel=stacklevel,
        )


def _check_zip(path: Path, file: BinaryIO, size: int) -> tuple[bytes, dict[str, int]]:
    """``(data.pkl, {storage key: record size})`` of a torch.save archive; CheckpointError for anything else."""
    file.seek(0)
    with zipfile.ZipFile(file) as archive:
        infos = archive.infolist()
        names = [info.filename for info in infos]
        if any(name.rsplit("/", 1)[-1] == "constants.pkl" or "/code/" in name for name in names):
            raise CheckpointError(
                f"'{path}' is a TorchScript archive (torch.jit.save), which can run code when loaded; ldm never "
                "loads those. Give a checkpoint saved with torch.save(state_dict) or a .safetensors file."
            )
        compressed = [i.filename for i in infos if i.compress_type != zipfile.ZIP_STORED]
        if compressed or sum(i.file_size for i in infos) > size:
            raise CheckpointError(
                f"'{path}' has compressed records ({', '.join(compressed[:3]) or 'larger than the file'}), which "
                "torch.save never writes; it is not a checkpoint (possibly a zip bomb)."
            )
        pickles = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise CheckpointError(f"'{path}' is a zip file but not a torch.save checkpoint (no single data.pkl).")
        prefix = pickles[0][: -len("data.pkl")] + "data/"
        records = {i.filename[len(prefix) :]: i.file_size for i in infos if i.filename.startswith(prefix)}
        return archive.read(pickles[0]), records


def _foreign_globals(path: Path, file: BinaryIO, data_pkl: bytes | None) -> list[str]:
    """Every global the checkpoint's pickles name that torch.load's allow-list lacks, found without unpickling."""
    if data_pkl is not None:
        streams = [io.BytesIO(data_pkl)]
    else:
        file.seek(0)
        streams = [file] * 4  # magic, protocol, system info, then the objects
    found: set[str] = set()
    for stream in streams:
        for opcode, arg, _ in pickletools.genops(stream):
            if opcode.name == "STACK_GLOBAL":
                raise CheckpointError(f"'{path}' uses pickle protocol 4+ globals, which torch.save never writes.")
            if opcode.name == "GLOBAL":
                module, name = arg.split(" ", 1)
                module, name = NAME_MAPPING.get((module, name), (IMPORT_MAPPING.get(module, module), name))
                found.add(f"{module}.{name}")
    blocked = sorted(n for n in found if n.split(".", 1)[0] in BLOCKED_MODULES)
    if blocked:
        raise CheckpointError(
            f"'{path}' refers to {', '.join(blocked[:3])}, which no checkpoint needs: the file is probably malicious. "
            "Nothing in it was run."
        )
    allowed = set(torch._weights_only_unpickler._get_allowed_globals())
    return sorted(found - allowed)


def _stand_ins(names: list[str]) -> list[tuple[Callable, str]]:
    stand_ins: list[tuple[Callable, str]] = []
    for name in names:
        if name in DICT_LIKE:
            stand_ins.append((dict, name))
        else:
            namespace = {"__module__": "ldm.ignored", "original": name}
            stand_ins.append((type(name.rsplit(".", 1)[-1], (Ignored,), namespace), name))
    return stand_ins


def _declared_storages(stream: BinaryIO, legacy: bool) -> tuple[dict[str, tuple[int, int]], Any, dict[int, str]]:
    """Unpickle the object pickle with meta-device storages, nothing allocated: ``{storage key: (elements, bytes)}``,
    the object (its tensors on the meta device) and ``{storage id (_cdata): storage key}``."""
    declared: dict[str, tuple[int, int]] = {}
    keys: dict[int, str] = {}

    def persistent_load(saved_id: Any) -> Any:
        if not isinstance(saved_id, tuple) or len(saved_id) != (6 if legacy else 5):
            raise pickle.UnpicklingError(f"unexpected storage reference {str(saved_id)[:80]}")
        storage_type, key, numel = saved_id[1], str(saved_id[2]), saved_id[4]
        # Dtypes without a storage class of their own (float8, the unsigned ints) are saved as bytes.
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        if not isinstance(numel, int) or numel < 0:
            raise pickle.UnpicklingError(f"storage '{key}' declares {numel!r} elements")
        nbytes = numel * torch._utils._element_size(dtype)
        if declared.setdefault(key, (numel, nbytes)) != (numel, nbytes):
            raise pickle.UnpicklingError(f"storage '{key}' is declared with two sizes")
        storage = torch.UntypedStorage(nbytes, device="meta")
        keys[storage._cdata] = key
        return torch.storage.TypedStorage(wrap_storage=storage, dtype=dtype, _internal=True)

    unpickler = WeightsOnlyUnpickler(stream, encoding="utf-8")
    unpickler.persistent_load = persistent_load
    contents = unpickler.load()
    return declared, contents, keys


def _check_declared_storages(path: Path, declared: dict[str, tuple[int, int]], records: dict[str, int]) -> None:
    for key, (_, nbytes) in declared.items():
        if records.get(key) != nbytes:
            found = "no record" if key not in records else f"a record of {records[key]} bytes"
            raise CheckpointError(
                f"'{path}': storage '{key}' is declared as {nbytes} bytes but the file has {found}; it is damaged."
            )


def _check_legacy_storages(path: Path, file: BinaryIO, size: int) -> None:
    """Every storage the legacy stream declares must be filled by it, in full, within the file.

    (torch.load would otherwise allocate whatever the pickle declares, and leave storages the key list omits
    uninitialised.)
    """
    file.seek(0)
    magic = WeightsOnlyUnpickler(file, encoding="utf-8").load()
    protocol = WeightsOnlyUnpickler(file, encoding="utf-8").load()
    system = WeightsOnlyUnpickler(file, encoding="utf-8").load()
    if magic != LEGACY_MAGIC or protocol != LEGACY_PROTOCOL or not isinstance(system, dict):
        raise CheckpointError(f"'{path}' starts like a torch.save file but is not one (wrong magic number).")
    if not system.get("little_endian", False):
        raise CheckpointError(f"'{path}' was saved on a big-endian machine; re-save it on a little-endian one.")
    declared, _, _ = _declared_storages(file, legacy=True)
    keys = WeightsOnlyUnpickler(file, encoding="utf-8").load()
    if not isinstance(keys, list) or len(set(keys)) != len(keys) or set(map(str, keys)) != set(declared):
        raise CheckpointError(f"'{path}': its list of storages does not match the storages it uses; it is damaged.")
    offset = file.tell()
    for key in keys:
        numel, nbytes = declared[str(key)]
        (count,) = struct.unpack("<q", _read_exactly(file, offset, 8))
        offset += 8 + nbytes
        if count != numel or offset > size:
            raise CheckpointError(
                f"'{path}': storage '{key}' ({nbytes} bytes declared) is not in the file in full; it is truncated."
            )


# ---------------------------------------------------------------------------------------------------------------------
# Plain pickles of numbers (CompVis's ImageNet index lists)

# What a pickled numpy array needs (numpy 1.x files name numpy.core, numpy 2 numpy._core): building an array from its
# dtype and bytes runs no code of the file's choosing.
_ARRAY_GLOBALS = {
    (module, name)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
} | {("numpy", "ndarray"), ("numpy", "dtype")}


class _ArrayUnpickler(pickle.Unpickler):
    """Plain containers and numpy arrays only: any other class or function the file names is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ARRAY_GLOBALS:
            raise pickle.UnpicklingError(f"refusing {module}.{name}")
        return getattr(np, name) if module == "numpy" else getattr(np._core.multiarray, name)


def read_array_pickle(path: str | os.PathLike) -> Any:
    """A plain ``pickle.dump`` of lists, numbers or numpy arrays (not a torch.save file), e.g. CompVis's
    ``imagenet_train_hr_indices.p``; raises pickle.UnpicklingError for anything else the file names."""
    with open_regular(Path(path)) as file:
        return _ArrayUnpickler(file).load()
