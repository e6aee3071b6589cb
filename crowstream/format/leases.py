"""Fencing on object storage. It owns the conditional writes of a bucket OUT (`Store`:
create-only and compare-and-swap PUTs, the 412 answer as the fencing signal) and the
lease of one (run, rank) (`Lease`: `leases/rank-<rank>.json`, `$defs/lease` in
schemas/, holding the writer's attempt id and an expiry).

The protocol: a writer creates its lease with `If-None-Match: *` (or takes an expired one
over with `If-Match` on its ETag) before it deletes or writes anything; a thread renews
it every `lease_s / 3` seconds with `If-Match`; before each record PUT the writer checks
that the lease is still its own and unexpired by its own clock. Another writer takes a
lease over only `SKEW_S` seconds after its expiry (or at once with `takeover`, the user
asserting that its holder is dead), so a writer whose lease was taken over has seen its
own lease expire first and stopped. Records are created with `If-None-Match: *` and the
manifest is replaced with `If-Match` on the ETag this writer last saw: a writer that
lost the race gets a 412 and stops (`FencedError`).

A store that ignores conditional writes (found by one probe) is written as before, with
one warning: it fences nothing.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import threading
import time

from crowstream.errors import OutputError
from crowstream.schemas import validate_definition

log = logging.getLogger("crowstream")

SKEW_S = 30.0  # clock-skew margin between two writers' clocks, added to a lease's expiry
LEASES_DIR = "leases"
NO_RUN_YET = "00000000"  # a lease taken before the run's id is known (a new run)


class FencedError(OutputError):
    """This writer no longer owns the run (its lease was taken over, or another writer
    committed first): it stopped without committing."""


def _precondition_failed(error: BaseException) -> bool:
    """Whether `error` (as s3fs raises it) is an HTTP 412 answer."""
    while error is not None:
        text = str(error)
        if "PreconditionFailed" in text or "pre-conditions you specified" in text:
            return True
        error = error.__cause__ or error.__context__
    return False


class Store:
    """Conditional PUTs on the bucket of an fsspec filesystem `fs`. `conditional` is False
    where the store (or its fsspec implementation) offers none: then writes are plain."""

    def __init__(self, fs, root: str):
        self.fs = fs
        self.conditional = hasattr(fs, "call_s3") and self._probe(root)
        if not self.conditional:
            log.warning("the store of this OUT does not honour conditional writes: two writers "
                        "on one OUT are not fenced (see docs/scaling.md)")

    def _split(self, key: str):
        bucket, path, _ = self.fs.split_path(key)
        return bucket, path

    def _put(self, key: str, data: bytes, **condition) -> str:
        bucket, path = self._split(key)
        try:
            answer = self.fs.call_s3("put_object", Bucket=bucket, Key=path, Body=data, **condition)
        except OSError as error:
            if _precondition_failed(error):
                raise FencedError(f"the conditional write of {path} failed") from error
            raise
        return answer["ETag"]

    def _probe(self, root: str) -> bool:
        """Create one object twice with If-None-Match: honoured when the second fails."""
        key = f"{root}/{LEASES_DIR}/probe-{secrets.token_hex(8)}"
        try:
            self._put(key, b"probe", IfNoneMatch="*")
            try:
                self._put(key, b"probe", IfNoneMatch="*")
                return False
            except FencedError:
                return True
        except OSError as error:  # e.g. a store that refuses the header outright
            log.debug("conditional-write probe failed: %s", error)
            return False
        finally:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(key)

    def read(self, key: str) -> tuple[bytes | None, str | None]:
        """-> (content, ETag) of `key`, or (None, None) if absent."""
        self.fs.invalidate_cache()
        try:
            etag = self.fs.info(key).get("ETag")
            return self.fs.cat_file(key), etag
        except FileNotFoundError:
            return None, None

    def create(self, key: str, data: bytes) -> str | None:
        """PUT `key` only if it does not exist (FencedError if it does). -> its ETag."""
        if not self.conditional:
            self.fs.pipe_file(key, data)
            return None
        return self._put(key, data, IfNoneMatch="*")

    def replace(self, key: str, data: bytes, etag: str | None) -> str | None:
        """PUT `key` only if its ETag is still `etag` (None: only if it does not exist).
        -> the new ETag. FencedError when another writer changed it."""
        if not self.conditional:
            self.fs.pipe_file(key, data)
            return None
        if etag is None:
            return self._put(key, data, IfNoneMatch="*")
        return self._put(key, data, IfMatch=etag)


class Lease:
    """The lease of (run, `rank`) on a bucket OUT for this writer's `attempt`."""

    def __init__(self, store: Store, root: str, shown: str, *, rank: int, world: int,
                 attempt: str, lease_s: float):
        self.store, self.shown, self.rank, self.world = store, shown, rank, world
        self.attempt, self.lease_s = attempt, float(lease_s)
        self.key = f"{root}/{LEASES_DIR}/rank-{rank:05d}.json"
        self.run_id = NO_RUN_YET
        self.etag: str | None = None
        self.expires = 0.0  # by this process's clock
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _value(self, expires: float) -> bytes:
        value = {"run_id": self.run_id, "rank": self.rank, "world_size": self.world,
                 "attempt": self.attempt, "expires": expires}
        assert not validate_definition("lease", value), value
        return json.dumps(value).encode()

    def acquire(self, *, takeover: bool) -> None:
        """Create the lease, or take over one whose holder's expiry (+ SKEW_S) has passed
        (at once with `takeover`); then start renewing it. Raises `OutputError` naming
        the holder while another writer holds it."""
        if not self.store.conditional:
            return
        data, etag = self.store.read(self.key)
        if data is not None:
            held = json.loads(data)
            if held.get("attempt") != self.attempt and not takeover \
                    and time.time() < float(held.get("expires", 0)) + SKEW_S:
                raise OutputError(self._held_message(held))
        expires = time.time() + self.lease_s
        try:
            self.etag = self.store.replace(self.key, self._value(expires), etag)
        except FencedError as error:
            raise OutputError(f"another crowstream writer took rank {self.rank}'s lease of "
                              f"{self.shown!r} at the same moment; this one stopped before "
                              "writing anything. Let it finish (or stop it) first.") from error
        self.expires = expires
        self._thread = threading.Thread(target=self._renew_loop, name="crowstream-lease",
                                        daemon=True)
        self._thread.start()

    def _held_message(self, held: dict) -> str:
        left = max(0, float(held.get("expires", 0)) + SKEW_S - time.time())
        return (f"another crowstream writer (attempt {held.get('attempt')}) holds rank "
                f"{self.rank}'s lease of {self.shown!r} for {left:.0f} s more; let it finish "
                "(or stop it) first. If it is dead, wait, or pass takeover=True (--takeover).")

    def renew(self) -> None:
        """Extend the lease by `lease_s` with If-Match; a failure is kept and fences."""
        with self._lock:
            if self.error is not None:
                return
            expires = time.time() + self.lease_s
            try:
                self.etag = self.store.replace(self.key, self._value(expires), self.etag)
                self.expires = expires
            except Exception as error:  # kept: check() raises it before the next record
                self.error = error

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            self.renew()
            if self.error is not None:
                return

    def check(self, *, read: bool = True) -> None:
        """Raise `FencedError` unless this writer still holds its lease: renewed in time
        by its own clock, and (with `read`: one HEAD and one GET) the object still its own."""
        if not self.store.conditional or self._thread is None:
            return
        with self._lock:
            if self.error is None and time.time() >= self.expires:
                self.error = TimeoutError(f"the lease expired {time.time() - self.expires:.0f} "
                                          "s ago without a renewal")
            if self.error is None and read:
                data, etag = self.store.read(self.key)
                if etag != self.etag:
                    held = json.loads(data) if data else {}
                    self.error = FencedError(f"attempt {held.get('attempt')} holds it now")
            if self.error is not None:
                raise FencedError(f"this writer (attempt {self.attempt}) lost rank {self.rank}'s "
                                  f"lease of {self.shown!r} ({self.error}); it stopped without "
                                  "committing. Another writer owns the run now.") from self.error

    def release(self) -> None:
        """Stop renewing; delete the lease object if it is still this writer's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            if self.error is None:
                data, etag = self.store.read(self.key)
                if etag == self.etag:
                    self.store.fs.rm_file(self.key)


def live_leases(store: Store, root: str, *, besides: int) -> list[dict]:
    """The leases (as held: run_id, rank, world_size, attempt, expires) of every rank but
    `besides` that have not passed their expiry plus SKEW_S: writers that may be alive."""
    if not store.conditional:
        return []
    store.fs.invalidate_cache()
    try:
        keys = store.fs.find(f"{root}/{LEASES_DIR}")
    except FileNotFoundError:
        return []
    found = []
    for key in keys:
        name = key.rsplit("/", 1)[-1]
        if not (name.startswith("rank-") and name.endswith(".json")) \
                or name == f"rank-{besides:05d}.json":
            continue
        data, _ = store.read(key)
        held = json.loads(data) if data else None
        if held and time.time() < float(held.get("expires", 0)) + SKEW_S:
            found.append(held)
    return sorted(found, key=lambda h: h.get("rank", 0))
