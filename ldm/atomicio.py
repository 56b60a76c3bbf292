"""Crash-safe file writes.

A file is written to a temporary name in its own folder, flushed and fsynced,
then renamed over the target with ``os.replace`` (atomic on POSIX and Windows),
and the folder is fsynced so the rename itself survives a power cut. A reader,
or a rerun after a ``kill -9``, sees the old file or the new one, never half of
one; what a crash can leave behind is a temporary file, which
:func:`remove_temp_files` clears.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

TEMP_SUFFIX = ".ldm-tmp"


def _umask() -> int:
    # os.umask can only be read by setting it; done once, at import.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


def fsync_dir(folder: str | os.PathLike) -> None:
    """Persist a rename in ``folder`` (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(f)`` on a temporary file, then move it to ``path`` atomically."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            # mkstemp makes the file 0600; give it the mode an ordinary open() would.
            with contextlib.suppress(AttributeError, OSError):
                os.fchmod(f.fileno(), _FILE_MODE)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line with a single ``write`` and fsync it.

    A crash can at worst leave the last line unterminated; readers of such logs
    (the batch manifest) drop a final line that has no newline.
    """
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def is_temp_file(path: str | os.PathLike) -> bool:
    name = Path(path).name
    return name.startswith(".") and name.endswith(TEMP_SUFFIX)


def remove_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files an interrupted :func:`atomic_write` left in ``folder``."""
    removed = []
    for p in Path(folder).iterdir():
        if is_temp_file(p) and p.is_file():
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed
