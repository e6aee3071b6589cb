"""Stage 1, the source. It owns turning whatever the user has (a list of strings or dicts,
a `datasets.Dataset`/`IterableDataset`, a local file or directory, a hub dataset id) into
a stream of `(doc_id, text)`, where `doc_id` is the document's 0-based row index in the
source, or, for a pre-tokenized corpus (`tokens_field`), `(doc_id, token ids)`. Sampling,
`max_docs`, and skipping already-committed documents (resume) live here, so a resumed run
never even reads the skipped documents into the model. What one row becomes (its text or
its token ids, and the policy for bad ones) is `documents.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from crowstream.checks import looks_like_path
from crowstream.errors import DataError
from crowstream.pipeline.documents import (check_not_text_file, docs_of_output, field_words,
                                           ids_digest, ids_of, text_of)

_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# compressed text files that datasets (fsspec) decompresses by their extension
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")
_REPLAY_ROWS = 1024  # rows of a one-shot iterable kept to read again (>= SORT_WINDOW_DOCS)


@dataclasses.dataclass
class Source:
    """A corpus, ready to stream. `rows(skip)` yields `(doc_id, text or None)`, or with
    `tokens_field` `(doc_id, ids or None)`."""

    fingerprint: dict
    _rows: Any  # callable () -> iterator of (index, item)
    text_field: str
    n_docs: int | None  # documents this run will see (after sample/max_docs), if known
    _indices: np.ndarray | None = None
    _max_docs: int | None = None
    tokens_field: str | None = None

    def rows(self, skip: int = 0) -> Iterator[tuple[int, str | None]]:
        """Documents in order, the first `skip` of them left out unread where possible."""
        if self._indices is not None:
            wanted = self._indices[skip:]
            stream = _pick(self._rows(0), wanted)
        else:
            limit = None if self._max_docs is None else max(self._max_docs - skip, 0)
            stream = itertools.islice(self._rows(skip), limit)
        if self.tokens_field is not None:
            for index, item in stream:
                yield index, ids_of(item, self.tokens_field, index)
            return
        for index, item in stream:
            yield index, text_of(item, self.text_field, index)

    def shards(self, shard_size: int, wanted, *, first: int = 0, stop: int | None = None,
               on_end=None) -> Iterator[tuple[int, list]]:
        """`(index, rows)` of every shard from `first` (up to `stop`) that `wanted(index)`
        accepts; shard k is rows [k * shard_size, (k + 1) * shard_size) of `rows()`. The
        rows of other shards are read past, never tokenized, so `doc_id` stays the global
        row index under several ranks. `on_end(shards, rows)` is called once the corpus
        is seen to end."""
        rows = self.rows(first * shard_size)
        index = first
        while stop is None or index < stop:
            if wanted(index):
                block = list(itertools.islice(rows, shard_size))
                size = len(block)
                if block:
                    yield index, block
            else:
                size = sum(1 for _ in itertools.islice(rows, shard_size))
            if size < shard_size:
                if on_end is not None:
                    on_end(index + (size > 0), index * shard_size + size)
                return
            index += 1


@dataclasses.dataclass(frozen=True)
class Repository:
    """Which part of a dataset repository (hub id or local directory) to read: `config`
    (e.g. "wikitext-2-raw-v1"), `revision` (branch, tag or commit; hub only), `data_files`
    (a path, list or split -> paths mapping, as `datasets.load_dataset` takes them)."""

    config: str | None = None
    revision: str | None = None
    data_files: Any = None

    def fingerprint(self) -> dict:
        found = {"config": self.config, "revision": self.revision, "data_files": self.data_files}
        return {k: v for k, v in found.items() if v is not None}


def open_source(data, *, text_field: str = "text", split: str = "train",
                sample: int | None = None, seed: int = 0, max_docs: int | None = None,
                repository: Repository | None = None, tokens_field: str | None = None) -> Source:
    """Wrap `data` as a `Source`. See the module docstring for what `data` may be;
    `repository` picks a config, revision or data files of a dataset repository;
    `tokens_field` names a column of token-id lists to read instead of text."""
    if tokens_field is not None:
        data = docs_of_output(data)
    field = text_field if tokens_field is None else tokens_field
    rows, n_total, fingerprint = _open(data, field, split, repository or Repository(),
                                       tokens=tokens_field is not None)
    indices = None
    if sample is not None:
        if fingerprint["kind"] == "iterable":
            raise DataError("sample= reads the corpus twice (once to count it), which a generator "
                            "or other one-shot iterable cannot do; pass a list, a datasets "
                            "dataset or a file, or list(your_iterable).")
        if n_total is None:
            n_total = sum(1 for _ in rows(0))
        if sample > n_total:
            raise DataError(f"sample={sample} is larger than the corpus ({n_total} documents); "
                            "lower sample or drop it.")
        rng = np.random.default_rng(seed)
        indices = np.sort(rng.choice(n_total, size=sample, replace=False))
        if max_docs is not None:
            indices = indices[:max_docs]
        n_docs = len(indices)
    else:
        n_docs = n_total if max_docs is None or n_total is None else min(n_total, max_docs)
    fingerprint = {**fingerprint, "text_field": text_field}
    if tokens_field is not None:
        fingerprint["tokens_field"] = tokens_field
    return Source(fingerprint, rows, text_field, n_docs, indices, max_docs, tokens_field)


def _open(data, text_field: str, split: str, repository: Repository, *, tokens: bool = False):
    """-> (rows(skip) -> iterator of (index, item), total count or None, fingerprint)."""
    if isinstance(data, os.PathLike):
        data = os.fspath(data)
    if repository.fingerprint() and not (isinstance(data, str) and not os.path.isfile(data)):
        raise DataError(f"data_config, data_revision and data_files select from a dataset "
                        f"repository (a hub id or a local directory), not from {_kind(data)}; "
                        "drop them or pass the repository.")
    if isinstance(data, str):
        if tokens:
            check_not_text_file(data)
        return _open_path_or_hub(data, split, repository)
    if _is_pandas_frame(data):
        return _open_pandas(data, text_field, tokens)
    datasets = sys.modules.get("datasets")  # a Dataset exists only once it is imported
    if datasets is not None and isinstance(data, datasets.Dataset):
        return _open_dataset(data, text_field, tokens)
    if datasets is not None and isinstance(data, datasets.IterableDataset):
        return _streaming_rows(data), None, {
            "kind": "datasets.IterableDataset", "name": str(data.info.dataset_name),
            "config": str(data.config_name), "split": str(data.split),
            "features": str(data.features), "head_sha256": _head_digest(data)}
    if isinstance(data, (list, tuple)):
        digest = hashlib.sha256()
        for item in data:
            digest.update(json.dumps(item, sort_keys=True, default=str).encode())
        return (lambda skip: enumerate(data[skip:], start=skip)), len(data), {
            "kind": "list", "n": len(data), "sha256": digest.hexdigest()}
    if isinstance(data, Iterable) and not isinstance(data, (bytes, dict)):
        numbered, head = enumerate(iter(data)), []

        def rows(skip):  # one pass: the first rows read (the peek) are replayed once more
            def replayed():
                yield from list(head)
                for pair in numbered:
                    if len(head) < _REPLAY_ROWS:
                        head.append(pair)
                    yield pair
            return itertools.islice(replayed(), skip, None)
        return rows, None, {"kind": "iterable", "type": type(data).__name__}
    raise DataError(
        f"data of type {type(data).__name__} is not supported; pass a list of strings or dicts, "
        "a datasets.Dataset/IterableDataset, a local file/directory path, or a hub dataset id."
    )


def _open_dataset(ds, text_field: str, tokens: bool = False):
    if text_field not in ds.column_names:
        what, option = field_words(tokens)
        raise DataError(f"{what} {text_field!r} is not a column of the dataset; "
                        f"available columns: {', '.join(ds.column_names)}. Pass {option}.")
    column = ds.select_columns([text_field])

    def rows(skip):
        for start in range(skip, len(column), 1024):
            batch = column[start:start + 1024][text_field]
            yield from enumerate(batch, start=start)

    return rows, len(ds), {"kind": "datasets.Dataset", "n": len(ds),
                           "fingerprint": str(getattr(ds, "_fingerprint", ""))}


def _is_pandas_frame(data) -> bool:
    return type(data).__module__.startswith("pandas") and type(data).__name__ == "DataFrame"


def _open_pandas(frame, text_field: str, tokens: bool = False):
    """A pandas DataFrame: its `text_field` column, rows in order (doc_id = row number)."""
    import pandas as pd

    if text_field not in frame.columns:
        what, option = field_words(tokens)
        raise DataError(f"{what} {text_field!r} is not a column of the DataFrame; available "
                        f"columns: {', '.join(map(str, frame.columns))}. Pass {option}.")
    column = frame[text_field]
    if tokens:  # lists of ids are unhashable for pandas
        digest = ids_digest(column)
    else:
        digest = hashlib.sha256(pd.util.hash_pandas_object(column, index=False).to_numpy().tobytes())

    def rows(skip):
        return enumerate(column.iloc[skip:].tolist(), start=skip)

    return rows, len(frame), {"kind": "pandas.DataFrame", "n": len(frame),
                              "sha256": digest.hexdigest()}


def _kind(data) -> str:
    return f"a file ({data!r})" if isinstance(data, str) else f"a {type(data).__name__}"


def _open_path_or_hub(path: str, split: str, repository: Repository):
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
        return _streaming_rows(ds, described), None, fingerprint
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
        return _streaming_rows(ds, described), None, fingerprint
    if looks_like_path(path) or os.path.splitext(path)[1].lower() in {".txt", *_FILE_BUILDERS}:
        raise DataError(f"data path {path!r} does not exist; pass an existing file or directory.")
    ds = _load_split(path, split, repository, streaming=True)
    return _streaming_rows(ds, f"hub dataset {path!r}"), None, {
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


def _streaming_rows(ds, described: str = "the dataset"):
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


def _head_digest(rows: Iterable, n: int = 64) -> str:
    """sha256 of the first `n` rows: tells two in-memory streaming corpora apart."""
    digest = hashlib.sha256()
    for item in itertools.islice(rows, n):
        digest.update(json.dumps(item, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _file_digest(path: str) -> dict:
    with open(path, "rb") as f:
        head = f.read(1 << 20)
    return {"bytes": os.path.getsize(path), "sha256_first_mib": hashlib.sha256(head).hexdigest()}


def _pick(rows: Iterator[tuple[int, Any]], wanted: np.ndarray) -> Iterator[tuple[int, Any]]:
    """Rows whose index is in the sorted array `wanted`."""
    targets = iter(wanted.tolist())
    target = next(targets, None)
    for index, item in rows:
        if target is None:
            return
        if index == target:
            yield index, item
            target = next(targets, None)
