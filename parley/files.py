"""Crash-safe file writes: a reader (or a restart after a crash) sees the old file or the
new one, never half of one.

    with atomic_open(path) as f:        # text; "wb" for bytes
        f.write(text)
    fsync(folder)                       # make renames inside `folder` durable
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_open(path, mode: str = "w"):
    """A temporary file beside `path`, renamed over it only if the block finishes."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
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
