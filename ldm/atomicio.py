"""Crash-safe file writes, and the regular-file check that readers run first.

A file is written to a temporary name in its own folder, flushed and fsynced,
then renamed over the target with ``os.replace`` (atomic on POSIX and Windows),
and the folder is fsynced so the rename itself survives a power cut. A reader,
or a rerun after a ``kill -9``, sees the old file or the new one, never half of
one; what a crash can leave behind is a temporary file, which
:func:`remove_temp_files` clears.

Writers that need a path rather than a file object (safetensors ``save_file``, a
whole folder tree) use :func:`atomic_path`, under the same temporary-name rule, and
:func:`remove_temp_siblings` clears what a killed one left next to its target.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

TEMP_SUFFIX = ".ldm-tmp"


def _umask() -> int:
    # os.umask can only be read by setting it; done once, at import.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()
_FILE_MODE = 0o666 & ~_UMASK
_DIR_MODE = 0o777 & ~_UMASK


_NON_REGULAR = (
    (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
)


def non_regular_reason(path: str | os.PathLike) -> str | None:
    """None for a regular file (links followed), else what ``path`` is instead
    ("is a FIFO (named pipe), not a regular file", ...), so that a reader refuses it
    by name instead of hanging on a pipe or calling a folder "not found".

    Raises FileNotFoundError for a missing path or a broken link.
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        if path.is_symlink():
            raise FileNotFoundError(f"{path} is a broken symbolic link (to {os.readlink(path)})") from None
        raise FileNotFoundError(f"not found: {path}") from None
    except OSError as exc:  # a link loop, a name too long, ...
        return f"cannot be read ({exc.strerror or exc})"
    for test, kind in _NON_REGULAR:
        if test(mode):
            return f"is {kind}, not a regular file"
    return None if stat.S_ISREG(mode) else "is not a regular file"


def fsync_dir(folder: str | os.PathLike) -> None:
    """Persist a rename in ``folder`` (a no-op where folders cannot be opened, e.g. Windows)."""
    with contextlib.suppress(OSError):
        _fsync_file(folder)


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(f)`` on a temporary file, then move it to ``path`` atomically."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=TEMP_SUFFIX, dir=path.parent)
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


def remove_temp_siblings(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files and folders a killed :func:`atomic_path` or
    :func:`atomic_write` for ``path`` left next to it (and nothing else)."""
    path = Path(path)
    prefix = _temp_prefix(path)
    removed = []
    for p in path.parent.iterdir():
        if p.name.startswith(prefix) and is_temp_file(p):
            _remove(p)
            removed.append(p)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _fsync_tree(root: Path) -> None:
    """Give every written file and folder the ordinary modes and flush it to disk."""
    if not root.is_dir():
        os.chmod(root, _FILE_MODE)
        _fsync_file(root)
        return
    for folder, _, files in os.walk(root):
        os.chmod(folder, _DIR_MODE)
        for name in files:
            os.chmod(os.path.join(folder, name), _FILE_MODE)
            _fsync_file(Path(folder, name))
        fsync_dir(folder)


def _fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _move_into_place(tmp: Path, dst: Path) -> None:
    if dst.is_dir() and not dst.is_symlink():
        # A folder cannot be replaced in one rename: the old one is moved aside under a
        # temporary name first (a kill in between leaves it for remove_temp_siblings).
        old = Path(tempfile.mkdtemp(prefix=_temp_prefix(dst), suffix=TEMP_SUFFIX, dir=dst.parent))
        os.rename(dst, old / dst.name)
        os.rename(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dst)


@contextlib.contextmanager
def atomic_path(dst: str | os.PathLike, *, folder: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``dst`` to write (an empty file, or with
    ``folder=True`` an empty folder); on success fsync what was written and move it
    to ``dst``, replacing what is there; on error remove it, leaving ``dst`` as it was.

    Which existing ``dst`` may be replaced is the caller's decision, made before.
    """
    dst = Path(dst)
    names = {"prefix": _temp_prefix(dst), "suffix": TEMP_SUFFIX, "dir": dst.parent}
    if folder:
        tmp = Path(tempfile.mkdtemp(**names))
    else:
        fd, name = tempfile.mkstemp(**names)
        os.close(fd)
        tmp = Path(name)
    try:
        yield tmp
        _fsync_tree(tmp)
        _move_into_place(tmp, dst)
    except BaseException:
        _remove(tmp)
        raise
    fsync_dir(dst.parent)
