"""Stage 5, write. It owns the part files: `PartWriter` buffers RecordBatches into ~16 MiB
row groups and writes one Parquet file under `OUT/.tmp/` with the format's settings;
`ModuleStats` keeps the running count/mean/variance/mean-norm that SAE trainers
normalise with. The pipeline runs one writer per module on its own background thread
(pyarrow releases the GIL while encoding), so the forward loop never waits on IO.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from crowstream.schemas import ROW_GROUP_BYTES, parquet_options, table_options

from .errors import OutputError

log = logging.getLogger("crowstream")


@dataclasses.dataclass
class PartInfo:
    """A finished (closed, fsynced) part file still in `.tmp/`."""

    tmp_path: str
    rows: int
    bytes: int
    sha256: str


class PartWriter:
    """Writes one part file; the file exists only once the first row group is written."""

    def __init__(self, tmp_path: str, schema: pa.Schema):
        self.tmp_path = tmp_path
        self.schema = schema
        self._buffer: list[pa.RecordBatch] = []
        self._buffered_bytes = 0
        self._rows = 0
        dtype = "float16" if schema.field("vector").type.value_type == pa.float16() else "float32"
        self._writer = pq.ParquetWriter(tmp_path, schema, **parquet_options(dtype))

    def write(self, batch: pa.RecordBatch) -> None:
        self._buffer.append(batch)
        self._buffered_bytes += batch.nbytes
        self._rows += batch.num_rows
        if self._buffered_bytes >= ROW_GROUP_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self._buffer:  # one write call per row group: each call closes a row group
            table = pa.Table.from_batches(self._buffer, schema=self.schema)
            self._writer.write_table(table, row_group_size=table.num_rows)
        self._buffer, self._buffered_bytes = [], 0

    def close(self) -> PartInfo:
        self._flush()
        self._writer.close()
        return PartInfo(self.tmp_path, self._rows, os.path.getsize(self.tmp_path),
                        fsync_and_hash(self.tmp_path))

    def abort(self) -> None:
        """Drop the unfinished file. Called while another error is being reported."""
        try:
            self._writer.close()
        except OSError as error:  # a disk that failed the write usually fails the close too
            log.debug("closing aborted %s: %s", self.tmp_path, error)
            self._writer.is_open = False  # or its __del__ retries the close and fails again
        if os.path.exists(self.tmp_path):
            os.remove(self.tmp_path)


def write_table(path: str, table: pa.Table) -> PartInfo:
    """Write a small table (docs, vocab) as one Parquet file; fsync; hash."""
    pq.write_table(table, path, **table_options())
    return PartInfo(path, table.num_rows, os.path.getsize(path), fsync_and_hash(path))


def fsync_and_hash(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
        while chunk := f.read(8 << 20):
            digest.update(chunk)  # hashlib releases the GIL on large chunks
    return digest.hexdigest()


def describe_os_error(error: OSError, out: str, bytes_written: int) -> OutputError:
    """An OutputError naming OUT and what was written, for ENOSPC and friends."""
    import errno

    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputError(f"disk full while writing to {out!r} ({bytes_written:,} bytes written "
                           "so far by this run). Committed shards are intact: free space, "
                           "then rerun the same command with --resume.")
    return OutputError(f"cannot write to {out!r}: {error}. Committed shards are intact; fix the "
                       "problem, then rerun the same command with --resume.")


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
