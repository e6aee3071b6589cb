"""Analysis. It owns finding and showing what a capture holds: `top` (the rows of one
module with the highest score: a direction, a dimension, the norm or any function of the
vectors; or the best rows of each of many latents at once, see `latents.py`) and
`contexts` (the exact tokens around any `(doc_id, position)` that the model saw in the
forward that produced the row, decoded from the docs table's token ids with the tokenizer
saved in `OUT/tokenizer/`). OUT may be a local directory or a URL: everything is read
through the catalog.

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
from crowstream.reading.catalog import Catalog, ModuleFiles, vector_array
from crowstream.reading.latents import LATENT_BATCH_ROWS, TopKLatents
from crowstream.reading.latents import batch_rows as latent_batch_rows
from crowstream.reading.windows import CONTEXT_COLUMNS, check_window, contexts, load_tokenizer  # noqa: F401

SCAN_BATCH_ROWS = 8192  # rows scored per call: ~25 MiB of float32 at d=768
ROW_COLUMNS = ["doc_id", "position", "token", "token_text", "score"]


def top(out, module: str, score, k: int = 20, *, window=(16, 4), per_doc: int | None = None,
        storage_options: dict | None = None):
    """The `k` rows of `module` with the highest score, as a `polars.DataFrame` with
    doc_id, position, token, token_text, score (float64) and the context columns of
    `contexts` (window_start, window_end, window_text, mark_start, mark_end, context).

    `score` is one latent: a direction (a `[d]` tensor or array: the projection
    `vector @ direction`), an int (that dimension's value), `"norm"` (the L2 norm), or a
    callable taking a `[B, d]` float32 torch tensor and returning `[B]` scores. Or many
    latents at once: a `[d, L]` matrix (directions, an SAE encoder's weights), a callable
    returning `[B, L]` (an SAE encoder with its bias and activation), or `"neurons"` (every
    dimension, L = d); then the k best rows of every latent come from one pass (memory
    k x L) in one frame with `latent` and `rank` columns first, ordered by latent then rank.
    Scores are computed in float32; NaN ranks last. `per_doc` caps the hits per document
    (one latent only). Rows are ordered by (score descending, doc_id, position), which
    also breaks ties. `window = (before, after)` tokens of context, clipped to the forward
    the row came from (see `contexts`); `window=None` skips contexts (and works on outputs
    written before format 2). `out` may be a URL with fsspec `storage_options`.
    """
    out = os.fspath(out)
    check_positive("k", k, allow_none=False)
    if per_doc is not None:
        check_positive("per_doc", per_doc)
    if window is not None:
        check_window(window)  # before the pass, not after it
    catalog = Catalog(out, storage_options)
    best = scan_top(catalog, catalog.module(module), score, k, per_doc)
    first = ["latent", "rank"] if isinstance(best, TopKLatents) else []
    return _with_text(catalog, best.frame(), window, first)


def scored_batches(catalog: Catalog, files: ModuleFiles, score):
    """Yield (doc_id, position, token, scores [B] or [B, L]) over every row of `files`;
    the first item is L (None for one latent or a callable, whose output decides)."""
    scorer, n_latents = make_scorer(score, files.d)
    yield n_latents
    rows = SCAN_BATCH_ROWS if n_latents is None else latent_batch_rows(n_latents, SCAN_BATCH_ROWS)
    if callable(score):  # it may return [B, L]: keep those scores small
        rows = LATENT_BATCH_ROWS
    for doc_id, position, token, batch in scan_batches(catalog, files, rows):
        yield doc_id, position, token, scorer(batch)


def scan_top(catalog: Catalog, files: ModuleFiles, score, k: int, per_doc=None, each=None):
    """One pass: -> the filled `TopK` (one latent) or `TopKLatents`; `each(scores)` is
    called on every batch's scores too."""
    batches = scored_batches(catalog, files, score)
    n_latents = next(batches)
    best = None
    for doc_id, position, token, scores in batches:
        if best is None:
            best = _accumulator(scores, k, per_doc)
        best.add(scores, doc_id, position, token)
        if each is not None:
            each(scores)
    if best is None:  # no rows yet
        best = TopK(k) if n_latents is None else TopKLatents(k, n_latents)
    return best


def _accumulator(scores: np.ndarray, k: int, per_doc):
    if scores.ndim == 1:
        return TopK(k, per_doc)
    if per_doc is not None:
        raise ConfigError("per_doc works with one latent only; with many latents (a [d, L] "
                          "matrix, \"neurons\" or a callable returning [B, L]) leave it None.")
    return TopKLatents(k, scores.shape[1])


def _with_text(catalog: Catalog, found, window, first: list[str]):
    """The token's text (window=None) or the full context columns, in the documented order."""
    import polars as pl

    from crowstream.reading.readers import vocab

    if window is None:
        texts = vocab(catalog).select(
            pl.col("token"), pl.col("text").alias("token_text")).collect()
        found = found.join(texts, on="token", how="left", maintain_order="left")
        return found.select(*first, *ROW_COLUMNS)
    found = contexts(catalog, found, window)
    return found.select(*first, *ROW_COLUMNS, *CONTEXT_COLUMNS[1:])


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
    """-> (function [B, d] float32 array -> [B] or [B, L] scores, L or None for one latent
    or a callable, whose output decides)."""
    if isinstance(score, str):
        if score == "norm":
            return (lambda x: np.sqrt(np.einsum("ij,ij->i", x, x))), None
        if score == "neurons":
            return (lambda x: x), d
        raise ConfigError(f"score {score!r} is not known; use \"norm\", \"neurons\", a dimension "
                          "(int), a [d] direction, a [d, L] matrix, or a callable on a [B, d] tensor.")
    if isinstance(score, (int, np.integer)) and not isinstance(score, bool):
        if not 0 <= score < d:
            raise ConfigError(f"dimension {score} is out of range for d={d}; use 0..{d - 1}.")
        return (lambda x: x[:, int(score)]), None
    if callable(score):
        return functools.partial(_call_scorer, score), None
    values = score.detach().cpu().float().numpy() if hasattr(score, "detach") else score
    weights = np.asarray(values, dtype=np.float32)
    if weights.ndim == 2 and weights.shape[0] == d and weights.shape[1] >= 1:
        import torch

        # torch's matmul: numpy's BLAS threads ran 2.5x slower than torch's on busy cores
        return functools.partial(_matmul, torch.from_numpy(weights.copy())), weights.shape[1]
    if weights.shape != (d,):
        raise ConfigError(f"a direction must have shape ({d},) and a matrix of directions "
                          f"({d}, L) for this module; got {weights.shape}.")
    # [B, d] . [d] -> [B]; einsum: 3x faster than BLAS's threaded x @ direction on 2 busy cores
    return (lambda x: np.einsum("ij,j->i", x, weights)), None


def _tensor(x: np.ndarray):
    import warnings

    import torch

    with warnings.catch_warnings():  # Arrow's buffers are read-only; the scorer only reads them
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        return torch.from_numpy(x)


def _matmul(weights, x: np.ndarray) -> np.ndarray:
    """[B, d] @ [d, L] -> [B, L] float32."""
    import torch

    with torch.inference_mode():
        return (_tensor(x) @ weights).numpy()


def _call_scorer(function, x: np.ndarray) -> np.ndarray:
    import torch

    tensor = _tensor(x)
    with torch.inference_mode():
        result = function(tensor)
    if hasattr(result, "detach"):  # a torch tensor
        result = result.detach().float().cpu().numpy()
    result = np.asarray(result)
    if result.ndim not in (1, 2) or result.shape[0] != len(x):
        raise ConfigError(f"the score function must map a [B, d] tensor to [B] scores (one "
                          f"latent) or [B, L] (many); for B={len(x)} it returned shape "
                          f"{tuple(result.shape)}.")
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
