"""Feature dashboards. It owns `dashboard(out, module, score, dest)`: for L latents (an SAE
encoder, a matrix of directions, every neuron) it writes two Parquet tables that dashboard
tools (SAEDashboard, sae_vis, delphi) or a few lines of polars browse:

  dest/examples.parquet    latent, rank, doc_id, position, token, activation, window_start,
                           window_tokens (list<int32>: the window's token ids, clipped to the
                           forward the row came from; `position - window_start` indexes the
                           row's own token)
  dest/histograms.parquet  latent, min, max, zeros, fraction_active, bin_edges (list<float64>,
                           bins + 1), counts (list<int64>, bins)

Two streaming passes over the module: the first keeps each latent's top k (`cs.top`'s
exact ordering) and its range, the second counts each latent's histogram over that range
in one `bincount` per batch. Exact zeros (an SAE's inactive rows) are counted in `zeros`,
not in the bins, so an SAE latent's histogram shows its activations; `fraction_active` is
the share of rows scoring > 0. Memory: k x L candidates and L x bins counts.
"""

from __future__ import annotations

import os

import numpy as np

from crowstream.checks import check_positive
from crowstream.errors import ConfigError
from crowstream.reading.analysis import scan_top, scored_batches
from crowstream.reading.catalog import Catalog
from crowstream.reading.latents import TopKLatents
from crowstream.reading.windows import chunk_size, check_window, doc_tokens, window_span

EXAMPLES_NAME = "examples.parquet"
HISTOGRAMS_NAME = "histograms.parquet"


def dashboard(out, module: str, score, dest, *, k: int = 20, window=(16, 4), bins: int = 50,
              storage_options: dict | None = None) -> dict:
    """Write `dest/examples.parquet` (the `k` top rows of every latent of `score`, with
    their windows' token ids) and `dest/histograms.parquet` (each latent's histogram in
    `bins` bins) for `module` of `out` (a path or URL with fsspec `storage_options`).
    `score` is anything `cs.top` takes for many latents: a `[d, L]` matrix, `"neurons"`
    or a callable `[B, d] -> [B, L]`. -> {"examples", "histograms": paths, "latents": L}."""
    import pyarrow.parquet as pq

    check_positive("k", k, allow_none=False)
    check_positive("bins", bins, allow_none=False)
    before, after = check_window(window)
    catalog = Catalog(out, storage_options)
    files = catalog.module(module)
    ranges = _Range()
    best = scan_top(catalog, files, score, k, each=ranges.add)
    if not isinstance(best, TopKLatents):
        raise ConfigError("dashboard needs many latents: a [d, L] matrix, \"neurons\" or a "
                          "callable returning [B, L]; for one latent use cs.top.")
    counts, zeros, active, total = _histograms(catalog, files, score, ranges, bins)
    dest = os.fspath(dest)
    os.makedirs(dest, exist_ok=True)
    examples = _examples(catalog, best.frame(), before, after)
    pq.write_table(examples.to_arrow(), os.path.join(dest, EXAMPLES_NAME))
    histograms = _histogram_frame(ranges, counts, zeros, active, total, bins)
    pq.write_table(histograms.to_arrow(), os.path.join(dest, HISTOGRAMS_NAME))
    return {"examples": os.path.join(dest, EXAMPLES_NAME),
            "histograms": os.path.join(dest, HISTOGRAMS_NAME), "latents": best.n_latents}


class _Range:
    """Running per-latent min and max of the finite scores."""

    def __init__(self):
        self.low = self.high = None

    def add(self, scores: np.ndarray) -> None:
        if scores.ndim != 2 or not len(scores):
            return
        finite = np.isfinite(scores)
        low = np.where(finite, scores, np.inf).min(0)
        high = np.where(finite, scores, -np.inf).max(0)
        self.low = low if self.low is None else np.minimum(self.low, low)
        self.high = high if self.high is None else np.maximum(self.high, high)


def _histograms(catalog: Catalog, files, score, ranges: _Range, bins: int):
    """Second pass: -> (counts [L, bins], zeros [L], active [L], rows) over the range."""
    batches = scored_batches(catalog, files, score)
    next(batches)
    n = 0 if ranges.low is None else len(ranges.low)
    counts, zeros, active, total = np.zeros(n * bins, np.int64), np.zeros(n, np.int64), \
        np.zeros(n, np.int64), 0
    if not n:
        return counts.reshape(0, bins), zeros, active, total
    low = np.where(np.isfinite(ranges.low), ranges.low, 0.0)
    width = np.where(ranges.high > low, (ranges.high - low) / bins, 1.0)
    offsets = np.arange(n) * bins
    for _, _, _, scores in batches:
        total += len(scores)
        zeros += (scores == 0).sum(0)
        active += (scores > 0).sum(0)
        counted = np.isfinite(scores) & (scores != 0)
        safe = np.where(counted, scores, low)  # NaN/inf would not cast to a bin index
        index = np.clip(((safe - low) / width).astype(np.int64), 0, bins - 1) + offsets  # [B, L]
        counts += np.bincount(index[counted], minlength=n * bins)
    return counts.reshape(n, bins), zeros, active, total


def _histogram_frame(ranges: _Range, counts, zeros, active, total: int, bins: int):
    import polars as pl

    n = len(zeros)
    low = np.zeros(n) if ranges.low is None else np.where(np.isfinite(ranges.low), ranges.low, 0.0)
    high = low if ranges.high is None else np.where(np.isfinite(ranges.high), ranges.high, low)
    edges = low[:, None] + (high - low)[:, None] * np.linspace(0, 1, bins + 1)[None, :]
    return pl.DataFrame({
        "latent": pl.Series(np.arange(n), dtype=pl.Int32),
        "min": pl.Series(low, dtype=pl.Float64), "max": pl.Series(high, dtype=pl.Float64),
        "zeros": pl.Series(zeros, dtype=pl.Int64),
        "fraction_active": pl.Series(active / max(total, 1), dtype=pl.Float64),
        "bin_edges": pl.Series(list(edges), dtype=pl.List(pl.Float64)),
        "counts": pl.Series(list(counts), dtype=pl.List(pl.Int64))})


def _examples(catalog: Catalog, found, before: int, after: int):
    """The top rows with their windows' token ids (no decoding: join vocab to render)."""
    import polars as pl

    tokens = doc_tokens(catalog, found["doc_id"].unique().to_list())
    chunk = chunk_size(catalog)
    starts, windows = [], []
    for doc_id, position in zip(found["doc_id"].to_list(), found["position"].to_list()):
        ids = tokens.get(doc_id, [])
        lo, hi = window_span(position, len(ids), before, after, chunk)
        starts.append(lo)
        windows.append(ids[lo:hi])
    return found.rename({"score": "activation"}).with_columns(
        pl.Series("window_start", starts, pl.Int32),
        pl.Series("window_tokens", windows, pl.List(pl.Int32))).select(
        "latent", "rank", "doc_id", "position", "token", "activation", "window_start",
        "window_tokens")
