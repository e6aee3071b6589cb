"""The encoder pool and the statistics (#16 writer side): identical bytes whatever the thread count, hashing while writing, statistics against numpy, position-0 statistics apart.
statistics (totals and position 0 apart) agree with numpy."""

from __future__ import annotations

import glob
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

import crowstream as cs
from crowstream.errors import ConfigError, ResumeMismatchError
from crowstream.format.records import committed
from crowstream.format.statistics import ModuleStats
from crowstream.pipeline import parts as parts_module
from helpers import parts_of

MODULES = ["transformer.h.0", "transformer.h.2"]


def _capture(gpt2, texts, out, **kwargs):
    model, tokenizer = gpt2
    return cs.capture(model, texts, MODULES, str(out), tokenizer=tokenizer, progress=False,
                      **kwargs)


def _records(out) -> list:
    """The commit records without what names the run (its id, times)."""
    found = []
    for shard in committed(str(out)).shards:
        record = shard.to_json()
        found.append({k: v for k, v in record.items() if k not in ("run_id", "created")})
    return found


def test_one_and_two_encoder_threads_write_identical_parts_and_records(gpt2, corpus, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setattr(parts_module, "ROW_GROUP_BYTES", 16 << 10)  # ~60 rows at d=64
    runs = {threads: _capture(gpt2, corpus[:40], tmp_path / f"t{threads}", shard_size=15,
                              batch_size=8, encoder_threads=threads) for threads in (1, 2)}
    one, two = (str(runs[t].path) for t in (1, 2))
    assert parts_of(one) == parts_of(two)  # paths, rows and sha256 of every part
    files = sorted(glob.glob(os.path.join(one, "data", "*", "*.parquet")))
    assert len(files) > 2 * len(MODULES) * 3  # several files per module and shard
    for path in files:  # the same bytes; verify() below checks each recorded hash and size
        with open(path, "rb") as f, open(path.replace(one, two), "rb") as g:
            assert f.read() == g.read()
    assert _records(one) == _records(two)
    assert runs[1].manifest.stats == runs[2].manifest.stats
    cs.verify(one)


def test_hash_while_writing_equals_the_file_hash(tmp_path):
    import hashlib

    from crowstream.pipeline.flatten import to_record_batch
    from crowstream.schemas import row_schema

    vectors = np.random.default_rng(0).standard_normal((5000, 32)).astype(np.float32)
    ids = np.arange(5000)
    part = parts_module.PartWriter(str(tmp_path / "p.parquet"), row_schema(32, "float32"))
    part.write(to_record_batch(ids, ids.astype(np.int32), ids.astype(np.int32), vectors,
                               "float32"))
    info = part.close()
    data = (tmp_path / "p.parquet").read_bytes()
    assert info.sha256 == hashlib.sha256(data).hexdigest() and info.bytes == len(data)
    assert pq.read_table(tmp_path / "p.parquet").num_rows == 5000


def test_parts_encode_in_the_jemalloc_pool_and_the_bytes_do_not_depend_on_the_pool(
        tmp_path, monkeypatch):
    import pyarrow as pa

    from crowstream.pipeline.flatten import to_record_batch
    from crowstream.schemas import row_schema

    try:
        jemalloc = pa.jemalloc_memory_pool()
    except NotImplementedError:
        pytest.skip("this pyarrow has no jemalloc pool")
    assert parts_module.encoder_memory_pool().backend_name == "jemalloc"
    vectors = np.random.default_rng(1).standard_normal((3000, 48)).astype(np.float32)
    ids = np.arange(3000)
    batch = to_record_batch(ids, ids.astype(np.int32), ids.astype(np.int32), vectors, "float32")
    real_writer, pools_used = parts_module.pq.ParquetWriter, []

    def spy(*args, **kwargs):
        pools_used.append(kwargs.get("memory_pool"))
        return real_writer(*args, **kwargs)

    monkeypatch.setattr(parts_module.pq, "ParquetWriter", spy)
    hashes = {}
    for pool in (None, pa.default_memory_pool(), pa.system_memory_pool()):
        if pool is not None:
            monkeypatch.setattr(parts_module, "encoder_memory_pool", lambda pool=pool: pool)
        name = "encoder pool" if pool is None else pool.backend_name
        part = parts_module.PartWriter(str(tmp_path / f"{name}.parquet"), row_schema(48, "float32"))
        part.write(batch.slice(0, 1000))  # a remainder: buffered in the pool too
        part.write(batch.slice(1000))
        hashes[name] = part.close().sha256
    assert pools_used[0] is jemalloc or pools_used[0].backend_name == "jemalloc"
    assert len(set(hashes.values())) == 1, hashes


@pytest.mark.parametrize("step", ["close", "abort"])
def test_a_part_whose_close_failed_leaves_no_writer_for_the_garbage_collector(tmp_path, step,
                                                                              monkeypatch):
    """A failed close used to leave pyarrow's writer open on a closed file; its __del__
    then raised inside whatever test the garbage collector interrupted (CI, stop 20)."""
    import gc
    import sys

    from crowstream.pipeline.flatten import to_record_batch
    from crowstream.schemas import row_schema

    raised = []
    monkeypatch.setattr(sys, "unraisablehook", raised.append)
    ids = np.arange(100)
    part = parts_module.PartWriter(str(tmp_path / "p.parquet"), row_schema(8, "float32"))
    part.write(to_record_batch(ids, ids.astype(np.int32), ids.astype(np.int32),
                               np.ones((100, 8), np.float32), "float32"))

    def full_disk():
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(part, "_flush", full_disk)  # fails before pyarrow's writer closes
    try:
        part.close()
    except OSError as error:  # not pytest.raises: its traceback would keep `part` alive
        assert "No space" in str(error)
    else:
        pytest.fail("close succeeded on a full disk")
    if step == "abort":
        part.abort()
    del part
    gc.collect()
    assert raised == []


def _check(stats: ModuleStats, rows: np.ndarray) -> None:
    exact = rows.astype(np.float64)
    assert stats.count == len(rows)
    np.testing.assert_allclose(stats.mean, exact.mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(stats.m2 / len(rows), exact.var(0), rtol=1e-6, atol=1e-9)
    assert stats.norm_sum / len(rows) == pytest.approx(np.linalg.norm(exact, axis=1).mean(),
                                                        rel=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_statistics_and_position0_statistics_match_numpy(dtype):
    rng = np.random.default_rng(1)
    d = 48
    stats = ModuleStats(d)
    batches = []
    for size in (700, 1, 0, 1300):  # slices of 256 rows, a single row, an empty batch
        rows = (rng.standard_normal((size, d)) * 3 + 40).astype(dtype)  # a large mean
        positions = rng.integers(0, 5, size).astype(np.int32)
        rows[positions == 0] += 100  # attention sinks: far from the rest
        stats.update(rows, positions=positions)
        batches.append((rows, positions))
    rows = np.concatenate([b[0] for b in batches])
    positions = np.concatenate([b[1] for b in batches])
    _check(stats, rows)
    _check(stats.p0, rows[positions == 0])
    _check(stats.after_position0(), rows[positions >= 1])


def test_position0_statistics_survive_the_stats_file_and_the_merge(gpt2, corpus, tmp_path):
    run = _capture(gpt2, corpus[:30], tmp_path / "out", shard_size=10)
    summary = run.manifest.stats[MODULES[0]]
    table = pq.read_table(os.path.join(run.path, "data", f"module={MODULES[0]}"),
                          columns=["position", "vector"])
    vectors = np.stack(table.column("vector").to_numpy(zero_copy_only=False))
    first = vectors[table.column("position").to_numpy() == 0].astype(np.float64)
    assert summary.position0.count == len(first) == 30
    np.testing.assert_allclose(summary.position0.mean, first.mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(summary.position0.var, first.var(0), rtol=1e-5, atol=1e-7)
    assert summary.count == len(vectors)


@pytest.mark.parametrize("codec, names", [("lz4", ("LZ4", "LZ4_RAW")),  # pyarrow names LZ4_RAW "LZ4"
                                          ("none", ("UNCOMPRESSED",))])
def test_compression_option_writes_that_codec_and_the_same_rows(gpt2, corpus, tmp_path, codec,
                                                                 names):
    from helpers import assert_same_rows

    reference = _capture(gpt2, corpus[:12], tmp_path / "zstd")
    run = _capture(gpt2, corpus[:12], tmp_path / codec, compression=codec)
    assert run.manifest.config["compression"] == codec
    assert reference.manifest.config["compression"] == "zstd"
    assert_same_rows(run.path, reference.path)
    for path in glob.glob(os.path.join(run.path, "data", "*", "*.parquet")):
        column = pq.ParquetFile(path).metadata.row_group(0).column(3)
        assert column.compression in names, path
    with pytest.raises(ConfigError, match="compression"):
        _capture(gpt2, corpus[:12], tmp_path / "bad", compression="gzip")
    with pytest.raises(ResumeMismatchError, match="compression: manifest has '" + codec):
        _capture(gpt2, corpus[:12], run.path, compression="zstd", resume=True)


def test_default_budget_follows_a_cgroup_memory_limit(tmp_path, monkeypatch):
    from crowstream.pipeline import options

    limit = tmp_path / "memory.max"
    monkeypatch.setattr(options, "CGROUP_LIMIT_FILES", (str(tmp_path / "absent"), str(limit)))
    limit.write_text("max\n")
    unlimited = options.default_inflight_bytes()
    assert options.cgroup_memory_limit() is None
    limit.write_text(f"{4 << 30}\n")  # a 4 GiB container on a bigger machine
    assert options.cgroup_memory_limit() == 4 << 30
    assert options.default_inflight_bytes() == min(unlimited, int(0.1 * (4 << 30)))
    limit.write_text("9223372036854771712\n")  # cgroup v1 without a limit
    assert options.default_inflight_bytes() == unlimited


def test_cli_takes_compression_and_encoder_threads():
    from crowstream.cli import build_parser

    base = ["capture", "m", "d", "-m", "x", "-o", "o"]
    args = build_parser().parse_args(base + ["--compression", "none", "--encoder-threads", "3"])
    assert (args.compression, args.encoder_threads) == ("none", 3)
    args = build_parser().parse_args(base)
    assert (args.compression, args.encoder_threads) == ("zstd", None)
    with pytest.raises(ConfigError, match="encoder_threads"):
        cs.capture("m", ["a"], ["x"], "o", encoder_threads=0)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_statistics_of_read_only_rows_equal_those_of_writable_ones(dtype):
    """Rows straight from Arrow are read-only; statistics (torch's norms and subtract, the
    float16 upcast) take them too, silently (pytest turns warnings into errors here),
    with the same result."""
    rng = np.random.default_rng(2)
    rows = (rng.standard_normal((600, 24)) * 2 + 5).astype(dtype)
    frozen = rows.copy()
    frozen.flags.writeable = False
    a, b = ModuleStats(24), ModuleStats(24)
    a.update(rows)
    b.update(frozen)
    assert a.count == b.count == 600
    np.testing.assert_array_equal(a.mean, b.mean)
    np.testing.assert_array_equal(a.m2, b.m2)
    assert a.norm_sum == b.norm_sum


@pytest.mark.parametrize("d,dtype", [(768, "float32"), (100, "float16"), (1024, "float32")])
def test_part_bytes_do_not_depend_on_where_the_batches_end(tmp_path, d, dtype):
    """The same rows in batches cut anywhere give the same file, byte for byte: a row group
    is written from one chunk (Parquet cuts pages at mini-batch ends counted per chunk;
    groups made of several batch pieces gave 3-4 different files at d = 768 and 100)."""
    from crowstream.pipeline.flatten import to_record_batch
    from crowstream.schemas import row_schema

    n = 9000 if d > 100 else 80000  # two or three row groups
    vectors = np.random.default_rng(4).standard_normal((n, d)).astype(dtype)
    ids = np.arange(n)
    batch = to_record_batch(ids, (ids % 500).astype(np.int32), (ids % 97).astype(np.int32),
                            vectors, dtype)
    hashes, tables = set(), []
    for i, cuts in enumerate(([n], [333, 7000, n - 7333], [n // 4] * 4, [1, 1, 1, n - 3])):
        part = parts_module.PartWriter(str(tmp_path / f"{i}.parquet"), row_schema(d, dtype))
        offset = 0
        for size in cuts:
            piece = batch.slice(offset, size)
            part.write(piece)
            offset += size
        vectors[:] = 0  # the caller reuses its buffer at once: the writer kept copies
        hashes.add(part.close().sha256)
        vectors[:] = np.random.default_rng(4).standard_normal((n, d)).astype(dtype)
        tables.append(pq.read_table(tmp_path / f"{i}.parquet"))
    assert len(hashes) == 1
    assert tables[0].equals(batch_table(batch)) and all(t.equals(tables[0]) for t in tables)


def batch_table(batch):
    import pyarrow as pa

    return pa.Table.from_batches([batch]).replace_schema_metadata(None)
