"""One writer per output: an exclusive lock next to what a command writes.

``OUT.lock`` (beside ``OUT``, never inside it: ``--overwrite`` may delete ``OUT``) is
held for as long as the command writes, and names its holder (host, pid, command, start
time). A live holder makes a second run fail at once with a message naming it.

The lock is a POSIX record lock (``fcntl.lockf``), not ``flock``: a ``flock`` belongs to
the open file, which forked children (DataLoader workers) share, so after a ``kill -9``
of the holder its workers kept the lock for seconds; a record lock belongs to the process
alone, so the kernel drops it the moment the holder dies, however it dies, and a lock file
left by a killed run is stale by construction. The price of record locks: closing *any*
descriptor of the file in the holding process releases them, and a second lock by the
same process always succeeds. So this process never opens a lock file it holds again:
the locks it holds are kept in :data:`_HELD` (by device and inode) and a second
``OutputLock`` on the same output is refused from there, before any ``open``.
Under torchrun only rank 0 takes it (the ranks of one run share the output).
Outputs on object storage (fsspec URLs) are not locked.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import threading
from datetime import datetime, timezone
from typing import Any

from ._paths import local_path


class LockedError(RuntimeError):
    """Another live process writes the same output."""


# (st_dev, st_ino) of every lock file this process holds -> its holder record.
_HELD: dict[tuple[int, int], dict] = {}
_HELD_GUARD = threading.Lock()


def lock_path(out: Any) -> str | None:
    local = local_path(out)
    return None if local is None else os.path.abspath(local).rstrip("/") + ".lock"


def _file_id(path: str) -> tuple[int, int] | None:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    return info.st_dev, info.st_ino


class OutputLock:
    """Context manager: ``with OutputLock(out): ...`` writes ``out`` alone."""

    def __init__(self, out: Any, *, command: str | None = None):
        self.out = str(out)
        self.path = lock_path(out)
        self.command = command or " ".join(os.path.basename(a) if i == 0 else a
                                           for i, a in enumerate(sys.argv))
        self._fd: int | None = None
        self._id: tuple[int, int] | None = None
        self._made: list[str] = []   # folders acquire created for the lock file

    def _refuse(self, holder: str) -> LockedError:
        return LockedError(f"{self.out} is being written by another ssld run ({holder}); wait "
                           f"for it to finish, or remove {self.path} if that process is gone")

    def acquire(self) -> "OutputLock":
        if self.path is None or self._fd is not None:
            return self
        self._made = _make_folders(os.path.dirname(self.path))
        with _HELD_GUARD:
            while True:
                held = _HELD.get(_file_id(self.path))
                if held is not None:   # this process holds it: opening it again would free it
                    self._forget_folders()
                    raise self._refuse(_describe(held))
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    if exc.errno not in (errno.EACCES, errno.EAGAIN):
                        os.close(fd)
                        raise
                    holder = _read_holder(fd)
                    os.close(fd)
                    self._forget_folders()
                    raise self._refuse(holder) from None
                # The file may have been unlinked by a holder that just finished: then this
                # lock guards nothing and the next run would create a fresh file. Retry.
                info = os.fstat(fd)
                if _file_id(self.path) == (info.st_dev, info.st_ino):
                    break
                os.close(fd)
            record = {"host": socket.gethostname(), "pid": os.getpid(), "command": self.command,
                      "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode("utf-8"), 0)
            self._fd, self._id = fd, (info.st_dev, info.st_ino)
            _HELD[self._id] = record
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        with _HELD_GUARD:
            try:
                os.unlink(self.path)  # while still held: no one can take a file being removed
            except FileNotFoundError:
                pass
            os.close(self._fd)        # releases the record lock
            _HELD.pop(self._id, None)
            self._fd = self._id = None
        self._forget_folders()

    def _forget_folders(self) -> None:
        """Remove the folders ``acquire`` made, deepest first, while they are empty: a
        refused or finished run that wrote nothing leaves nothing behind."""
        for folder in reversed(self._made):
            try:
                os.rmdir(folder)
            except OSError:   # not empty (the output is in it), or already gone
                break
        self._made = []

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _make_folders(folder: str) -> list[str]:
    """``os.makedirs(folder)``, returning the folders it created, outermost first."""
    missing = []
    while folder and not os.path.isdir(folder):
        missing.append(folder)
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    missing.reverse()
    for path in missing:
        try:
            os.mkdir(path)
        except FileExistsError:
            pass
    return missing


def _describe(record: dict) -> str:
    if not record:
        return "holder unknown"
    return (f"host {record.get('host')}, pid {record.get('pid')}, since {record.get('since')}: "
            f"{record.get('command')}")


def _read_holder(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
    except (OSError, ValueError):
        record = {}
    return _describe(record)
