"""The writers. It owns `Writers`: per module, a dispatcher thread that turns captured
rows into Arrow batches and hands them to the shared `EncoderPool` (each part file of the
shard on its own lane, the module's statistics on another), and a committer thread that
commits shards in order through `commit.commit_shard`. One `ByteBudget` bounds every
byte between the forward and the disk.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import CancelledError

from crowstream.format.layout import (DOCS_DIR, FORMAT_VERSION, model_id, module_dir, part_name,
                                      record_path, staging_path)
from crowstream.format.manifest import Part, ShardRecord
from crowstream.format.statistics import ModuleStats, merged_stats
from crowstream.schemas import part_schema

from .commit import commit_shard
from .options import CaptureConfig
from .parts import ENCODER_BYTES, ShardParts, encoder_slots, lead_bytes, row_bytes, write_table
from .tables import docs_table
from .threads import ByteBudget, EncoderPool, Worker

log = logging.getLogger("crowstream")


class Writers:
    """Per module a dispatcher thread, one `EncoderPool` of `encoder_threads` threads (at
    most one per core, and no more than a quarter of the budget can feed) shared by all
    modules, and a committer thread that commits shards in order. Part files are written
    in `.tmp/` and only appear in `data/` at commit. One `ByteBudget` bounds every byte
    between the forward and the disk: a batch's kept rows on the host (until every piece
    of them is encoded and their statistics taken), the queues, the row-group buffers,
    and each encoder's working memory (ENCODER_BYTES, set aside up front)."""

    def __init__(self, output, config: CaptureConfig, dims: dict, committed,
                 encoder_threads: int | None = None, gate=None):
        self.output, self.config, self.dims, self.run_id = output, config, dims, committed.run_id
        self.out, self.rank = output.path, output.rank
        # `gate` (a threads.ForwardGate, CPU forwards only): every thread here waits for it
        self.workers = {name: Worker(f"crowstream-writer[{name}]", gate=gate) for name in dims}
        self.committer = Worker("crowstream-committer", 2, gate=gate)
        limit = config.max_inflight_bytes  # resolved by capture()
        slots = encoder_slots(limit, encoder_threads)  # their memory comes out of the budget
        self.pool = EncoderPool(slots, gate=gate)
        self.schemas = {name: part_schema(name, d, config.dtype, model_id(config.model),
                                          FORMAT_VERSION) for name, d in dims.items()}
        self.row_cost = {name: row_bytes(s) for name, s in self.schemas.items()}  # as stored
        # the encoders' memory comes first; the forward runs at most `lead_bytes` ahead
        batch_tokens = config.max_batch_tokens or config.batch_size * config.context_size
        lead = lead_bytes(slots, len(dims), batch_tokens * sum(self.row_cost.values()))
        self.budget = ByteBudget(max(1, min(limit - slots * ENCODER_BYTES, lead)))
        self.stats_lanes = {name: self.pool.lane() for name in dims}
        self.parts: dict = {}            # module -> ShardParts of the open shard (dispatchers)
        self.closing: dict = {}          # (module, shard) -> ShardParts closed, not committed
        self.shard_stats: dict = {}      # module -> ModuleStats of the open shard (its lane)
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
        self.pool.check()  # first: a failed encode also fails the commit that waits on it
        for worker in (*self.workers.values(), self.committer):
            worker.check()

    def write(self, batch, captured) -> None:
        rows = len(batch.keep_index)
        for name, worker in self.workers.items():
            worker.submit(self._write_rows, name, batch.shard, batch, captured,
                          rows * self.row_cost[name])
        self.check()

    def _write_rows(self, name, shard, batch, captured, charge) -> None:
        """Dispatch one batch's rows of module `name`: its pieces to the files' lanes, its
        statistics to the module's lane. The rows leave flight (and their host buffer is
        released) once the last of those calls is done."""
        import torch

        from .flatten import to_record_batch
        from .host import check_float16

        done = _Countdown(lambda: (captured.release(name), self.budget.settle(charge)))
        futures: list = []
        try:
            captured.wait()
            check_float16(name, captured.peaks.get(name))
            vectors = captured.rows(name, getattr(torch, self.config.dtype))  # [N, d]
            parts = self._part(name, shard)
            futures += parts.write(to_record_batch(batch.doc_ids, batch.positions, batch.tokens,
                                                  vectors, self.config.dtype))
            stats = self.shard_stats.setdefault(name, ModuleStats(self.dims[name]))
            futures.append(self.stats_lanes[name].submit(
                stats.update, vectors, captured.clamped_count(name), batch.positions))
        finally:  # dispatched (or failed): the countdown settles once every call is done
            done.wait_for(futures)

    def _part(self, name, shard):
        if name not in self.parts:
            def path_of(seq):
                rel = f"{module_dir(name)}/{part_name(self.rank, shard, seq)}"
                return staging_path(self.out, rel)
            self.parts[name] = ShardParts(path_of, self.schemas[name], self.pool,
                                          self.budget.settle,
                                          compression=self.config.compression)
        return self.parts[name]

    def _close_part(self, name, shard):
        """-> (Futures of the shard's `PartInfo`s, Future of its statistics)."""
        parts = self._part(name, shard)
        infos = parts.close()
        self.closing[(name, shard)] = parts  # until committed: abort deletes its files
        del self.parts[name]
        self._stage(shard, parts.paths)
        stats = self.shard_stats.pop(name, None) or ModuleStats(self.dims[name])
        return infos, self.stats_lanes[name].submit(lambda: stats)

    def commit(self, end) -> None:
        """Queue shard `end` for commit once every module has closed its part."""
        futures = {name: w.submit(self._close_part, name, end.index)
                   for name, w in self.workers.items()}
        self.committer.submit(self._commit, end, futures)

    def _commit(self, end, futures) -> None:
        """Commit one shard once every module's part is closed and fsynced in .tmp/: write
        its docs part there, then `commit_shard` (statistics, fence, record, publish)."""
        results = {}
        try:
            for name, future in futures.items():
                infos, stats = future.result()
                results[name] = ([info.result() for info in infos], stats.result())
        except CancelledError:  # skipped after an encoder failed: report that failure
            self.pool.check()
            raise
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
        for name in futures:
            self.closing.pop((name, end.index), None)
        with self._staged_lock:
            self.staged.pop(end.index, None)
        self.shards.append(record)  # counted from here on, as on disk
        for module, shard_stats in stats.items():
            self.stats[module].merge(shard_stats)
        self.bytes_written += sum(part.bytes for part in parts)

    def finish(self) -> None:
        """Wait for every queued commit; re-raise the first background failure."""
        self._join()
        self.check()

    def abort(self) -> None:
        """Stop the threads: queued commits of complete shards finish, the open shard's
        part files are deleted. Background failures are left for `finish` to raise."""
        self._join()

    def _abort_unfinished(self) -> None:
        """Delete the open shard's part files, and the unfinished ones of shards that were
        closing (an encoder failed): no file is left open. Finished files of a shard whose
        commit did not complete stay for the resume (it may roll the shard forward)."""
        for parts in self.parts.values():
            parts.abort()
        for parts in self.closing.values():
            parts.abort(unfinished_only=True)
        self.parts.clear()
        self.closing.clear()

    def _join(self) -> None:
        for worker in self.workers.values():
            worker.close()
        self.committer.close()  # its last commit waits on the pool, so it ends first
        self.pool.close()
        self._abort_unfinished()

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


class _Countdown:
    """Runs `action` once, when every Future handed to `wait_for` is done (at once if
    there are none); a failed or cancelled Future counts as done."""

    def __init__(self, action):
        self._action = action
        self._lock = threading.Lock()
        self._left = 1

    def wait_for(self, futures) -> None:
        with self._lock:
            self._left += len(futures)
        for future in futures:
            future.add_done_callback(self._one)
        self._one(None)

    def _one(self, _future) -> None:
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            self._action()
