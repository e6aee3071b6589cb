"""The shuffle of a training stream. It owns reading a rank's windows (units read ahead on
background threads), permuting each window and cutting it into batches (gathered straight
from the decoded row groups into batch buffers by `batches.gather`: the one copy), the
`Consumed` set of batch numbers a resume skips, and the small argument helpers of
`loader.py`.
"""

from __future__ import annotations

import collections
import difflib
import itertools
import math
import os
import re
import warnings

import numpy as np

from crowstream.checks import check_positive
from crowstream.errors import ConfigError
from crowstream.format.layout import is_glob, match_modules
from crowstream.pipeline.threads import usable_cpus
from crowstream.reading.batches import ID_COLUMNS, gather

NORMALIZE = ("mean_norm", "standardize")  # what Stream(normalize=) accepts

# Units read ahead of the consumer beyond one per reader thread, so none of them idles.
READ_AHEAD_UNITS = 2
# Warn when a stream's pool (a window being emitted, the next being read) would take more
# than this fraction of the machine's memory.
POOL_RAM_FRACTION = 0.25


class Consumed:
    """Batch numbers taken from one iteration: all below `below`, and those in `extra`."""

    def __init__(self, below: int = 0, extra=()):
        self.below, self.extra = int(below), set(int(g) for g in extra)
        self._settle()

    def add(self, index: int) -> None:
        if index >= self.below:
            self.extra.add(index)
            self._settle()

    def _settle(self) -> None:
        while self.below in self.extra:
            self.extra.remove(self.below)
            self.below += 1

    def __contains__(self, index: int) -> bool:
        return index < self.below or index in self.extra

    def covers(self, base: int, n: int) -> bool:
        return base + n <= self.below or all(base + k in self for k in range(n))


def batches_of_role(windows, role: int, workers: int, skip: Consumed):
    """The batch numbers worker role `role` of `workers` yields, in order, skipping `skip`."""
    for j, _, base, n in windows.windows(_first_window(windows, role, workers, skip)):
        if j % workers == role:
            yield from (base + k for k in range(n) if base + k not in skip)


def _first_window(windows, role: int, workers: int, skip: Consumed) -> int:
    """Endless streams: start at the first window not wholly below `skip.below`."""
    if windows.epochs is not None:
        return 0
    j = skip.below // (windows.W // windows.B)
    return j + (role - j) % workers


def window_batches(windows, read, role: int, workers: int, skip: Consumed, seed: int,
                   rank: int, threads: int, buffers, fill):
    """-> iterator of (batch number, {key: tensor}) of worker role `role`: its windows
    (j mod workers == role) not wholly in `skip`, read `threads` units ahead, each
    permuted by (seed, start epoch, rank, j), the batches in `skip` left out; each batch
    gathered straight from the decoded units into `buffers` by `fill` (batches.gather)."""
    todo = ((j, segments, base, n) for j, segments, base, n
            in windows.windows(_first_window(windows, role, workers, skip))
            if j % workers == role and not skip.covers(base, n))
    items = ((window, piece) for window in todo for piece in _with_count(windows, window))
    chunks = _read_ahead(lambda item: (item, read(item[1][0])), items, threads)
    try:
        current, held = None, []
        for (window, (_, count)), chunk in chunks:
            if current is not window:
                current, held = window, []
            held.append(chunk)
            if len(held) == count:
                yield from _window_batches(window, held, windows, skip, seed, rank, buffers,
                                              fill)
    finally:
        chunks.close()


def _with_count(windows, window):
    pieces = windows.pieces(window[1])
    return [(piece, len(pieces)) for piece in pieces]


def _window_batches(window, pieces: list, windows, skip: Consumed, seed: int, rank: int,
                    buffers, fill):
    j, _, base, n = window
    sizes = [len(p) for p in pieces]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    total = int(offsets[-1])
    order = np.random.default_rng([seed, windows.epoch0, rank, j]).permutation(total) \
        if windows.shuffle else np.arange(total)
    for k in range(n):
        if base + k in skip:
            continue
        yield base + k, gather(pieces, offsets, order[k * windows.B:(k + 1) * windows.B],
                               buffers, fill)


def row_bytes(parts: dict, columns) -> int:
    """Bytes of one row as a stream holds it (vectors of every module + id columns)."""
    vectors = sum(f.d * np.dtype(f.dtype).itemsize for f in parts.values()) \
        if "vector" in columns else 0
    return vectors + 8 * len([c for c in columns if c in ID_COLUMNS]) + 8


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


def worker_share(batches: int, totals: list) -> tuple[list[int], int]:
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


def resolve(catalog, modules) -> tuple[bool, dict]:
    """-> (keyed by module?, {module: catalog.ModuleFiles}). A str without glob characters is one
    module (batches carry "vector"); a list or a glob gives batches keyed by module."""
    keyed = not isinstance(modules, str) or is_glob(modules)
    patterns = [modules] if isinstance(modules, str) else list(modules)
    if not patterns:
        raise ConfigError("no modules given; name at least one (`crowstream info OUT` lists them).")
    chosen: list[str] = []
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ConfigError(f"module names must be strings, got {pattern!r}.")
        matches = match_modules(pattern, catalog.modules)
        if not matches:
            close = difflib.get_close_matches(pattern, list(catalog.modules), n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
            raise ConfigError(f"{catalog.shown!r} has no module {pattern!r}; {hint}it has "
                              f"{', '.join(map(repr, catalog.modules))}.")
        chosen += [m for m in matches if m not in chosen]
    return keyed, {m: catalog.module(m) for m in chosen}


def check_columns(columns) -> tuple[str, ...]:
    columns = (columns,) if isinstance(columns, str) else tuple(columns)
    unknown = [c for c in columns if c not in (*ID_COLUMNS, "vector")]
    if unknown or not columns:
        raise ConfigError(f"columns must be some of 'doc_id', 'position', 'token', 'vector'; "
                          f"got {columns!r}.")
    return columns


def ddp(rank, world_size) -> tuple[int, int]:
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


def default_read_threads(remote: bool) -> int:
    """Reader threads when not given: 4 for a bucket (its reads wait on the network);
    locally half the CPUs this process may use, 1 to 4, leaving the rest to the gather and
    the training step. Each decode is CPU-bound: on 2 CPUs at d = 768 float32, 2 readers
    delivered 1.2-1.3x the rows/s of 1 at 1.4-1.5x a plain read's CPU per row, 1 reader
    0.9x a plain read's rows/s at 1.26-1.28x its CPU (4 readers: 1.4x the CPU of 1 or 2)."""
    return 4 if remote else min(4, max(1, usable_cpus() // 2))


def torch_dtype(dtype):
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype), None) if re.fullmatch(r"[a-z0-9]+", str(dtype)) else None
    if not isinstance(value, torch.dtype):
        raise ConfigError(f"dtype must be a torch dtype or its name (e.g. 'float16'), "
                          f"got {dtype!r}.")
    return value


def warn_if_large(nbytes: int) -> None:
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if nbytes > POOL_RAM_FRACTION * ram:
        warnings.warn(f"the shuffle pool takes about {nbytes / 2**30:.1f} GiB per process "
                      f"(a window and the next), over {POOL_RAM_FRACTION:.0%} of this machine's "
                      f"{ram / 2**30:.0f} GiB; DataLoader workers each hold one. Pass a smaller "
                      "shuffle_buffer_bytes.", ResourceWarning, stacklevel=4)


def check_arguments(batch_size, shuffle_buffer, shuffle_buffer_bytes, seed, epochs,
                     normalize, read_threads, min_position, exclude_tokens) -> None:
    check_positive("batch_size", batch_size, allow_none=False)
    check_positive("read_threads", read_threads)
    check_positive("epochs", epochs)
    check_positive("shuffle_buffer_bytes", shuffle_buffer_bytes)
    if isinstance(shuffle_buffer, bool) or not isinstance(shuffle_buffer, int) \
            or shuffle_buffer < 0:
        raise ConfigError(f"shuffle_buffer must be a number of rows (0 for no shuffling), "
                          f"got {shuffle_buffer!r}.")
    if shuffle_buffer and shuffle_buffer_bytes is not None:
        raise ConfigError("pass shuffle_buffer (rows) or shuffle_buffer_bytes, not both.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}.")
    if normalize is not None and normalize not in NORMALIZE:
        raise ConfigError(f"normalize must be None, 'mean_norm' or 'standardize'; "
                          f"got {normalize!r}.")
    if isinstance(min_position, bool) or not isinstance(min_position, int) or min_position < 0:
        raise ConfigError(f"min_position must be a non-negative integer, got {min_position!r}.")
    if isinstance(exclude_tokens, (str, bytes)) or not all(
            isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in exclude_tokens):
        raise ConfigError(f"exclude_tokens must be a list of token ids, got {exclude_tokens!r}.")
