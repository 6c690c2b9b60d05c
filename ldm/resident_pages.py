"""Keeping a compiled network's weights out of resident memory (Linux; elsewhere these functions change nothing).

Once OpenVINO has compiled a network, two more copies of its weights sit in the process besides the compiled one:
the torch module's tensors, and the pages of the converted model's ``.bin`` file, which OpenVINO maps and keeps
mapped. Both are only read again in rare cases (a new input shape to convert, a torch fallback), yet both count in
the resident set: an fp32 SD 1.5 UNet would take three times its 3.4 GB.

- :func:`move_to_file` moves the torch tensors into a private (copy-on-write) mapping of an unlinked file: they stay
  ordinary tensors that anything may read or change in place, but pages that are only read can be handed back to
  the kernel, which reads them from the file again when they are touched.
- :func:`page_out` hands back the read pages of such tensors (``MADV_PAGEOUT``: pages written since, a merged LoRA
  say, are never dropped).
- :func:`dropping_file_pages` hands back the pages of a read-only file mapping, such as OpenVINO's ``.bin``, every
  few milliseconds while a block runs (the compiler reads each weight once, to repack it) and once at its end.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

MADV_DONTNEED = 4  # drop a mapping's pages; a read-only file mapping reads them from the file again
MADV_PAGEOUT = 21  # reclaim a mapping's pages where it can lose nothing (Linux 5.4)
ALIGNMENT = 64  # bytes between tensors in the file: a cache line, more than any dtype's alignment
POLL_SECONDS = 0.05


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


LIBC = _libc()
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _advise(start: int, end: int, advice: int) -> None:
    """``madvise`` on the whole pages in [start, end); a kernel that refuses the advice leaves the pages as they are."""
    first, last = -(-start // PAGE) * PAGE, end // PAGE * PAGE
    if LIBC is not None and last > first:
        LIBC.madvise(first, last - first, advice)


def _trim_heap() -> None:
    """Return freed heap memory to the kernel (glibc keeps freed blocks below its mmap threshold)."""
    with contextlib.suppress(AttributeError, OSError):
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)


def in_mapping(tensor: torch.Tensor, mapping: torch.UntypedStorage | None) -> bool:
    """Whether ``tensor``'s bytes lie in ``mapping`` (a storage :func:`move_to_file` returned)."""
    start = tensor.untyped_storage().data_ptr()
    return mapping is not None and mapping.data_ptr() <= start < mapping.data_ptr() + mapping.nbytes()


def movable(tensor: torch.Tensor, mapping: torch.UntypedStorage | None = None) -> bool:
    """Whether :func:`move_to_file` moves ``tensor``: a contiguous CPU tensor alone in its storage, or one of an
    earlier mapping's."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        return False
    alone = tensor.storage_offset() == 0 and tensor.untyped_storage().nbytes() == tensor.nbytes
    return alone or in_mapping(tensor, mapping)


def move_to_file(
    tensors: Iterable[torch.Tensor], folder: Path, previous: torch.UntypedStorage | None = None
) -> torch.UntypedStorage | None:
    """Move each :func:`movable` tensor into one private mapping of a file in ``folder`` (deleted at once: the
    mapping keeps it until the tensors are gone). The tensors keep their identity, values, dtype and shape; only
    where their bytes live changes. Tensors in ``previous`` (an earlier mapping) move too, so the new mapping
    replaces it. Returns the mapping's storage (for :func:`page_out`), or None where nothing moved or the platform
    has no ``madvise``."""
    if LIBC is None:
        return None
    moving: dict[int, list[torch.Tensor]] = {}  # by address: tensors that share bytes (tied weights) stay shared
    for tensor in tensors:
        if movable(tensor, previous):
            moving.setdefault(tensor.data_ptr(), []).append(tensor)
    if not moving:
        return None
    offsets, size = {}, 0
    for ptr, (tensor, *_) in moving.items():
        offsets[ptr], size = size, -(-(size + tensor.nbytes) // ALIGNMENT) * ALIGNMENT
    folder.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=".weights-", dir=folder)
    try:
        with os.fdopen(handle, "wb") as file:
            file.truncate(size)
            for ptr, (tensor, *_) in moving.items():
                file.seek(offsets[ptr])
                file.write(memoryview(tensor.detach().reshape(-1).view(torch.uint8).numpy()))
            # page_out can only hand back clean pages: while the kernel has not yet written the file (seconds, or
            # much longer when other writes keep the disk busy), every page would stay resident.
            file.flush()
            os.fdatasync(file.fileno())
        mapped = torch.from_file(name, shared=False, size=size, dtype=torch.uint8)
    finally:
        os.unlink(name)
    for ptr, (tensor, *tied) in moving.items():
        view = mapped[offsets[ptr] : offsets[ptr] + tensor.nbytes].view(tensor.dtype).view(tensor.shape)
        for same in (tensor, *tied):
            same.data = view
    _trim_heap()
    storage = mapped.untyped_storage()
    page_out(storage)
    return storage


def page_out(storage: torch.UntypedStorage | None) -> None:
    """Hand back the pages of a :func:`move_to_file` mapping that were only read."""
    if storage is not None:
        _advise(storage.data_ptr(), storage.data_ptr() + storage.nbytes(), MADV_PAGEOUT)


def _read_only_mappings(path: Path) -> list[tuple[int, int]]:
    target = os.path.realpath(path)
    ranges = []
    with contextlib.suppress(OSError), open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].rstrip("\n") == target and "w" not in fields[1]:
                start, end = (int(v, 16) for v in fields[0].split("-"))
                ranges.append((start, end))
    return ranges


def drop_file_pages(path: Path) -> None:
    """Hand back the resident pages of this process's read-only mappings of ``path``."""
    for start, end in _read_only_mappings(path):
        _advise(start, end, MADV_DONTNEED)


@contextlib.contextmanager
def dropping_file_pages(path: Path) -> Iterator[None]:
    """Hand back the pages of read-only mappings of ``path`` while the block runs (from a thread: OpenVINO's compiler
    runs without Python's lock) and once more at its end."""
    if LIBC is None:
        yield
        return
    done = threading.Event()

    def drop_until_done() -> None:
        while not done.wait(POLL_SECONDS):
            drop_file_pages(path)

    thread = threading.Thread(target=drop_until_done, name="drop-file-pages", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        drop_file_pages(path)
