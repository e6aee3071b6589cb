"""The training loader's one copy (#18): every batch is gathered straight from the arrays
pyarrow decoded into the buffer the user receives (filters and multi-segment units
included), normalisation and dtype conversion fused there, buffers recycled only when
nothing refers to them, and the CUDA path (pinned buffers, the host-to-device copy issued
on the loader's thread one batch ahead) run on CPU with the pinning and the copy injected."""

from __future__ import annotations

import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import crowstream as cs
from helpers import benchmark
from crowstream.reading import batches as batches_module
from crowstream.reading import loader as loader_module
from crowstream.reading import units as units_module
from crowstream.reading.catalog import Catalog

DOC = 10
bench = benchmark("loader")  # benchmarks/loader.py: write_synthetic


@pytest.fixture(scope="module")
def units12(tmp_path_factory):
    """12 units of 250 rows (4 shards, parts rolled every 250 rows), d = 32."""
    out = str(tmp_path_factory.mktemp("copies") / "twelve")
    bench.write_synthetic(out, rows=3000, d=32, files=4, part_rows=250, doc_tokens=DOC)
    return out


@pytest.fixture(scope="module")
def rolled(tmp_path_factory):
    """'narrow' rolls a part every 700 rows, 'wide' every 300: a wide unit spans two
    narrow part files (two decoded segments) now and then."""
    out = str(tmp_path_factory.mktemp("copies") / "rolled")
    bench.write_synthetic(out, rows=3000, d={"narrow": 4, "wide": 64}, files=3,
                          modules=("narrow", "wide"), part_rows={"narrow": 700, "wide": 300},
                          doc_tokens=DOC)
    return out


def stored(out, module="synthetic"):
    """{row key: vector} of every stored row, read with plain pyarrow."""
    table = pq.read_table(list(Catalog(out).module(module).paths))
    keys = table["doc_id"].to_numpy() * DOC + table["position"].to_numpy()
    return keys, np.stack(table["vector"].to_numpy(zero_copy_only=False))


def keys_of(batch):
    return batch["doc_id"].numpy() * DOC + batch["position"].numpy()


class CopyLog:
    """Records the arrays the decode produced and every fill (the one copy): its source
    and the batch memory it wrote."""

    def __init__(self, monkeypatch):
        self.decoded, self.fills = [], []
        decode, fill = units_module.vector_array, batches_module.Normalizer.__call__

        def vector_array(column, d, dtype=None):
            found = decode(column, d, dtype)
            self.decoded.append(found)
            return found

        def record(normalizer, key, source, rows, out):
            self.fills.append((key, source, out.data_ptr(), out.numel() * out.element_size()))
            fill(normalizer, key, source, rows, out)
            self.scratch += [(a.ctypes.data, a.nbytes) for a in normalizer._scratch.values()]

        def take(a, indices, *args, out=None, **kwargs):
            self.takes.append((a.ctypes.data, a.nbytes, None if out is None else
                               (out.ctypes.data, out.nbytes)))
            return np.take(a, indices, *args, out=out, **kwargs)

        self.takes, self.scratch = [], []
        monkeypatch.setattr(units_module, "vector_array", vector_array)
        monkeypatch.setattr(batches_module.Normalizer, "__call__", record)
        monkeypatch.setattr(batches_module, "np", _Numpy(take))

    def check(self, got: list[dict], vector_keys) -> None:
        """Every vector fill read a decoded array itself (not a filtered or concatenated
        copy) and wrote into a batch tensor the user received (no copy after it)."""
        spans = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())
                 for b in got for k, t in b.items() if k in vector_keys]
        decoded = {a.ctypes.data: a for a in self.decoded}
        vector_fills = [f for f in self.fills if f[0] in vector_keys]
        assert vector_fills
        for key, source, ptr, size in vector_fills:
            assert decoded.get(source.ctypes.data) is not None
            assert source.shape == decoded[source.ctypes.data].shape  # the whole decode
            assert any(lo <= ptr and ptr + size <= hi for lo, hi in spans)
        # inside the fill: every take of vector rows reads decoded memory and writes the
        # batch (or a one-block scratch for a dtype conversion, never a whole batch)
        within = lambda p, n, found: any(a <= p and p + n <= a + m for a, m in found)  # noqa: E731
        memory = [(a.ctypes.data, a.nbytes) for a in self.decoded]
        targets = [(lo, hi - lo) for lo, hi in spans] + self.scratch
        rows = [t for t in self.takes if t[1] > 8 * 1024 and t[2] is not None]
        assert rows
        for source, nbytes, (out, size) in rows:
            if within(source, 1, memory):
                assert within(out, size, targets)
            else:  # scratch -> nothing: a take reads only decoded units (or ids)
                raise AssertionError("a take read rows that were not decoded by pyarrow")


class _Numpy:
    """numpy as `batches` sees it, with `take` recorded."""

    def __init__(self, take):
        self.take = take

    def __getattr__(self, name):
        return getattr(np, name)


def test_filters_gather_once_from_the_decoded_rows(units12, monkeypatch):
    keys, vectors = stored(units12)
    log = CopyLog(monkeypatch)
    stream = cs.stream(units12, "synthetic", batch_size=128, shuffle_buffer=512,
                       min_position=1, exclude_tokens=[7919 * 3 % 50_000],
                       columns=("vector", "doc_id", "position"))
    got = list(stream)
    log.check(got, {"vector"})
    found = np.concatenate([keys_of(b) for b in got])
    want = keys[(keys % DOC >= 1) & (keys != 3)]
    assert np.array_equal(np.sort(found), np.sort(want))
    by_key = dict(zip(keys.tolist(), range(len(keys))))
    for b in got:
        rows = [by_key[k] for k in keys_of(b).tolist()]
        assert np.array_equal(b["vector"].numpy(), vectors[rows])


def test_kept_rows_are_counted_once_before_workers(units12, monkeypatch):
    stream = cs.stream(units12, "synthetic", batch_size=100, min_position=1)
    assert stream._plan._kept is not None  # pickled into workers with the plan
    scans = []
    monkeypatch.setattr(units_module.Plan, "_count_kept",
                        lambda self: scans.append(1) or np.zeros(0))
    assert len(stream) == 3000 * 9 // 10 // 100 and not scans
    assert int(stream._plan.kept().sum()) == 2700


def test_segments_of_rolled_parts_are_gathered_without_concatenation(rolled, monkeypatch):
    log = CopyLog(monkeypatch)
    got = list(cs.stream(rolled, ["narrow", "wide"], batch_size=256, shuffle_buffer=600,
                         columns=("vector", "doc_id", "position")))
    log.check(got, {"narrow", "wide"})
    assert any(len(s) < 300 for s in log.decoded if s.shape[1] == 4)  # split units ran
    for module in ("narrow", "wide"):
        keys, vectors = stored(rolled, module)
        by_key = dict(zip(keys.tolist(), range(len(keys))))
        for b in got:
            rows = [by_key[k] for k in keys_of(b).tolist()]
            assert np.array_equal(b[module].numpy(), vectors[rows])
    assert sum(len(b["wide"]) for b in got) == 3000


@pytest.mark.parametrize("stored_dtype", ["float32", "float16"])
@pytest.mark.parametrize("want", [None, torch.float32, torch.bfloat16])
def test_normalisation_and_dtype_fused_in_the_gather(tmp_path, stored_dtype, want):
    out = str(tmp_path / "norm")
    bench.write_synthetic(out, rows=600, d=1000, files=2, dtype=stored_dtype, doc_tokens=DOC)
    _, vectors = stored(out)
    x = torch.from_numpy(vectors).float()
    stats = cs.stats(out, "synthetic")
    shift = stats["mean"].float()
    scale = (stats["var"] + loader_module.STANDARDIZE_EPS).rsqrt().float()
    reference = ((x - shift) * scale).to(want or getattr(torch, stored_dtype))
    got = list(cs.stream(out, "synthetic", batch_size=200, normalize="standardize",
                         dtype=want, columns=("vector", "doc_id", "position")))
    order = np.concatenate([keys_of(b) for b in got])
    result = torch.cat([b["vector"] for b in got])
    assert result.dtype == reference.dtype
    keys, _ = stored(out)
    rows = [dict(zip(keys.tolist(), range(len(keys))))[k] for k in order.tolist()]
    torch.testing.assert_close(result.float(), reference[rows].float(), rtol=0, atol=0)
    assert all(b["vector"].data_ptr() % batches_module.ALIGN == 0 for b in got)


def test_a_held_batch_is_never_overwritten(units12):
    stream = cs.stream(units12, "synthetic", batch_size=100, shuffle_buffer=300, epochs=3)
    held, copies = [], []
    for i, batch in enumerate(stream):
        if i % 7 == 0:
            view = batch["vector"][5:9]  # a view keeps the buffer, the batch dict is dropped
            held.append(view)
            copies.append(view.clone())
    assert len(held) > 3
    for view, copy in zip(held, copies):
        assert torch.equal(view, copy)


def test_buffers_are_recycled_once_free():
    buffers = batches_module.Buffers({"vector": None})
    first = buffers("vector", (64, 32), np.float32)
    pointer = first.data_ptr()
    second = buffers("vector", (64, 32), np.float32)
    assert second.data_ptr() != pointer  # `first` is alive
    del first
    assert buffers("vector", (64, 32), np.float32).data_ptr() == pointer


def test_cuda_path_pins_and_copies_one_batch_ahead(units12, monkeypatch):
    """CI has no GPU: the pinned allocator and the host-to-device copy are injected; the
    code path (which buffers, which thread, non_blocking, how far ahead) is the real one."""
    pinned, copies, lock = [], [], threading.Lock()

    def pin(shape, dtype):
        tensor = torch.empty(shape, dtype=dtype)
        pinned.append(tensor.data_ptr())
        return tensor

    def to_device(tensor, device, non_blocking):
        with lock:
            copies.append((tensor.data_ptr(), str(device), non_blocking,
                           threading.current_thread().name))
        return tensor.clone()  # "on the device": a copy the stream no longer owns

    monkeypatch.setattr(loader_module, "to_device", to_device)
    stream = cs.stream(units12, "synthetic", batch_size=100, shuffle_buffer=300,
                       device="cuda", dtype=torch.bfloat16, normalize="mean_norm",
                       columns=("vector", "token"))
    monkeypatch.setattr(stream, "_pin", pin)
    n = 0
    for batch in stream:
        n += 1
        deadline = time.monotonic() + 5
        while n < len(stream) and len(copies) < 2 * (n + 1) and time.monotonic() < deadline:
            time.sleep(0.005)  # the next batch's copy is issued while this one is used
        assert n == len(stream) or len(copies) >= 2 * (n + 1)
        assert batch["vector"].dtype == torch.bfloat16
    assert n == len(stream) == 30
    assert {c[0] for c in copies} <= set(pinned)  # every copy from a pinned buffer
    assert all(c[1] == "cuda" and c[2] for c in copies)  # non_blocking
    assert {c[3] for c in copies} == {"crowstream-shuffle"}  # not the training thread


@pytest.mark.parametrize("read_threads", [1, 2, 4])
def test_each_unit_decodes_once_per_epoch_whatever_the_reader_threads(units12, monkeypatch,
                                                                      read_threads):
    """A unit split between two windows is read as two pieces, side by side on two reader
    threads; the second waits for the first's decode instead of decoding it again. The
    decode is slowed so the two pieces always overlap."""
    decoded, read_unit = [], units_module.Plan._read_unit

    def slow(plan, unit, *args, **kwargs):
        decoded.append(tuple(int(v) for v in unit))
        time.sleep(0.02)
        return read_unit(plan, unit, *args, **kwargs)

    monkeypatch.setattr(units_module.Plan, "_read_unit", slow)
    stream = cs.stream(units12, "synthetic", batch_size=100, shuffle_buffer=400,
                       read_threads=read_threads)  # 400-row windows split 250-row units
    rows = sum(len(b["vector"]) for b in stream)
    assert rows == 3000
    assert len(decoded) == len(set(decoded)) == 12


def test_a_failed_decode_reaches_every_reader_waiting_for_it(units12, monkeypatch):
    def broken(plan, unit, *args, **kwargs):
        time.sleep(0.02)
        raise OSError("disk gone")

    monkeypatch.setattr(units_module.Plan, "_read_unit", broken)
    plan = cs.stream(units12, "synthetic", batch_size=100)._plan
    unit = plan.units[0]
    errors = []

    def piece(lo, hi):
        try:
            plan.read(unit, lo, hi, [], vectors=True, keyed=False)
        except OSError as error:
            errors.append(str(error))

    threads = [threading.Thread(target=piece, args=span) for span in ((0, 100), (100, 250))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == ["disk gone", "disk gone"]
    assert not plan._recent  # a later read tries again
