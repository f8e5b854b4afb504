"""Locks on a study folder (POSIX `fcntl.flock`: released by the kernel when the holder dies, even by kill -9).

- :class:`StudyLock` (`<out>/.memlens.lock`): held for a whole `memlens run`, so two processes never
  write the same study; the second gets :class:`StudyLockedError` naming the holder.
- :func:`write_lock` (`<out>/.write.lock`): a short blocking lock around read-modify-write of the
  study-level files (results.parquet and the merged parquet files) when several processes of one
  study (e.g. Ray workers) may merge at the same time.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from memlens.store.layout import StudyFile

LOCK_FILE = StudyFile.LOCK
WRITE_LOCK_FILE = StudyFile.WRITE_LOCK


class StudyLockedError(RuntimeError):
    """Another process holds the study lock."""


class StudyLock:
    """Exclusive, non-blocking lock on a study folder; use as a context manager."""

    def __init__(self, root: Path):
        self.path = Path(root) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = self.holder()
            who = (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"
                   if holder else "another process")
            raise StudyLockedError(
                f"study {self.path.parent} is being written by {who}; wait for it to finish or stop it "
                "(a killed process releases the lock), or use another --out"
            ) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def holder(self) -> dict | None:
        """Who wrote the lock file last ({pid, host, since}), or None."""
        try:
            return json.loads(self.path.read_text() or "null")
        except (OSError, ValueError):
            return None

    def is_held(self) -> bool:
        """True when some process (this one included) holds the lock now."""
        if self._fd is not None:
            return True
        if not self.path.exists():
            return False
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing drops a lock we may have taken
        return False

    def __enter__(self) -> "StudyLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def write_lock(root: Path) -> Iterator[None]:
    """Blocking exclusive lock for a read-modify-write of study-level files."""
    path = Path(root) / WRITE_LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


__all__ = ["StudyLock", "StudyLockedError", "write_lock"]
