"""Durable small files. It owns the primitives every commit step is built from: atomic
replace (temp file in `.tmp/`, fsync, `os.replace`, fsync of the directory), JSON in and
out, and hashing a file.
"""

from __future__ import annotations

import datetime
import hashlib
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
