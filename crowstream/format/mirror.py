"""Writing a bucket OUT (`Mirror`): the local pipeline writes into a temporary local spool;
at each commit the shard's parts are uploaded under names that carry this attempt's id
(object stores cannot rename, so a retry never reuses a name), then its statistics file,
then its record LAST (one PUT: the commit point); then the local copies are deleted, so the
spool stays bounded by the shards in flight. A resume downloads `crowstream.json` and
`commits/`, deletes every object no record lists (after the call matched the recorded run)
and continues. Writers are fenced by leases and conditional writes (`format.leases`).
Several ranks each spool and publish their own shards under their own lease; rank 0 creates
a new run (the others wait for its manifest), and the last rank to finish, or `finalize`,
consolidates the manifest with If-Match on its ETag (`pipeline.ranks.finalize_url`).
Reading a bucket OUT is `format.storage`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import secrets
import shutil
import time

from crowstream.errors import ManifestError, OutputError, OutputExistsError
from crowstream.format.layout import CARD_NAME, END_PATH, RUN_PATH, record_path, staging_path
from crowstream.format.manifest import Manifest, ShardRecord, read_manifest
from crowstream.format.records import consolidated, write_record_json
from crowstream.format.leases import LEASES_DIR, SKEW_S, FencedError, Lease, Store, live_leases
from crowstream.format.recovery import check_not_lost, damaged_parts, listed_paths, owned_file
from crowstream.format.spool import make_spool
from crowstream.format.storage import is_metadata, download, filesystem, listing, public

from .layout import (
    RECORD_NAME,
    COMMITS_DIR,
    DATA_DIR,
    DOCS_DIR,
    MANIFEST_NAME,
    TMP_DIR,
    TOKENIZER_DIR,
    VOCAB_NAME,
)

JOIN_WAIT_S = 600  # how long a rank other than 0 waits for rank 0 to create a new run


_UNSTARTED = re.compile("|".join([re.escape(CARD_NAME), re.escape(VOCAB_NAME), re.escape(RUN_PATH),
                                   re.escape(TOKENIZER_DIR) + "/[^/]+"]))


def _unstarted(objects) -> bool:
    """Whether a bucket OUT without a manifest holds only what a new run uploads before
    its manifest (vocab first, then commits/run.json, the tokenizer, the card): a start
    cut short, with nothing committed."""
    return VOCAB_NAME in objects and all(_UNSTARTED.fullmatch(rel) for rel in objects)


def attempt_path(rel: str, attempt: str) -> str:
    """`data/.../part-00000-000001-000.parquet` -> `...-000-a<attempt>.parquet`."""
    return f"{rel[:-len('.parquet')]}-a{attempt}.parquet"


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
            objects = listing(self.fs, self.root)
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
        joining = self.world > 1 and self.rank != 0  # rank 0 creates a new run
        if not joining:
            self._check(self._list(), overwrite=overwrite, resume=resume)
        self.store = Store(self.fs, self.root)
        self.lease = Lease(self.store, self.root, public(self.url), rank=self.rank,
                           world=self.world, attempt=self.attempt, lease_s=self.lease_s)
        self.lease.acquire(takeover=self.takeover)
        self._check_world()
        if joining:
            self._wait_for_run()
        objects = self._check(self._list(), overwrite=overwrite, resume=resume)  # under the lease
        if not objects:
            return False
        if resume and MANIFEST_NAME in objects:
            self._download_state(objects)
            return True
        self.fs.rm([self._key(r) for r in objects])  # overwrite, or a start cut short
        return False

    def _who(self) -> str:
        return f"rank {self.rank} of {self.world}" if self.world > 1 else "this capture"

    def _check_world(self) -> None:
        """Refuse, before anything is deleted, while a rank of another world size may still
        be writing (its lease is live): its shards are shared out differently, and a
        recovery would delete its uploads in flight. With `takeover`, the user asserts
        that every old writer is dead."""
        others = [h for h in live_leases(self.store, self.root, besides=self.rank)
                  if h.get("world_size") != self.world]
        if others and not self.takeover:
            left = max(float(h["expires"]) for h in others) + SKEW_S - time.time()
            raise OutputError(
                f"{self._who()} cannot write to {public(self.url)!r}: rank(s) "
                f"{', '.join(str(h['rank']) for h in others)} of a {others[0]['world_size']}-rank "
                f"run hold leases there (for up to {left:.0f} s more). Start every rank with the "
                "same world size; to resize, let every rank stop first (or pass takeover=True / "
                "--takeover if they are dead).")

    def _wait_for_run(self) -> None:
        """A rank other than 0 joins the run rank 0 creates: wait for its manifest."""
        deadline = time.monotonic() + JOIN_WAIT_S
        while True:
            self.fs.invalidate_cache()
            if self.fs.exists(self._key(MANIFEST_NAME)):
                return
            if time.monotonic() > deadline:
                raise OutputError(f"rank {self.rank} waited {JOIN_WAIT_S} s for rank 0 to create "
                                  f"the run in {public(self.url)!r}; on object storage rank 0 "
                                  "creates a new run: start it (or resume an existing run).")
            time.sleep(0.2)

    def _check(self, objects: dict[str, int], *, overwrite: bool, resume: bool) -> dict[str, int]:
        """Refuse what cannot be written (as `inspect_out` does locally). -> `objects`."""
        if not objects:
            return objects
        ours = MANIFEST_NAME in objects
        if not ours and resume:
            check_not_lost(public(self.url), sorted(
                r.rsplit("/", 1)[1] for r in objects
                if r.startswith(f"{COMMITS_DIR}/") and RECORD_NAME.fullmatch(r.rsplit("/", 1)[1])))
        if not ours and resume and _unstarted(objects):
            return objects  # a start killed before its manifest: nothing was committed
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
        download(self.fs, self.root, [r for r in objects if is_metadata(r)], self.spool)
        for sub in (TMP_DIR, DATA_DIR, DOCS_DIR, COMMITS_DIR):
            os.makedirs(os.path.join(self.spool, sub), exist_ok=True)
        self.objects = objects
        self.manifest_etag = self.store.read(self._key(MANIFEST_NAME))[1]

    def recover(self, manifest: Manifest, owned=None) -> tuple[Manifest, list[str]]:
        """Once the resumed call matches the recorded run: check every listed object is
        there, then delete every object no record lists (`owned`: shard index -> bool, one
        rank's shards only; the other ranks' uploads in flight are theirs).
        -> (committed manifest, removed). Runs under this writer's lease: no live writer's
        attempt is deleted."""
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
                    and (not is_metadata(r) or r.startswith(f"{COMMITS_DIR}/"))
                    and (owned is None or owned_file(r, owned))]
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
            if self._joined_running():
                return
            self.fenced = True
            raise FencedError(f"{MANIFEST_NAME} of {public(self.url)} was replaced by another "
                              f"writer; this writer (attempt {self.attempt}) stopped and left "
                              "it as it is.") from error

    def _joined_running(self) -> bool:
        """A rank of several that PUT "running" over a stopped run lost the race to another
        rank doing the same: fine when the bucket's manifest now says "running" too."""
        if self.world == 1:
            return False
        data, etag = self.store.read(self._key(MANIFEST_NAME))
        mine = read_manifest(self.spool)
        if data is None or mine.status != "running":
            return False
        theirs = json.loads(data)
        if theirs.get("status") != "running" or theirs.get("run_id") != mine.run_id:
            return False
        self.manifest_etag = etag
        return True

    def upload_end(self) -> None:
        """Upload commits/end.json if this rank read to the end of the corpus (every rank
        that did writes the same bytes)."""
        self.check_fence()
        if os.path.isfile(os.path.join(self.spool, END_PATH)):
            self.fs.put_file(os.path.join(self.spool, END_PATH), self._key(END_PATH))

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
