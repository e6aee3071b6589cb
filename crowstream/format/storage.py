"""Object storage. It owns OUT given as an fsspec URL (`s3://bucket/run`, `gs://...`) with
`storage_options` (the fsspec dialect: `key`, `secret`, `client_kwargs={"endpoint_url":
...}`; or the environment, `AWS_ENDPOINT_URL` and the like).

Writing (`Mirror`): the local pipeline writes into a temporary local spool; at each commit
the shard's parts are uploaded under names that carry this attempt's id (object stores
cannot rename, so a retry never reuses a name), then its statistics file, then its record
LAST (one PUT: the commit point); then the local copies are deleted, so the spool stays
bounded by the shards in flight. A resume downloads `crowstream.json` and `commits/`,
deletes every object no record lists and continues. No conditional writes are used: two
writers on one bucket OUT are not refused.

Reading (`committed`, `paths`, `arrow_filesystem`): only parts the manifest or the records
list are read, never a prefix glob. Credentials stay in `storage_options`: they never
reach the manifest, the card, logs or error messages.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import secrets
import shutil
import tempfile

from crowstream.errors import ManifestError, OutputError, OutputExistsError
from crowstream.format import records
from crowstream.format.layout import CARD_NAME, END_PATH, RUN_PATH, record_path, staging_path
from crowstream.format.manifest import Manifest, ShardRecord, read_manifest
from crowstream.format.records import consolidated, write_record_json
from crowstream.format.leases import LEASES_DIR, FencedError, Lease, Store
from crowstream.format.recovery import check_not_lost, damaged_parts, listed_paths

from .layout import (
    LOCKS_DIR,
    RECORD_NAME,
    COMMITS_DIR,
    DATA_DIR,
    DOCS_DIR,
    MANIFEST_NAME,
    TMP_DIR,
    TOKENIZER_DIR,
    VOCAB_NAME,
)

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(out) -> bool:
    """Whether `out` is a URL other than `file://` (which is a local path)."""
    return isinstance(out, str) and bool(_SCHEME.match(out)) and not out.startswith("file://")


def public(url: str) -> str:
    """`url` without a query string or user info (either may hold credentials), for messages."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/@]*@", r"\1", url.split("?")[0])


def filesystem(url: str, storage_options: dict | None):
    """-> (fsspec filesystem, root path inside it) of `url`."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    fs.invalidate_cache()  # fsspec shares instances: another user's listing may be stale
    return fs, root.rstrip("/")


def arrow_filesystem(fs):
    """A pyarrow filesystem over the fsspec one (so no option needs translating)."""
    import pyarrow.fs as pafs

    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def attempt_path(rel: str, attempt: str) -> str:
    """`data/.../part-00000-000001-000.parquet` -> `...-000-a<attempt>.parquet`."""
    return f"{rel[:-len('.parquet')]}-a{attempt}.parquet"


def _objects(fs, root: str) -> dict[str, int]:
    """rel path -> size of every object under root."""
    fs.invalidate_cache()
    if not fs.exists(root):
        return {}
    found = fs.find(root, detail=True)
    return {key[len(root) + 1:]: info.get("size", 0) for key, info in found.items()}


def _download(fs, root: str, rels, local: str) -> None:
    for rel in rels:
        target = os.path.join(local, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fs.get_file(f"{root}/{rel}", target)


def _metadata(rel: str) -> bool:
    """Files besides the parts: manifest, card, vocab, tokenizer, commits/."""
    return not rel.startswith((f"{DATA_DIR}/", f"{DOCS_DIR}/", ".tmp/"))


def local_copy(url: str, storage_options: dict | None, local: str, *, parts: bool) -> dict:
    """Download OUT's metadata (and, with `parts`, every listed part and stats file that
    exists) into `local`. -> the remote objects (rel -> size)."""
    fs, root = filesystem(url, storage_options)
    objects = _objects(fs, root)
    if MANIFEST_NAME not in objects:
        raise ManifestError(f"{public(url)} has no {MANIFEST_NAME}: it is not a crowstream "
                            "output (or not one yet). Check the URL and storage_options.")
    _download(fs, root, [r for r in objects if _metadata(r)], local)
    if parts:
        listed = {p.path for p in records.committed(local, stats=False).parts}
        _download(fs, root, sorted(listed & set(objects)), local)
    return objects


def committed(url: str, storage_options: dict | None, *, stats: bool = False) -> Manifest:
    """The committed manifest of a bucket OUT, as `manifest.committed` gives it locally
    (records are PUT after their parts, so every shard it lists is readable). Reads
    `crowstream.json`, and while the run is not consolidated its records (and, with
    `stats`, their statistics files)."""
    fs, root = filesystem(url, storage_options)
    with tempfile.TemporaryDirectory(prefix="crowstream-") as local:
        try:
            _download(fs, root, [MANIFEST_NAME], local)
        except FileNotFoundError as error:
            raise ManifestError(f"{public(url)} has no {MANIFEST_NAME}: it is not a crowstream "
                                "output (or not one yet). Check the URL and storage_options.") \
                from error
        manifest = read_manifest(local)
        if manifest.format_version == 1 or manifest.status != "running":
            return manifest
        names = [n for n in _objects(fs, f"{root}/{COMMITS_DIR}") if stats or n.endswith(".json")]
        _download(fs, root, [f"{COMMITS_DIR}/{n}" for n in names], local)
        return records.committed(local, stats=stats)


def paths(url: str, rels) -> list[str]:
    """Full URLs of the files `rels` (relative to OUT)."""
    return [f"{url.rstrip('/')}/{rel}" for rel in rels]


class Mirror:
    """A capture's local spool and the bucket OUT it is published to (see the module doc).
    `rank` of `world` writers; `lease_s`, `takeover`: the lease (`format.leases`);
    `spool_dir`: where the spool goes (default: the system's temp directory)."""

    def __init__(self, url: str, storage_options: dict | None, *, rank: int = 0, world: int = 1,
                 lease_s: float = 60.0, takeover: bool = False, spool_dir: str | None = None):
        self.url = url.rstrip("/")
        self.fs, self.root = filesystem(url, storage_options)
        self.attempt = secrets.token_hex(4)
        self.rank, self.world, self.lease_s, self.takeover = rank, world, lease_s, takeover
        self.spool, self._spool_lock = make_spool(spool_dir)
        self.objects: dict[str, int] = {}
        self.store: Store | None = None
        self.lease: Lease | None = None
        self.manifest_etag: str | None = None
        self.fenced = False

    def __enter__(self) -> Mirror:
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.lease is not None:
                self.lease.release()
        finally:
            shutil.rmtree(self.spool, ignore_errors=True)
            os.close(self._spool_lock)

    def _key(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def _list(self) -> dict[str, int]:
        try:
            objects = _objects(self.fs, self.root)
        except Exception as error:  # botocore's own exceptions: one clear error instead
            raise OutputError(f"cannot list OUT {public(self.url)}: {type(error).__name__}: "
                              f"{error}. Check the URL and the credentials and endpoint in "
                              "storage_options (or AWS_* in the environment).") from error
        return {r: n for r, n in objects.items() if not r.startswith(f"{LEASES_DIR}/")}

    def prepare(self, *, overwrite: bool, resume: bool) -> bool:
        """Check the bucket OUT as `manifest.inspect_out` does locally, then take this
        writer's lease (before anything is deleted or written); for a resume download its
        committed state into the spool (deleting nothing: `recover` does, once the call
        matched the recorded run). -> whether this is a resume."""
        objects = self._check(self._list(), overwrite=overwrite, resume=resume)
        self.store = Store(self.fs, self.root)
        self.lease = Lease(self.store, self.root, public(self.url), rank=self.rank,
                           world=self.world, attempt=self.attempt, lease_s=self.lease_s)
        self.lease.acquire(takeover=self.takeover)
        objects = self._check(self._list(), overwrite=overwrite, resume=resume)  # under the lease
        if not objects:
            return False
        if resume:
            self._download_state(objects)
            return True
        self.fs.rm([self._key(r) for r in objects])  # overwrite
        return False

    def _check(self, objects: dict[str, int], *, overwrite: bool, resume: bool) -> dict[str, int]:
        """Refuse what cannot be written (as `inspect_out` does locally). -> `objects`."""
        if not objects:
            return objects
        ours = MANIFEST_NAME in objects
        if not ours and resume:
            check_not_lost(public(self.url), sorted(
                r.rsplit("/", 1)[1] for r in objects
                if r.startswith(f"{COMMITS_DIR}/") and RECORD_NAME.fullmatch(r.rsplit("/", 1)[1])))
        if not ours:
            raise OutputExistsError(f"OUT {public(self.url)} is not empty and holds no "
                                    f"{MANIFEST_NAME}: choose another prefix.")
        if not resume and not overwrite:
            raise OutputExistsError(f"OUT {public(self.url)} is not empty: pass overwrite=True "
                                    "(--overwrite) to replace it, resume=True (--resume) to "
                                    "continue it, or choose another prefix.")
        return objects

    def _download_state(self, objects: dict[str, int]) -> None:
        """Download the run's metadata and records into the spool, deleting nothing: the
        call is compared with the recorded run first (`recover`, after `Session.load`'s
        check)."""
        _download(self.fs, self.root, [r for r in objects if _metadata(r)], self.spool)
        for sub in (TMP_DIR, DATA_DIR, DOCS_DIR, COMMITS_DIR):
            os.makedirs(os.path.join(self.spool, sub), exist_ok=True)
        self.objects = objects
        self.manifest_etag = self.store.read(self._key(MANIFEST_NAME))[1]

    def recover(self, manifest: Manifest) -> tuple[Manifest, list[str]]:
        """Once the resumed call matches the recorded run: check every listed object is
        there, then delete every object no record lists. -> (committed manifest, removed).
        Runs under this writer's lease: no live writer's attempt is deleted."""
        objects = self.objects
        state = consolidated(self.spool, manifest, stats=False)
        damaged = damaged_parts(self.spool, state, sizes=objects)
        if damaged:
            raise ManifestError(f"cannot resume {public(self.url)}: {len(damaged)} committed "
                                "object(s) are missing or changed in size "
                                f"({', '.join(damaged[:3])}). "
                                "Capture again with overwrite=True or into a new prefix.")
        listed = listed_paths(state)
        unlisted = [r for r in objects if r not in listed
                    and (not _metadata(r) or r.startswith(f"{COMMITS_DIR}/"))]
        if unlisted:
            self.fs.rm([self._key(r) for r in unlisted])
            for rel in unlisted:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(self.spool, rel))
        return state, unlisted

    def _create(self, rel: str, index: int) -> str | None:
        """PUT the spool's `rel` only if the bucket has no such object yet. -> its ETag."""
        with open(os.path.join(self.spool, rel), "rb") as f:
            data = f.read()
        try:
            return self.store.create(self._key(rel), data)
        except FencedError as error:
            raise FencedError(f"shard {index} of {public(self.url)} is being (or was) committed "
                              f"by another writer ({rel} exists); this writer (attempt "
                              f"{self.attempt}) deleted its own copy and stopped.") from error

    def check_fence(self, *, read: bool = True) -> None:
        """Raise `FencedError` unless this writer still holds its lease (`read`: read it
        back from the store; else by this process's clock and renewals only)."""
        if self.fenced:
            raise FencedError(f"this writer (attempt {self.attempt}) was fenced off "
                              f"{public(self.url)}; it commits nothing more.")
        if self.lease is not None:
            try:
                self.lease.check(read=read)
            except FencedError:
                self.fenced = True
                raise

    def publish(self, *, everything: bool = False) -> None:
        """Upload crowstream.json, the card and end.json (with `everything`, also the vocab,
        commits/run.json and the tokenizer: at the start of a run). The manifest is PUT
        If-Match on the ETag this writer last saw; a fenced writer publishes nothing."""
        self.check_fence()
        rels = [CARD_NAME, END_PATH]
        tokenizer = os.path.join(self.spool, TOKENIZER_DIR)
        if everything:
            names = sorted(os.listdir(tokenizer))
            rels = [VOCAB_NAME, RUN_PATH, *(f"{TOKENIZER_DIR}/{n}" for n in names)] + rels
        for rel in rels:
            if os.path.isfile(os.path.join(self.spool, rel)):
                self.fs.put_file(os.path.join(self.spool, rel), self._key(rel))
        with open(os.path.join(self.spool, MANIFEST_NAME), "rb") as f:
            data = f.read()
        try:  # the manifest last
            self.manifest_etag = self.store.replace(self._key(MANIFEST_NAME), data,
                                                    self.manifest_etag)
        except FencedError as error:
            self.fenced = True
            raise FencedError(f"{MANIFEST_NAME} of {public(self.url)} was replaced by another "
                              f"writer; this writer (attempt {self.attempt}) stopped and left "
                              "it as it is.") from error

    def commit(self, run_id: str, record: ShardRecord) -> ShardRecord:
        """Publish a shard the spool has committed (record written, parts still staged):
        parts under attempt names, the statistics, then the record
        (create-only: the commit point). -> the record as PUT. A writer that lost the run
        deletes what it uploaded and raises `FencedError`."""
        self.check_fence(read=False)  # a writer that slept past its lease uploads nothing
        parts, staged_paths = [], [staging_path(self.spool, p.path) for p in record.parts]
        uploaded = []
        try:
            for part in record.parts:
                final = attempt_path(part.path, self.attempt)
                self.fs.put_file(staging_path(self.spool, part.path), self._key(final))
                uploaded.append(final)
                parts.append(dataclasses.replace(part, path=final))
            # the statistics' name is shared by every attempt at the shard, but its bytes are
            # the same whoever writes it (rows are bit-identical): a plain PUT, never deleted
            self.fs.put_file(os.path.join(self.spool, record.stats.path),
                             self._key(record.stats.path))
            record = dataclasses.replace(record, parts=tuple(parts))
            write_record_json(self.spool, run_id, record)
            self.check_fence()
            self._create(record_path(record.index), record.index)
        except FencedError:
            self.fenced = True
            if uploaded:  # this attempt's own names: no other writer's
                self.fs.rm([self._key(r) for r in uploaded])
            raise
        for staged in staged_paths:  # the spool keeps only the small record and statistics
            os.remove(staged)
        return record


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
