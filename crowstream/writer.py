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


class ModuleStats:
    """Running statistics of one module's vectors, in float64."""

    def __init__(self, d: int, recorded: dict | None = None):
        self.count = 0
        self.sum = np.zeros(d)
        self.sum_sq = np.zeros(d)
        self.norm_sum = 0.0
        if recorded and recorded.get("count"):
            self.count = int(recorded["count"])
            mean = np.asarray(recorded["mean"])
            self.sum = mean * self.count
            self.sum_sq = (np.asarray(recorded["var"]) + mean ** 2) * self.count
            self.norm_sum = float(recorded["mean_norm"]) * self.count

    def update(self, vectors: np.ndarray) -> None:
        v = vectors.astype(np.float32, copy=False)  # [N, d]
        self.count += len(v)
        self.sum += v.sum(0, dtype=np.float64)
        self.sum_sq += np.einsum("ij,ij->j", v, v, dtype=np.float64)
        self.norm_sum += float(np.sqrt(np.einsum("ij,ij->i", v, v, dtype=np.float64)).sum())

    def add(self, other: ModuleStats) -> None:
        self.count += other.count
        self.sum += other.sum
        self.sum_sq += other.sum_sq
        self.norm_sum += other.norm_sum

    def to_json(self) -> dict:
        n = max(self.count, 1)
        mean = self.sum / n
        return {"count": self.count, "mean": mean.tolist(),
                "var": np.maximum(self.sum_sq / n - mean ** 2, 0.0).tolist(),
                "mean_norm": self.norm_sum / n}
