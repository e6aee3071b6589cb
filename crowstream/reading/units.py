"""What a training stream reads. It owns the `Plan` (the units of work: row ranges of one
shard, from the manifest's per-part row counts, read through the catalog with its
paired-read rule and the read-time filters) and the `Windows` arithmetic (which rows of
which units make up window j of a rank's sequence, and which batches it holds).

The invariant everything else relies on: a rank's row sequence, its windows and its
numbered batches depend only on (data, seed, start epoch, rank, world size, window rows,
batch size, filters, even, drop_last, endless); never on DataLoader workers, which only
share out the windows (window j goes to worker j mod workers). So a batch index names the
same rows in every process, and a resume state is a set of batch indices.
"""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import Future

import numpy as np

from crowstream.errors import ConfigError, DataError
from crowstream.reading.catalog import Catalog, aligned, shard_rows, vector_array

class Piece:
    """Kept rows [lo, hi) of one decoded unit: `arrays` maps each key to its segments
    `[(first row, [n, ...] array)]` as decoded (a unit spanning two row groups or part
    files has two), `rows` the unit's kept rows (None: all rows, no filter)."""

    __slots__ = ("arrays", "rows", "lo", "hi")

    def __init__(self, arrays: dict, rows: np.ndarray | None, lo: int, hi: int):
        self.arrays, self.rows, self.lo, self.hi = arrays, rows, lo, hi

    def __len__(self) -> int:
        return self.hi - self.lo

    def source(self, local: np.ndarray) -> np.ndarray:
        """Rows `local` of this piece (0 .. len - 1) -> rows of the decoded unit."""
        return local + self.lo if self.rows is None else self.rows[local + self.lo]


# Decoded units kept per process: a unit split between two consecutive windows (and the
# few units read ahead) decode once, also when two reader threads ask for it side by side
# (each decoding it was 12% more decode work at d = 768, measured).
RECENT_UNITS = 4


class Plan:
    """The units of `parts` ({module: ModuleFiles}, rows aligned by shard): `units` is
    [U, (shard, start, stop)] with the widest module's row-group boundaries, so a unit
    decodes at most one row group per module. Footers are opened lazily, in the reading
    process, and cached there."""

    def __init__(self, catalog: Catalog, parts: dict, *, min_position: int = 0,
                 exclude_tokens: tuple = ()):
        from crowstream.pipeline.parts import group_rows
        from crowstream.schemas import row_schema

        self.catalog, self.parts = catalog, parts
        self.min_position, self.exclude_tokens = min_position, tuple(exclude_tokens)
        self.index = {m: f.by_shard() for m, f in parts.items()}
        names = list(parts)
        first = names[0]
        totals = {m: {s: sum(parts[m].rows[i] for i in ix) for s, ix in self.index[m].items()}
                  for m in names}
        for m in names[1:]:
            if totals[m] != totals[first]:
                bad = next((s for s in totals[first] if totals[first][s] != totals[m].get(s)),
                           next(iter(set(totals[m]) - set(totals[first])), None))
                raise DataError(f"modules {first!r} and {m!r} hold different numbers of rows "
                                f"in shard {bad} ({totals[first].get(bad)} vs "
                                f"{totals[m].get(bad)}), so their rows cannot be aligned; "
                                "read them separately.")
        widest = min(names, key=lambda m: group_rows(row_schema(parts[m].d, parts[m].dtype)))
        group = group_rows(row_schema(parts[widest].d, parts[widest].dtype))
        units, starts = [], parts[widest].shard_starts()
        for shard, ix in sorted(self.index[widest].items()):
            for i in ix:
                rows, offset = parts[widest].rows[i], starts[i]
                units += [(shard, offset + a, offset + min(a + group, rows))
                          for a in range(0, rows, group)]
        self.units = np.array(units, dtype=np.int64).reshape(-1, 3)
        self.footers: dict = {}
        self._recent: dict = {}  # the last units read: Futures of the decoded units
        self._lock = threading.Lock()
        self._kept: np.ndarray | None = None

    @property
    def filtered(self) -> bool:
        return bool(self.min_position or self.exclude_tokens)

    def kept(self) -> np.ndarray:
        """Rows per unit after the filters ([U] int64); with filters, computed once (a scan
        of the `position`/`token` columns, one read per shard); `Stream` computes it before
        workers start, so they inherit it."""
        if self._kept is None:
            rows = self.units[:, 2] - self.units[:, 1]
            self._kept = rows if not self.filtered else self._count_kept()
        return self._kept

    def _count_kept(self) -> np.ndarray:
        first = next(iter(self.parts))
        kept = np.zeros(len(self.units), dtype=np.int64)
        for shard in np.unique(self.units[:, 0]):
            mine = np.flatnonzero(self.units[:, 0] == shard)
            lo, hi = int(self.units[mine, 1].min()), int(self.units[mine, 2].max())
            table = self._table(first, (shard, lo, hi), ["position", "token"])
            keep = self._keep(table.column("position").to_numpy(),
                              table.column("token").to_numpy())
            ends = np.concatenate([[0], np.cumsum(keep)])
            kept[mine] = ends[self.units[mine, 2] - lo] - ends[self.units[mine, 1] - lo]
        return kept

    def digest(self) -> str:
        """A hash of the unit table and filters: a resume state must match it."""
        h = hashlib.sha256(self.units.tobytes())
        h.update(repr((list(self.parts), self.min_position, self.exclude_tokens)).encode())
        return h.hexdigest()[:16]

    def _table(self, module: str, unit, columns: list[str]):
        shard, start, stop = (int(v) for v in unit)
        return shard_rows(self.catalog, self.parts[module], shard, start, stop, columns,
                          index=self.index[module], footers=self.footers, memory_map=True)

    def _keep(self, position: np.ndarray, token: np.ndarray) -> np.ndarray:
        keep = position >= self.min_position
        if self.exclude_tokens:
            keep &= ~np.isin(token, self.exclude_tokens)
        return keep

    def read(self, unit, lo: int, hi: int, ids: list[str], *, vectors: bool,
             keyed: bool) -> Piece:
        """Kept rows [lo, hi) of one unit, as a `Piece` of its decoded row groups (no copy:
        the batch gather reads them where the decode left them). The whole unit is decoded
        (a row group decodes whole anyway) and the last few are kept, so a unit split
        between two consecutive windows decodes once."""
        key = (tuple(int(v) for v in unit), tuple(ids), vectors, keyed)
        with self._lock:
            decoded = self._recent.pop(key, None)  # a Future, done or still decoding
            mine = decoded is None
            if mine:
                decoded = Future()
            self._recent[key] = decoded  # most recent last
            while len(self._recent) > RECENT_UNITS:
                self._recent.pop(next(iter(self._recent)))
        if mine:  # decode it; a reader thread that wants it meanwhile waits for this one
            try:
                decoded.set_result(self._read_unit(unit, ids, vectors=vectors, keyed=keyed))
            except BaseException as error:
                decoded.set_exception(error)
                with self._lock:
                    self._recent.pop(key, None)
                raise
        return Piece(*decoded.result(), lo, hi)

    def _read_unit(self, unit, ids: list[str], *, vectors: bool, keyed: bool):
        """-> ({key: [(first row, array)] segments of the unit's rows}, kept rows or None)."""
        shard, start, _ = (int(v) for v in unit)
        arrays: dict[str, list] = {}
        reference, keep = None, None
        filters = ["position", "token"] if self.filtered else []
        for m in self.parts:
            keys = list(dict.fromkeys([*ids, *filters])) if reference is None else []
            if len(self.parts) > 1:
                keys = list(dict.fromkeys([*keys, "doc_id", "position"]))
            table = self._table(m, unit, keys + (["vector"] if vectors else []))
            got = {k: table.column(k).to_numpy() for k in keys}
            if reference is None:
                reference = got
                if self.filtered:
                    keep = np.flatnonzero(self._keep(got["position"], got["token"]))
                arrays.update({k: [(0, got[k])] for k in ids})
            else:
                aligned(next(iter(self.parts)), m, f"shard {shard} from row {start}",
                        reference, got)
            if vectors:  # one segment per decoded chunk: never concatenated
                d, first, segments = self.parts[m].d, 0, []
                for chunk in table.column("vector").chunks:
                    segments.append((first, vector_array(chunk, d)))
                    first += len(chunk)
                arrays[m if keyed else "vector"] = segments
        return arrays, keep

    def __getstate__(self):  # to spawned workers: no lock, no cache
        state = self.__dict__.copy()
        state["_lock"], state["_recent"], state["footers"] = None, {}, {}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


class Windows:
    """Window j of a rank's sequence: which (unit, kept rows lo..hi) it holds and which
    batch indices. Finite mode batches each epoch apart (its last batch short unless
    `drop_last`); endless mode (`epochs=None`) runs the epochs together, so every batch is
    full and the windows carry over epoch boundaries."""

    def __init__(self, plan: Plan, *, seed: int, shuffle: bool, epoch: int, epochs,
                 rank: int, world: int, window_rows: int, batch_size: int, even: bool,
                 drop_last: bool):
        if len(plan.units) < world:
            raise ConfigError(f"the data has {len(plan.units)} units (row groups) but "
                              f"{world} ranks share them, so some ranks would get no rows "
                              "and wait forever. Use fewer ranks or capture more rows.")
        self.plan, self.seed, self.shuffle, self.epoch0, self.epochs = \
            plan, seed, shuffle, epoch, epochs
        self.rank, self.world, self.W, self.B = rank, world, window_rows, batch_size
        self.even, self.drop_last = even, drop_last
        self._cache: dict = {}
        self._rows: dict[int, int] = {}

    def dealt(self, epoch: int, rank: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """-> (unit indices of `rank` in epoch `epoch`, cumulative kept rows [n + 1])."""
        key = epoch if rank is None else (epoch, rank)
        if key not in self._cache:
            if len(self._cache) > 8:
                self._cache.clear()
            n = len(self.plan.units)
            order = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle \
                else np.arange(n)
            mine = order[(self.rank if rank is None else rank)::self.world]
            self._cache[key] = (mine, np.concatenate([[0], np.cumsum(self.plan.kept()[mine])]))
        return self._cache[key]

    def epoch_rows(self, epoch: int) -> int:
        """Rows of this rank's sequence in `epoch` (after `even` and `drop_last`)."""
        if epoch not in self._rows:
            if len(self._rows) > 64:
                self._rows.clear()
            self._rows[epoch] = self._epoch_rows(epoch)
        return self._rows[epoch]

    def _epoch_rows(self, epoch: int) -> int:
        rows = int(self.dealt(epoch)[1][-1])
        if self.even:
            rows = min(int(self.dealt(epoch, r)[1][-1]) for r in range(self.world))
            rows -= rows % self.B
        if self.drop_last and self.epochs is not None:
            rows -= rows % self.B
        return rows

    def batches_per_epoch(self, epoch: int) -> int:
        return -(-self.epoch_rows(epoch) // self.B)

    def __len__(self) -> int:
        if self.epochs is None:
            raise TypeError("an endless stream (epochs=None) has no length.")
        return sum(self.batches_per_epoch(e) for e in range(self.epoch0, self.epoch0 + self.epochs))

    def windows(self, first: int = 0):
        """-> iterator of (j, segments [(epoch, lo, hi)], first batch index, batches)."""
        return self._endless(first) if self.epochs is None else self._finite(first)

    def _finite(self, first: int):
        j = base = 0
        for epoch in range(self.epoch0, self.epoch0 + self.epochs):
            rows = self.epoch_rows(epoch)
            for lo in range(0, rows, self.W):
                hi = min(lo + self.W, rows)
                n = -(-(hi - lo) // self.B)
                if j >= first:
                    yield j, [(epoch, lo, hi)], base, n
                j, base = j + 1, base + n

    def _endless(self, first: int):
        per, W = self.W // self.B, self.W
        epoch, done, j = self.epoch0, 0, first  # done: rows of the epochs before `epoch`
        rows = self._rows_or_fail(epoch)
        while True:
            while j * W >= done + rows:  # the epoch that holds window j's first row
                done, epoch = done + rows, epoch + 1
                rows = self._rows_or_fail(epoch)
            segments, e, base, lo = [], epoch, done, j * W
            while lo < (j + 1) * W:  # a window longer than an epoch spans several
                r = self._rows_or_fail(e)
                hi = min((j + 1) * W, base + r)
                segments.append((e, lo - base, hi - base))
                lo, base, e = hi, base + r, e + 1
            yield j, segments, j * per, per
            j += 1

    def _rows_or_fail(self, epoch: int) -> int:
        rows = self.epoch_rows(epoch)
        if rows == 0:
            raise ConfigError(f"rank {self.rank} of {self.world} gets no rows in epoch "
                              f"{epoch} (after filters and even=True); use fewer ranks.")
        return rows

    def pieces(self, segments) -> list[tuple[np.ndarray, int, int]]:
        """The (unit, kept lo, kept hi) pieces that make up `segments`, in order."""
        found = []
        for epoch, lo, hi in segments:
            mine, ends = self.dealt(epoch)
            a = int(np.searchsorted(ends, lo, side="right")) - 1
            b = int(np.searchsorted(ends, hi, side="left"))
            for k in range(a, b):
                u_lo, u_hi = max(lo - ends[k], 0), min(hi, ends[k + 1]) - ends[k]
                if u_hi > u_lo:
                    found.append((self.plan.units[mine[k]], int(u_lo), int(u_hi)))
        return found
