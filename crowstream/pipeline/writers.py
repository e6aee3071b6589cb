"""The writers. It owns `Writers`: one background thread per module that turns captured
rows into part files in `.tmp/` (and their statistics), and a committer thread that
commits shards in order through `commit.commit_shard`. One `ByteBudget` bounds every
byte between the forward and the disk.
"""

from __future__ import annotations

import logging
import os
import threading

from crowstream.format.layout import (DOCS_DIR, FORMAT_VERSION, model_id, module_dir, part_name,
                                      record_path, staging_path)
from crowstream.format.manifest import Part, ShardRecord
from crowstream.format.statistics import ModuleStats, merged_stats
from crowstream.schemas import part_schema

from .commit import commit_shard
from .options import CaptureConfig
from .parts import ENCODER_BYTES, ShardParts, encoder_slots, row_bytes, write_table
from .tables import docs_table
from .threads import ByteBudget, Worker

log = logging.getLogger("crowstream")


class Writers:
    """One background writer per module plus a committer thread that commits shards in
    order. Part files are written in `.tmp/` and only appear in `data/` at commit. One
    `ByteBudget` bounds every byte between the forward and the disk: a batch's kept rows
    on the host, the writers' queues and their row-group buffers."""

    def __init__(self, output, config: CaptureConfig, dims: dict, committed):
        self.output, self.config, self.dims, self.run_id = output, config, dims, committed.run_id
        self.out, self.rank = output.path, output.rank
        self.workers = {name: Worker(f"crowstream-writer[{name}]") for name in dims}
        self.committer = Worker("crowstream-committer", 2)
        limit = config.max_inflight_bytes  # resolved by capture()
        slots = encoder_slots(limit)  # concurrent encodes come out of the same budget
        self.encoders = threading.BoundedSemaphore(slots)
        self.budget = ByteBudget(max(1, limit - slots * ENCODER_BYTES))
        self.schemas = {name: part_schema(name, d, config.dtype, model_id(config.model),
                                          FORMAT_VERSION) for name, d in dims.items()}
        self.row_cost = {name: row_bytes(s) for name, s in self.schemas.items()}  # as stored
        self.parts: dict = {}            # module -> ShardParts of the open shard (writer threads)
        self.shard_stats: dict = {}      # module -> ModuleStats of the open shard
        self.staged: dict = {}           # shard -> its files closed in .tmp/, until committed
        self._staged_lock = threading.Lock()
        # committed so far (committer thread only): records, and their statistics merged
        # in shard order, so a resumed run's totals equal an uninterrupted run's exactly
        self.shards = list(committed.shards)
        self.stats = merged_stats(self.out, self.shards, committed.modules)
        self.bytes_written = 0  # by this run (a resume starts again from zero)

    def admit(self, batch) -> None:
        """Wait until `batch`'s kept rows fit in the in-flight budget, then count them.
        A background failure is raised at once, before another forward is spent."""
        self.check()
        rows = len(batch.keep_index)
        self.budget.acquire(rows * sum(self.row_cost.values()), check=self.check)

    def check(self) -> None:
        for worker in (*self.workers.values(), self.committer):
            worker.check()

    def write(self, batch, captured) -> None:
        rows = len(batch.keep_index)
        for name, worker in self.workers.items():
            worker.submit(self._write_rows, name, batch.shard, batch, captured,
                          rows * self.row_cost[name])
        self.committer.check()

    def _write_rows(self, name, shard, batch, captured, charge) -> None:
        import torch

        from .flatten import to_record_batch
        from .tracing import check_float16

        parts = self._part(name, shard)
        buffered = parts.buffered_bytes
        try:
            captured.wait()
            check_float16(name, captured.peaks.get(name))
            vectors = captured.rows(name, getattr(torch, self.config.dtype))  # [N, d]
            parts.write(to_record_batch(batch.doc_ids, batch.positions, batch.tokens, vectors,
                                        self.config.dtype))
            stats = self.shard_stats.setdefault(name, ModuleStats(self.dims[name]))
            stats.update(vectors, captured.clamped_count(name))
        finally:  # written (or failed): the rows leave flight, the row-group buffer stays
            captured.release(name)
            self.budget.settle(charge, parts.buffered_bytes - buffered)

    def _part(self, name, shard):
        if name not in self.parts:
            def path_of(seq):
                rel = f"{module_dir(name)}/{part_name(self.rank, shard, seq)}"
                return staging_path(self.out, rel)
            self.parts[name] = ShardParts(path_of, self.schemas[name], encoders=self.encoders)
        return self.parts[name]

    def _close_part(self, name, shard):
        parts = self._part(name, shard)
        self.budget.settle(0, -parts.buffered_bytes)
        infos = parts.close()
        del self.parts[name]
        self._stage(shard, [info.tmp_path for info in infos])
        return infos, self.shard_stats.pop(name, ModuleStats(self.dims[name]))

    def commit(self, end) -> None:
        """Queue shard `end` for commit once every module has closed its part."""
        futures = {name: w.submit(self._close_part, name, end.index)
                   for name, w in self.workers.items()}
        self.committer.submit(self._commit, end, futures)

    def _commit(self, end, futures) -> None:
        """Commit one shard once every module's part is closed and fsynced in .tmp/: write
        its docs part there, then `commit_shard` (statistics, fence, record, publish)."""
        results = {name: future.result() for name, future in futures.items()}
        docs_rel = f"{DOCS_DIR}/{part_name(self.rank, end.index)}"
        self._stage(end.index, [staging_path(self.out, docs_rel)])
        docs_info = write_table(staging_path(self.out, docs_rel), docs_table(end))
        parts = [Part(path=docs_rel, bytes=docs_info.bytes, sha256=docs_info.sha256,
                      kind="docs", rows=docs_info.rows)]
        parts += [Part(path=f"{module_dir(m)}/{part_name(self.rank, end.index, info.seq)}",
                       bytes=info.bytes, sha256=info.sha256, kind="module", module=m,
                       rows=info.rows)
                  for m, (infos, _) in results.items() for info in infos]
        record = ShardRecord(index=end.index, rank=self.rank, source_start=end.source_start,
                             source_end=end.source_end, docs=len(end.doc_ids),
                             skipped=end.skipped, tokens=int(end.n_tokens.sum()),
                             parts=tuple(parts), world_size=self.output.world)
        stats = {m: shard_stats for m, (_, shard_stats) in results.items()}
        record = commit_shard(self.output, self.run_id, record, stats)
        with self._staged_lock:
            self.staged.pop(end.index, None)
        self.shards.append(record)  # counted from here on, as on disk
        for module, shard_stats in stats.items():
            self.stats[module].merge(shard_stats)
        self.bytes_written += sum(part.bytes for part in parts)

    def finish(self) -> None:
        """Wait for every queued commit; re-raise the first background failure."""
        self._join()
        for worker in (*self.workers.values(), self.committer):
            worker.check()

    def abort(self) -> None:
        """Stop the threads: queued commits of complete shards finish, the open shard's
        part files are deleted. Background failures are left for `finish` to raise."""
        self._join()
        for part in self.parts.values():
            part.abort()
        self.parts.clear()

    def _join(self) -> None:
        for worker in self.workers.values():
            worker.close()
        self.committer.close()
        self._discard_staged()

    def _stage(self, shard: int, paths: list) -> None:
        with self._staged_lock:
            self.staged.setdefault(shard, []).extend(paths)

    def _discard_staged(self) -> None:
        """Delete the closed files of shards whose commit failed or never ran (the bytes a
        full disk needs back). A shard whose record was written keeps them: a resume rolls
        it forward."""
        for shard, paths in self.staged.items():
            if os.path.exists(os.path.join(self.out, record_path(shard))):
                continue
            for path in paths:
                try:
                    os.remove(path)
                except FileNotFoundError:
                    pass
                except OSError as error:  # the failure that stopped the run matters more
                    log.warning("could not remove the uncommitted file %s: %s", path, error)
        self.staged.clear()
