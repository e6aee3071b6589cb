"""Per-module statistics. It owns `ModuleStats` (count, mean, M2, norm sum, non-finite and
clamped counts, in float64; partials merge exactly by Chan's rule) and their on-disk form,
one small Parquet file per committed shard (`commits/shard-<k>.stats.parquet`).
"""

from __future__ import annotations

import os

import numpy as np


def stats_table(stats: dict):
    """Partial statistics as a small table: one row per module (count, mean[d], m2[d],
    norm_sum in float64; nonfinite, clamped)."""
    import pyarrow as pa

    names = list(stats)
    return pa.table({
        "module": pa.array(names, pa.string()),
        "count": pa.array([stats[n].count for n in names], pa.int64()),
        "mean": pa.array([stats[n].mean for n in names], pa.list_(pa.float64())),
        "m2": pa.array([stats[n].m2 for n in names], pa.list_(pa.float64())),
        "norm_sum": pa.array([stats[n].norm_sum for n in names], pa.float64()),
        "nonfinite": pa.array([stats[n].nonfinite for n in names], pa.int64()),
        "clamped": pa.array([stats[n].clamped for n in names], pa.int64()),
    })


def read_stats(out: str, ref) -> dict:
    """A shard's partial statistics (`ref`, a `manifest.FileRef`): module -> `ModuleStats`."""
    import numpy as np
    import pyarrow.parquet as pq


    table = pq.read_table(os.path.join(out, ref.path)).to_pydict()
    found = {}
    for i, name in enumerate(table["module"]):
        found[name] = ModuleStats.of(table["count"][i], np.asarray(table["mean"][i], np.float64),
                                     np.asarray(table["m2"][i], np.float64),
                                     table["norm_sum"][i], table["nonfinite"][i],
                                     table["clamped"][i])
    return found


def merged_stats(out: str, shards, modules) -> dict:
    """module -> `ModuleStats` over `shards`, merged in index order (Chan et al.)."""
    return merge_partials((read_stats(out, shard.stats) for shard in shards), modules)


def merge_partials(partials, modules) -> dict:
    """Shards' partial statistics (each module -> `ModuleStats`), merged in order."""

    total = {name: ModuleStats(info.d) for name, info in modules.items()}
    for partial in partials:
        for name, stats in partial.items():
            total[name].merge(stats)
    return total


STATS_SLICE_ROWS = 1024  # rows centred at a time: a temporary of 1,024 x d float32


class ModuleStats:
    """Statistics of one module's stored vectors, in float64: `count` rows, `mean` and `m2`
    (sum of squared deviations from the mean) per dimension, `norm_sum` (sum of row L2
    norms), `nonfinite` (stored values that are NaN or infinite) and `clamped` (values
    clamped into float16's range before they were stored). Partial statistics
    (one per batch, one per shard) combine exactly with `merge`, so each shard keeps its
    own and a resume re-merges them in the same order as an uninterrupted run."""

    def __init__(self, d: int):
        self.count = 0
        self.mean = np.zeros(d)
        self.m2 = np.zeros(d)
        self.norm_sum = 0.0
        self.nonfinite = 0
        self.clamped = 0

    @classmethod
    def of(cls, count, mean, m2, norm_sum, nonfinite=0, clamped=0) -> ModuleStats:
        stats = cls(len(mean))
        stats.count, stats.mean, stats.m2 = int(count), mean, m2
        stats.norm_sum, stats.nonfinite, stats.clamped = float(norm_sum), int(nonfinite), int(clamped)
        return stats

    def update(self, vectors: np.ndarray, clamped: int = 0) -> None:
        """Add the rows of `vectors` [N, d] as stored (float32 or float16, after any clamp,
        of which there were `clamped`)."""
        v = vectors.astype(np.float32, copy=False)  # [N, d]
        n = len(v)
        if not n:
            return
        with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf: counted, not warned
            total = v.sum(0, dtype=np.float64)                               # [d]
            mean = total / n
            # M2 about the batch mean: rows minus the mean in float32 (exact where they are close,
            # so a large mean does not cancel the spread away), squares summed in float64, in
            # slices of rows so the temporary stays small
            shift = mean.astype(np.float32)
            m2 = np.zeros_like(mean)
            for start in range(0, n, STATS_SLICE_ROWS):
                centered = v[start:start + STATS_SLICE_ROWS] - shift            # [r, d]
                m2 += np.einsum("ij,ij->j", centered, centered, dtype=np.float64)
            m2 = np.maximum(m2 - n * (mean - shift) ** 2, 0.0)
            norms = np.sqrt(np.einsum("ij,ij->i", v, v, dtype=np.float64))    # [N]
            nonfinite = 0
            if not (np.isfinite(total).all() and np.isfinite(m2).all()):
                nonfinite = int(v.size - np.count_nonzero(np.isfinite(v)))  # rare: only then count
            self.merge(ModuleStats.of(n, mean, m2, norms.sum(), nonfinite, clamped))

    def merge(self, other: ModuleStats) -> None:
        """Combine with another partial (Chan, Golub and LeVeque's parallel update)."""
        self.clamped += other.clamped
        if not other.count:
            return
        n = self.count + other.count
        with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf are counted, not warned
            delta = other.mean - self.mean
            self.mean = self.mean + delta * (other.count / n)
            self.m2 = self.m2 + other.m2 + delta * delta * (self.count * other.count / n)
        self.count = n
        self.norm_sum += other.norm_sum
        self.nonfinite += other.nonfinite

    def summary(self):
        """-> `manifest.StatsSummary`: mean, population variance and mean norm."""
        from .manifest import StatsSummary

        n = max(self.count, 1)
        return StatsSummary(self.count, tuple(self.mean.tolist()), tuple((self.m2 / n).tolist()),
                            self.norm_sum / n, self.nonfinite, self.clamped)
