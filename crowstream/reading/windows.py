"""Contexts. It owns `contexts`: the tokens around a `(doc_id, position)` that the model saw
in the forward that produced the row, decoded exactly with the tokenizer saved in
`OUT/tokenizer/` from the docs table's token ids, and where the row's own token lies.

The window is `window = (before, after)` tokens around the row, clipped to the document
and, with `overflow="chunk"`, to the row's chunk `[c * context_size, (c + 1) *
context_size)`: each chunk was its own forward, so text of the previous chunk was never
seen by the model. The token's place is returned as data (token positions
`window_start`/`window_end`, character offsets `mark_start`/`mark_end` in the decoded
`window_text`); `context` with « and » around the token is only a rendering of those.
"""

from __future__ import annotations

import functools
import os
import tempfile

import numpy as np

from crowstream.errors import ConfigError
from crowstream.format.layout import TOKENIZER_DIR
from crowstream.reading.catalog import Catalog

MARK = ("«", "»")  # the rendering in `context` around the scored token
CONTEXT_COLUMNS = ["token_text", "window_start", "window_end", "window_text", "mark_start",
                   "mark_end", "context"]


def contexts(out, frame, window=(16, 4), *, storage_options: dict | None = None):
    """`frame` (any polars DataFrame with doc_id and position) plus the columns
    token_text, window_start, window_end (token positions, end exclusive), window_text
    (`tokenizer.decode` of those tokens, special tokens included), mark_start, mark_end
    (the row's token in window_text: `window_text[mark_start:mark_end]`) and context
    (window_text with « and » around the token: a rendering; a « in the text itself
    cannot be told from it, the offsets can). The window is `(before, after)` tokens,
    clipped to the chunk the row was captured in (`overflow="chunk"`). `out` may be a
    URL with fsspec `storage_options` (or a `Catalog`). Needs format 2 output
    (crowstream 0.2+): older outputs raise `ConfigError`.
    """
    import polars as pl

    catalog = out if isinstance(out, Catalog) else Catalog(out, storage_options)
    before, after = check_window(window)
    missing = {"doc_id", "position"} - set(frame.columns)
    if missing:
        raise ConfigError(f"contexts needs the columns doc_id and position; the frame lacks "
                          f"{', '.join(sorted(missing))} (it has {', '.join(frame.columns)}).")
    tokenizer = load_tokenizer(catalog)
    token_ids = doc_tokens(catalog, frame["doc_id"].unique().to_list())
    chunk = chunk_size(catalog)
    pieces, spans = [], []
    for doc_id, position in zip(frame["doc_id"].to_list(), frame["position"].to_list()):
        ids = token_ids.get(doc_id)
        if ids is None or not 0 <= position < len(ids):
            where = "is not in the docs table" if ids is None else f"has {len(ids)} tokens"
            raise ConfigError(f"no token at doc_id {doc_id}, position {position}: the document "
                              f"{where}. Pass rows of this OUT.")
        lo, hi = window_span(position, len(ids), before, after, chunk)
        spans.append((lo, hi))
        pieces += [ids[lo:position], ids[lo:position + 1], ids[lo:hi], ids[position:position + 1]]
    decoded = tokenizer.batch_decode(pieces) if pieces else []
    columns = {name: [] for name in CONTEXT_COLUMNS}
    for i, (lo, hi) in enumerate(spans):
        head, through, full, own = decoded[4 * i:4 * i + 4]
        start, end = mark_span(full, head, through, own)
        for name, value in zip(CONTEXT_COLUMNS, (own, lo, hi, full, start, end,
                                                 render(full, start, end))):
            columns[name].append(value)
    types = [pl.String, pl.Int32, pl.Int32, pl.String, pl.Int32, pl.Int32, pl.String]
    return frame.with_columns(pl.Series(name, columns[name], dtype)
                              for name, dtype in zip(CONTEXT_COLUMNS, types))


def chunk_size(catalog: Catalog) -> int | None:
    """The tokens per forward when long documents were chunked, else None."""
    config = catalog.manifest.config
    return config.get("context_size") if config.get("overflow") == "chunk" else None


def window_span(position: int, n: int, before: int, after: int, chunk: int | None):
    """-> [lo, hi) token positions around `position` in a document of `n` tokens, inside
    its chunk of `chunk` tokens when the document was chunked."""
    first, last = 0, n
    if chunk:
        first = position // chunk * chunk
        last = min(n, first + chunk)
    return max(first, position - before), min(last, position + after + 1)


def mark_span(full: str, head: str, through: str, own: str = "") -> tuple[int, int]:
    """Where the scored token lies in `full` (decode of the whole slice): its text ends
    `through` (decode up to and including it) after `head` (decode before it). Decoding is
    not always additive (WordPiece joins, split UTF-8): the span is where the partial
    decodes stop agreeing with `full`. A space the decoder put between words stays outside
    unless the token's own text `own` starts with one (byte-level BPE's " the")."""
    start = len(os.path.commonprefix([full, head]))
    end = max(start, len(os.path.commonprefix([full, through])))
    if not own[:1].isspace():
        while start < end and full[start].isspace():
            start += 1
    return start, end


def render(full: str, start: int, end: int) -> str:
    """`full` with MARK around `full[start:end]`."""
    return full[:start] + MARK[0] + full[start:end] + MARK[1] + full[end:]


def load_tokenizer(out, *, storage_options: dict | None = None):
    """The tokenizer saved in OUT/tokenizer/ (`out`: a path, a URL with fsspec
    `storage_options`, or a `Catalog`), cached per directory and its mtime (a URL: per
    run)."""
    catalog = out if isinstance(out, Catalog) else Catalog(out, storage_options)
    if not catalog.exists(TOKENIZER_DIR):
        raise ConfigError(f"{catalog.shown!r} has no {TOKENIZER_DIR}/: it was written before "
                          "format 2 (crowstream 0.1), which kept neither the tokenizer nor each "
                          "document's token ids, so contexts cannot be rebuilt exactly. Capture "
                          "again with this version, or pass window=None to cs.top.")
    if catalog.remote:
        return _remote_tokenizer(catalog.shown, catalog.manifest.run_id, catalog)
    path = os.path.join(catalog.out, TOKENIZER_DIR)
    return _tokenizer_at(path, os.stat(path).st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _tokenizer_at(path: str, mtime_ns: int):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


_REMOTE: dict = {}


def _remote_tokenizer(shown: str, run_id: str, catalog: Catalog):
    """Download OUT/tokenizer/ once per (URL, run) into a temporary directory and load it
    (the tokenizer then lives in memory; the copy is deleted)."""
    from transformers import AutoTokenizer

    key = (shown, run_id)
    if key not in _REMOTE:
        with tempfile.TemporaryDirectory(prefix="crowstream-tokenizer-") as local:
            catalog.download(TOKENIZER_DIR, local)
            _REMOTE.clear()  # one remote tokenizer cached at a time
            _REMOTE[key] = AutoTokenizer.from_pretrained(local, local_files_only=True)
    return _REMOTE[key]


def doc_tokens(out, doc_ids: list[int], *,
               storage_options: dict | None = None) -> dict[int, list[int]]:
    """-> {doc_id: token ids} for the given documents, read from the docs table (`out`: a
    path, a URL with fsspec `storage_options`, or a `Catalog`)."""
    import polars as pl

    from crowstream.reading.readers import docs

    catalog = out if isinstance(out, Catalog) else Catalog(out, storage_options)
    table = docs(catalog)
    if "tokens" not in table.collect_schema().names():
        load_tokenizer(catalog)  # raises the format-1 explanation when the tokenizer is missing too
        raise ConfigError(f"the docs table of {catalog.shown!r} has no tokens column (format 1); "
                          "capture again with this version, or pass window=None to cs.top.")
    found = table.filter(pl.col("doc_id").is_in(doc_ids)).select("doc_id", "tokens").collect()
    return dict(zip(found["doc_id"].to_list(), found["tokens"].to_list()))


def check_window(window) -> tuple[int, int]:
    ok = (isinstance(window, (tuple, list)) and len(window) == 2
          and all(isinstance(w, (int, np.integer)) and not isinstance(w, bool) and w >= 0
                  for w in window))
    if not ok:
        raise ConfigError(f"window must be (tokens before, tokens after), two integers >= 0; "
                          f"got {window!r}.")
    return int(window[0]), int(window[1])
