"""Stage 5, write. It owns the part files: `PartWriter` writes one Parquet file under
`OUT/.tmp/` with the format's settings, in row groups of at most ROW_GROUP_BYTES whatever
the batch size; `ShardParts` rolls one module's rows of one shard over several such files
of about PART_TARGET_BYTES each; `ModuleStats` keeps the running count, mean, variance
and mean norm that SAE trainers normalise with. The pipeline runs one writer per module on
its own background thread (pyarrow releases the GIL while encoding), so the forward loop
never waits on IO.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os

import pyarrow as pa
import pyarrow.parquet as pq

from crowstream.schemas import ROW_GROUP_BYTES, parquet_options, table_options

from crowstream.format.layout import PART_TARGET_BYTES

# Memory one row-group encode holds beyond its input: the byte-stream-split copy, the
# compressed pages and the allocator's slack. Measured: 16 writers encoding 16 MiB groups
# at once peaked ~780 MiB above their input, 2 at once ~255 MiB (same speed on 2 cores).
ENCODER_BYTES = 3 * ROW_GROUP_BYTES
from crowstream.errors import OutputError
from crowstream.format.files import fsync_and_hash

log = logging.getLogger("crowstream")


@dataclasses.dataclass
class PartInfo:
    """A finished (closed, fsynced) part file still in `.tmp/`; `seq` numbers the files
    of one module within one shard."""

    tmp_path: str
    rows: int
    bytes: int
    sha256: str
    seq: int = 0


def encoder_slots(budget_bytes: int) -> int:
    """Row groups encoded at once: one per core, but encoders take at most a quarter of
    the in-flight budget (ENCODER_BYTES each); at least one."""
    fits = budget_bytes // (4 * ENCODER_BYTES)
    return max(1, min(os.cpu_count() or 1, fits))


def row_bytes(schema: pa.Schema) -> int:
    """Raw bytes of one row: the fixed-width columns plus the d elements of `vector`."""
    total = 0
    for field in schema:
        kind = field.type
        if pa.types.is_fixed_size_list(kind):
            total += kind.list_size * kind.value_type.bit_width // 8
        else:
            total += kind.bit_width // 8
    return total


def group_rows(schema: pa.Schema) -> int:
    """Rows per row group: as many as fit in ROW_GROUP_BYTES, less 1/64 and 4 KiB of
    headroom for the levels, page headers and statistics Parquet adds (~0.2% measured
    at 16 MiB; ~1 KiB per group)."""
    headroom = ROW_GROUP_BYTES // 64 + 4096
    return max(1, (ROW_GROUP_BYTES - headroom) // row_bytes(schema))


class PartWriter:
    """Writes one part file as row groups of `group_rows(schema)` rows (the last may be
    shorter), so a row group stays under ROW_GROUP_BYTES whatever the batch size.

    It never holds on to a batch once `write` returns: full row groups go from the batch
    straight to the encoder (zero-copy slices, one write call per row group, since each
    call closes a row group), and a remainder is copied into the writer's own buffer. So
    a caller may reuse its host buffers at once, and the writer holds at most one row
    group (`buffered_bytes`). The file exists from construction on.
    """

    def __init__(self, tmp_path: str, schema: pa.Schema, seq: int = 0, encoders=None):
        self.tmp_path = tmp_path
        self.schema = schema
        self.seq = seq
        # a semaphore shared by all writers: concurrent row-group encodes cost memory
        self._encoders = encoders if encoders is not None else contextlib.nullcontext()
        self.group_rows = group_rows(schema)
        self.row_bytes = row_bytes(schema)
        self.rows = 0
        self._buffer: list[pa.RecordBatch] = []
        self._buffered_rows = 0
        dtype = "float16" if schema.field("vector").type.value_type == pa.float16() else "float32"
        self._writer = pq.ParquetWriter(tmp_path, schema, **parquet_options(dtype))

    @property
    def buffered_bytes(self) -> int:
        """Raw bytes held in the writer's own buffer (less than one row group)."""
        return self._buffered_rows * self.row_bytes

    def write(self, batch: pa.RecordBatch) -> None:
        n, offset = batch.num_rows, 0
        if self._buffered_rows:  # top up the open row group first
            offset = min(n, self.group_rows - self._buffered_rows)
            self._keep(batch.slice(0, offset))
            if self._buffered_rows == self.group_rows:
                self._flush()
        while n - offset >= self.group_rows:
            with self._encoders:
                self._writer.write_batch(batch.slice(offset, self.group_rows),
                                         row_group_size=self.group_rows)
            offset += self.group_rows
        if offset < n:
            self._keep(batch.slice(offset))
        self.rows += n

    def _keep(self, batch: pa.RecordBatch) -> None:
        """Buffer a copy: a slice would keep the caller's whole batch alive."""
        copied = [pa.concat_arrays([column]) for column in batch.columns]
        self._buffer.append(pa.RecordBatch.from_arrays(copied, schema=self.schema))
        self._buffered_rows += batch.num_rows

    def _flush(self) -> None:
        if self._buffer:  # one write call per row group: each call closes a row group
            table = pa.Table.from_batches(self._buffer, schema=self.schema)
            with self._encoders:
                self._writer.write_table(table, row_group_size=table.num_rows)
        self._buffer, self._buffered_rows = [], 0

    def close(self) -> PartInfo:
        self._flush()
        self._writer.close()
        return PartInfo(self.tmp_path, self.rows, os.path.getsize(self.tmp_path),
                        fsync_and_hash(self.tmp_path), self.seq)

    def abort(self) -> None:
        """Drop the unfinished file. Called while another error is being reported."""
        self._buffer, self._buffered_rows = [], 0
        try:
            self._writer.close()
        except OSError as error:  # a disk that failed the write usually fails the close too
            log.debug("closing aborted %s: %s", self.tmp_path, error)
            self._writer.is_open = False  # or its __del__ retries the close and fails again
        if os.path.exists(self.tmp_path):
            os.remove(self.tmp_path)


class ShardParts:
    """One module's rows of one shard, in part files of `file_rows` rows each (the last
    may be shorter): whole row groups adding up to about PART_TARGET_BYTES raw. Where a
    file ends depends only on the row count, never on batch boundaries, so a resumed run
    (or one that backed off on OOM) cuts the same files. `path_of(seq)` names file `seq`
    in `.tmp/`. A shard that stored no rows still gets one (empty) file.
    """

    def __init__(self, path_of, schema: pa.Schema, target_bytes: int | None = None,
                 encoders=None):
        rows_per_group = group_rows(schema)
        target = PART_TARGET_BYTES if target_bytes is None else target_bytes
        groups = max(1, target // (rows_per_group * row_bytes(schema)))
        self.file_rows = rows_per_group * groups
        self.schema = schema
        self.finished: list[PartInfo] = []
        self._encoders = encoders
        self._path_of = path_of
        self._open: PartWriter | None = None

    @property
    def buffered_bytes(self) -> int:
        return self._open.buffered_bytes if self._open is not None else 0

    def write(self, batch: pa.RecordBatch) -> None:
        offset = 0
        while offset < batch.num_rows:
            part = self._current()
            take = min(batch.num_rows - offset, self.file_rows - part.rows)
            part.write(batch.slice(offset, take))
            offset += take
            if part.rows == self.file_rows:  # full: the next row starts the next file
                self.finished.append(part.close())
                self._open = None

    def _current(self) -> PartWriter:
        if self._open is None:
            seq = len(self.finished)
            self._open = PartWriter(self._path_of(seq), self.schema, seq, self._encoders)
        return self._open

    def close(self) -> list[PartInfo]:
        """Close the open file (or write the shard's one empty file); -> every file."""
        if self._open is not None or not self.finished:
            self.finished.append(self._current().close())
            self._open = None
        return self.finished

    def abort(self) -> None:
        """Delete every file of this shard, finished ones included."""
        if self._open is not None:
            self._open.abort()
            self._open = None
        for info in self.finished:
            if os.path.exists(info.tmp_path):
                os.remove(info.tmp_path)
        self.finished = []


def write_table(path: str, table: pa.Table) -> PartInfo:
    """Write a small table (docs, vocab) as one Parquet file; fsync; hash."""
    pq.write_table(table, path, **table_options())
    return PartInfo(path, table.num_rows, os.path.getsize(path), fsync_and_hash(path))






def describe_os_error(error: OSError, out: str, bytes_written: int) -> OutputError:
    """An OutputError naming OUT and what was written, for ENOSPC and friends."""
    import errno

    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputError(f"disk full while writing to {out!r} ({bytes_written:,} bytes written "
                           "so far by this run). Committed shards are intact: free space, "
                           "then rerun the same command with --resume.")
    return OutputError(f"cannot write to {out!r}: {error}. Committed shards are intact; fix the "
                       "problem, then rerun the same command with --resume.")




