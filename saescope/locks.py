"""One writer per output folder: an ``fcntl.flock`` on ``<folder>/.saescope.lock``.

A second process writing the same store, training run, release or feature folder would delete
the first one's temporary files or interleave checkpoints, so it is refused, naming the pid that
holds the folder.  ``flock`` locks die with their process (a SIGKILL included), so a killed run
never leaves a folder locked; the pid written into the file is only there to name the holder.
Locks are re-entrant within a process (``saescope run`` holds its folder while the trainer it
calls takes the same one), and a lock held is what makes removing the folder's stale temporary
files safe: no other live process can own them.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from saescope.errors import LockedError

LOCK_FILE = ".saescope.lock"

_held: dict[Path, list] = {}  # resolved folder -> [fd, depth, whether this lock created the folder]
_mutex = threading.Lock()


@contextlib.contextmanager
def folder_lock(folder: str | Path, what: str = "output folder") -> Iterator[Path]:
    """Hold ``folder``'s lock (creating the folder) for the ``with`` block; raise
    :class:`~saescope.errors.LockedError` naming the holder's pid if another process has it."""
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    key = folder.resolve()
    with _mutex:
        if key in _held:
            _held[key][1] += 1
        else:
            fd = os.open(key / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise LockedError(
                    f"{what} {folder} is being written by another saescope process (pid {holder}); "
                    "wait for it to finish or stop it, or use another output folder"
                ) from None
            mine = f"{os.getpid()}\n".encode()
            if os.pread(fd, 64, 0) != mine:  # left alone when unchanged: a no-op rerun touches nothing
                os.ftruncate(fd, 0)
                os.pwrite(fd, mine, 0)
            _held[key] = [fd, 1, created]
    try:
        yield folder
    finally:
        with _mutex:
            entry = _held[key]
            entry[1] -= 1
            if entry[1] == 0:
                del _held[key]
                if entry[2] and [p.name for p in key.iterdir()] == [LOCK_FILE]:
                    (key / LOCK_FILE).unlink()  # nothing was written: leave no folder behind
                    key.rmdir()
                os.close(entry[0])  # closing the descriptor releases the flock


def holds_lock(folder: str | Path) -> bool:
    """Whether this process holds ``folder``'s lock."""
    return Path(folder).resolve() in _held
