"""Stage 5, write. It owns the part files: `PartWriter` writes one Parquet file under
`OUT/.tmp/` with the format's settings, in row groups of at most ROW_GROUP_BYTES whatever
the batch size, hashing the bytes as they are written (no re-read after the fsync);
`ShardParts` cuts one module's rows of one shard into part files by row ranges (file k
holds rows [k * file_rows, (k + 1) * file_rows) of the shard) and hands each file's work
to its own lane of the shared `threads.EncoderPool`, so the files of a shard encode in
parallel on every core while their bytes depend only on the rows, never on the thread
count or the batch boundaries.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from crowstream.errors import OutputError
from crowstream.format.files import HashingFile, fsync_and_hash
from crowstream.format.layout import PART_TARGET_BYTES
from crowstream.pipeline.flatten import to_record_batch
from crowstream.pipeline.ranks import local_world_size
from crowstream.pipeline.threads import usable_cpus
from crowstream.schemas import ROW_GROUP_BYTES, parquet_options, table_options

# Memory one row-group encode holds beyond its input: the byte-stream-split copy, the
# compressed pages and the allocator's slack. Measured: 16 writers encoding 16 MiB groups
# at once peaked ~780 MiB above their input, 2 at once ~255 MiB (same speed on 2 cores).
ENCODER_BYTES = 3 * ROW_GROUP_BYTES
# Row groups per part file. Files of a shard are the unit of parallel encoding (a file's
# row groups are written in order), so they are smaller than PART_TARGET_BYTES: 4 groups
# (~64 MiB) give 8 encoders work side by side from a 512 MiB run of rows, and still make
# reads of whole files cheap against opening them.
PART_GROUPS = 4
# Part files' worth of rows, per encoder and module, that the forward may run ahead of the
# encoders (`lead_bytes`). One keeps every encoder fed: its file's row groups queue up
# behind the one encoding (and `lead_bytes` never goes under two batches). A longer lead
# only grows memory, and fresh host buffers are not free: page faults and zeroing on the
# CPU, a page-locked allocation behind a GPU. Ceiling captures at d = 1,024 (300k tokens,
# 3 alternating rounds of one process per version, 2 captures each): a 64 MiB lead used
# 0.91x the CPU of a 128 MiB one at float32, 1.03x (noise) at float16; 128 MiB had used
# 1.76x a plain writer's CPU against 2.04x with the whole 2 GiB budget as its lead.
LEAD_FILES = 1

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


def encoder_slots(budget_bytes: int, threads: int | None = None) -> int:
    """Row groups encoded at once: `threads` (default: one per usable CPU, shared among the
    ranks torchrun started on this node), but encoders take at most a quarter of the
    in-flight budget (ENCODER_BYTES each); at least one."""
    fits = budget_bytes // (4 * ENCODER_BYTES)
    return max(1, min(threads or max(1, usable_cpus() // local_world_size()), fits))


def lead_bytes(slots: int, modules: int, batch_bytes: int = 0) -> int:
    """Bytes of kept rows the forward may hold ahead of `slots` encoders writing `modules`
    modules: LEAD_FILES part files per encoder and module, and never less than two
    batches of `batch_bytes` (else the next forward would wait for the last batch's
    every row to be encoded). The in-flight budget still bounds it."""
    return max(LEAD_FILES * slots * modules * PART_GROUPS * ROW_GROUP_BYTES, 2 * batch_bytes)


@functools.cache
def encoder_memory_pool() -> pa.MemoryPool:
    """The memory pool part files encode in: pyarrow's jemalloc pool where this pyarrow has
    one, else its default. The default (mimalloc) hands a freed encode buffer back to the
    system after 10 ms and copies the growing page buffers on every realloc; an encoder
    thread that waits between row groups then faults the next group's buffers in again.
    jemalloc (pyarrow's own settings: freed pages kept ~1 s) cost 8-14% less CPU per GB
    of a ceiling capture (medians of 3 alternating rounds, d = 1,024 float32 and d = 4,096
    float16). The command line keeps its freed pages for good (`process.keep_encoder_memory`).
    The bytes written are the same whatever the pool."""
    try:
        return pa.jemalloc_memory_pool()
    except NotImplementedError:  # a pyarrow built without jemalloc
        return pa.default_memory_pool()


def min_inflight_bytes(modules: int) -> int:
    """The smallest in-flight budget the writers can honour: one encoder's working memory
    (statistics temporaries, 3 x 256 x d x 4 bytes, fit inside it) and up to two
    row-group buffers per module (the last file of a shard may still be closing while the
    next shard's first file fills)."""
    return ENCODER_BYTES + modules * 2 * ROW_GROUP_BYTES


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
    group (`buffered_bytes`). The file exists from construction on. Not thread-safe: one
    `Lane` calls it.
    """

    def __init__(self, tmp_path: str, schema: pa.Schema, seq: int = 0,
                 compression: str | None = None):
        self.tmp_path = tmp_path
        self.schema = schema
        self.seq = seq
        self.group_rows = group_rows(schema)
        self.row_bytes = row_bytes(schema)
        self.rows = 0
        self._buffer: RowGroupBuffer | None = None  # the open row group's rows, if any
        vector = schema.field("vector").type
        self.d = vector.list_size
        self.dtype = "float16" if vector.value_type == pa.float16() else "float32"
        self._sink = HashingFile(tmp_path)
        self._writer = pq.ParquetWriter(self._sink, schema, memory_pool=encoder_memory_pool(),
                                        **parquet_options(self.dtype, compression))

    @property
    def buffered_bytes(self) -> int:
        """Raw bytes held in the writer's own buffer (less than one row group)."""
        return self._buffered_rows * self.row_bytes

    @property
    def _buffered_rows(self) -> int:
        return self._buffer.rows if self._buffer is not None else 0

    @property
    def closed(self) -> bool:
        return self._sink.closed

    def write(self, batch: pa.RecordBatch) -> None:
        n, offset = batch.num_rows, 0
        if self._buffered_rows:  # top up the open row group first
            offset = min(n, self.group_rows - self._buffered_rows)
            self._keep(batch.slice(0, offset))
            if self._buffered_rows == self.group_rows:
                self._flush()
        while n - offset >= self.group_rows:
            self._writer.write_batch(batch.slice(offset, self.group_rows),
                                     row_group_size=self.group_rows)
            offset += self.group_rows
        if offset < n:
            self._keep(batch.slice(offset))
        self.rows += n

    def _keep(self, batch: pa.RecordBatch) -> None:
        """Buffer a copy: a slice would keep the caller's whole batch alive."""
        if self._buffer is None:
            self._buffer = RowGroupBuffer(self.d, self.dtype, self.group_rows,
                                          encoder_memory_pool())
        self._buffer.append(batch)

    def _flush(self) -> None:
        if self._buffer is not None:  # one write call per row group: each call closes one
            self._writer.write_batch(self._buffer.batch(), row_group_size=self._buffer.rows)
        self._buffer = None

    def close(self) -> PartInfo:
        try:
            self._flush()
            self._writer.close()
            self._sink.close()  # fsync; the hash is already complete
        except BaseException:
            self._release()  # no open file left behind; the caller reports the error
            raise
        return PartInfo(self.tmp_path, self.rows, self._sink.size,
                        self._sink.sha256.hexdigest(), self.seq)

    def _release(self) -> None:
        """Close the file without finishing it. The writer is marked closed first: if its
        own close failed, `ParquetWriter.__del__` would retry it on the closed file later,
        inside whatever code the garbage collector happens to interrupt."""
        self._writer.is_open = False
        self._sink.discard()

    def abort(self) -> None:
        """Drop the unfinished file. Called while another error is being reported."""
        self._buffer = None
        if not self._sink.closed:
            try:
                self._writer.close()
            except OSError as error:  # a disk that failed the write usually fails the close too
                log.debug("closing aborted %s: %s", self.tmp_path, error)
        self._release()
        if os.path.exists(self.tmp_path):
            os.remove(self.tmp_path)


class RowGroupBuffer:
    """The rows of one row group, copied in as they arrive: one contiguous buffer per column
    (in `pool`'s memory), filled by one memcpy per column and piece. A row group is then
    always written from one chunk, whether it came whole from a batch or from here.
    Parquet cuts pages at the ends of mini-batches counted from the start of each chunk, so
    a group written from several chunks (one per batch piece) had bytes that depended on
    where the batches ended (seen at d = 768 and 100)."""

    def __init__(self, d: int, dtype: str, capacity: int, pool: pa.MemoryPool):
        self.rows, self.dtype = 0, dtype
        self._columns = [_pooled((capacity,), np.int64, pool), _pooled((capacity,), np.int32, pool),
                         _pooled((capacity,), np.int32, pool),
                         _pooled((capacity, d), np.dtype(dtype), pool)]

    def append(self, batch: pa.RecordBatch) -> None:
        """Copy in a piece of rows (doc_id, position, token, vector, as `flatten` makes them)."""
        n = batch.num_rows
        for column, view in zip(batch.columns, self._columns):
            if pa.types.is_fixed_size_list(column.type):
                column = column.flatten()  # the slice's values
            values = column.to_numpy(zero_copy_only=True)  # part rows have no nulls
            view[self.rows:self.rows + n] = values.reshape((n, *view.shape[1:]))
        self.rows += n

    def batch(self) -> pa.RecordBatch:
        """The rows so far as one RecordBatch over the buffers (no copy)."""
        return to_record_batch(*(column[:self.rows] for column in self._columns), self.dtype)


def _pooled(shape: tuple, dtype, pool: pa.MemoryPool) -> np.ndarray:
    """An uninitialised array in `pool`'s memory."""
    buffer = pa.allocate_buffer(int(np.prod(shape)) * np.dtype(dtype).itemsize, memory_pool=pool)
    return np.frombuffer(buffer, dtype).reshape(shape)


class ShardParts:
    """One module's rows of one shard, in part files of `file_rows` rows each (the last
    may be shorter): PART_GROUPS whole row groups (at most about PART_TARGET_BYTES raw).
    Where a file ends depends only on the row count, never on batch boundaries, so a
    resumed run (or one that backed off on OOM) cuts the same files. `path_of(seq)` names
    file `seq` in `.tmp/`. A shard that stored no rows still gets one (empty) file.

    `write` is called from one thread (the module's dispatcher) and returns at once: each
    file's writes and its close run in order on the file's own lane of `pool` (an
    `EncoderPool`), different files in parallel. `settle(0, change)` is called from the
    lanes as a file's row-group buffer grows or shrinks (`ByteBudget.settle`).
    """

    def __init__(self, path_of, schema: pa.Schema, pool, settle=None,
                 target_bytes: int | None = None, compression: str | None = None):
        rows_per_group = group_rows(schema)
        target = PART_TARGET_BYTES if target_bytes is None else target_bytes
        groups = max(1, min(PART_GROUPS, target // (rows_per_group * row_bytes(schema))))
        self.file_rows = rows_per_group * groups
        self.schema = schema
        self.closing: list = []  # Futures of PartInfo, in seq order
        self._pool = pool
        self._settle = settle or (lambda written, change: None)
        self._path_of = path_of
        self._compression = compression
        self._open = None  # (PartWriter, Lane, rows submitted to it)
        self._made: list[PartWriter] = []

    def write(self, batch: pa.RecordBatch) -> list:
        """Queue `batch`'s rows; -> the Futures of its pieces (done once encoded)."""
        futures, offset = [], 0
        while offset < batch.num_rows:
            part, lane, rows = self._current()
            take = min(batch.num_rows - offset, self.file_rows - rows)
            futures.append(lane.submit(self._write, part, batch.slice(offset, take)))
            offset += take
            self._open = (part, lane, rows + take)
            if rows + take == self.file_rows:  # full: the next row starts the next file
                self._close_open()
        return futures

    def _write(self, part: PartWriter, piece: pa.RecordBatch) -> None:
        before = part.buffered_bytes
        part.write(piece)
        self._settle(0, part.buffered_bytes - before)

    def _finish(self, part: PartWriter) -> PartInfo:
        self._settle(0, -part.buffered_bytes)
        return part.close()

    def _current(self):
        if self._open is None:
            part = PartWriter(self._path_of(len(self.closing)), self.schema, len(self.closing),
                              self._compression)
            self._made.append(part)
            self._open = (part, self._pool.lane(), 0)
        return self._open

    def _close_open(self) -> None:
        part, lane, _ = self._open
        self.closing.append(lane.submit(self._finish, part))
        self._open = None

    @property
    def paths(self) -> list:
        """Every file this shard's parts have created in `.tmp/`."""
        return [part.tmp_path for part in self._made]

    def close(self) -> list:
        """Close the open file (or write the shard's one empty file); -> every file's
        Future of its `PartInfo`, in seq order."""
        if self._open is not None or not self.closing:
            self._current()
            self._close_open()
        return self.closing

    def abort(self, unfinished_only: bool = False) -> None:
        """Delete every file of this shard, finished ones included (or only those never
        closed). Call once the pool has stopped (no lane still writes)."""
        for part in self._made:
            if not (unfinished_only and part.closed):
                part.abort()
        self._made, self.closing, self._open = [], [], None


def write_table(path: str, table: pa.Table) -> PartInfo:
    """Write a small table (docs, vocab) as one Parquet file; fsync; hash (a re-read of a
    small file: pyarrow's own writer then owns the file, also when a write fails)."""
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


