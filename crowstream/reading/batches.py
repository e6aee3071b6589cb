"""Batch buffers of a training stream. It owns the one copy a row makes on its way to the
user: `gather` takes a batch's rows from the decoded row groups (the `Piece`s of a window,
where pyarrow's decode left them: no filter copy, no concatenation) straight into a batch
buffer, with normalisation and dtype conversion fused there, a cache-sized block at a time;
`Buffers` hands out those buffers (recycled once nothing refers to them, pinned when the
batches go to a CUDA device), and `Normalizer` holds the per-module shift and scale.
"""

from __future__ import annotations

import sys

import numpy as np

ID_COLUMNS = ("doc_id", "position", "token")
# Rows per fused step (take, then convert and normalise while they are in cache): about
# this many bytes of float32.
BLOCK_BYTES = 1 << 20
ALIGN = 4096  # batch buffers start on a page, as pyarrow's buffers do (64-byte aligned)


def gather(pieces: list, offsets: np.ndarray, index: np.ndarray, buffers, fill) -> dict:
    """Rows `index` (into the concatenation of `pieces`) -> {key: [len(index), ...] tensor}
    from `buffers(key, shape, stored dtype)`, filled run by run by `fill(key, segment,
    rows, out)`. A run is a stretch of the batch whose rows all come from one segment of
    every key, so each run is one `np.take` per key straight into the batch buffer; the
    batch's rows are grouped by run (a training step, a mean over the batch, does not
    see the order inside it)."""
    runs = _runs(pieces, offsets, index)
    result = {}
    for key, segments in pieces[0].arrays.items():
        first = segments[0][1]
        out = buffers(key, (len(index), *first.shape[1:]), first.dtype)
        for piece, rows, a, b, which in runs:
            start, source = piece.arrays[key][which.get(key, 0)]
            fill(key, source, rows - start, out[a:b])
        result[key] = out
    return result


def _runs(pieces: list, offsets: np.ndarray, index: np.ndarray) -> list:
    """-> [(piece, rows of its decoded unit, batch rows a..b, {key: segment})]."""
    piece = np.searchsorted(offsets, index, side="right") - 1
    order = np.argsort(piece, kind="stable")
    index, piece = index[order], piece[order]
    cuts = np.flatnonzero(np.diff(piece)) + 1
    runs = []
    for a, b in zip([0, *cuts.tolist()], [*cuts.tolist(), len(index)]):
        p = pieces[int(piece[a])]
        rows = p.source(index[a:b] - offsets[int(piece[a])])
        split = {k: np.array([s for s, _ in v[1:]]) for k, v in p.arrays.items() if len(v) > 1}
        if not split:
            runs.append((p, rows, a, b, {}))
            continue
        # a key decoded in several segments: group the rows by segment of every key
        seg = {k: np.searchsorted(starts, rows, side="right") for k, starts in split.items()}
        code = np.zeros(len(rows), dtype=np.int64)
        for k, s in seg.items():
            code = code * (len(split[k]) + 1) + s
        inner = np.argsort(code, kind="stable")
        rows, code = rows[inner], code[inner]
        edges = [0, *(np.flatnonzero(np.diff(code)) + 1).tolist(), len(rows)]
        for x, y in zip(edges[:-1], edges[1:]):
            runs.append((p, rows[x:y], a + x, a + y,
                         {k: int(s[inner[x]]) for k, s in seg.items()}))
    return runs


def rows_view(a: np.ndarray) -> np.ndarray:
    """[n, ...] C-contiguous -> [n] of opaque row-sized items: numpy moves whole rows per
    index then (gather of 3 KB rows measured 2-3x faster than plain fancy indexing)."""
    if a.ndim == 1:
        return a
    a = np.ascontiguousarray(a)
    return a.view(np.dtype((np.void, a.itemsize * a[0].size))).reshape(len(a))


class Normalizer:
    """Fills batch buffers: `(x - shift) * scale` per module (`norm`: {key: (scale,
    shift or None)} float32 tensors; keys without an entry are copied as stored) and the
    conversion to the buffer's dtype, fused with the take a block at a time."""

    def __init__(self, norm: dict):
        self.norm = norm
        self._scratch: dict = {}

    def __call__(self, key: str, source: np.ndarray, rows: np.ndarray, out) -> None:

        if key in ID_COLUMNS:  # [n] ints, stored int32/int64, handed out as int64
            out.numpy()[:] = np.take(source, rows, mode="clip")
            return
        norm = self.norm.get(key)
        direct = out.dtype == torch_of(source.dtype)
        if norm is None and direct:
            np.take(rows_view(source), rows, out=rows_view(out.numpy()), mode="clip")
            return
        step = max(1, BLOCK_BYTES // (4 * max(1, source[0].size)))
        for s in range(0, len(rows), step):
            self._block(key, source, rows[s:s + step], out[s:s + step], norm, direct)

    def _block(self, key, source, rows, out, norm, direct: bool) -> None:
        import torch

        if direct and out.dtype == torch.float32:  # take into the buffer, scale in place
            np.take(rows_view(source), rows, out=rows_view(out.numpy()), mode="clip")
            _normalise(out, norm)
            return
        taken = self._space(("take", key), (len(rows), *source.shape[1:]), source.dtype)
        np.take(rows_view(source), rows, out=rows_view(taken), mode="clip")
        taken = torch.from_numpy(taken)
        if norm is None:
            out.copy_(taken)
            return
        work = torch.from_numpy(self._space(("work", key), tuple(taken.shape), np.float32))
        work.copy_(taken)
        _normalise(work, norm)
        out.copy_(work)

    def _space(self, key, shape: tuple, dtype) -> np.ndarray:
        """A reused scratch block (at most one block of rows)."""
        held = self._scratch.get(key)
        if held is None or held.shape[0] < shape[0]:
            held = self._scratch[key] = aligned_empty(shape, dtype)
        return held[:shape[0]]


def _normalise(x, norm) -> None:
    scale, shift = norm
    if shift is not None:
        x.sub_(shift)
    x.mul_(scale)


class Buffers:
    """Batch buffers ([n, ...] torch tensors of the dtype handed out). Not pinned: numpy
    allocations (Linux backs large ones with transparent huge pages; torch's 4 KiB pages
    cost 13 µs/row of page faults at d = 4,096 against 2.3 µs/row for the gather alone),
    reused once nothing but this list refers to one (a tensor handed out, and every view
    of it, keeps its numpy array alive). Pinned (batches for a CUDA device): `pin(shape,
    dtype)`, by default torch's pinned allocator, which caches and recycles them once
    their copy to the device is done."""

    KEEP = 8  # buffers tracked per stream

    def __init__(self, dtypes: dict, pin=None):
        self.dtypes, self.pin, self.held = dtypes, pin, []

    def __call__(self, key: str, shape: tuple, stored):
        import torch

        want = torch.int64 if key in ID_COLUMNS else (self.dtypes.get(key) or torch_of(stored))
        if self.pin is not None:
            return self.pin(shape, want)
        size = torch.empty(0, dtype=want).element_size()
        ints = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}[size]
        for array in self.held:
            # 3 references: this list, the loop variable and getrefcount's argument (a
            # tensor handed out, and every view of it, holds one more)
            if array.shape == shape and array.dtype == ints and sys.getrefcount(array) == 3:
                return torch.from_numpy(array).view(want)
        array = aligned_empty(shape, ints)
        if len(self.held) >= self.KEEP:
            self.held.pop(0)
        self.held.append(array)
        return torch.from_numpy(array).view(want)


def aligned_empty(shape: tuple, dtype) -> np.ndarray:
    """np.empty on a 4 KiB boundary (its `base` owns the memory). numpy's large arrays
    start 16 bytes into a page (malloc's header), so a row copy from pyarrow's 64-byte
    aligned buffers is misaligned: measured 10 µs/row at d = 4,096 against 3 aligned."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + ALIGN, np.uint8)
    skip = -raw.ctypes.data % ALIGN
    return raw[skip:skip + nbytes].view(dtype).reshape(shape)


def torch_of(dtype):
    """The torch dtype of a numpy dtype."""
    import torch

    return {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16,
            np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32}[np.dtype(dtype)]


def pinned(shape: tuple, dtype):
    import torch

    return torch.empty(shape, dtype=dtype, pin_memory=True)
