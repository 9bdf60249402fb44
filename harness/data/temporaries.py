"""The temporary folders that prepares write into, `<fingerprint>.tmp-<host>-<pid>`, and the
removal of those that a killed prepare left behind.

Several prepares may share a cache folder, from this host and from others (a shared file
system), so a temporary is removed only when its prepare is surely gone: its process is dead on
this host, or nothing in it was written for a day (the only sign for another host's prepare,
whose process cannot be seen from here); a running prepare writes tokens every few seconds.
"""

from __future__ import annotations

import os
import shutil
import socket
import time

MARK = ".tmp-"
IDLE_S = 24 * 3600


def temporary_folder(path: str) -> str:
    """Where this process writes the corpus that will be renamed to `path`."""
    return f"{path}{MARK}{socket.gethostname()}-{os.getpid()}"


def remove_stale_temporaries(cache_dir: str) -> None:
    host, now = socket.gethostname(), time.time()
    for entry in os.scandir(cache_dir):
        owner = entry.name.partition(MARK)[2]
        if not owner or not entry.is_dir(follow_symlinks=False):
            continue
        owner_host, _, pid = owner.rpartition("-")
        dead_here = owner_host == host and pid.isdigit() and not _alive(int(pid))
        if dead_here or now - _last_write(entry.path) > IDLE_S:
            shutil.rmtree(entry.path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def _last_write(folder: str) -> float:
    """The newest modification time of the folder and its files (now, when they change under us)."""
    try:
        return max([os.stat(folder).st_mtime] + [e.stat().st_mtime for e in os.scandir(folder)])
    except FileNotFoundError:  # renamed or removed by its own prepare meanwhile
        return time.time()
