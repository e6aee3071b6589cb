"""The training loader. It owns `stream` (a `Stream`: shuffled `[B, d]` torch batches read
straight from the part files, for training SAEs, transcoders and crosscoders) and `stats`
(the stored per-module statistics as tensors, for normalising).

How a `Stream` works (the pieces live in `reading/units.py` and `reading/shuffle.py`):
- The unit of work is a row range of one shard (the widest module's row group; other
  modules are read over the same rows and paired by the catalog's rule, so parts that
  rolled over at different row counts pair). Units come from the manifest's row counts.
- Each epoch permutes all units with a generator seeded by `(seed, epoch)`, identically on
  every rank, and deals them out: unit i goes to rank `i mod world_size`. That rank's
  rows, in that order, are its sequence; it is cut into windows of `shuffle_buffer` rows
  (a multiple of the batch size). A window is read (on background threads), permuted with
  a generator seeded by `(seed, start epoch, rank, window)` and cut into numbered batches.
  With `epochs=None` the epochs run together, so every batch is full.
- DataLoader workers share out the windows (window j to worker j mod workers); the set of
  batches never depends on the workers. Every batch carries its number (`batch_index`), so
  a resume state is the set of batches taken: a resumed stream skips those, reading only
  the windows that still hold untaken batches (at most one window per worker: the resume
  cost is bounded by the pool). Epoch and resume point live in shared memory, so they
  reach `persistent_workers=True` workers.

Nothing here reads the manifest: the catalog (`reading/catalog.py`) does.
"""

from __future__ import annotations

import math

import numpy as np

from crowstream.errors import ConfigError
from crowstream.reading.catalog import Catalog
from crowstream.reading.batches import Buffers, Normalizer, pinned
from crowstream.reading.shuffle import (Consumed, batches_of_role, check_arguments,
                                        check_columns, ddp, default_read_threads, resolve,
                                        row_bytes, torch_dtype, warn_if_large, window_batches,
                                        worker_share)
from crowstream.reading.units import Plan, Windows

# Added to the variance before dividing by its square root in normalize="standardize".
STANDARDIZE_EPS = 1e-6
# Batch numbers taken ahead of the resume point that shared memory can hold (workers
# with in_order=False hand batches out of order).
MAX_EXTRA = 4096
_SLOTS = 6  # shared: epoch, pending resume, below, extra count, rotate, saved workers


def stats(out, module: str, *, min_position: int = 0, storage_options: dict | None = None) -> dict:
    """The stored statistics of `module` over its committed rows, as torch values;
    `min_position=1` gives those of the rows at position >= 1 (exact, from the position-0
    statistics a capture keeps apart).

    -> {"mean": [d] float64 tensor, "var": [d] float64 tensor (population variance),
    "mean_norm": float (mean L2 norm of a row), "count": int (rows),
    "scaling_factor": float (SAELens' `sqrt(d) / mean_norm`: multiply by it so that rows
    have a mean norm of sqrt(d))}.
    """
    import torch

    if not isinstance(module, str) or set("*?[") & set(module):
        raise ConfigError(f"stats takes one module name, got {module!r}.")
    if min_position not in (0, 1):
        raise ConfigError(f"stats keeps statistics for all rows (min_position=0) and for the "
                          f"rows at position >= 1 (min_position=1); got {min_position!r}.")
    catalog = Catalog(out, storage_options, stats=True)
    parts = resolve(catalog, module)[1][module]
    summary = catalog.manifest.stats.get(module)
    recorded = summary.to_json() if summary is not None else None
    if not recorded or not recorded.get("count"):
        raise ConfigError(f"module {module!r} in {catalog.shown!r} has no statistics yet: no "
                          "rows are committed. Let the capture commit a shard first.")
    if min_position:
        first = getattr(summary, "position0", None)
        if first is None:
            raise ConfigError(f"{catalog.shown!r} has no position-0 statistics for {module!r} "
                              "(its capture did not keep them apart), so statistics of the "
                              "rows at position >= 1 are unknown; normalise without "
                              "min_position, or capture again with this crowstream.")
        recorded = without_position0(recorded, first if isinstance(first, dict)
                                     else first.to_json())
    mean_norm = float(recorded["mean_norm"])
    return {"mean": torch.tensor(recorded["mean"], dtype=torch.float64),
            "var": torch.tensor(recorded["var"], dtype=torch.float64),
            "mean_norm": mean_norm, "count": int(recorded["count"]),
            "scaling_factor": math.sqrt(parts.d) / mean_norm if mean_norm else 1.0}


def without_position0(total: dict, first: dict) -> dict:
    """Statistics of all rows minus those of the position-0 rows (Chan's update run
    backwards): count, mean, population var, mean_norm of the rest."""
    n, n0 = int(total["count"]), int(first["count"])
    n1 = n - n0
    if n1 <= 0:
        raise ConfigError("every stored row is at position 0; nothing is left at min_position=1.")
    mean, mean0 = np.asarray(total["mean"], float), np.asarray(first["mean"], float)
    mean1 = (n * mean - n0 * mean0) / n1
    delta = mean0 - mean1
    m2 = n * np.asarray(total["var"], float) - n0 * np.asarray(first["var"], float) \
        - delta * delta * (n0 * n1 / n)
    return {"count": n1, "mean": mean1.tolist(), "var": (np.maximum(m2, 0) / n1).tolist(),
            "mean_norm": (n * total["mean_norm"] - n0 * first["mean_norm"]) / n1}


def stream(out, modules, **options) -> Stream:
    """Training batches of one or several modules, read from the part files with pyarrow.

    -> a `Stream` (a `torch.utils.data.IterableDataset`); the options are `Stream`'s (see
    its docstring). Iterate it directly (it reads on its own background threads) or hand it
    to `DataLoader(stream, batch_size=None, num_workers=n, pin_memory=True)`.
    """
    return Stream(out, modules, **options)


def _iterable_dataset():
    import torch.utils.data

    return torch.utils.data.IterableDataset


class Stream(_iterable_dataset()):
    """Shuffled training batches of `modules` in OUT.

    `modules`: one name yields dicts `{"vector": [B, d]}`; a list of names or a glob
    (`"transformer.h.*"`, `"transformer.h.*:input"`) yields `{module: [B, d]}` with rows
    paired by (shard, row) and their `doc_id`/`position` checked equal. `columns` may add
    `doc_id`, `position`, `token` (`[B]` int64). Every batch also carries `batch_index`
    (an int64 scalar tensor: its number in this iteration; `record` takes it).
    `shuffle_buffer` (rows) or `shuffle_buffer_bytes`: the pool, a window of the rank's
    rows that is permuted as a whole (0: file order). Each process (each DataLoader worker)
    holds one full window plus a few units read ahead (docs/training.md has the formula).
    `epochs`: 1 (default) or n; `None` repeats forever with only full batches.
    `drop_last`: drop each finite epoch's short last batch. `even`: every rank gets the
    same number of batches per epoch (the minimum over ranks), for DDP.
    `min_position` / `exclude_tokens`: drop rows at positions below it / with these token
    ids at read time (e.g. `min_position=1` drops the attention-sink rows).
    `rank`/`world_size`: default torch.distributed's, resolved when the stream is used.
    `dtype` casts the vectors (default: as stored); `device` moves batches there (pinned
    memory and non-blocking copies on CUDA; leave it None inside DataLoader workers).
    `normalize`: "mean_norm" multiplies by `stats(...)["scaling_factor"]`, "standardize"
    computes `(x - mean) / sqrt(var + 1e-6)` (statistics of the rows at position >= 1 when
    `min_position` >= 1). `read_threads`: units decoded at once (default: half the
    usable CPUs, 1 to 4; 4 for a URL). `out` may be a URL with fsspec `storage_options`.
    Resumable: `state_dict()` / `load_state_dict(state)`; `set_epoch(e)` as
    `DistributedSampler.set_epoch`.
    """

    def __init__(self, out, modules, *, batch_size: int = 4096, shuffle_buffer: int = 0,
                 shuffle_buffer_bytes: int | None = None, seed: int = 0, epochs: int | None = 1,
                 drop_last: bool = False, even: bool = False, min_position: int = 0,
                 exclude_tokens=(), rank: int | None = None, world_size: int | None = None,
                 dtype=None, device=None, normalize: str | None = None, columns=("vector",),
                 read_threads: int | None = None, storage_options: dict | None = None):
        import torch

        check_arguments(batch_size, shuffle_buffer, shuffle_buffer_bytes, seed, epochs,
                         normalize, read_threads, min_position, exclude_tokens)
        catalog = Catalog(out, storage_options)
        self.out = catalog.out
        self.keyed, parts = resolve(catalog, modules)
        self.modules = list(parts)
        self.columns = check_columns(columns)
        self.batch_size, self.seed, self.epochs = batch_size, seed, epochs
        self.drop_last, self.even = bool(drop_last), bool(even)
        self.read_threads = read_threads or default_read_threads(catalog.remote)
        self.min_position, self.exclude_tokens = min_position, tuple(int(t) for t in exclude_tokens)
        if rank is not None or world_size is not None:
            ddp(rank, world_size)  # checked now, used as given
        self._rank_arg, self._world_arg = rank, world_size
        self.dtype, self.device, self.normalize = torch_dtype(dtype), device, normalize
        self.run_id = catalog.manifest.run_id
        self._plan = Plan(catalog, parts, min_position=min_position,
                          exclude_tokens=self.exclude_tokens)
        self._plan.kept()  # the filter scan, once: workers inherit it
        per_row = row_bytes(parts, self.columns)
        if shuffle_buffer_bytes is not None:
            shuffle_buffer = shuffle_buffer_bytes // per_row
        self.shuffle = bool(shuffle_buffer)
        unit = int((self._plan.units[:, 2] - self._plan.units[:, 1]).max(initial=1))
        rows = shuffle_buffer if self.shuffle else unit
        self.window_rows = max(1, -(-rows // batch_size) if not self.shuffle
                               else rows // batch_size) * batch_size
        warn_if_large(2 * self.window_rows * per_row)
        self._norm = {m if self.keyed else "vector": _norm_arrays(
            self.out, m, normalize, min(min_position, 1), storage_options)
            for m in self.modules} if normalize else {}  # by batch key
        self._shared = torch.zeros(_SLOTS + MAX_EXTRA, dtype=torch.int64).share_memory_()
        self._consumed = Consumed()
        self._tracked = False  # has this process seen the batches taken (or been told)?

    def __getstate__(self):  # to spawned DataLoader workers: the ranks resolved here
        state = self.__dict__.copy()
        state["_rank_arg"], state["_world_arg"] = self.ranks()
        return state

    def ranks(self) -> tuple[int, int]:
        """(rank, world size): as given, else torch.distributed's at the time of the call."""
        return ddp(self._rank_arg, self._world_arg)

    # -- sizes ----------------------------------------------------------------------
    def _windows(self, epoch: int | None = None) -> Windows:
        rank, world = self.ranks()
        return Windows(self._plan, seed=self.seed, shuffle=self.shuffle,
                       epoch=self.epoch if epoch is None else epoch, epochs=self.epochs,
                       rank=rank, world=world, window_rows=self.window_rows,
                       batch_size=self.batch_size, even=self.even, drop_last=self.drop_last)

    def __len__(self) -> int:
        """This rank's batches over all epochs of one iteration, all workers together."""
        return len(self._windows())

    def batches_per_epoch(self, epoch: int | None = None) -> int:
        """This rank's batches in `epoch` (default: the current one), all workers together;
        with `epochs=None`, rows per epoch / batch size."""
        windows = self._windows()
        epoch = self.epoch if epoch is None else epoch
        if self.epochs is None:
            return windows.epoch_rows(epoch) // self.batch_size
        return windows.batches_per_epoch(epoch)

    @property
    def epoch(self) -> int:
        return int(self._shared[0])

    # -- state ----------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Start the next iteration at `epoch` (a new shuffle). A pending resume point of
        the same epoch is kept (the `DistributedSampler` idiom: `load_state_dict`, then
        `set_epoch` each epoch); one of another epoch is dropped."""
        if int(self._shared[1]) and int(self._shared[0]) == int(epoch):
            return
        self._shared[:_SLOTS] = 0
        self._shared[0] = int(epoch)
        self._consumed, self._tracked = Consumed(), True

    def record(self, batch: dict) -> None:
        """Note that the training loop took `batch` (from a DataLoader with workers, in any
        order, `in_order=False` included); `state_dict()` then covers exactly those."""
        self._consumed.add(int(batch["batch_index"]))
        self._tracked = True

    def state_dict(self, *, batches: int | None = None, num_workers: int = 0) -> dict:
        """The position in the data, as plain values (store it with your checkpoint).

        Iterated directly, the stream counts the batches itself. Through a DataLoader with
        workers, either call `record(batch)` on each batch taken, or pass `batches` (taken
        from the DataLoader's current iterator, `in_order=True`) and its `num_workers`.
        """
        rotate, saved = 0, 0
        if batches is not None:
            consumed, rotate, saved = self._round_robin(int(batches), int(num_workers))
        elif not self._tracked:
            raise ConfigError("this process has not seen which batches were taken (the "
                              "stream ran in DataLoader workers); call stream.record(batch) "
                              "on each batch, or pass state_dict(batches=n, num_workers=w).")
        else:
            consumed = self._consumed
        rank, world = self.ranks()
        return {"version": 2, "epoch": self.epoch, "below": consumed.below,
                "extra": sorted(consumed.extra), "rotate": rotate, "workers": saved,
                **self._identity(rank, world)}

    def _identity(self, rank: int, world: int) -> dict:
        return {"run_id": self.run_id, "units": self._plan.digest(), "seed": self.seed,
                "batch_size": self.batch_size, "window_rows": self.window_rows,
                "rank": rank, "world_size": world, "modules": list(self.modules),
                "endless": self.epochs is None, "even": self.even, "drop_last": self.drop_last}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`: the next iteration skips the batches already taken."""
        mine = self._identity(*self.ranks())
        if state.get("version") != 2:
            raise ConfigError("this state was saved by another crowstream version's stream; "
                              "it cannot place the resume point.")
        if (state["run_id"], state["units"]) != (mine["run_id"], mine["units"]):
            raise ConfigError(f"the data changed since this state was saved (run "
                              f"{state['run_id']}, units {state['units']}; now run "
                              f"{mine['run_id']}, units {mine['units']}): another capture, "
                              "more shards or `finalize` would repeat and skip rows. Resume on "
                              "the same data, or start a new epoch without the state.")
        differ = [k for k in mine if k not in ("run_id", "units") and state.get(k) != mine[k]]
        if differ:
            raise ConfigError("cannot resume this stream from the given state: "
                              + ", ".join(f"{k} is {mine[k]!r} here, {state.get(k)!r} in the "
                                          "state" for k in differ)
                              + ". Create the stream with the same arguments.")
        if len(state["extra"]) > MAX_EXTRA:
            raise ConfigError(f"the state lists {len(state['extra'])} batches taken out of "
                              f"order, more than {MAX_EXTRA}; save states more often.")
        self._shared[:] = 0
        extra = state["extra"]
        self._shared[:_SLOTS] = self._shared.new_tensor(
            [state["epoch"], 1, state["below"], len(extra), state["rotate"], state["workers"]])
        if extra:
            self._shared[_SLOTS:_SLOTS + len(extra)] = self._shared.new_tensor(extra)
        self._consumed, self._tracked = Consumed(state["below"], extra), True

    def _pending(self) -> tuple[Consumed, int, int]:
        """The resume point in shared memory: (taken batches, rotate, saved workers)."""
        head = self._shared[:_SLOTS].tolist()
        if not head[1]:
            return Consumed(), 0, 0
        extra = self._shared[_SLOTS:_SLOTS + head[3]].tolist()
        return Consumed(head[2], extra), head[4], head[5]

    def _round_robin(self, batches: int, workers: int) -> tuple[Consumed, int, int]:
        """The batches a DataLoader (in_order=True, `workers` workers) handed out first,
        after the pending resume point: DataLoader worker i serves role (i + rotate)."""
        pending, rotate, saved = self._pending()
        n = max(workers, 1)
        rotate = rotate if saved == n else 0
        windows = self._windows()
        roles = [(i + rotate) % n for i in range(n)]
        totals = [None if self.epochs is None else
                  sum(1 for _ in batches_of_role(windows, role, n, pending)) for role in roles]
        got, following = worker_share(batches, totals)
        consumed = Consumed(pending.below, pending.extra)
        for role, count in zip(roles, got):
            for _, g in zip(range(count), batches_of_role(windows, role, n, pending)):
                consumed.add(g)
        return consumed, (rotate + following) % n, n

    # -- iteration ------------------------------------------------------------------
    def __iter__(self):
        import torch.utils.data

        from crowstream.pipeline.threads import prefetch

        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        pending, rotate, saved = self._pending()
        role = (worker + rotate) % workers if saved == workers else worker
        if info is None:  # this process sees every batch taken
            self._consumed, self._tracked = Consumed(pending.below, pending.extra), True
            self._shared[1] = 0
        rank = self.ranks()[0]
        found = window_batches(self._windows(), self._read, role, workers, pending, self.seed,
                               rank, self.read_threads, self._buffers(info is None),
                               Normalizer(self._norm))
        batches = prefetch(map(self._to_torch, found), depth=2, name="crowstream-shuffle")
        try:
            for index, batch in batches:
                if info is None:
                    self._consumed.add(index)
                yield batch
        finally:
            batches.close()

    def _read(self, piece) -> dict[str, np.ndarray]:
        unit, lo, hi = piece
        ids = [c for c in self.columns if c != "vector"]
        return self._plan.read(unit, lo, hi, ids, vectors="vector" in self.columns,
                               keyed=self.keyed)

    def _buffers(self, main: bool) -> Buffers:
        """Batch buffers of `dtype`: pinned when batches go to a CUDA device from this
        process, so the copy to the device can overlap the next batch."""
        import torch

        vectors = self.modules if self.keyed else ["vector"]
        on_cuda = main and self.device is not None and torch.device(self.device).type == "cuda"
        return Buffers({k: self.dtype for k in vectors}, self._pin if on_cuda else None)

    _pin = staticmethod(pinned)  # a test injects a stand-in (no CUDA on CI)

    def _to_torch(self, found) -> tuple[int, dict]:
        """Issued on the prefetch thread, one batch ahead of the loop: with a pinned buffer
        on CUDA the host-to-device copy overlaps the training step."""
        import torch

        index, batch = found
        if self.device is not None:
            non_blocking = torch.device(self.device).type == "cuda"
            batch = {k: to_device(t, self.device, non_blocking) for k, t in batch.items()}
        batch["batch_index"] = torch.tensor(index, dtype=torch.int64)
        return index, batch


def to_device(tensor, device, non_blocking: bool):
    """The host-to-device copy (from a pinned buffer on CUDA: it returns at once and the
    copy overlaps the training step). A test injects a stand-in (no CUDA on CI)."""
    return tensor.to(device, non_blocking=non_blocking)


def _norm_arrays(out: str, module: str, normalize: str, min_position: int,
                 storage_options=None):
    """-> (scale, shift) float32 CPU tensors, x_normalised = (x - shift) * scale."""
    import torch

    recorded = stats(out, module, min_position=min_position, storage_options=storage_options)
    if normalize == "mean_norm":
        return torch.tensor(recorded["scaling_factor"], dtype=torch.float32), None
    return (recorded["var"] + STANDARDIZE_EPS).rsqrt().float(), recorded["mean"].float()
