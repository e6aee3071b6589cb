"""The training loader (`cs.stream`, `cs.stats`) on synthetic datasets written with
crowstream's own part-file writer (benchmarks/loader.py's `write_synthetic`): coverage,
shuffle quality over 2 DataLoader workers x 2 ranks, exact resume, multi-module
alignment, normalisation, dtype/device and argument errors."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

import crowstream as cs
from helpers import benchmark
from crowstream.reading.catalog import Catalog, ModuleFiles
from crowstream.errors import ConfigError, DataError
from crowstream.reading.loader import Stream
from crowstream.reading.shuffle import worker_share as _worker_share

DOC_TOKENS = 20
bench = benchmark("loader")  # benchmarks/loader.py: write_synthetic


@pytest.fixture(scope="module")
def many_docs(tmp_path_factory):
    """240k rows of d=32 in 24 part files, 12k documents of 20 rows."""
    out = str(tmp_path_factory.mktemp("loader") / "many")
    bench.write_synthetic(out, rows=240_000, d=32, files=24, doc_tokens=DOC_TOKENS)
    return out


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """25k rows in 5 part files: 2 workers get 3 and 2 files, so they run out unevenly."""
    out = str(tmp_path_factory.mktemp("loader") / "small")
    bench.write_synthetic(out, rows=25_000, d=16, files=5, doc_tokens=DOC_TOKENS)
    return out


@pytest.fixture(scope="module")
def paired(tmp_path_factory):
    """Two modules of very different widths (so different row groups), same rows."""
    out = str(tmp_path_factory.mktemp("loader") / "paired")
    bench.write_synthetic(out, rows=30_000, d={"narrow": 16, "wide": 512}, files=2,
                          modules=("narrow", "wide"), doc_tokens=DOC_TOKENS)
    return out


def stored(out, module="synthetic"):
    """All rows of a module in file order, read with pyarrow: (row key, vectors)."""
    files = sorted(Catalog(out).module(module).paths)
    tables = [pq.read_table(f) for f in files]
    doc = np.concatenate([t["doc_id"].to_numpy() for t in tables])
    pos = np.concatenate([t["position"].to_numpy() for t in tables])
    vec = np.concatenate([np.stack(t["vector"].to_numpy(zero_copy_only=False)) for t in tables])
    return doc * DOC_TOKENS + pos, vec


def keys_of(batches):
    return [(b["doc_id"] * DOC_TOKENS + b["position"]).numpy() for b in batches]


def loader(stream, workers=2):
    return DataLoader(stream, batch_size=None, num_workers=workers)


# -- coverage and shuffle quality -----------------------------------------------------

def test_two_workers_two_ranks_cover_every_row_once_and_mix_documents(many_docs):
    all_keys, first_files = [], []
    for rank in range(2):
        stream = cs.stream(many_docs, "synthetic", batch_size=1024, shuffle_buffer=100_000,
                           seed=5, rank=rank, world_size=2,
                           columns=("doc_id", "position", "vector"))
        batches = list(loader(stream))
        assert sum(len(b["vector"]) != 1024 for b in batches) == 1  # the epoch's last
        keys = keys_of(batches)
        all_keys += keys
        # first 10 batches of each rank: rows from many part files (10k rows per file)
        first_files.append(len(np.unique(np.concatenate(keys[:10]) // 10_000)))
        different = [np.mean(np.diff(b["doc_id"].numpy()) != 0) for b in batches]
        assert np.mean(different) >= 0.95, np.mean(different)
    everything = np.concatenate(all_keys)
    assert len(everything) == 240_000
    assert len(np.unique(everything)) == 240_000  # no duplicates within the epoch
    truth, _ = stored(many_docs)
    assert np.array_equal(np.sort(everything), np.sort(truth))  # the union is the stored rows
    assert min(first_files) >= 8, first_files  # each rank's streams hold 12 of the 24 files


def test_values_match_the_stored_rows(small):
    truth_keys, truth_vectors = stored(small)
    order = np.argsort(truth_keys)
    batches = list(cs.stream(small, "synthetic", batch_size=999, shuffle_buffer=3000, seed=1,
                             columns=("doc_id", "position", "token", "vector")))
    keys = np.concatenate(keys_of(batches))
    vectors = torch.cat([b["vector"] for b in batches]).numpy()
    assert np.array_equal(np.sort(keys), truth_keys[order])
    np.testing.assert_array_equal(vectors[np.argsort(keys)], truth_vectors[order])
    assert batches[0]["token"].dtype == torch.int64 and batches[0]["vector"].dtype == torch.float32


def test_no_shuffle_is_file_order_and_seeds_are_deterministic(small):
    truth, _ = stored(small)
    plain = np.concatenate(keys_of(cs.stream(small, "synthetic", batch_size=4096,
                                             columns=("doc_id", "position"))))
    assert np.array_equal(plain, truth)

    def order(seed, epoch=0):
        stream = cs.stream(small, "synthetic", batch_size=4096, shuffle_buffer=5000, seed=seed,
                           columns=("doc_id", "position"))
        stream.set_epoch(epoch)
        return np.concatenate(keys_of(stream))

    assert np.array_equal(order(3), order(3))
    assert not np.array_equal(order(3), order(4))
    assert not np.array_equal(order(3), order(3, epoch=1))
    assert np.array_equal(np.sort(order(3, epoch=1)), np.sort(truth))


def test_endless_and_several_epochs(small):
    stream = cs.stream(small, "synthetic", batch_size=5000, shuffle_buffer=2000, epochs=None,
                       columns=("doc_id", "position"))
    taken = [b for _, b in zip(range(12), stream)]  # 25k rows per epoch: 5 batches each
    first, second = np.concatenate(keys_of(taken[:5])), np.concatenate(keys_of(taken[5:10]))
    assert len(np.unique(first)) == len(np.unique(second)) == 25_000
    assert not np.array_equal(first, second)
    two = list(cs.stream(small, "synthetic", batch_size=5000, shuffle_buffer=2000, epochs=2,
                         columns=("doc_id", "position")))
    assert np.array_equal(np.concatenate(keys_of(two)), np.concatenate(keys_of(taken[:10])))


# -- resume -------------------------------------------------------------------------

def resumed_run(out, make, stop, workers):
    """Take `stop` batches, save the state, and finish on a fresh stream: all batches."""
    stream = make()
    head = []
    for batch in loader(stream, workers):
        head.append(batch)
        if len(head) == stop:
            break
    state = stream.state_dict() if workers == 0 else \
        stream.state_dict(batches=stop, num_workers=workers)
    resumed = make()
    resumed.load_state_dict(state)
    return head + list(loader(resumed, workers))


def assert_same_batches(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert torch.equal(a["doc_id"], b["doc_id"]) and torch.equal(a["position"], b["position"])
        assert torch.equal(a["vector"], b["vector"])


@pytest.mark.parametrize("shuffle_buffer", [0, 4000])
def test_resume_at_every_batch_equals_two_uninterrupted_epochs(small, shuffle_buffer):
    def make():
        return cs.stream(small, "synthetic", batch_size=700, shuffle_buffer=shuffle_buffer,
                         seed=9, epochs=2, columns=("doc_id", "position", "vector"))

    whole = list(make())
    assert len(whole) == 2 * 36
    for stop in range(1, len(whole)):  # the pool's fill, swaps and drain; both epochs
        assert_same_batches(resumed_run(small, make, stop, 0), whole)


def test_resume_with_dataloader_workers(small):
    def make():
        return cs.stream(small, "synthetic", batch_size=700, shuffle_buffer=4000, seed=9,
                         epochs=2, columns=("doc_id", "position", "vector"))

    whole = list(loader(make()))
    for stop in (3, 40, len(whole) - 1):  # early, past the first epoch, the very end
        assert_same_batches(resumed_run(small, make, stop, 2), whole)


def test_resume_reads_only_the_rows_still_pooled(many_docs, monkeypatch):
    """Resuming late in an epoch reads the units whose rows are still in the pool and
    those not read yet, not the whole epoch again."""
    def make():
        return cs.stream(many_docs, "synthetic", batch_size=1000, shuffle_buffer=3000, seed=2,
                         columns=("doc_id", "position", "vector"))

    whole = list(make())
    head = make()
    taken = [b for _, b in zip(range(200), head)]  # 200 of 240 batches: 21.5 of 24 units
    resumed = make()
    resumed.load_state_dict(head.state_dict())
    reads = []
    original = Stream._read
    monkeypatch.setattr(Stream, "_read", lambda self, piece: reads.append(piece[2] - piece[1])
                        or original(self, piece))
    assert_same_batches(taken + list(resumed), whole)
    # the 40 batches left, plus at most one pool (the window holding the resume point);
    # a replay would read all 240k rows again
    assert sum(reads) - 40_000 <= 3000, sum(reads)

def test_resume_refuses_a_different_stream(small):
    state = cs.stream(small, "synthetic", seed=1).state_dict(batches=0)
    with pytest.raises(ConfigError, match="seed is 2 here, 1 in the state"):
        cs.stream(small, "synthetic", seed=2).load_state_dict(state)


def test_worker_share_follows_round_robin_with_exhausted_workers():
    assert _worker_share(7, [3, 5]) == ([3, 4], 1)
    assert _worker_share(6, [3, 5]) == ([3, 3], 1)
    assert _worker_share(3, [3, 5]) == ([2, 1], 1)
    assert _worker_share(5, [None] * 3) == ([2, 2, 1], 2)
    assert _worker_share(0, [3, 5]) == ([0, 0], 0)
    assert _worker_share(8, [3, 5]) == ([3, 5], 0)  # all done


# -- several modules ------------------------------------------------------------------

def test_shard_starts_count_rows_within_each_shard():
    files = ModuleFiles("m", 4, "float32", ("a", "b", "c", "d", "e"), (3, 4, 5, 6, 7),
                        (0, 0, 1, 1, 1))
    assert files.shard_starts() == (0, 3, 0, 5, 11)


def test_paired_modules_are_aligned(paired):
    batches = list(cs.stream(paired, ["narrow", "wide"], batch_size=1000, shuffle_buffer=5000,
                             columns=("doc_id", "position", "vector")))
    assert set(batches[0]) == {"narrow", "wide", "doc_id", "position", "batch_index"}
    assert batches[0]["narrow"].shape == (1000, 16) and batches[0]["wide"].shape == (1000, 512)
    keys = np.concatenate(keys_of(batches))
    for module in ("narrow", "wide"):
        truth_keys, truth_vectors = stored(paired, module)
        by_key = dict(zip(truth_keys.tolist(), range(len(truth_keys))))
        got = torch.cat([b[module] for b in batches]).numpy()
        np.testing.assert_array_equal(got, truth_vectors[[by_key[k] for k in keys.tolist()]])
    globbed = next(iter(cs.stream(paired, "*", batch_size=10)))
    assert list(globbed) == ["narrow", "wide", "batch_index"]


def test_misaligned_modules_raise(paired, tmp_path):
    out = str(tmp_path / "bad")
    shutil.copytree(paired, out)
    path = sorted(Catalog(out).module("wide").paths)[1]
    table = pq.read_table(path)
    pq.write_table(table.take(np.r_[1, 0, 2:table.num_rows]), path)  # two rows swapped
    with pytest.raises(DataError, match=r"rows of 'wide' and 'narrow' are not aligned in "
                                        r"shard 1 from row 0: row 0 has "
                                        r"position 1 vs 0"):
        list(cs.stream(out, ["narrow", "wide"], batch_size=1000))
    pq.write_table(table.slice(0, 100), path)  # fewer rows than the manifest says
    with pytest.raises(DataError, match="holds 100 rows but its commit record says 15000"):
        list(cs.stream(out, ["narrow", "wide"], batch_size=1000))


# -- statistics and normalisation ------------------------------------------------------

def test_stats_match_numpy_over_all_rows(small):
    _, vectors = stored(small)
    x = vectors.astype(np.float64)
    got = cs.stats(small, "synthetic")
    assert got["count"] == len(x)
    np.testing.assert_allclose(got["mean"].numpy(), x.mean(0), rtol=1e-6)
    np.testing.assert_allclose(got["var"].numpy(), x.var(0), rtol=1e-6)
    mean_norm = np.linalg.norm(x, axis=1).mean()
    assert got["mean_norm"] == pytest.approx(mean_norm, rel=1e-6)
    assert got["scaling_factor"] == pytest.approx(np.sqrt(16) / mean_norm, rel=1e-6)


def test_normalize(small):
    _, vectors = stored(small)
    x = vectors.astype(np.float64)
    scaled = torch.cat([b["vector"] for b in cs.stream(small, "synthetic", batch_size=5000,
                                                        normalize="mean_norm")]).double().numpy()
    assert np.linalg.norm(scaled, axis=1).mean() == pytest.approx(4.0, rel=1e-5)  # sqrt(16)
    standard = torch.cat([b["vector"] for b in cs.stream(small, "synthetic", batch_size=5000,
                                                          normalize="standardize")])
    want = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-6)
    np.testing.assert_allclose(standard.double().numpy(), want, atol=1e-4)
    half = next(iter(cs.stream(small, "synthetic", batch_size=10, dtype="float16",
                               normalize="standardize", device="cpu")))
    assert half["vector"].dtype == torch.float16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_device(small):
    batches = list(cs.stream(small, "synthetic", batch_size=4096, shuffle_buffer=5000,
                             device="cuda", dtype=torch.bfloat16))
    assert batches[0]["vector"].device.type == "cuda"
    assert batches[0]["vector"].dtype == torch.bfloat16
    assert sum(len(b["vector"]) for b in batches) == 25_000


# -- errors ---------------------------------------------------------------------------

def test_argument_errors(small):
    with pytest.raises(ConfigError, match=r"has no module 'synthetc'; did you mean 'synthetic'"):
        cs.stream(small, "synthetc")
    with pytest.raises(ConfigError, match="normalize must be"):
        cs.stream(small, "synthetic", normalize="l2")
    with pytest.raises(ConfigError, match="rank and world_size together"):
        cs.stream(small, "synthetic", rank=1)
    with pytest.raises(ConfigError, match=r"rank must be in 0\.\.1"):
        cs.stream(small, "synthetic", rank=2, world_size=2)
    with pytest.raises(ConfigError, match="columns must be some of"):
        cs.stream(small, "synthetic", columns=("vectors",))
    with pytest.raises(ConfigError, match="stats takes one module name"):
        cs.stats(small, "syn*")
    with pytest.raises(ConfigError, match="shuffle_buffer must be"):
        cs.stream(small, "synthetic", shuffle_buffer=-1)
    assert isinstance(cs.stream(small, "synthetic"), (Stream, torch.utils.data.IterableDataset))


def test_each_epoch_visits_the_row_groups_in_a_new_order(small):
    """The per-epoch permutation of row groups across files: with a pool smaller than a
    row group, the order in which rows of each file first appear is the reading order.
    Without the permutation it would be file order in every epoch."""
    files = sorted(Catalog(small).module("synthetic").paths)
    file_of = {}
    for i, path in enumerate(files):
        table = pq.read_table(path, columns=["doc_id", "position"])
        for key in table["doc_id"].to_numpy() * DOC_TOKENS + table["position"].to_numpy():
            file_of[int(key)] = i
    assert len(files) == 5 and all(pq.ParquetFile(f).num_row_groups == 1 for f in files)

    def visit_order(epoch):
        stream = cs.stream(small, "synthetic", batch_size=500, shuffle_buffer=500, seed=7,
                           columns=("doc_id", "position"))
        stream.set_epoch(epoch)
        seen = [file_of[int(k)] for k in np.concatenate(keys_of(stream))]
        return tuple(dict.fromkeys(seen))  # files in order of first appearance

    orders = [visit_order(epoch) for epoch in range(4)]
    assert all(sorted(order) == list(range(5)) for order in orders)
    assert len(set(orders)) >= 3 and orders[0] != tuple(range(5)), orders


@pytest.mark.parametrize("cpus, want", [(1, 1), (2, 1), (4, 2), (6, 3), (8, 4), (64, 4)])
def test_reader_threads_default_to_half_the_usable_cpus(monkeypatch, cpus, want):
    from crowstream.reading import shuffle

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cpus)))
    assert shuffle.default_read_threads(remote=False) == want
    assert shuffle.default_read_threads(remote=True) == 4  # a bucket's reads wait on the network
