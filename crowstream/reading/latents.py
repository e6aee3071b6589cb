"""Many latents at once. It owns `TopKLatents`: the best k rows of each of L latents (an
SAE's encoder, a matrix of directions, every neuron of a module) kept in one streaming
pass, in `[L, k]` arrays, so memory is k x L whatever the data's size.

Each batch's `[B, L]` scores are cut to each latent's best k rows in one vectorised
`argpartition` over a unique integer key: the float32 score's bits made order-preserving
in the high 32 bits, the row's rank by (doc_id, position) within the batch in the low 32
bits. The key ranks rows exactly as `top` does (score descending, then doc_id, position),
ties included, without a Python loop per latent; NaN ranks last (as -inf), -0.0 ties 0.0.
Once each latent holds k rows, only scores >= its k-th can enter; when few do (the usual
case after the first batches) just those are sorted (`_sparse`), else the whole batch is
partitioned (`_dense`: the first batches, or many latents tied at their floor, like an
SAE's dead latents at 0). The batch's k per latent then merge with the k kept so far by
one `lexsort` on `[L, 2k]` (missing rows padded with -inf, sorting last).
"""

from __future__ import annotations

import numpy as np

LATENT_BATCH_ELEMENTS = 1 << 22  # rows x latents scored per call: 16 MiB of float32 scores
LATENT_BATCH_ROWS = 1024         # rows per call for a callable (its L is unknown up front)
SPARSE_SHARE = 8  # below 1/8 of (latent, row) pairs able to enter, sort just those


def batch_rows(n_latents: int, most: int) -> int:
    """Rows per scored batch for L latents: the [B, L] scores and keys stay ~16-64 MiB."""
    return int(np.clip(LATENT_BATCH_ELEMENTS // max(n_latents, 1), 256, most))


def order_key(scores: np.ndarray) -> np.ndarray:
    """float32 `[...]` -> int64 keys with the same order (NaN as -inf, -0.0 as 0.0)."""
    clean = np.where(np.isnan(scores), np.float32(-np.inf), scores).astype(np.float32) + \
        np.float32(0.0)  # -0.0 + 0.0 = +0.0
    bits = clean.view(np.int32).astype(np.int64)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: flip the magnitude's order


class TopKLatents:
    """The best `k` rows of each of `n_latents` latents seen so far, each latent ordered by
    (score desc, doc_id, position). Holds `[L, <= k]` arrays."""

    def __init__(self, k: int, n_latents: int):
        self.k, self.n_latents, self.seen = k, n_latents, 0
        empty = (n_latents, 0)
        self.columns = {"score": np.zeros(empty, np.float32), "doc_id": np.zeros(empty, np.int64),
                        "position": np.zeros(empty, np.int32), "token": np.zeros(empty, np.int32)}

    def add(self, scores, doc_id, position, token) -> None:
        """`scores` [B, L] (float32) of the rows (doc_id, position, token) [B]."""
        from crowstream.errors import ConfigError

        if scores.ndim != 2 or scores.shape[1] != self.n_latents:
            raise ConfigError(f"the score function returned shape {tuple(scores.shape)} after "
                              f"returning {self.n_latents} latents per row; it must always "
                              "return [B, L] with the same L.")
        n = len(doc_id)
        if not n:
            return
        self.seen += n
        transposed = np.ascontiguousarray(np.asarray(scores, np.float32).T)  # [L, B]
        np.copyto(transposed, np.float32(-np.inf), where=np.isnan(transposed))  # NaN ranks last
        rank = np.empty(n, np.int64)
        rank[np.lexsort((position, doc_id))] = np.arange(n)  # (doc_id, position) order
        width = self.columns["score"].shape[1]
        floor = self.columns["score"][:, -1] if width == self.k else np.full(self.n_latents, -np.inf)
        entering = transposed >= floor[:, None]  # only these can enter (ties: the key decides)
        if np.count_nonzero(entering) * SPARSE_SHARE <= entering.size:
            rows = self._sparse(transposed, entering, rank)
        else:
            rows = self._dense(transposed, rank)
        score = np.take_along_axis(transposed, np.maximum(rows, 0), 1)
        score[rows < 0] = -np.inf  # padding: sorts after every real row
        pad = rows < 0
        new = {"score": score,
               "doc_id": np.where(pad, np.iinfo(np.int64).max, doc_id[np.maximum(rows, 0)]),
               "position": np.where(pad, np.iinfo(np.int32).max, position[np.maximum(rows, 0)]),
               "token": np.where(pad, 0, token[np.maximum(rows, 0)])}
        self._merge(new)

    def _dense(self, transposed: np.ndarray, rank: np.ndarray) -> np.ndarray:
        """-> [L, min(k, B)] row indices: each latent's best rows of the batch."""
        n = transposed.shape[1]
        take = min(self.k, n)
        if take == n:
            return np.broadcast_to(np.arange(n), (self.n_latents, n))
        key = order_key(transposed)  # [L, B]
        key <<= 32
        key += (n - 1 - rank)  # a smaller (doc_id, position) ranks higher on ties
        return np.argpartition(key, n - take, axis=1)[:, n - take:]

    def _sparse(self, transposed: np.ndarray, entering: np.ndarray, rank: np.ndarray):
        """The same as `_dense` from the few (latent, row) pairs that can enter: -> [L, k]
        row indices, -1 where a latent has fewer."""
        n = transposed.shape[1]
        latent, row = np.nonzero(entering)
        key = (order_key(transposed[latent, row]) << 32) + (n - 1 - rank[row])
        order = np.lexsort((-key, latent))  # by latent, best first
        latent, row = latent[order], row[order]
        slot = np.arange(len(latent)) - np.searchsorted(latent, latent)  # place within its latent
        keep = slot < self.k
        rows = np.full((self.n_latents, self.k), -1, np.int64)
        rows[latent[keep], slot[keep]] = row[keep]
        return rows

    def _merge(self, new: dict) -> None:
        c = {name: np.concatenate([self.columns[name], new[name]], axis=1) for name in new}
        order = np.lexsort((c["position"], c["doc_id"], -c["score"]), axis=1)[:, :self.k]
        self.columns = {name: np.take_along_axis(values, order, 1) for name, values in c.items()}

    def frame(self):
        """-> polars DataFrame: latent, rank, doc_id, position, token, score (float64),
        ordered by latent then rank (0 = best)."""
        import polars as pl

        width = min(self.k, self.seen)
        c = {name: values[:, :width] for name, values in self.columns.items()}
        return pl.DataFrame({
            "latent": pl.Series(np.repeat(np.arange(self.n_latents), width), dtype=pl.Int32),
            "rank": pl.Series(np.tile(np.arange(width), self.n_latents), dtype=pl.Int32),
            "doc_id": pl.Series(c["doc_id"].reshape(-1), dtype=pl.Int64),
            "position": pl.Series(c["position"].reshape(-1), dtype=pl.Int32),
            "token": pl.Series(c["token"].reshape(-1), dtype=pl.Int32),
            "score": pl.Series(c["score"].reshape(-1).astype(np.float64), dtype=pl.Float64)})
