"""Durable small files. It owns the primitives every commit step is built from: atomic
replace (temp file in `.tmp/`, fsync, `os.replace`, fsync of the directory), JSON in and
out, hashing a file, and hashing one as it is written (`HashingFile`).
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import secrets

from crowstream.errors import ManifestError

from .layout import TMP_DIR


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ManifestError(f"{path} is damaged ({error}); it was left as it is. Restore it from "
                            "a backup or capture again into a new OUT.") from error


def dumps(value) -> str:
    return json.dumps(value, allow_nan=False, separators=(",", ":"))


def write_atomic(out: str, rel: str, data: bytes) -> None:
    """tmp in .tmp/, fsync, os.replace to `rel`, fsync its directory. The temp name holds
    a random token, not the pid: ranks (in containers sharing a file system, where pids
    repeat) may write the same file (`end.json`) at once."""
    tmp = os.path.join(out, TMP_DIR, f"{os.path.basename(rel)}.{secrets.token_hex(8)}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    final = os.path.join(out, rel)
    os.replace(tmp, final)
    fsync_dir(os.path.dirname(final))


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_and_hash(path: str) -> str:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    return sha256_file(path)


def sha256_file(path: str) -> str:
    """The file's sha256, read in 8 MiB chunks (hashlib releases the GIL on large ones)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class HashingFile(io.RawIOBase):
    """A file opened for writing that hashes (sha256) and counts what goes through it;
    `close` fsyncs. pyarrow writes through it from its encoding thread."""

    def __init__(self, path: str):
        self._file = open(path, "wb", buffering=0)
        self.sha256 = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data)
        written = 0
        while written < view.nbytes:  # a raw write may be partial
            written += self._file.write(view[written:])
        self.sha256.update(view)  # hashlib releases the GIL on large buffers
        self.size += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self.size

    def close(self) -> None:
        if not self.closed:
            try:
                os.fsync(self._file.fileno())
            finally:
                self._file.close()
        super().close()

    def discard(self) -> None:
        """Close without the fsync (the file is about to be deleted)."""
        self._file.close()
        super().close()
