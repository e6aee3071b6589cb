"""Captured rows on the host: `Captured` (one batch's kept rows per module, valid once
their copies are done), the pool of reused host buffers they live in, and the float16
range check the writer thread runs on them."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import torch

from crowstream.errors import Float16OverflowError
from crowstream.pipeline.options import FLOAT16_MAX


@dataclasses.dataclass
class Captured:
    """Kept rows of one batch on the host, valid once `wait()` returns.

    `vectors[name]` is `[N, d]` in the stored dtype, or in the model's bf16/fp16 when
    float32 is stored (upcast by `rows` on the writer thread: half the device memory and
    copy bytes). `peaks[name]` is the largest finite-or-infinite magnitude before a float16
    cast, NaN ignored (see `check_float16`); `clamped[name]` counts values clamped to
    float16's range.
    """

    vectors: dict[str, torch.Tensor]
    ready: tuple = ()  # CUDA events, one per device the copies came from
    peaks: dict = dataclasses.field(default_factory=dict)
    clamped: dict = dataclasses.field(default_factory=dict)
    buffers: dict = dataclasses.field(default_factory=dict)  # pooled buffers to give back
    pool: HostPool | None = None

    def wait(self) -> None:
        for event in self.ready:
            event.synchronize()

    def rows(self, name: str, dtype: torch.dtype) -> np.ndarray:
        """[N, d] as stored (on the host, in `dtype`)."""
        vectors = self.vectors[name]
        return vectors.to(dtype).numpy() if vectors.dtype != dtype else vectors.numpy()

    def clamped_count(self, name: str) -> int:
        count = self.clamped.get(name)
        return 0 if count is None else int(count)

    def release(self, name: str) -> None:
        """Done with `name`'s rows: they are dropped (whoever still holds this object), and
        their pooled buffer goes back to the pool."""
        self.vectors.pop(name, None)
        buffer = self.buffers.pop(name, None)
        if buffer is not None and self.pool is not None:
            self.pool.give(buffer)


def check_float16(name: str, peak) -> None:
    """Raise Float16OverflowError if `peak` (the largest magnitude of rows about to be cast
    to float16, NaN ignored) is beyond float16's range. NaN is not an overflow: it is
    stored as NaN and counted as non-finite, as with float32."""
    if peak is not None and float(peak) > FLOAT16_MAX:
        raise Float16OverflowError(
            f"module {name!r} has values of magnitude up to {float(peak):.6g}, beyond "
            f"float16's range (±{FLOAT16_MAX:g}), so they cannot be stored as float16. "
            "Store float32 instead (dtype='float32' / --dtype float32, in a new OUT or with "
            "--overwrite), or clamp them (float16_overflow='clamp' / --float16-overflow "
            "clamp, which --resume accepts).")


class HostPool:
    """Host buffers reused from batch to batch: page-locked behind a CUDA device, so
    device-to-host copies are asynchronous without a page-locked allocation per batch;
    ordinary memory on the CPU, where a fresh [N, d] tensor per batch costs more in page
    faults and zeroing than the copy itself (0.7 CPU-s per GB, measured). A request takes the smallest
    free buffer of at least its size and at most 1.25x it, or allocates one rounded up by
    at most 1/8; buffers given back are kept while the free ones total under `capacity`."""

    def __init__(self, capacity: int, allocate=None):
        self.capacity = capacity
        self._allocate = allocate or _pinned_bytes
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    @classmethod
    def for_device(cls, capacity: int, cuda: bool) -> HostPool:
        return cls(capacity, None if cuda else _host_bytes)

    def take(self, shape, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (a view of `shape` and `dtype`, the buffer to `give` back later)."""
        nbytes = int(np.prod(shape)) * dtype.itemsize
        with self._lock:
            fits = [b for b in self._free if nbytes <= b.numel() <= nbytes * 1.25 + (1 << 16)]
            buffer = min(fits, key=torch.Tensor.numel) if fits else None
            if buffer is not None:
                self._free = [b for b in self._free if b is not buffer]
        if buffer is None:
            buffer = self._allocate(_size_class(nbytes))
        return buffer[:nbytes].view(dtype).view(shape), buffer

    def give(self, buffer: torch.Tensor) -> None:
        with self._lock:
            if sum(b.numel() for b in self._free) + buffer.numel() <= self.capacity:
                self._free.append(buffer)


def _pinned_bytes(n: int) -> torch.Tensor:
    return torch.empty(n, dtype=torch.uint8, pin_memory=True)


def _host_bytes(n: int) -> torch.Tensor:
    return torch.empty(n, dtype=torch.uint8)


def _size_class(nbytes: int) -> int:
    """`nbytes` rounded up by at most 1/8 (eight size classes per power of two)."""
    nbytes = max(nbytes, 1 << 16)
    step = 1 << max(0, nbytes.bit_length() - 4)
    return -(-nbytes // step) * step


@dataclasses.dataclass
class Rows:
    """Kept rows and the pooled host buffer under them (None: a fresh tensor)."""

    tensor: torch.Tensor
    buffer: torch.Tensor | None = None


def on_cpu(tensors: dict) -> dict:
    """`tensors` with each one not on the CPU copied there (`.numpy()` needs host memory)."""
    return {name: t if t.device.type == "cpu" else t.cpu() for name, t in tensors.items()}


def to_host(scalars: dict) -> dict:
    """0-d device tensors -> pinned host copies, without waiting for them."""
    host = {}
    for name, value in scalars.items():
        host[name] = torch.empty((), dtype=value.dtype, pin_memory=True)
        host[name].copy_(value, non_blocking=True)
    return host
