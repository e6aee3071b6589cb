"""Files, directories and hub datasets as a source (`open_path_or_hub`): which reader each
file takes (.txt lines; .jsonl, .json, .csv, also compressed; .parquet), the checks that
turn an empty, unreadable or missing corpus into one DataError, and the fingerprints that
tell two corpora apart without an absolute path. `sources.py` dispatches to it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from crowstream.checks import looks_like_path
from crowstream.errors import DataError

if TYPE_CHECKING:  # sources imports this module
    from crowstream.pipeline.sources import Repository


_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# compressed text files that datasets (fsspec) decompresses by their extension
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")


def open_path_or_hub(path: str, split: str, repository: Repository):
    import datasets

    if os.path.isfile(path):
        stem, suffix = os.path.splitext(path.lower())
        compression = suffix if suffix in _COMPRESSIONS else None
        if compression:
            suffix = os.path.splitext(stem)[1]
        # a name and a content digest, no absolute path: a moved or uploaded OUT resumes
        fingerprint = {"kind": "file", "name": os.path.basename(path), **_file_digest(path)}
        if suffix == ".txt" and not compression:
            _check_not_empty(path)
            return (lambda skip: _text_lines(path, skip)), None, fingerprint
        if suffix not in _FILE_BUILDERS or (compression and suffix == ".parquet"):
            raise DataError(f"cannot read {path!r}: supported files are .txt (one document per "
                            "line), .jsonl, .json, .parquet and .csv (.jsonl, .json and .csv "
                            "also compressed: .gz, .bz2, .xz, .zst).")
        if not compression:
            _check_not_empty(path)
        described = f"{path!r} as {suffix.lstrip('.')}"
        if suffix == ".parquet":
            _check_parquet_rows(path, described)
        with _unreadable(described):  # the Parquet builder reads the footer here
            ds = datasets.load_dataset(_FILE_BUILDERS[suffix], data_files=path, split="train",
                                       streaming=True)
        return streaming_rows(ds, described), None, fingerprint
    if os.path.isdir(path):
        files = sorted(os.path.relpath(os.path.join(d, f), path)
                       for d, _, fs in os.walk(path) for f in fs if not f.startswith("."))
        if not files:
            raise DataError(f"directory {path!r} holds no files; point data at a corpus.")
        if all(os.path.getsize(os.path.join(path, f)) == 0 for f in files):
            raise DataError(f"directory {path!r} holds only empty files: the corpus has no documents.")
        fingerprint = {"kind": "directory",
                       "name": os.path.basename(os.path.normpath(os.path.abspath(path))),
                       "files": [[f, os.path.getsize(os.path.join(path, f))] for f in files],
                       "sha256": _directory_digest(path, files), **repository.fingerprint()}
        described = f"the files in directory {path!r}"
        with _unreadable(described):
            ds = _load_split(path, split, repository, streaming=True)
        return streaming_rows(ds, described), None, fingerprint
    if looks_like_path(path) or os.path.splitext(path)[1].lower() in {".txt", *_FILE_BUILDERS}:
        raise DataError(f"data path {path!r} does not exist; pass an existing file or directory.")
    ds = _load_split(path, split, repository, streaming=True)
    return streaming_rows(ds, f"hub dataset {path!r}"), None, {
        "kind": "hub", "id": path, "split": split, **repository.fingerprint(),
        **_resolved_revision(ds)}


def _resolved_revision(ds) -> dict:
    """The commit the hub resolved the dataset to, where `datasets` reports one."""
    for holder in (ds, getattr(ds, "info", None)):
        commit = getattr(holder, "_commit_hash", None) or getattr(holder, "commit_hash", None)
        if isinstance(commit, str) and commit:
            return {"commit": commit}
    return {}


def _directory_digest(path: str, files: list[str]) -> str:
    """sha256 over each file's relative name, size and first MiB: cheap, and enough to
    tell two corpora apart without reading terabytes."""
    digest = hashlib.sha256()
    for rel in files:
        digest.update(json.dumps([rel, _file_digest(os.path.join(path, rel))]).encode())
    return digest.hexdigest()


def _check_not_empty(path: str) -> None:
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if not head.strip() and os.path.getsize(path) <= len(head):
        what = "is empty" if not head else "holds only whitespace"
        raise DataError(f"data file {path!r} {what}: the corpus has no documents.")


def _check_parquet_rows(path: str, described: str) -> None:
    import pyarrow.parquet as pq

    with _unreadable(described):
        rows = pq.read_metadata(path).num_rows
    if rows == 0:
        raise DataError(f"data file {path!r} has a schema but no rows: the corpus has no documents.")


def streaming_rows(ds, described: str = "the dataset"):
    """rows(skip) for a streaming dataset: `.skip` leaves committed rows unread. A file
    that does not parse (wrong kind, bad encoding, truncated) becomes one DataError."""
    def rows(skip):
        with _unreadable(described):
            yield from enumerate(ds.skip(skip) if skip else ds, start=skip)
    return rows


class _DropBuilderFailures(logging.Filter):
    """datasets' file builders log "Failed to ..." just before raising; crowstream raises
    the same error as one DataError, so the log line would only repeat it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Failed to")


@contextlib.contextmanager
def _unreadable(described: str):
    loggers = [logging.getLogger(f"datasets.packaged_modules.{b}.{b}") for b in ("json", "csv", "parquet")]
    quiet = _DropBuilderFailures()
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        yield
    except DataError:
        raise
    except Exception as error:  # datasets' builders raise anything (StopIteration too)
        reason = str(error).strip().splitlines()[0].rstrip(".") if str(error).strip() else ""
        raise DataError(f"could not read {described}: {type(error).__name__}"
                        f"{': ' + reason[:200] if reason else ''}. Check that the file is "
                        "what its extension says, UTF-8 text, and complete.") from error
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)


def _load_split(path: str, split: str, repository: Repository, *, streaming: bool):
    import datasets

    try:
        return datasets.load_dataset(path, repository.config, split=split, streaming=streaming,
                                     revision=repository.revision,
                                     data_files=repository.data_files)
    except (ConnectionError, OSError) as error:
        raise DataError(
            f"could not load dataset {path!r} (split {split!r}): {error}. With no network, pass "
            "a local file or directory, or set HF_HUB_OFFLINE=1 to use the local cache."
        ) from error
    except ValueError as error:
        raise DataError(f"could not load dataset {path!r} (split {split!r}): {error}") from error


def _text_lines(path: str, skip: int) -> Iterator[tuple[int, str]]:
    """Lines split at "\n" only (a lone "\r" stays inside its line), so a document's
    index is the 0-based line number that `wc -l` and `sed -n` count."""
    try:
        with open(path, encoding="utf-8", newline="\n") as lines:
            for index, line in enumerate(lines):
                if index >= skip:
                    yield index, line.removesuffix("\n").removesuffix("\r")
    except UnicodeDecodeError as error:
        raise DataError(f"data file {path!r} is not valid UTF-8 ({error.reason}); convert it, "
                        "e.g. `iconv -f latin1 -t utf-8`.") from error


def _file_digest(path: str) -> dict:
    with open(path, "rb") as f:
        head = f.read(1 << 20)
    return {"bytes": os.path.getsize(path), "sha256_first_mib": hashlib.sha256(head).hexdigest()}
