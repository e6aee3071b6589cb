"""The training loader. It owns `stream` (a `Stream`: shuffled `[B, d]` torch batches read
straight from the part files, for training SAEs, transcoders and crosscoders) and `stats`
(the stored per-module statistics as tensors, for normalising).

How a `Stream` works:
- The unit of work is a row range of one shard: a row group of its part file (with several
  modules, the row groups of the module whose groups are largest; the others are read over
  the same rows and their `doc_id`/`position` checked equal, so rows are aligned).
- Each epoch permutes all units across all files with a generator seeded by
  `(seed, epoch)`, identically on every rank and worker, and deals them out: unit i goes to
  stream `i mod (world_size * num_workers)`. No row is read twice per epoch.
- Units are read and decoded on background threads (pyarrow releases the GIL), a few
  units ahead of the consumer.
- Rows pass through a fixed pool of `shuffle_buffer` rows, allocated once: while it
  fills, rows go in; after that each incoming row replaces a random slot, and the
  evicted rows form the batch (O(batch) work per batch); at the end of an epoch the rest
  of the pool comes out in a random order. `shuffle_buffer=0` reads in file order.
- Everything random derives from `(seed, epoch, stream index)`, so a stream is a
  deterministic function of those. That makes resuming exact and simple: the state is
  the epoch and the number of batches taken. Epochs before it are skipped without reading
  anything; inside the interrupted epoch the pool's random draws are replayed over row
  identities only (no reads), then only the units whose rows are still pooled are read,
  and the stream continues from the first unread row. (A resume point inside the
  end-of-epoch drain replays that epoch's reads instead.)

Nothing here reads the manifest: the catalog (`reading/catalog.py`) does.
"""

from __future__ import annotations

import collections
import difflib
import itertools
import math
import os
import re

import numpy as np

from crowstream.checks import check_positive
from crowstream.errors import ConfigError, DataError
from crowstream.reading.catalog import Catalog, aligned, vector_array

# Units read ahead of the consumer beyond one per reader thread, so none of them idles.
READ_AHEAD_UNITS = 2
# Added to the variance before dividing by its square root in normalize="standardize".
STANDARDIZE_EPS = 1e-6
ID_COLUMNS = ("doc_id", "position", "token")
NORMALIZE = ("mean_norm", "standardize")


def stats(out, module: str, *, storage_options: dict | None = None) -> dict:
    """The stored statistics of `module` over all its committed rows, as torch values.

    -> {"mean": [d] float64 tensor, "var": [d] float64 tensor (population variance),
    "mean_norm": float (mean L2 norm of a row), "count": int (rows),
    "scaling_factor": float (SAELens' `sqrt(d) / mean_norm`: multiply by it so that rows
    have a mean norm of sqrt(d))}.
    """
    import torch

    if not isinstance(module, str) or set("*?[") & set(module):
        raise ConfigError(f"stats takes one module name, got {module!r}.")
    catalog = Catalog(out, storage_options, stats=True)
    parts = _resolve(catalog, module)[1][module]
    summary = catalog.manifest.stats.get(module)
    recorded = summary.to_json() if summary is not None else None
    if not recorded or not recorded.get("count"):
        raise ConfigError(f"module {module!r} in {catalog.shown!r} has no statistics yet: no "
                          "rows are committed. Let the capture commit a shard first.")
    mean_norm = float(recorded["mean_norm"])
    return {"mean": torch.tensor(recorded["mean"], dtype=torch.float64),
            "var": torch.tensor(recorded["var"], dtype=torch.float64),
            "mean_norm": mean_norm, "count": int(recorded["count"]),
            "scaling_factor": math.sqrt(parts.d) / mean_norm if mean_norm else 1.0}


def stream(out, modules, *, batch_size: int = 4096, shuffle_buffer: int = 0, seed: int = 0,
           epochs: int | None = 1, rank: int | None = None, world_size: int | None = None,
           dtype=None, device=None, normalize: str | None = None, columns=("vector",),
           read_threads: int = 4, storage_options: dict | None = None) -> Stream:
    """Training batches of one or several modules, read from the part files with pyarrow.

    -> a `Stream` (a `torch.utils.data.IterableDataset`). Iterate it directly (it reads on
    its own background threads) or hand it to `DataLoader(stream, batch_size=None,
    num_workers=n, pin_memory=True)`.

    `modules`: one name yields dicts `{"vector": [B, d]}`; a list of names or a glob
    (`"transformer.h.*"`, `"transformer.h.*:input"`) yields `{module: [B, d]}` with rows
    aligned on `(doc_id, position)` (checked on every read). `columns` may add `doc_id`,
    `position`, `token` (`[B]` int64). The last batch of an epoch may be smaller.

    `shuffle_buffer` (rows): 0 reads in file order; n > 0 visits row groups in a random
    order across files and shuffles rows through an n-row pool (split between the
    DataLoader workers of a rank; memory is n rows x all modules' vectors). Deterministic
    for a given `seed` and epoch (`set_epoch`). `epochs=None` repeats forever.
    `rank`/`world_size` split the data between DDP ranks (default: torch.distributed's,
    if initialised); DataLoader workers split it further. Each rank may get a slightly
    different number of rows per epoch (row groups differ in size).
    `dtype` casts the vectors (default: as stored); `device` moves batches there (pinned
    memory and non-blocking copies on CUDA; leave it None inside DataLoader workers).
    `normalize`: "mean_norm" multiplies by `stats(...)["scaling_factor"]`, "standardize"
    computes `(x - mean) / sqrt(var + 1e-6)`.
    `out` may be a URL (`s3://bucket/run`) with fsspec `storage_options`.
    """
    return Stream(out, modules, batch_size=batch_size, shuffle_buffer=shuffle_buffer, seed=seed,
                  epochs=epochs, rank=rank, world_size=world_size, dtype=dtype, device=device,
                  normalize=normalize, columns=columns, read_threads=read_threads,
                  storage_options=storage_options)


def _iterable_dataset():
    import torch.utils.data

    return torch.utils.data.IterableDataset


class Stream(_iterable_dataset()):
    """What `stream` returns; see its docstring. Resumable: `state_dict()` after some
    batches, `load_state_dict(state)` on a fresh `Stream`, and iterating it continues the
    interrupted epoch exactly where it stopped. `set_epoch(e)` starts the next iteration at
    epoch e (a new shuffle), as `DistributedSampler.set_epoch` does."""

    def __init__(self, out, modules, *, batch_size, shuffle_buffer, seed, epochs, rank,
                 world_size, dtype, device, normalize, columns, read_threads,
                 storage_options=None):
        _check_arguments(batch_size, shuffle_buffer, seed, epochs, normalize, read_threads)
        catalog = Catalog(out, storage_options)
        self.out = out = catalog.out
        self.keyed, parts = _resolve(catalog, modules)
        self.modules = list(parts)
        self.columns = _check_columns(columns)
        self.batch_size, self.shuffle_buffer = batch_size, shuffle_buffer
        self.seed, self.epochs, self.read_threads = seed, epochs, read_threads
        self.rank, self.world_size = _ddp(rank, world_size)
        self.dtype, self.device, self.normalize = _torch_dtype(dtype), device, normalize
        self._plan = _Plan(parts, catalog.filesystem)
        self._norm = {m: _norm_arrays(out, m, normalize, device, storage_options)
                      for m in self.modules} \
            if normalize else {}
        self._epoch = 0
        self._resume_batches = 0   # batches of the interrupted iteration to drop on resume
        self._resume_workers = None
        self._taken = 0            # batches this process's iteration has yielded

    # -- state ----------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at `epoch` (and forget any pending resume point)."""
        self._epoch, self._resume_batches, self._taken = int(epoch), 0, 0

    def state_dict(self, *, batches: int | None = None, num_workers: int = 0) -> dict:
        """The position in the data, as plain values (store it with your checkpoint).

        Iterated directly (or with `num_workers=0`), the stream counts the batches itself.
        Inside a DataLoader with workers, pass `batches`, the number of batches your loop
        took from the DataLoader's current iterator, and its `num_workers`.
        """
        taken = self._resume_batches + self._taken if batches is None else int(batches)
        return {"epoch": self._epoch, "batches": taken, "seed": self.seed,
                "batch_size": self.batch_size, "shuffle_buffer": self.shuffle_buffer,
                "rank": self.rank, "world_size": self.world_size,
                "num_workers": max(int(num_workers), 1), "modules": list(self.modules)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`: the next iteration skips the batches already taken."""
        mine = self.state_dict(num_workers=state.get("num_workers", 1))
        differ = [k for k in ("seed", "batch_size", "shuffle_buffer", "rank", "world_size",
                              "modules") if state.get(k) != mine[k]]
        if differ:
            raise ConfigError("cannot resume this stream from the given state: "
                              + ", ".join(f"{k} is {mine[k]!r} here, {state.get(k)!r} in the "
                                          "state" for k in differ)
                              + ". Create the stream with the same arguments.")
        self._epoch, self._resume_batches = int(state["epoch"]), int(state["batches"])
        self._resume_workers, self._taken = int(state["num_workers"]), 0

    # -- iteration ------------------------------------------------------------------
    def __iter__(self):
        import torch.utils.data

        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        if self._resume_batches and self._resume_workers not in (None, workers):
            raise ConfigError(f"this stream was saved with {self._resume_workers} DataLoader "
                              f"worker(s) and now runs with {workers}; resume with the same "
                              "num_workers.")
        skip, stream = 0, worker
        if self._resume_batches:
            totals = [self._batches_of(w, workers) for w in range(workers)]
            done, first = _worker_share(self._resume_batches, totals)
            # the DataLoader starts again at worker 0: it takes the stream due next
            stream = (first + worker) % workers
            skip = done[stream]
        self._taken = 0
        index = self.rank * workers + stream
        batches = self._stream_batches(index, self.world_size * workers, skip)
        return self._counted(batches) if info is None else batches

    def _counted(self, batches):
        for batch in batches:
            self._taken += 1
            yield batch

    def _epochs(self):
        start = self._epoch
        return itertools.count(start) if self.epochs is None else range(start, start + self.epochs)

    def _batches_of(self, worker: int, workers: int) -> int | None:
        """Batches worker `worker` of this rank yields in this iteration (None: endless),
        which `_worker_share` needs to follow DataLoader's round-robin."""
        if self.epochs is None:
            return None
        index, count = self.rank * workers + worker, self.world_size * workers
        return sum(self._epoch_batches(e, index, count) for e in self._epochs())

    def _epoch_batches(self, epoch: int, index: int, count: int) -> int:
        rows = self._plan.rows(self._epoch_units(epoch, index, count))
        return -(-rows // self.batch_size)

    def _epoch_units(self, epoch: int, index: int, count: int) -> np.ndarray:
        units = self._plan.units
        if self.shuffle_buffer:
            units = units[np.random.default_rng([self.seed, epoch]).permutation(len(units))]
        return units[index::count]

    def _stream_batches(self, index: int, count: int, skip: int):
        """Torch batches of stream `index` of `count`; the pool runs on its own thread."""
        from crowstream.pipeline.threads import prefetch

        batches = prefetch(self._pooled(index, count, skip), depth=2, name="crowstream-shuffle")
        try:
            for batch in batches:
                yield self._to_torch(batch)
        finally:
            batches.close()

    def _pooled(self, index: int, count: int, skip: int):
        """Numpy batches of stream `index`: epochs of units through the pool, the first
        `skip` batches dropped (whole epochs without reading them; inside an epoch by
        `_fast_forward`, or by replaying it when the resume point is in the final drain)."""
        per_worker = self.shuffle_buffer // (count // self.world_size)
        pool = _Pool(max(per_worker, 1) if self.shuffle_buffer else 0, self.batch_size)
        for epoch in self._epochs():
            n = self._epoch_batches(epoch, index, count)
            if skip >= n:
                skip -= n
                continue
            units = self._epoch_units(epoch, index, count)
            pool.rng = np.random.default_rng([self.seed, epoch, index])
            if skip:
                units, skip = self._fast_forward(pool, units, skip, epoch, index)
            chunks = _read_ahead(self._read, units, self.read_threads)
            try:
                batches = itertools.chain(itertools.chain.from_iterable(map(pool.feed, chunks)),
                                          pool.drain())
                for batch in itertools.islice(batches, skip, None):
                    yield batch
                skip = 0
            finally:
                chunks.close()

    def _fast_forward(self, pool: _Pool, units: np.ndarray, skip: int, epoch: int, index: int):
        """Bring `pool` to where it was after `skip` batches of this epoch without reading
        the rows already gone: replay the pool's random draws over row identities only,
        then read just the units whose rows are still pooled. -> (units still to read, the
        first one shortened to its unread rows; batches still to drop: 0, or `skip` with
        a fresh pool when the resume point lies in the final drain, which is replayed)."""
        ghost = _Pool(pool.capacity, pool.batch_size, pool.rng)  # shares the generator
        emitted = 0
        for position, (_, start, stop) in enumerate(units):
            identities = (position << 32) | np.arange(stop - start, dtype=np.int64)
            for _ in ghost.feed({"id": identities}):
                emitted += 1
                if emitted == skip:  # every batch so far was full, nothing is staged
                    pooled = ghost.pool["id"][:ghost.filled] if ghost.filled else np.empty(0, int)
                    self._restore(pool, units, pooled)
                    return _after(units, skip * pool.batch_size + ghost.filled), 0
        pool.rng = np.random.default_rng([self.seed, epoch, index])
        return units, skip

    def _restore(self, pool: _Pool, units: np.ndarray, identities: np.ndarray) -> None:
        """Fill `pool` with the rows `identities` ((unit position << 32) | row) name."""
        unit_of, row_of = identities >> 32, identities & 0xFFFFFFFF
        order = np.argsort(unit_of, kind="stable")
        needed = np.unique(unit_of)
        bounds = np.searchsorted(unit_of[order], needed, side="left").tolist() + [len(order)]
        chunks = _read_ahead(self._read, units[needed], self.read_threads)
        try:
            for i, chunk in enumerate(chunks):
                if pool.pool is None:
                    pool.pool = {k: _empty((pool.capacity, *a.shape[1:]), a.dtype)
                                 for k, a in chunk.items()}
                slots = order[bounds[i]:bounds[i + 1]]
                for key, a in chunk.items():
                    _rows(pool.pool[key])[slots] = _rows(a)[row_of[slots]]
        finally:
            chunks.close()
        pool.filled = len(identities)

    def _read(self, unit) -> dict[str, np.ndarray]:
        ids = [c for c in self.columns if c != "vector"]
        return self._plan.read(unit, ids, vectors="vector" in self.columns,
                               keyed=self.keyed)

    def _to_torch(self, batch: dict[str, np.ndarray]) -> dict:
        import torch

        on_cuda = self.device is not None and torch.device(self.device).type == "cuda"
        result = {}
        for key, array in batch.items():
            tensor = torch.from_numpy(array)
            if key in ID_COLUMNS:
                tensor = tensor.to(torch.int64)
            if on_cuda:  # async copy from pinned memory; torch keeps the block until it is done
                tensor = tensor.pin_memory().to(self.device, non_blocking=True)
            elif self.device is not None:
                tensor = tensor.to(self.device)
            if key not in ID_COLUMNS:
                tensor = self._vector(key, tensor)
            result[key] = tensor
        return result

    def _vector(self, key: str, x):
        module = self.modules[0] if key == "vector" else key
        if self.normalize:
            scale, shift = self._norm[module]
            x = (x.float() - shift) * scale  # [B, d]
        return x if self.dtype is None else x.to(self.dtype)


def _norm_arrays(out: str, module: str, normalize: str, device, storage_options=None):
    """-> (scale, shift) float32 tensors on `device`, x_normalised = (x - shift) * scale."""
    import torch

    recorded = stats(out, module, storage_options=storage_options)
    if normalize == "mean_norm":
        scale = torch.tensor(recorded["scaling_factor"], dtype=torch.float32)
        shift = torch.zeros((), dtype=torch.float32)
    else:
        scale = (recorded["var"] + STANDARDIZE_EPS).rsqrt().float()
        shift = recorded["mean"].float()
    return scale.to(device or "cpu"), shift.to(device or "cpu")


class _Plan:
    """Which rows of which files make up each unit of work, from the Parquet footers."""

    def __init__(self, parts: dict, filesystem=None):
        import pyarrow.parquet as pq

        self.parts, self.filesystem = parts, filesystem  # a pyarrow filesystem for URLs
        names = list(parts)
        by_shard = {m: {os.path.basename(p): p for p in parts[m].paths} for m in names}
        shards = sorted(by_shard[names[0]])
        for m in names[1:]:
            if sorted(by_shard[m]) != shards:
                raise DataError(f"modules {names[0]!r} and {m!r} have different part files "
                                f"({len(shards)} vs {len(by_shard[m])}), so their rows cannot "
                                "be aligned; read them separately.")
        self.files = {m: [by_shard[m][s] for s in shards] for m in names}
        self.offsets: dict[str, list[np.ndarray]] = {m: [] for m in names}
        self.footers: dict[str, list] = {m: [] for m in names}  # read once, reused per unit
        units = []
        for i, shard in enumerate(shards):
            for m in names:
                meta = pq.read_metadata(self.files[m][i], filesystem=filesystem)
                self.footers[m].append(meta)
                counts = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
                self.offsets[m].append(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))
            totals = {m: int(self.offsets[m][i][-1]) for m in names}
            if len(set(totals.values())) > 1:
                raise DataError(f"part files of shard {shard} hold different numbers of rows "
                                f"per module ({totals}), so rows cannot be aligned.")
            # the module with the fewest (largest) row groups sets the unit boundaries
            edges = min((self.offsets[m][i] for m in names), key=len)
            units += [(i, int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]
        self.units = np.array(units, dtype=np.int64).reshape(-1, 3)  # [U, (file, start, stop)]

    @staticmethod
    def rows(units: np.ndarray) -> int:
        return int((units[:, 2] - units[:, 1]).sum())

    def read(self, unit, ids: list[str], *, vectors: bool, keyed: bool) -> dict[str, np.ndarray]:
        """The rows of one unit: {"vector" or module: [n, d], id column: [n]}."""
        file, start, stop = (int(v) for v in unit)
        chunk: dict[str, np.ndarray] = {}
        reference = None
        for m in self.parts:
            keys = list(ids if reference is None else ())
            if len(self.parts) > 1:
                keys = list(dict.fromkeys([*keys, "doc_id", "position"]))
            table = self._read_rows(m, file, start, stop, keys + (["vector"] if vectors else []))
            got = {k: table.column(k).to_numpy() for k in keys}
            if reference is None:
                reference = got
                chunk.update({k: got[k] for k in ids})
            else:
                where = f"{os.path.basename(self.files[m][file])} from row {start}"
                aligned(next(iter(self.parts)), m, where, reference, got)
            if vectors:
                chunk[m if keyed else "vector"] = vector_array(table.column("vector"), self.parts[m].d)
        return chunk

    def _read_rows(self, module: str, file: int, start: int, stop: int, columns: list[str]):
        import pyarrow.parquet as pq

        offsets = self.offsets[module][file]
        first = int(np.searchsorted(offsets, start, side="right")) - 1
        last = int(np.searchsorted(offsets, stop, side="left"))
        parquet = pq.ParquetFile(self.files[module][file], metadata=self.footers[module][file],
                                 page_checksum_verification=True, filesystem=self.filesystem)
        table = parquet.read_row_groups(list(range(first, last)), columns=columns)
        return table.slice(start - int(offsets[first]), stop - start)


class _Pool:
    """A fixed pool of `capacity` rows (allocated on the first rows, never grown): rows
    fill it, then each new row replaces a random slot and the evicted rows form the
    batches. capacity 0 passes rows through in order."""

    def __init__(self, capacity: int, batch_size: int, rng: np.random.Generator | None = None):
        self.capacity, self.batch_size, self.rng = capacity, batch_size, rng
        self.pool: dict[str, np.ndarray] | None = None
        self.filled = 0
        self.pieces: list[dict[str, np.ndarray]] = []
        self.staged = 0

    def feed(self, chunk: dict[str, np.ndarray]):
        n = len(next(iter(chunk.values())))
        i = 0
        if self.capacity and self.filled < self.capacity:
            if self.pool is None:
                self.pool = {k: _empty((self.capacity, *a.shape[1:]), a.dtype)
                             for k, a in chunk.items()}
            i = min(self.capacity - self.filled, n)
            for k, a in chunk.items():
                self.pool[k][self.filled:self.filled + i] = a[:i]
            self.filled += i
        while i < n:
            k = min(self.batch_size - self.staged, n - i, self.capacity or n)
            if self.capacity:
                slots = self.rng.choice(self.capacity, k, replace=False)  # O(k), distinct
                piece = {key: _gather(self.pool[key], slots) for key in chunk}
                for key, a in chunk.items():
                    _rows(self.pool[key])[slots] = _rows(a[i:i + k])
            else:
                piece = {key: a[i:i + k] for key, a in chunk.items()}
            i += k
            yield from self._stage(piece, k)

    def drain(self):
        """The rows still pooled or staged, in a random order; the last batch may be short."""
        if self.filled:
            order = self.rng.permutation(self.filled)
            for start in range(0, self.filled, self.batch_size):
                take = order[start:start + self.batch_size]
                yield from self._stage({k: _gather(a, take) for k, a in self.pool.items()},
                                       len(take))
        self.filled = 0  # the next epoch reuses the memory
        if self.staged:
            yield self._emit()

    def _stage(self, piece: dict[str, np.ndarray], rows: int):
        while rows:
            k = min(self.batch_size - self.staged, rows)
            self.pieces.append({key: a[:k] for key, a in piece.items()})
            piece = {key: a[k:] for key, a in piece.items()}
            self.staged += k
            rows -= k
            if self.staged == self.batch_size:
                yield self._emit()

    def _emit(self) -> dict[str, np.ndarray]:
        pieces, self.pieces, self.staged = self.pieces, [], 0
        if len(pieces) == 1:  # Arrow's zero-copy arrays are read-only: hand out a copy
            return {k: a if a.flags.writeable and a.flags.c_contiguous else a.copy()
                    for k, a in pieces[0].items()}
        return {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}


def _after(units: np.ndarray, rows: int) -> np.ndarray:
    """The units that remain once the first `rows` rows of `units` are consumed."""
    ends = np.cumsum(units[:, 2] - units[:, 1])
    first = int(np.searchsorted(ends, rows, side="right"))
    rest = units[first:].copy()
    if len(rest):
        rest[0, 1] += rows - (int(ends[first - 1]) if first else 0)
    return rest


def _rows(a: np.ndarray) -> np.ndarray:
    """[n, ...] C-contiguous -> [n] of opaque row-sized items: numpy moves whole rows per
    index then (gather and scatter of 3 KB rows measured 2-3x faster than plain fancy
    indexing over a 3 GB pool)."""
    if a.ndim == 1:
        return a
    a = np.ascontiguousarray(a)
    return a.view(np.dtype((np.void, a.itemsize * a[0].size))).reshape(len(a))


def _empty(shape: tuple, dtype: np.dtype) -> np.ndarray:
    """np.empty through torch's allocator: numpy asks for transparent huge pages, and
    where the kernel compacts memory for them (defrag=madvise), first touching a 3 GB pool
    took 2-3x longer."""
    import torch

    return torch.empty(shape, dtype=torch.from_numpy(np.empty(0, dtype)).dtype).numpy()


def _gather(a: np.ndarray, index: np.ndarray) -> np.ndarray:
    """a[index] for the rows of `a`, through `_rows`."""
    return _rows(a)[index].view(a.dtype).reshape(len(index), *a.shape[1:])


def _read_ahead(read, units: np.ndarray, threads: int):
    """read(unit) for each unit on `threads` background threads, `threads` +
    READ_AHEAD_UNITS units ahead, yielded in order. Closing the generator cancels what is
    queued and joins the threads."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads, thread_name_prefix="crowstream-reader") as executor:
        todo = iter(units)
        pending = collections.deque(executor.submit(read, u)
                                    for u in itertools.islice(todo, threads + READ_AHEAD_UNITS))
        try:
            while pending:
                chunk = pending.popleft().result()
                for unit in itertools.islice(todo, 1):
                    pending.append(executor.submit(read, unit))
                yield chunk
        finally:
            for future in pending:
                future.cancel()


def _worker_share(batches: int, totals: list) -> tuple[list[int], int]:
    """DataLoader takes batches from its workers round-robin, skipping exhausted ones;
    `totals[w]` is worker w's batch count (None: endless). -> (how many of the first
    `batches` came from each worker, the worker the next batch comes from)."""
    workers = len(totals)
    left = [math.inf if t is None else t for t in totals]
    got = [0] * workers
    last = workers - 1
    while batches > 0:
        active = [w for w in range(workers) if left[w] > got[w]]
        if not active:
            break
        rounds = min(min(left[w] - got[w] for w in active), batches // len(active))
        if rounds == 0:  # a partial round
            for w in active[:batches]:
                got[w] += 1
                last = w
            break
        for w in active:
            got[w] += rounds
        last = active[-1]
        batches -= rounds * len(active)
    following = [(last + 1 + i) % workers for i in range(workers)]
    return got, next((w for w in following if left[w] > got[w]), 0)


def _resolve(catalog: Catalog, modules) -> tuple[bool, dict]:
    """-> (keyed by module?, {module: catalog.ModuleFiles}). A str without glob characters is one
    module (batches carry "vector"); a list or a glob gives batches keyed by module."""
    from crowstream.pipeline.tracing import _glob_regex

    keyed = not isinstance(modules, str) or bool(set("*?[") & set(modules))
    patterns = [modules] if isinstance(modules, str) else list(modules)
    if not patterns:
        raise ConfigError("no modules given; name at least one (`crowstream info OUT` lists them).")
    chosen: list[str] = []
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ConfigError(f"module names must be strings, got {pattern!r}.")
        if set("*?[") & set(pattern):
            base, _, tail = pattern.partition(":")
            regex = _glob_regex(base)
            matches = [n for n in catalog.modules if n.partition(":")[2] == tail
                       and regex.fullmatch(n.partition(":")[0])]
        else:
            matches = [pattern] if pattern in catalog.modules else []
        if not matches:
            close = difflib.get_close_matches(pattern, list(catalog.modules), n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
            raise ConfigError(f"{catalog.shown!r} has no module {pattern!r}; {hint}it has "
                              f"{', '.join(map(repr, catalog.modules))}.")
        chosen += [m for m in matches if m not in chosen]
    return keyed, {m: catalog.module(m) for m in chosen}


def _check_arguments(batch_size, shuffle_buffer, seed, epochs, normalize, read_threads) -> None:
    check_positive("batch_size", batch_size, allow_none=False)
    check_positive("read_threads", read_threads, allow_none=False)
    check_positive("epochs", epochs)
    if isinstance(shuffle_buffer, bool) or not isinstance(shuffle_buffer, int) \
            or shuffle_buffer < 0:
        raise ConfigError(f"shuffle_buffer must be a number of rows (0 for no shuffling), "
                          f"got {shuffle_buffer!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}.")
    if normalize is not None and normalize not in NORMALIZE:
        raise ConfigError(f"normalize must be None, 'mean_norm' or 'standardize'; "
                          f"got {normalize!r}.")


def _check_columns(columns) -> tuple[str, ...]:
    columns = (columns,) if isinstance(columns, str) else tuple(columns)
    unknown = [c for c in columns if c not in (*ID_COLUMNS, "vector")]
    if unknown or not columns:
        raise ConfigError(f"columns must be some of 'doc_id', 'position', 'token', 'vector'; "
                          f"got {columns!r}.")
    return columns


def _ddp(rank, world_size) -> tuple[int, int]:
    if rank is None and world_size is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1
    if rank is None or world_size is None:
        raise ConfigError("pass rank and world_size together (or neither, to use "
                          "torch.distributed's).")
    check_positive("world_size", world_size, allow_none=False)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ConfigError(f"rank must be in 0..{world_size - 1}, got {rank!r}.")
    return rank, world_size


def _torch_dtype(dtype):
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None) if re.fullmatch(r"[a-z0-9]+", str(dtype)) else None
    if not isinstance(value, torch.dtype):
        raise ConfigError(f"dtype must be a torch dtype or its name (e.g. 'float16'), "
                          f"got {dtype!r}.")
    return value
