"""One writer per folder: an exclusive lock on OUTPUT (or a training run) held for the whole run."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = ".optvq.lock"  # inside the locked folder; holds the writer's pid


class FolderBusy(BlockingIOError):
    """Another process holds the folder's lock; the message names its pid."""


@contextlib.contextmanager
def folder_lock(folder: str | Path) -> Iterator[Path]:
    """Hold an exclusive ``fcntl.flock`` on ``folder/.optvq.lock`` (the folder is created) until the
    block ends. A second process fails at once with :class:`FolderBusy` naming the holder's pid. The
    kernel drops the lock when the holder dies, even by SIGKILL, so a stale file never blocks."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise FolderBusy(
                f"{folder}: another optvq run (pid {holder}) is writing here; wait for it or stop it"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race a waiting locker)
