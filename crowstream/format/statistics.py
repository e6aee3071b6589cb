"""Per-module statistics. It owns `ModuleStats` (count, mean, M2, norm sum, non-finite and
clamped counts, in float64; partials merge exactly by Chan's rule) and their on-disk form,
one small Parquet file per committed shard (`commits/shard-<k>.stats.parquet`).
"""

from __future__ import annotations

import os

import numpy as np


def stats_table(stats: dict):
    """Partial statistics as a small table: one row per module (count, mean[d], m2[d],
    norm_sum in float64; nonfinite, clamped), and the same over the rows at position 0 as
    p0_count, p0_mean, p0_m2, p0_norm_sum, p0_nonfinite (null where not kept)."""
    import pyarrow as pa

    names = list(stats)
    p0 = [stats[n].p0 for n in names]
    return pa.table({
        "module": pa.array(names, pa.string()),
        "count": pa.array([stats[n].count for n in names], pa.int64()),
        "mean": pa.array([stats[n].mean for n in names], pa.list_(pa.float64())),
        "m2": pa.array([stats[n].m2 for n in names], pa.list_(pa.float64())),
        "norm_sum": pa.array([stats[n].norm_sum for n in names], pa.float64()),
        "nonfinite": pa.array([stats[n].nonfinite for n in names], pa.int64()),
        "clamped": pa.array([stats[n].clamped for n in names], pa.int64()),
        "p0_count": pa.array([s and s.count for s in p0], pa.int64()),
        "p0_mean": pa.array([s and s.mean for s in p0], pa.list_(pa.float64())),
        "p0_m2": pa.array([s and s.m2 for s in p0], pa.list_(pa.float64())),
        "p0_norm_sum": pa.array([s and s.norm_sum for s in p0], pa.float64()),
        "p0_nonfinite": pa.array([s and s.nonfinite for s in p0], pa.int64()),
    })


def read_stats(out: str, ref) -> dict:
    """A shard's partial statistics (`ref`, a `manifest.FileRef`): module -> `ModuleStats`
    (its `p0` None where the file has no position-0 statistics, as before format 3)."""
    import pyarrow.parquet as pq

    table = pq.read_table(os.path.join(out, ref.path)).to_pydict()
    found = {}
    for i, name in enumerate(table["module"]):
        stats = ModuleStats.of(table["count"][i], np.asarray(table["mean"][i], np.float64),
                               np.asarray(table["m2"][i], np.float64), table["norm_sum"][i],
                               table["nonfinite"][i], table["clamped"][i])
        stats.p0 = None
        if table.get("p0_count", [None] * (i + 1))[i] is not None:
            stats.p0 = ModuleStats.of(table["p0_count"][i],
                                      np.asarray(table["p0_mean"][i], np.float64),
                                      np.asarray(table["p0_m2"][i], np.float64),
                                      table["p0_norm_sum"][i], table["p0_nonfinite"][i])
        found[name] = stats
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


# Rows taken at a time: one float32 buffer of 256 x d (1 MiB at d = 1,024), each slice's
# sums accumulated into float64. Measured at d = 1,024: 0.25 CPU-s per GB of float32 rows
# (0.35-0.42 with numpy's float64 sums; 1.0 with a fresh temporary per slice), agreeing
# with numpy's float64 to ~1e-7.
STATS_SLICE_ROWS = 256


class ModuleStats:
    """Statistics of one module's stored vectors, in float64: `count` rows, `mean` and `m2`
    (sum of squared deviations from the mean) per dimension, `norm_sum` (sum of row L2
    norms), `nonfinite` (stored values that are NaN or infinite) and `clamped` (values
    clamped into float16's range before they were stored); `p0`, the same over the rows at
    position 0 only (attention sinks, so statistics of positions >= 1 follow exactly), or
    None where it was not kept (outputs before format 3). Partial statistics
    (one per batch, one per shard) combine exactly with `merge`, so each shard keeps its
    own and a resume re-merges them in the same order as an uninterrupted run."""

    def __init__(self, d: int, position0: bool = True):
        self.count = 0
        self.mean = np.zeros(d)
        self.m2 = np.zeros(d)
        self.norm_sum = 0.0
        self.nonfinite = 0
        self.clamped = 0
        self.p0: ModuleStats | None = ModuleStats(d, False) if position0 else None

    @classmethod
    def of(cls, count, mean, m2, norm_sum, nonfinite=0, clamped=0) -> ModuleStats:
        stats = cls(len(mean), False)
        stats.count, stats.mean, stats.m2 = int(count), mean, m2
        stats.norm_sum, stats.nonfinite, stats.clamped = float(norm_sum), int(nonfinite), int(clamped)
        return stats

    def update(self, vectors: np.ndarray, clamped: int = 0, positions=None) -> None:
        """Add the rows of `vectors` [N, d] as stored (float32 or float16, after any clamp,
        of which there were `clamped`); `positions` [N] (optional) picks out the rows at
        position 0 for `p0`. The rows at position 0 and the others are summed apart and
        merged exactly, so sinks far from the rest cost no precision in either."""
        first = None
        if positions is not None and self.p0 is not None:
            first = np.asarray(positions) == 0  # [N]
            first = first if first.any() else None
        d = vectors.shape[1]
        partials = [_partial(vectors, first, d)]
        if first is not None:
            partials.append(_partial(vectors[first], None, d))  # a copy of few rows
            self.p0.merge(partials[-1])
        for partial in partials:
            self.merge(partial)
        self.clamped += clamped

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
        if self.p0 is not None and other.p0 is None:
            self.p0 = None  # a partial without position-0 statistics: none for the total
        elif self.p0 is not None:
            self.p0.merge(other.p0)

    def after_position0(self) -> ModuleStats:
        """The statistics of the rows at position >= 1: the position-0 rows taken back out
        of the totals (Chan's rule run backwards). Needs `p0`."""
        if self.p0 is None:
            raise ValueError("these statistics do not keep position 0 apart")
        first, n = self.p0, self.count
        rest = ModuleStats(len(self.mean), False)
        rest.count = n - first.count
        if rest.count:
            with np.errstate(invalid="ignore", over="ignore"):
                rest.mean = (self.mean * n - first.mean * first.count) / rest.count
                delta = first.mean - rest.mean
                rest.m2 = np.maximum(
                    self.m2 - first.m2 - delta * delta * (first.count * rest.count / n), 0.0)
        rest.norm_sum = self.norm_sum - first.norm_sum
        rest.nonfinite = self.nonfinite - first.nonfinite
        rest.clamped = self.clamped
        return rest

    def summary(self):
        """-> `manifest.StatsSummary`: mean, population variance and mean norm."""
        from .manifest import StatsSummary

        n = max(self.count, 1)
        position0 = self.p0.summary() if self.p0 is not None else None
        return StatsSummary(self.count, tuple(self.mean.tolist()), tuple((self.m2 / n).tolist()),
                            self.norm_sum / n, self.nonfinite, self.clamped, position0)


def _partial(vectors: np.ndarray, skip, d: int) -> ModuleStats:
    """The statistics of `vectors`' rows, less those where `skip` [N] (optional) is True."""
    n = len(vectors) - (0 if skip is None else int(skip.sum()))
    partial = ModuleStats(d, False)
    if n:
        partial = ModuleStats.of(n, *_moments(vectors, skip, n))
    partial.p0 = ModuleStats(d, False)  # position 0 is merged by the caller
    return partial


def _moments(vectors: np.ndarray, skip, n: int):
    """[N, d] float32/float16 less the rows where `skip` [N] is True (n > 0 left) ->
    (mean [d], m2 [d], norm_sum, nonfinite), in float64. Slices of STATS_SLICE_ROWS rows
    go through one reused float32 buffer: row norms in float32 (over d values), then the
    rows centred on the mean of the first kept rows (exact where values are close, so a
    large mean does not cancel the spread away), whose sums and sums of squares are
    summed per slice in float32 (cascaded, `_column_sums`) and accumulated in float64.
    Skipped rows are zeroed in the buffer; no full-array copy."""
    import torch

    d = vectors.shape[1]
    head = vectors[:STATS_SLICE_ROWS] if skip is None else \
        vectors[np.flatnonzero(~skip)[:STATS_SLICE_ROWS]]
    shift = head.astype(np.float32).mean(0).astype(np.float32)  # [d]
    shift_t = torch.from_numpy(shift)
    total, m2, norm_sum = np.zeros(d), np.zeros(d), 0.0
    buffer = np.empty((min(STATS_SLICE_ROWS, len(vectors)), d), np.float32)
    with np.errstate(invalid="ignore", over="ignore"):  # NaN/inf: counted, not warned
        for start in range(0, len(vectors), STATS_SLICE_ROWS):
            x = vectors[start:start + STATS_SLICE_ROWS]
            work = buffer[:len(x)]
            if x.dtype != np.float32 or not x.flags.writeable:  # torch warns on read-only
                _to_float32(x, work)
                x = work
            # torch's norm and subtract: 0.086 against 0.140 CPU-s/GB for einsum and
            # np.subtract at d = 1,024 (benchmarks/cpu_paths.py)
            rows, centred = torch.from_numpy(x), torch.from_numpy(work)
            norms = torch.linalg.vector_norm(rows, dim=1).numpy()
            torch.sub(rows, shift_t, out=centred)  # in place for fp16
            if skip is not None:
                drop = skip[start:start + STATS_SLICE_ROWS]
                norms[drop] = 0
                work[drop] = 0
            norm_sum += float(norms.sum(dtype=np.float64))
            total += _column_sums(work)
            np.multiply(work, work, out=work)
            m2 += _column_sums(work)
        offset = total / n                                          # mean - shift
        mean = shift + offset
        m2 = np.maximum(m2 - n * offset * offset, 0.0)
    nonfinite = 0
    if not (np.isfinite(total).all() and np.isfinite(m2).all()):
        kept = vectors if skip is None else vectors[~skip]  # rare: only then count
        nonfinite = int(kept.size - np.count_nonzero(np.isfinite(kept)))
    return mean, m2, norm_sum, nonfinite


def _column_sums(work: np.ndarray) -> np.ndarray:
    """[n, d] float32 -> [d] sums over the rows, in float32 (accumulated into float64 by
    the caller). torch sums a column in cascaded (pairwise) order, so the error grows with
    log n, not n as numpy's row-by-row float32 sum along axis 0 does: ~1e-7 relative on
    256 rows, at 0.25 CPU-s per GB against 0.35-0.42 for numpy's float64 sums."""
    import torch

    return torch.from_numpy(work).sum(0).numpy()


def _to_float32(x: np.ndarray, out: np.ndarray) -> None:
    """Rows `x` (float16, or read-only float32) into `out` as float32. torch's conversion
    is vectorised (F16C): 0.05 CPU-s per GB of float16 here, against numpy's 1.2-1.3,
    which made statistics the largest cost of a float16 capture after encoding. Read-only
    rows (Arrow's) go through numpy: torch.from_numpy warns on them."""
    if not x.flags.writeable:
        np.copyto(out, x)
        return
    import torch

    torch.from_numpy(out).copy_(torch.from_numpy(np.ascontiguousarray(x)))
