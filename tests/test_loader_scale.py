"""The training loader at real scale (#18): no hangs when units are scarce, rolled parts of
different widths pair, lazy rank resolution, a resume state that pins the data, epoch and
resume point reaching persistent workers, in_order=False, full batches, lengths, even
ranks, read-time filters, statistics of the filtered rows, dtype kept. Tiny synthetic
outputs (benchmarks/loader.py's `write_synthetic`); each test names what broke before."""

from __future__ import annotations

import contextlib
import signal

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import crowstream as cs
from helpers import benchmark
from crowstream.errors import ConfigError
from crowstream.reading.catalog import Catalog
from crowstream.reading.loader import without_position0

DOC = 10
# 3 workers on this 2-core machine: torch warns, and warnings are errors in the tests
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")
bench = benchmark("loader")  # benchmarks/loader.py: write_synthetic


@pytest.fixture(scope="module")
def two_units(tmp_path_factory):
    """2 shards of 1,000 rows, one row group each: 2 units (the demo's shape)."""
    out = str(tmp_path_factory.mktemp("scale") / "two")
    bench.write_synthetic(out, rows=2000, d=8, files=2, doc_tokens=DOC)
    return out


@pytest.fixture(scope="module")
def rolled(tmp_path_factory):
    """3 shards; 'narrow' rolls a part every 700 rows, 'wide' every 300: different files."""
    out = str(tmp_path_factory.mktemp("scale") / "rolled")
    bench.write_synthetic(out, rows=3000, d={"narrow": 4, "wide": 64}, files=3,
                          modules=("narrow", "wide"), part_rows={"narrow": 700, "wide": 300},
                          doc_tokens=DOC)
    return out


@pytest.fixture(scope="module")
def units12(tmp_path_factory):
    """12 units of 250 rows (4 shards, parts rolled every 250 rows), 300 documents."""
    out = str(tmp_path_factory.mktemp("scale") / "twelve")
    bench.write_synthetic(out, rows=3000, d=8, files=4, part_rows=250, doc_tokens=DOC)
    return out


@contextlib.contextmanager
def within(seconds: int):
    """Fail instead of hanging."""
    def alarm(*_):
        raise TimeoutError(f"no answer within {seconds} s: the stream hangs")
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def keys(batches) -> np.ndarray:
    return np.concatenate([(b["doc_id"] * DOC + b["position"]).numpy() for b in batches])


def ids(out, **options):
    return cs.stream(out, "synthetic", columns=("doc_id", "position"), **options)


# -- no hangs --------------------------------------------------------------------------

def test_more_ranks_than_units_is_an_error_not_a_hang(two_units):
    with within(20), pytest.raises(ConfigError, match="2 units .* but 3 ranks"):
        next(iter(ids(two_units, epochs=None, rank=0, world_size=3, batch_size=100)))


def test_more_workers_than_units_endless_gives_full_batches(two_units):
    stream = ids(two_units, epochs=None, batch_size=100, shuffle_buffer=300)
    with within(60):
        got = [b for _, b in zip(range(30), DataLoader(stream, batch_size=None,
                                                         num_workers=3))]
    assert all(len(b["doc_id"]) == 100 for b in got)
    assert len(np.unique(keys(got))) > 1500


# -- pairing ---------------------------------------------------------------------------

def test_rolled_parts_of_different_widths_pair(rolled):
    files = Catalog(rolled).module("narrow"), Catalog(rolled).module("wide")
    assert len(files[0].paths) != len(files[1].paths)  # the case that raised before
    got = list(cs.stream(rolled, ["narrow", "wide"], batch_size=128, shuffle_buffer=512,
                         columns=("doc_id", "position", "vector")))
    k = keys(got)
    assert np.array_equal(np.sort(k), np.arange(3000))
    import pyarrow.parquet as pq
    for module, f in zip(("narrow", "wide"), files):
        table = pq.read_table(list(f.paths))
        truth = np.stack(table["vector"].to_numpy(zero_copy_only=False))
        order = (table["doc_id"].to_numpy() * DOC + table["position"].to_numpy())
        want = truth[np.argsort(order)][k]
        np.testing.assert_array_equal(torch.cat([b[module] for b in got]).numpy(), want)


# -- ranks, resume identity --------------------------------------------------------------

def test_rank_is_resolved_when_the_stream_is_used(units12, monkeypatch):
    stream = ids(units12, batch_size=100, shuffle_buffer=500)  # before init_process_group
    import torch.distributed as dist
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    want = keys(ids(units12, batch_size=100, shuffle_buffer=500, rank=1, world_size=2))
    assert np.array_equal(keys(stream), want)
    assert stream.state_dict(batches=0)["world_size"] == 2


def test_resume_state_refuses_other_data(units12, tmp_path):
    stream = ids(units12, batch_size=100, shuffle_buffer=500)
    list(zip(range(3), stream))
    state = stream.state_dict()
    grown = str(tmp_path / "grown")
    bench.write_synthetic(grown, rows=3500, d=8, files=4, part_rows=250, doc_tokens=DOC)
    with pytest.raises(ConfigError, match="the data changed since this state was saved"):
        ids(grown, batch_size=100, shuffle_buffer=500).load_state_dict(state)


def test_state_dict_in_the_main_process_after_workers_is_not_zero(units12):
    stream = ids(units12, batch_size=100, shuffle_buffer=500)
    list(zip(range(3), DataLoader(stream, batch_size=None, num_workers=2)))
    with pytest.raises(ConfigError, match="call stream.record"):
        stream.state_dict()


# -- workers: epochs, resume, order --------------------------------------------------------

def test_set_epoch_reaches_persistent_workers(units12):
    stream = ids(units12, batch_size=100, shuffle_buffer=500)
    loader = DataLoader(stream, batch_size=None, num_workers=2, persistent_workers=True)
    first = keys(list(loader))
    stream.set_epoch(1)
    second = keys(list(loader))
    assert np.array_equal(np.sort(first), np.sort(second))
    assert not np.array_equal(first, second)  # was the identical order every epoch


def test_resume_reaches_persistent_workers_and_set_epoch_keeps_it(units12):
    stream = ids(units12, batch_size=100, shuffle_buffer=500)
    loader = DataLoader(stream, batch_size=None, num_workers=2, persistent_workers=True)
    head = [b for _, b in zip(range(7), loader)]  # the workers are started now
    state = stream.state_dict(batches=7, num_workers=2)
    stream.load_state_dict(state)
    stream.set_epoch(0)  # the DistributedSampler idiom: keeps the resume point of epoch 0
    rest = list(loader)
    assert np.array_equal(np.sort(keys(head + rest)), np.arange(3000))


def test_in_order_false_resumes_exactly_once_with_record(units12):
    stream = ids(units12, batch_size=100, shuffle_buffer=500)
    loader = DataLoader(stream, batch_size=None, num_workers=3, in_order=False)
    head = []
    for batch in loader:
        stream.record(batch)
        head.append(batch)
        if len(head) == 11:
            break
    again = ids(units12, batch_size=100, shuffle_buffer=500)
    again.load_state_dict(stream.state_dict())
    rest = list(DataLoader(again, batch_size=None, num_workers=3, in_order=False))
    assert np.array_equal(np.sort(keys(head + rest)), np.arange(3000))


# -- full batches, lengths, even ------------------------------------------------------------

def test_endless_batches_are_full_across_epochs(units12):
    got = [b for _, b in zip(range(40), ids(units12, epochs=None, batch_size=700,
                                               shuffle_buffer=1400))]
    assert all(len(b["doc_id"]) == 700 for b in got)  # 3,000 rows per epoch: was 2 short ones
    finite = list(ids(units12, epochs=2, batch_size=700, shuffle_buffer=1400, drop_last=True))
    assert [len(b["doc_id"]) for b in finite] == [700] * 8


def test_len_and_batches_per_epoch_match_the_batches(units12):
    for options in ({}, {"drop_last": True}, {"epochs": 3}):
        stream = ids(units12, batch_size=700, shuffle_buffer=1400, **options)
        assert len(stream) == len(list(stream))
    assert ids(units12, batch_size=700).batches_per_epoch() == 5
    assert ids(units12, batch_size=700, epochs=None).batches_per_epoch() == 4


def test_even_gives_every_rank_the_same_batches(units12):
    counts, rows = [], []
    for rank in range(5):  # 12 units over 5 ranks: 3 or 2 units each
        stream = ids(units12, batch_size=100, shuffle_buffer=300, rank=rank, world_size=5,
                     even=True)
        got = list(stream)
        counts.append(len(got))
        rows.append(sum(len(b["doc_id"]) for b in got))
        assert len(stream) == len(got)
    assert len(set(counts)) == 1 and len(set(rows)) == 1


# -- filters, statistics, defaults, dtype ------------------------------------------------------

def test_filters_drop_rows_at_read_time(units12):
    got = list(cs.stream(units12, "synthetic", batch_size=256, shuffle_buffer=512,
                         min_position=1, exclude_tokens=[7919 * 3 % 50_000],
                         columns=("doc_id", "position", "token")))
    k = keys(got)
    allowed = np.arange(3000)
    allowed = allowed[(allowed % DOC >= 1) & (allowed != 3)]
    assert np.array_equal(np.sort(k), allowed)
    assert all(len(b["doc_id"]) == 256 for b in got[:-1])


def test_stats_of_rows_after_position_0(units12):
    import pyarrow.parquet as pq

    table = pq.read_table(list(Catalog(units12).module("synthetic").paths))
    x = np.stack(table["vector"].to_numpy(zero_copy_only=False)).astype(np.float64)
    later = x[table["position"].to_numpy() >= 1]
    summary = Catalog(units12, stats=True).manifest.stats["synthetic"]
    if getattr(summary, "position0", None) is None:  # the manifest does not read it yet
        with pytest.raises(ConfigError, match="no position-0 statistics"):
            cs.stats(units12, "synthetic", min_position=1)
    else:
        got = cs.stats(units12, "synthetic", min_position=1)
        np.testing.assert_allclose(got["mean"].numpy(), later.mean(0), rtol=1e-6)
        np.testing.assert_allclose(got["var"].numpy(), later.var(0), rtol=1e-6)
    first = x[table["position"].to_numpy() == 0]
    norms = lambda a: float(np.linalg.norm(a, axis=1).mean())  # noqa: E731
    rest = without_position0(
        {"count": len(x), "mean": x.mean(0), "var": x.var(0), "mean_norm": norms(x)},
        {"count": len(first), "mean": first.mean(0), "var": first.var(0),
         "mean_norm": norms(first)})
    assert rest["count"] == len(later)
    np.testing.assert_allclose(rest["mean"], later.mean(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(rest["var"], later.var(0), rtol=1e-9)
    assert rest["mean_norm"] == pytest.approx(norms(later), rel=1e-12)


def test_stream_constructible_with_defaults_and_normalize_keeps_dtype(tmp_path):
    out = str(tmp_path / "half")
    bench.write_synthetic(out, rows=400, d=8, files=1, dtype="float16", doc_tokens=DOC)
    batch = next(iter(cs.Stream(out, "synthetic")))
    assert batch["vector"].shape == (400, 8) and batch["vector"].dtype == torch.float16
    normal = next(iter(cs.stream(out, "synthetic", normalize="standardize")))
    assert normal["vector"].dtype == torch.float16  # was float32
    assert next(iter(cs.stream(out, "synthetic", normalize="mean_norm",
                               dtype="float32")))["vector"].dtype == torch.float32


# -- the matrix: workers x ranks x persistent x in_order x resume point ------------------------

MATRIX = [(w, r, p, o, at) for w in (0, 2, 3) for r in (1, 2) for p in (False, True)
          for o in (True, False) for at in ("mid", "boundary") if w or (not p and o)]


def run_rank(out, rank, world, workers, persistent, in_order, at):
    """Epochs 0 and 1 of one rank, interrupted and resumed: -> [(batch_index, keys)]."""
    def make():
        return ids(out, batch_size=100, shuffle_buffer=400, epochs=2, rank=rank,
                   world_size=world)

    def load(stream):
        if not workers:
            return stream
        return DataLoader(stream, batch_size=None, num_workers=workers, in_order=in_order,
                          persistent_workers=persistent)

    stream = make()
    per_epoch = stream.batches_per_epoch(0)
    stop = per_epoch if at == "boundary" else per_epoch // 2 + 1
    loader, head = load(stream), []
    for batch in loader:
        stream.record(batch)
        head.append(batch)
        if len(head) == stop:
            break
    state = stream.state_dict() if not workers or not in_order else \
        stream.state_dict(batches=stop, num_workers=workers)
    if not persistent:
        stream = make()
        loader = load(stream)
    stream.load_state_dict(state)
    rest = list(loader)
    return [(int(b["batch_index"]), keys([b])) for b in head + rest], per_epoch


@pytest.mark.parametrize("workers,world,persistent,in_order,at", MATRIX)
def test_matrix_every_row_once_per_epoch(units12, workers, world, persistent, in_order, at):
    epochs = [[], []]
    with within(60):
        for rank in range(world):
            got, per_epoch = run_rank(units12, rank, world, workers, persistent, in_order, at)
            assert len(got) == len({g for g, _ in got})  # no batch twice
            for g, k in got:
                epochs[int(g >= per_epoch)].append((rank, g, k))
    for found in epochs:
        rows = np.concatenate([k for _, _, k in sorted(found, key=lambda t: t[:2])])
        assert np.array_equal(np.sort(rows), np.arange(3000))  # every row exactly once
    first, second = (np.concatenate([k for _, _, k in sorted(f, key=lambda t: t[:2])])
                     for f in epochs)
    assert not np.array_equal(first, second)  # a different order in epoch 1
