"""One writer per output: an exclusive lock next to what a command writes.

``OUT.lock`` (beside ``OUT``, never inside it: ``--overwrite`` may delete ``OUT``) is
held with ``flock`` for as long as the command writes, and names its holder (host, pid,
command, start time). The kernel drops the lock when the holder dies, however it dies,
so a lock file left by a killed run is stale by construction and the next run takes
it; a live holder makes the second run fail at once with a message naming it.
Under torchrun only rank 0 takes it (the ranks of one run share the output).
Outputs on object storage (fsspec URLs) are not locked.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
from datetime import datetime, timezone
from typing import Any

from ._paths import local_path


class LockedError(RuntimeError):
    """Another live process writes the same output."""


def lock_path(out: Any) -> str | None:
    local = local_path(out)
    return None if local is None else os.path.abspath(local).rstrip("/") + ".lock"


class OutputLock:
    """Context manager: ``with OutputLock(out): ...`` writes ``out`` alone."""

    def __init__(self, out: Any, *, command: str | None = None):
        self.out = str(out)
        self.path = lock_path(out)
        self.command = command or " ".join(os.path.basename(a) if i == 0 else a
                                           for i, a in enumerate(sys.argv))
        self._fd: int | None = None

    def acquire(self) -> "OutputLock":
        if self.path is None or self._fd is not None:
            return self
        parent = os.path.dirname(self.path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise LockedError(f"{self.out} is being written by another ssld run "
                                  f"({holder}); wait for it to finish, or remove "
                                  f"{self.path} if that process is gone") from None
            # The file may have been unlinked by a holder that just finished: then this
            # lock guards nothing and the next run would create a fresh file. Retry.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        record = {"host": socket.gethostname(), "pid": os.getpid(), "command": self.command,
                  "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode("utf-8"), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # while still held: no one can take a file being removed
        except FileNotFoundError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
    except (OSError, ValueError):
        record = {}
    if not record:
        return "holder unknown"
    return (f"host {record.get('host')}, pid {record.get('pid')}, since {record.get('since')}: "
            f"{record.get('command')}")
