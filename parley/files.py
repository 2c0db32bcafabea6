"""Crash-safe file writes: a reader (or a restart after a crash) sees the old file or the
new one, never half of one. And reads of files named from outside that cannot hang.

    with atomic_open(path) as f:        # text; "wb" for bytes
        f.write(text)
    fsync(folder)                       # make renames inside `folder` durable
    with open_regular(path) as f:       # binary; NotRegularFile for a FIFO, device or folder
        data = f.read()
    data = read_regular(path, max_bytes)  # the same, at most max_bytes (TooLarge beyond)
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO


class NotRegularFile(OSError):
    """A path that names a folder, pipe, device or socket where a file was expected."""


def open_regular(path) -> BinaryIO:
    """`path` opened for binary reading, only if it is a regular file. The check is made on the
    opened file itself, so nothing can be swapped in between: a FIFO opens at once (non-blocking)
    to be refused instead of waiting for a writer, a device (a link to /dev/zero) is refused
    instead of read forever. FileNotFoundError when it does not exist."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile(f"{path} is not a regular file (a folder, pipe or device)")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class TooLarge(OSError):
    """A file over the size its reader allows; `size` is (at least) what it holds."""

    def __init__(self, path, size: int, limit: int):
        super().__init__(f"{path}: {size:,} bytes, over the limit of {limit:,}")
        self.size = size


def read_regular(path, max_bytes: int | None = None) -> bytes:
    """A regular file's bytes (open_regular). With `max_bytes`, a larger file is refused from its size
    before it is read, and one that grows while it is read is refused too: TooLarge."""
    with open_regular(path) as f:
        if max_bytes is None:
            return f.read()
        size = os.fstat(f.fileno()).st_size
        data = f.read(max_bytes + 1) if size <= max_bytes else b""
    if max(size, len(data)) > max_bytes:
        raise TooLarge(path, max(size, len(data)), max_bytes)
    return data


@contextlib.contextmanager
def atomic_open(path, mode: str = "w"):
    """A temporary file beside `path` (`.NAME.XXXXXXXX.tmp`: a killed process leaves it, recognisably),
    renamed over it only if the block finishes."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as f:
            yield f
        os.chmod(tmp, 0o644)  # mkstemp makes it private; these are ordinary shared files
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def fsync(path) -> None:
    """Flush a file (or a folder's entries) to disk: a rename is durable only after this."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
