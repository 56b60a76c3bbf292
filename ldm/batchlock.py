"""One writer per output folder: the lock file of an ``ldm batch`` run.

``.ldm-batch.lock`` in the output folder is created with ``O_CREAT | O_EXCL`` (so of
two runs exactly one gets it) and holds the owner's pid, host, start time and a
random token. A second run reads it and refuses, naming the owner. A lock whose
pid no longer runs on this host is stale (its run was killed): it is reported and
taken over. A lock from another host cannot be checked and is always respected.

A lock is removed only by the run whose token it holds, or as a stale lock after
checking, once it has been moved aside, that it is still the one found stale.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger("ldm")

LOCK_FILE = ".ldm-batch.lock"
_ATTEMPTS = 3


class ActiveRunError(ValueError):
    """Another run holds the output folder's lock; the message names it."""


@dataclass(frozen=True)
class FolderLock:
    path: Path
    token: str

    def release(self) -> None:
        """Remove the lock if it is still this run's."""
        if _read(self.path).get("token") == self.token:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def _read(path: Path) -> dict[str, Any]:
    """The lock's fields; {} when it is gone, empty (being written) or unreadable."""
    try:
        owner = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    except (OverflowError, ValueError):
        return False
    return True


def is_stale(owner: dict[str, Any]) -> bool:
    """True when the owner ran on this host and its pid no longer runs."""
    pid = owner.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False  # cannot tell: respect it
    return owner.get("host") == socket.gethostname() and not _pid_running(pid)


def _create(path: Path) -> FolderLock:
    token = secrets.token_hex(16)
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "token": token,
             "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, (json.dumps(owner) + "\n").encode("utf-8"))  # one write: never half a lock
        os.fsync(fd)
    finally:
        os.close(fd)
    return FolderLock(path, token)


def _describe(path: Path, owner: dict[str, Any]) -> str:
    if not owner:
        return (f"a run is active in {path.parent} (lock file {path}, owner unknown); if no ldm batch "
                f"is writing there, delete {path}")
    return (f"a run is active in {path.parent}: pid {owner.get('pid')} on {owner.get('host')}, since "
            f"{owner.get('since')} (lock file {path}); wait for it to finish or use another output folder")


def _remove_stale(path: Path, owner: dict[str, Any]) -> None:
    """Delete the stale lock ``owner`` read, and only it: moved aside first, then checked,
    so a lock another run made meanwhile is put back, not deleted."""
    aside = path.with_name(f"{path.name}.stale-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return  # someone else took it over first
    if _read(aside).get("token") == owner.get("token"):
        aside.unlink()
        logger.warning("%s: removed the stale lock of pid %s on %s (that run no longer runs)",
                       path.parent, owner.get("pid"), owner.get("host"))
        return
    with contextlib.suppress(FileExistsError):
        os.link(aside, path)
    aside.unlink()


def acquire(folder: Path) -> FolderLock:
    """Take ``folder``'s lock; :class:`ActiveRunError` when a live run holds it."""
    path = Path(folder) / LOCK_FILE
    owner: dict[str, Any] = {}
    for _ in range(_ATTEMPTS):
        try:
            return _create(path)
        except FileExistsError:
            owner = _read(path)
        if not owner and not path.exists():
            continue  # released meanwhile
        if not is_stale(owner):
            break
        _remove_stale(path, owner)
    raise ActiveRunError(_describe(path, owner))
