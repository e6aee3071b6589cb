"""Analysis. It owns finding and showing what a capture holds: `top` (the rows of one
module with the highest score: a direction, a dimension, the norm or any function of the
vectors) and `contexts` (the exact text around any `(doc_id, position)`, decoded from the
docs table's token ids with the tokenizer saved in `OUT/tokenizer/`).

`top` streams: it reads pyarrow record batches, scores each batch in one vectorised call,
and keeps a running candidate set of at most k rows, so memory is bounded by the batch
and k, never by the dataset. With `per_doc`, keeping the k best rows that respect the cap
among everything seen so far is enough: a row of the final answer has, in any prefix of
the data, no more capped rows ahead of it than in the whole (a document's best rows in a
prefix rank no higher than its best rows overall), so it is never dropped early.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from crowstream.checks import check_positive
from crowstream.errors import ConfigError
from crowstream.format.layout import TOKENIZER_DIR
from crowstream.reading.catalog import Catalog, ModuleFiles, vector_array

MARK = ("«", "»")  # put around the scored token in `context`
SCAN_BATCH_ROWS = 8192  # rows scored per call: ~25 MiB of float32 at d=768


def top(out, module: str, score, k: int = 20, *, window=(16, 4), per_doc: int | None = None):
    """The `k` rows of `module` with the highest score, as a `polars.DataFrame` with
    doc_id, position, token, token_text, score (float64) and context.

    `score` is a direction (a `[d]` tensor or array: the projection `vector @ direction`),
    an int (that dimension's value), `"norm"` (the L2 norm), or a callable taking a
    `[B, d]` float32 torch tensor and returning `[B]` scores (e.g. an SAE latent). Scores
    are computed in float32; NaN ranks last. `per_doc` caps the hits per document. Rows
    are ordered by (score descending, doc_id, position), which also breaks ties.
    `context` is the decoded text of `window = (before, after)` tokens around the row,
    the row's own token between « and » (see `contexts`); `window=None` skips it (and
    works on outputs written before format 2). One streaming pass over the module's part
    files: memory is bounded by the batch and k.
    """
    import polars as pl

    out = os.fspath(out)
    check_positive("k", k, allow_none=False)
    if per_doc is not None:
        check_positive("per_doc", per_doc)
    catalog = Catalog(out)
    files = catalog.module(module)
    best = TopK(k, per_doc)
    scorer = make_scorer(score, files.d)
    for doc_id, position, token, batch in scan_batches(catalog, files):
        best.add(scorer(batch), doc_id, position, token)
    found = best.frame()
    if window is None:
        from crowstream.reading.readers import vocab

        texts = vocab(out).select(pl.col("token"), pl.col("text").alias("token_text"))
        found = found.join(texts.collect(), on="token", how="left").sort(
            "score", "doc_id", "position", descending=[True, False, False])
        return found.select("doc_id", "position", "token", "token_text", "score")
    found = contexts(out, found, window)
    return found.select("doc_id", "position", "token", "token_text", "score", "context")


def contexts(out, frame, window=(16, 4)):
    """`frame` (any polars DataFrame with doc_id and position) plus `token_text` and
    `context`: the text of `window = (before, after)` tokens around each row, decoded
    exactly with the tokenizer saved in OUT (`tokenizer.decode` of the document's token
    slice, special tokens included), with « and » inserted around the row's own token.
    Removing the two marks gives exactly `tokenizer.decode(tokens[p - before : p + after + 1])`.
    Needs format 2 output (crowstream 0.2+): older outputs raise `ConfigError`.
    """
    import polars as pl

    out = os.fspath(out)
    before, after = _check_window(window)
    missing = {"doc_id", "position"} - set(frame.columns)
    if missing:
        raise ConfigError(f"contexts needs the columns doc_id and position; the frame lacks "
                          f"{', '.join(sorted(missing))} (it has {', '.join(frame.columns)}).")
    tokenizer = load_tokenizer(out)
    wanted = frame["doc_id"].unique().to_list()
    token_ids = doc_tokens(out, wanted)
    pieces = []
    for doc_id, position in zip(frame["doc_id"].to_list(), frame["position"].to_list()):
        ids = token_ids.get(doc_id)
        if ids is None or not 0 <= position < len(ids):
            where = "is not in the docs table" if ids is None else f"has {len(ids)} tokens"
            raise ConfigError(f"no token at doc_id {doc_id}, position {position}: the document "
                              f"{where}. Pass rows of this OUT.")
        lo, hi = max(0, position - before), min(len(ids), position + after + 1)
        pieces += [ids[lo:position], ids[lo:position + 1], ids[lo:hi], ids[position:position + 1]]
    decoded = tokenizer.batch_decode(pieces) if pieces else []
    marked, token_texts = [], []
    for i in range(0, len(decoded), 4):
        head, through, full, own = decoded[i:i + 4]
        marked.append(mark(full, head, through, own))
        token_texts.append(own)
    return frame.with_columns(pl.Series("token_text", token_texts, pl.String),
                              pl.Series("context", marked, pl.String))


def mark(full: str, head: str, through: str, own: str = "") -> str:
    """Insert MARK into `full` (decode of the whole slice) around the scored token, whose
    text ends `through` (decode up to and including it) after `head` (decode before it).
    Decoding is not always additive (WordPiece joins, split UTF-8): the marks go where the
    partial decodes stop agreeing with `full`, so removing them always gives `full`. A
    space the decoder put between words stays outside unless the token's own text `own`
    starts with one (byte-level BPE's " the")."""
    start = len(os.path.commonprefix([full, head]))
    end = max(start, len(os.path.commonprefix([full, through])))
    if not own[:1].isspace():
        while start < end and full[start].isspace():
            start += 1
    return full[:start] + MARK[0] + full[start:end] + MARK[1] + full[end:]


def load_tokenizer(out: str):
    """The tokenizer saved in OUT/tokenizer/ (cached per directory and its mtime)."""
    path = os.path.join(os.fspath(out), TOKENIZER_DIR)
    if not os.path.isdir(path):
        raise ConfigError(f"{out!r} has no {TOKENIZER_DIR}/: it was written before format 2 "
                          "(crowstream 0.1), which kept neither the tokenizer nor each document's "
                          "token ids, so contexts cannot be rebuilt exactly. Capture again with "
                          "this version, or pass window=None to cs.top.")
    return _tokenizer_at(path, os.stat(path).st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _tokenizer_at(path: str, mtime_ns: int):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def doc_tokens(out: str, doc_ids: list[int]) -> dict[int, list[int]]:
    """-> {doc_id: token ids} for the given documents, read from the docs table."""
    import polars as pl

    from crowstream.reading.readers import docs

    table = docs(out)
    if "tokens" not in table.collect_schema().names():
        load_tokenizer(out)  # raises the format-1 explanation when the tokenizer is missing too
        raise ConfigError(f"the docs table of {out!r} has no tokens column (format 1); capture "
                          "again with this version, or pass window=None to cs.top.")
    found = table.filter(pl.col("doc_id").is_in(doc_ids)).select("doc_id", "tokens").collect()
    return dict(zip(found["doc_id"].to_list(), found["tokens"].to_list()))


def scan_batches(catalog: Catalog, files: ModuleFiles, batch_rows: int | None = None,
                 row_groups: dict[str, list[int]] | None = None):
    """Yield (doc_id [B] int64, position [B] int32, token [B] int32, vectors [B, d] float32)
    from each part file of `files` in turn; `row_groups` (path -> indices) reads only those."""
    columns = ["doc_id", "position", "token", "vector"]
    for path in files.paths:
        parquet = catalog.open(path, pre_buffer=False)  # pre-buffering held a whole file
        groups = None if row_groups is None else row_groups.get(path, [])
        if groups == []:
            continue
        for batch in parquet.iter_batches(batch_size=batch_rows or SCAN_BATCH_ROWS, columns=columns,
                                          row_groups=groups):
            yield (batch.column("doc_id").to_numpy(), batch.column("position").to_numpy(),
                   batch.column("token").to_numpy(),
                   vector_array(batch.column("vector"), files.d, np.float32))


def make_scorer(score, d: int):
    """-> a function [B, d] float32 array -> [B] scores, for the kinds `top` accepts."""
    if isinstance(score, str):
        if score != "norm":
            raise ConfigError(f"score {score!r} is not known; use \"norm\", a dimension (int), "
                              "a [d] direction, or a callable on a [B, d] tensor.")
        return lambda x: np.sqrt(np.einsum("ij,ij->i", x, x))
    if isinstance(score, (int, np.integer)) and not isinstance(score, bool):
        if not 0 <= score < d:
            raise ConfigError(f"dimension {score} is out of range for d={d}; use 0..{d - 1}.")
        return lambda x: x[:, int(score)]
    if callable(score):
        return functools.partial(_call_scorer, score)
    values = score.detach().cpu().float().numpy() if hasattr(score, "detach") else score
    direction = np.asarray(values, dtype=np.float32)
    if direction.shape != (d,):
        raise ConfigError(f"a direction must have shape ({d},) for this module; got "
                          f"{direction.shape}.")
    # [B, d] . [d] -> [B]; einsum: 3x faster than BLAS's threaded x @ direction on 2 busy cores
    return lambda x: np.einsum("ij,j->i", x, direction)


def _call_scorer(function, x: np.ndarray) -> np.ndarray:
    import warnings

    import torch

    with warnings.catch_warnings():  # Arrow's buffers are read-only; the scorer only reads them
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        tensor = torch.from_numpy(x)
    with torch.inference_mode():
        result = function(tensor)
    if hasattr(result, "detach"):  # a torch tensor
        result = result.detach().float().cpu().numpy()
    result = np.asarray(result)
    if result.shape != (len(x),):
        raise ConfigError(f"the score function must map a [B, d] tensor to [B] scores; for "
                          f"B={len(x)} it returned shape {tuple(result.shape)}.")
    return result


class TopK:
    """The best k rows seen so far, ordered by (score desc, doc_id, position), at most
    `per_doc` per document. Holds at most k candidates plus one batch's survivors."""

    def __init__(self, k: int, per_doc: int | None = None):
        self.k, self.per_doc = k, per_doc
        self.columns = {"score": np.zeros(0), "doc_id": np.zeros(0, np.int64),
                        "position": np.zeros(0, np.int32), "token": np.zeros(0, np.int32)}

    def threshold(self) -> float:
        """Rows scoring below this cannot enter (ties can: doc_id and position decide)."""
        scores = self.columns["score"]
        return scores[-1] if len(scores) == self.k else -np.inf

    def add(self, score, doc_id, position, token) -> None:
        score = np.where(np.isnan(score), -np.inf, score.astype(np.float64))  # NaN ranks last
        rows = np.flatnonzero(score >= self.threshold())
        if not rows.size:
            return
        if self.per_doc is None and rows.size > self.k:  # cheap cut; ties at the edge all stay
            edge = np.partition(score[rows], rows.size - self.k)[rows.size - self.k]
            rows = rows[score[rows] >= edge]
        new = {"score": score[rows], "doc_id": doc_id[rows], "position": position[rows],
               "token": token[rows]}
        self.columns = {c: np.concatenate([self.columns[c], new[c]]) for c in self.columns}
        self._select()

    def _select(self) -> None:
        c = self.columns
        order = np.lexsort((c["position"], c["doc_id"], -c["score"]))
        if self.per_doc is not None:
            order = order[_rank_within(c["doc_id"][order]) < self.per_doc]
        order = order[:self.k]
        self.columns = {name: values[order] for name, values in c.items()}

    def frame(self):
        import polars as pl

        c = self.columns
        return pl.DataFrame({"doc_id": pl.Series(c["doc_id"], dtype=pl.Int64),
                             "position": pl.Series(c["position"], dtype=pl.Int32),
                             "token": pl.Series(c["token"], dtype=pl.Int32),
                             "score": pl.Series(c["score"], dtype=pl.Float64)})


def _rank_within(groups: np.ndarray) -> np.ndarray:
    """For rows in ranking order, each row's rank among the rows of its group (0 = best)."""
    n = len(groups)
    by_group = np.argsort(groups, kind="stable")  # stable: ranking order within a group
    grouped = groups[by_group]
    starts = np.r_[True, grouped[1:] != grouped[:-1]] if n else np.zeros(0, bool)
    first = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
    rank = np.empty(n, np.int64)
    rank[by_group] = np.arange(n) - first
    return rank


def _check_window(window) -> tuple[int, int]:
    ok = (isinstance(window, (tuple, list)) and len(window) == 2
          and all(isinstance(w, (int, np.integer)) and not isinstance(w, bool) and w >= 0
                  for w in window))
    if not ok:
        raise ConfigError(f"window must be (tokens before, tokens after), two integers >= 0; "
                          f"got {window!r}.")
    return int(window[0]), int(window[1])
