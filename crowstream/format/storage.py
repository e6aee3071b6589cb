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
from crowstream.format.recovery import check_not_lost, damaged_parts, listed_paths

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
    """A capture's local spool and the bucket OUT it is published to (see the module doc)."""

    def __init__(self, url: str, storage_options: dict | None):
        self.url = url.rstrip("/")
        self.fs, self.root = filesystem(url, storage_options)
        self.attempt = secrets.token_hex(4)
        self.spool = tempfile.mkdtemp(prefix="crowstream-spool-")
        self.objects: dict[str, int] = {}

    def __enter__(self) -> Mirror:
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.spool, ignore_errors=True)

    def _key(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def prepare(self, *, overwrite: bool, resume: bool) -> bool:
        """Check the bucket OUT as `manifest.inspect_out` does locally; for a resume download
        its committed state into the spool and delete every object no record lists.
        -> whether this is a resume."""
        try:
            objects = _objects(self.fs, self.root)
        except Exception as error:  # botocore's own exceptions: one clear error instead
            raise OutputError(f"cannot list OUT {public(self.url)}: {type(error).__name__}: "
                              f"{error}. Check the URL and the credentials and endpoint in "
                              "storage_options (or AWS_* in the environment).") from error
        if not objects:
            return False
        ours = MANIFEST_NAME in objects
        if not ours and (resume or overwrite):
            check_not_lost(public(self.url), sorted(
                r.rsplit("/", 1)[1] for r in objects
                if r.startswith(f"{COMMITS_DIR}/") and RECORD_NAME.fullmatch(r.rsplit("/", 1)[1])))
        if not ours:
            raise OutputExistsError(f"OUT {public(self.url)} is not empty and holds no "
                                    f"{MANIFEST_NAME}: choose another prefix.")
        if resume:
            self._download_state(objects)
            return True
        if overwrite:
            self.fs.rm([self._key(r) for r in objects])
            return False
        raise OutputExistsError(f"OUT {public(self.url)} is not empty: pass overwrite=True "
                                "(--overwrite) to replace it, resume=True (--resume) to continue "
                                "it, or choose another prefix.")

    def _download_state(self, objects: dict[str, int]) -> None:
        """Download the run's metadata and records into the spool, deleting nothing: the
        call is compared with the recorded run first (`recover`, after `Session.load`'s
        check)."""
        _download(self.fs, self.root, [r for r in objects if _metadata(r)], self.spool)
        for sub in (TMP_DIR, DATA_DIR, DOCS_DIR, COMMITS_DIR):
            os.makedirs(os.path.join(self.spool, sub), exist_ok=True)
        self.objects = objects

    def recover(self, manifest: Manifest) -> tuple[Manifest, list[str]]:
        """Once the resumed call matches the recorded run: check every listed object is
        there, then delete every object no record lists. -> (committed manifest, removed)."""
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

    def publish(self, *, everything: bool = False) -> None:
        """Upload crowstream.json, the card and end.json (with `everything`, also the vocab
        and the tokenizer: at the start of a run)."""
        rels = [CARD_NAME, END_PATH, MANIFEST_NAME]  # the manifest last
        tokenizer = os.path.join(self.spool, TOKENIZER_DIR)
        if everything:
            names = sorted(os.listdir(tokenizer))
            rels = [VOCAB_NAME, RUN_PATH, *(f"{TOKENIZER_DIR}/{n}" for n in names)] + rels
        for rel in rels:
            if os.path.isfile(os.path.join(self.spool, rel)):
                self.fs.put_file(os.path.join(self.spool, rel), self._key(rel))

    def commit(self, run_id: str, record: ShardRecord) -> ShardRecord:
        """Publish a shard the spool has committed (record written, parts still staged):
        parts under attempt names, the statistics, then the record. -> the record as PUT."""
        parts, staged_paths = [], [staging_path(self.spool, p.path) for p in record.parts]
        for part in record.parts:
            final = attempt_path(part.path, self.attempt)
            self.fs.put_file(staging_path(self.spool, part.path), self._key(final))
            parts.append(dataclasses.replace(part, path=final))
        self.fs.put_file(os.path.join(self.spool, record.stats.path), self._key(record.stats.path))
        record = dataclasses.replace(record, parts=tuple(parts))
        rel = record_path(record.index)
        write_record_json(self.spool, run_id, record)
        self.fs.put_file(os.path.join(self.spool, rel), self._key(rel))
        for staged in staged_paths:  # the spool keeps only the small record and statistics
            os.remove(staged)
        return record
