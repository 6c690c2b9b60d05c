"""The one way this project writes a file: staged beside its destination, synced, then given its name, so that it
appears complete or not at all. Checkpoints, samples, grids and the model-hash cache are all written so."""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Temporary files of :func:`atomic_path`: ``.<file name>.<random>.tmp``.
TEMP_SUFFIX = ".tmp"
# errno values of file systems without hard links (FAT, some network and FUSE file systems).
NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV}


@contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """A temporary path beside ``path`` to write the file at; when the block ends, the file is synced and given the
    name ``path``, so it appears complete or not at all (a crash leaves the hidden ``.<name>.<random>.tmp``).

    With ``overwrite`` off an existing ``path`` is never replaced: the block's file is then discarded and
    FileExistsError raised, so that concurrent writers can each claim a name of their own.
    The result gets the permissions a new file gets from the umask (mkstemp's, and safetensors', would be 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
    open(tmp, "xb").close()
    mode = tmp.stat().st_mode & 0o777
    try:
        yield tmp
        os.chmod(tmp, mode)  # some writers (safetensors) replace the file with one of their own
        with open(tmp, "rb+") as file:
            os.fsync(file.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            _place_new(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _place_new(tmp: Path, path: Path) -> None:
    """Give the finished file ``tmp`` the name ``path`` unless that name is taken (then FileExistsError)."""
    try:
        os.link(tmp, path)  # fails if the name is taken, unlike a rename
        return
    except FileExistsError:
        raise
    except OSError as err:
        if err.errno not in NO_HARD_LINKS:
            raise
    # Without hard links: claim the name with an empty file, then move the file over it. Only a kill between the
    # two system calls can leave that empty file behind.
    open(path, "xb").close()
    try:
        os.replace(tmp, path)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
