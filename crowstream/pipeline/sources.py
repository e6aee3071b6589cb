"""Stage 1, the source. It owns turning whatever the user has (a list of strings or dicts,
a `datasets.Dataset`/`IterableDataset`, a local file or directory, a hub dataset id) into
a stream of `(doc_id, text)`, where `doc_id` is the document's 0-based row index in the
source, or, for a pre-tokenized corpus (`tokens_field`), `(doc_id, token ids)`. Sampling,
`max_docs`, and skipping already-committed documents (resume) live here, so a resumed run
never even reads the skipped documents into the model. What one row becomes (its text or
its token ids, and the policy for bad ones) is `documents.py`; reading files, directories
and hub datasets is `corpus_files.py`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from crowstream.errors import DataError
from crowstream.pipeline.corpus_files import open_path_or_hub, streaming_rows
from crowstream.pipeline.documents import (check_not_text_file, docs_of_output, field_words,
                                           ids_digest, ids_of, text_of)

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
        return open_path_or_hub(data, split, repository)
    if _is_pandas_frame(data):
        return _open_pandas(data, text_field, tokens)
    datasets = sys.modules.get("datasets")  # a Dataset exists only once it is imported
    if datasets is not None and isinstance(data, datasets.Dataset):
        return _open_dataset(data, text_field, tokens)
    if datasets is not None and isinstance(data, datasets.IterableDataset):
        return streaming_rows(data), None, {
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


def _head_digest(rows: Iterable, n: int = 64) -> str:
    """sha256 of the first `n` rows: tells two in-memory streaming corpora apart."""
    digest = hashlib.sha256()
    for item in itertools.islice(rows, n):
        digest.update(json.dumps(item, sort_keys=True, default=str).encode())
    return digest.hexdigest()


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
