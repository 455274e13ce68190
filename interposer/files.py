"""Atomic file writes: a crash never leaves a half-written file under the real name."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def absolute(location: str) -> str:
    """A URI (s3://...) as it is; a local path absolute, ~ expanded: what travels to workers in other folders
    or on other nodes, and what a record keeps so a rerun from elsewhere means the same place."""
    return location if "://" in location else os.path.abspath(os.path.expanduser(location))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call write(tmp) on a temporary path beside `path`, then rename it into place. The temporary is named
    `.NAME.*.tmp`, so a cleaner can find what a killed process left (pipeline.store.Store.remove_temporaries)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path.parent}: output folder does not exist")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes 0600 (and some writers replace the file): give what a plain open() would, so that other
        # accounts (a shared volume, ComfyUI as another user) may read it
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_bytes_durably(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically and fsync it first: once this returns, a crash cannot lose it."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, write)
