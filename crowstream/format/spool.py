"""The local spool of a capture into object storage. It owns making one (`make_spool`: a
temporary directory locked for the capture's life) and deleting the spools of dead
captures found beside it.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from .layout import LOCKS_DIR

SPOOL_PREFIX = "crowstream-spool-"


def make_spool(spool_dir: str | None) -> tuple[str, int]:
    """A new spool directory in `spool_dir` (default: the temp directory), locked for this
    process's life; the spools of dead captures found there are deleted first.
    -> (path, the lock's file descriptor)."""
    import fcntl

    parent = spool_dir or tempfile.gettempdir()
    os.makedirs(parent, exist_ok=True)
    for name in os.listdir(parent):
        path = os.path.join(parent, name)
        if name.startswith(SPOOL_PREFIX) and os.path.isdir(path) and _unlocked(path):
            shutil.rmtree(path, ignore_errors=True)
    spool = tempfile.mkdtemp(prefix=SPOOL_PREFIX, dir=parent)
    os.makedirs(os.path.join(spool, LOCKS_DIR))
    fd = os.open(_spool_lock(spool), os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return spool, fd


def _spool_lock(spool: str) -> str:
    return os.path.join(spool, LOCKS_DIR, "spool.lock")


def _unlocked(spool: str) -> bool:
    """Whether no live process holds `spool`'s lock (a spool without one is not ours)."""
    import fcntl

    try:
        fd = os.open(_spool_lock(spool), os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
