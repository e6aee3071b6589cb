"""Advisory locks. It owns the directory lock (`exclusive`: one process creates, resumes,
overwrites or finalizes OUT at a time) and the per-rank locks of a multi-rank run
(`RankLock`, `busy_ranks`) and the world size of the ranks running (`check_world`).
`flock` fences only where the file system honours it.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets

from crowstream.errors import OutputError

from .layout import LOCKS_DIR


@contextlib.contextmanager
def exclusive(out: str, *, wait: float = 0):
    """Hold an advisory lock on the OUT directory, so two captures never write (or clean
    up, or overwrite) the same OUT at once. Released when the process dies. A single
    process holds it for its whole run; a rank of several only while it creates or joins
    the run and while it finalizes, waiting up to `wait` seconds for it."""
    try:
        import fcntl  # noqa: F401  (only to know whether flock exists)
    except ImportError:  # not POSIX: no advisory locks to take
        yield
        return
    fd = os.open(out, os.O_RDONLY)
    try:
        _flock(fd, wait, f"another crowstream process is writing to {out!r}; let it finish "
                         "(or stop it) before resuming or overwriting.")
        yield
    finally:
        os.close(fd)


def _flock(fd: int, wait: float, message: str) -> None:
    import fcntl
    import time

    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError as error:
            if time.monotonic() >= deadline:
                raise OutputError(message) from error
            time.sleep(0.05)


def _lock_path(out: str, rank: int) -> str:
    return os.path.join(out, LOCKS_DIR, f"rank-{rank:05d}.lock")


class RankLock:
    """The lock of one rank of a multi-rank run: `OUT/.locks/rank-<rank>.lock`, held from
    the start of the rank's run until `release` (or the process's death)."""

    def __init__(self, out: str, rank: int):
        os.makedirs(os.path.join(out, LOCKS_DIR), exist_ok=True)
        self.fd: int | None = os.open(_lock_path(out, rank), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _flock(self.fd, 0, f"another crowstream process is writing to {out!r} as rank "
                               f"{rank}; let it finish (or stop it) first.")
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def busy_ranks(out: str, *, besides: int | None = None) -> list[int]:
    """Ranks whose lock another process holds right now (`besides`: the caller's own)."""
    try:
        import fcntl  # noqa: F401  (only to know whether flock exists)
    except ImportError:
        return []
    directory = os.path.join(out, LOCKS_DIR)
    names = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
    busy = []
    for name in names:
        found = re.fullmatch(r"rank-(\d{5})\.lock", name)
        if not found or int(found.group(1)) == besides:
            continue
        fd = os.open(os.path.join(directory, name), os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            busy.append(int(found.group(1)))
        finally:
            os.close(fd)
    return busy


def _world_path(out: str) -> str:
    return os.path.join(out, LOCKS_DIR, "world")


def check_world(out: str, rank: int, world: int) -> None:
    """Under the directory lock, as rank `rank` of `world` joins OUT's run: refuse it while
    any other rank holds its lock and the running ranks' world size (recorded here by
    the first of them) differs; else record `world`. Resizing with no rank running stays
    allowed: the new world size replaces the old."""
    path = _world_path(out)
    busy = busy_ranks(out, besides=rank)
    recorded = None
    if busy and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            text = f.read().strip()
        recorded = int(text) if text.isdigit() else None
    if recorded is not None and recorded != world:
        raise OutputError(f"rank {rank} of {world} cannot join the run in {out!r}: rank(s) "
                          f"{', '.join(map(str, busy))} of a {recorded}-rank run are writing it. "
                          "Start every rank with the same world size; to resize, stop every "
                          "rank, then resume with the new size.")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{secrets.token_hex(8)}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(f"{world}\n")
    os.replace(tmp, path)
