"""Interop: every Parquet reader we name in the README opens every dtype crowstream writes.

A matrix of readers x dtypes (float32, float16) x two modules of different width. Each
reader must return the module's row count, and the same keys and vectors (for a seeded
sample of rows) as pyarrow reading the manifest's part files. One small capture per dtype.
"""

from __future__ import annotations

import glob
import json
import os
import pathlib
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import crowstream as cs
from crowstream.schemas import parquet_options
from helpers import as_format_1, manifest_of, raw_manifest

MODULES = {"transformer.h.0": 64, "transformer.h.1.mlp.c_fc": 256}
N_DOCS = 24


@pytest.fixture(scope="module", params=["float32", "float16"])
def out(request, gpt2_dir, tmp_path_factory):
    from conftest import python_paragraphs

    path = str(tmp_path_factory.mktemp(f"interop-{request.param}") / "acts")
    cs.capture(gpt2_dir, python_paragraphs(N_DOCS), list(MODULES), path, dtype=request.param,
               shard_size=10, progress=False)
    return path


def module_files(out, module):
    manifest = manifest_of(out)
    return sorted(os.path.join(out, p.path) for p in manifest.module_parts(module))


def as_rows(doc_id, position, vector, d):
    """-> (doc_id, position, vector [N, d] float32) sorted by (doc_id, position)."""
    doc_id, position = np.asarray(doc_id, np.int64), np.asarray(position, np.int64)
    vector = np.asarray(vector, np.float32).reshape(len(doc_id), d)
    order = np.lexsort((position, doc_id))
    return doc_id[order], position[order], vector[order]


def arrow_vectors(column) -> np.ndarray:
    """The values of a fixed-size-list or list column (chunked or not), flattened."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False)


# -- the readers: (out, module) -> (doc_id, position, vector) --------------------------------

def read_pyarrow_dataset(out, module):
    import pyarrow.dataset as ds

    # hive partitioning over data/ gives the `module` column; one module's files at a
    # time, because a dataset over modules of different d has no single schema
    table = ds.dataset(module_files(out, module), format="parquet", partitioning="hive",
                       partition_base_dir=os.path.join(out, "data")).to_table()
    assert set(table["module"].to_pylist()) == {module}
    return table["doc_id"], table["position"], arrow_vectors(table["vector"])


def read_cs_scan(out, module):
    import polars as pl

    frame = cs.scan(out).filter(pl.col("module") == module).collect()
    return frame["doc_id"], frame["position"], arrow_vectors(frame["vector"].to_arrow())


def read_polars_module_dir(out, module):
    import polars as pl

    frame = pl.scan_parquet(f"{out}/data/module={module}").collect(engine="streaming")
    return frame["doc_id"], frame["position"], arrow_vectors(frame["vector"].to_arrow())


def read_duckdb(out, module):
    import duckdb

    table = duckdb.sql(
        f"select doc_id, position, vector from read_parquet('{out}/data/*/*.parquet', "
        f"hive_partitioning=true) where module = '{module}'").fetch_arrow_table()
    return table["doc_id"], table["position"], arrow_vectors(table["vector"])


def read_datasets(out, module):
    import datasets

    # its own cache: datasets keys a directory's cache by its name and config only
    cache = os.path.join(os.path.dirname(out), "hf-cache")
    rows = datasets.load_dataset(out, module, split="train", cache_dir=cache)
    rows = rows.with_format("torch")[:]
    return rows["doc_id"].numpy(), rows["position"].numpy(), rows["vector"].numpy()


def read_pandas(out, module):
    import pandas as pd

    frame = pd.read_parquet(f"{out}/data/module={module}")
    return frame["doc_id"], frame["position"], np.stack(frame["vector"].to_numpy())


def read_cs_load(out, module):
    rows = cs.load(out, module).with_format("torch")[:]
    return rows["doc_id"].numpy(), rows["position"].numpy(), rows["vector"].numpy()


def read_cs_stream(out, module):
    batches = list(cs.stream(out, module, batch_size=1000, columns=("doc_id", "position", "vector")))
    return tuple(np.concatenate([b[c].float().numpy() if c == "vector" else b[c].numpy()
                                 for b in batches]) for c in ("doc_id", "position", "vector"))


READERS = {"pyarrow.dataset": read_pyarrow_dataset, "cs.scan": read_cs_scan,
           "polars module dir (streaming)": read_polars_module_dir, "duckdb": read_duckdb,
           "datasets.load_dataset": read_datasets, "pandas": read_pandas,
           "cs.load": read_cs_load, "cs.stream": read_cs_stream}


@pytest.mark.parametrize("module", list(MODULES))
@pytest.mark.parametrize("reader", list(READERS))
def test_reader_returns_what_pyarrow_reads(out, reader, module):
    d = MODULES[module]
    tables = [pq.read_table(path) for path in module_files(out, module)]
    want = as_rows(np.concatenate([t["doc_id"].to_numpy() for t in tables]),
                   np.concatenate([t["position"].to_numpy() for t in tables]),
                   np.concatenate([arrow_vectors(t["vector"]) for t in tables]), d)
    got = as_rows(*READERS[reader](out, module), d)
    assert len(got[0]) == len(want[0]) == sum(t.num_rows for t in tables) > 0
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    sample = np.random.default_rng(0).choice(len(want[0]), size=16, replace=False)
    assert np.array_equal(got[2][sample], want[2][sample]), f"{reader}: vectors differ"


def test_cs_load_never_returns_another_outputs_cached_rows(out, tmp_path):
    """datasets keys `load_dataset(OUT, module)`'s cache by OUT's name and the config name,
    so a second OUT of the same name got the first one's rows; cs.load must not."""

    other = tmp_path / os.path.basename(out)
    shutil.copytree(out, other)
    for part in manifest_of(other).module_parts("transformer.h.0"):  # same names, new values
        path = os.path.join(other, part.path)
        table = pq.read_table(path)
        doubled = pa.array(arrow_vectors(table["vector"]) * 2)
        vector = pa.FixedSizeListArray.from_arrays(doubled, type=table.schema.field(3).type)
        pq.write_table(table.set_column(3, table.schema.field(3), vector), path)
    cache = str(tmp_path / "cache")
    first = cs.load(out, "transformer.h.0", cache_dir=cache).with_format("numpy")[:50]["vector"]
    second = cs.load(other, "transformer.h.0", cache_dir=cache).with_format("numpy")[:50]["vector"]
    np.testing.assert_array_equal(second, first * 2)


def test_scan_parquet_over_mixed_widths_fails_as_the_readme_says(out):
    import polars as pl

    # README: pl.scan_parquet(OUT/"data") needs one d for all modules; use cs.scan or a
    # module's directory. If polars learns to do this, update the README.
    with pytest.raises(pl.exceptions.SchemaError):
        pl.scan_parquet(f"{out}/data").collect()


def test_footer_says_what_each_part_is(out, gpt2_dir):
    dtype = manifest_of(out).config["dtype"]
    for module, d in MODULES.items():
        for path in module_files(out, module):
            found = pq.ParquetFile(path).metadata.metadata
            assert {k: v for k, v in found.items() if k.startswith(b"crowstream.")} == {
                b"crowstream.format_version": b"3", b"crowstream.module": module.encode(),
                b"crowstream.d": str(d).encode(), b"crowstream.dtype": dtype.encode(),
                b"crowstream.model": os.path.basename(gpt2_dir).encode()}  # never the path


def test_page_checksums_catch_a_flipped_byte_zstd_would_decode(out):
    path = module_files(out, "transformer.h.0")[0]
    damaged = os.path.join(os.path.dirname(out), "flipped.parquet")
    data = bytearray(pathlib.Path(path).read_bytes())
    column = pq.ParquetFile(path).metadata.row_group(0).column(3)
    middle = column.data_page_offset + column.total_compressed_size // 2
    data[middle] ^= 0x01
    pathlib.Path(damaged).write_bytes(bytes(data))
    with pytest.raises(OSError, match="(?i)crc|checksum"):
        pq.read_table(damaged, page_checksum_verification=True)


def test_same_model_in_two_places_gives_identical_parts(gpt2_dir, tmp_path):
    from conftest import python_paragraphs

    outs = []
    for place in ("a", "b"):
        model = tmp_path / place / "tiny-gpt2"
        shutil.copytree(gpt2_dir, model)
        outs.append(tmp_path / f"out-{place}")
        cs.capture(str(model), python_paragraphs(6), ["transformer.h.0"], outs[-1],
                   progress=False)
    parts = [sorted(glob.glob(f"{o}/data/*/*.parquet")) for o in outs]
    read = [[pathlib.Path(p).read_bytes() for p in paths] for paths in parts]
    assert read[0] == read[1]
    assert pq.ParquetFile(parts[0][0]).metadata.metadata[b"crowstream.model"] == b"tiny-gpt2"


# -- outputs written by crowstream 0.1 (format 1) --------------------------------------------

def make_like_0_1(out):
    """Re-encode OUT's parts as crowstream 0.1 did: BYTE_STREAM_SPLIT on every dtype, no
    footer metadata, no page checksums; manifest format 1 with matching sizes/checksums."""
    from crowstream.format.files import fsync_and_hash

    staged = str(out) + ".v2"
    os.rename(out, staged)
    as_format_1(staged, out)
    shutil.rmtree(staged)
    manifest = raw_manifest(out)
    old = {**parquet_options("float32"), "write_page_checksum": False}
    for part in manifest["parts"]:
        if part["kind"] != "module":
            continue
        path = os.path.join(out, part["path"])
        table = pq.read_table(path)
        pq.write_table(table.replace_schema_metadata(None), path, **old)
        part["bytes"], part["sha256"] = os.path.getsize(path), fsync_and_hash(path)
    pathlib.Path(out, "crowstream.json").write_text(json.dumps(manifest))


def test_old_float16_output_is_explained_and_rewritten(out, tmp_path):
    import duckdb

    old = str(tmp_path / "old")
    shutil.copytree(out, old)
    make_like_0_1(old)
    dtype = manifest_of(old).config["dtype"]
    before = {m: as_rows(*read_pyarrow_dataset(old, m), d) for m, d in MODULES.items()}
    query = f"select count(vector[1]) from read_parquet('{old}/data/*/*.parquet')"
    if dtype == "float32":
        assert cs.info(old)["notes"] == [] and cs.verify(old)["notes"] == []
        assert duckdb.sql(query).fetchall()
        return
    with pytest.raises(duckdb.Error, match="BYTE_STREAM_SPLIT"):
        duckdb.sql(query).fetchall()  # the bug this format change fixes
    for notes in (cs.info(old)["notes"], cs.verify(old)["notes"]):
        assert len(notes) == len(MODULES) and all(f"crowstream rewrite {old}" in n for n in notes)
    assert len(cs.rewrite(old)) == len(module_files(old, "transformer.h.0")) * len(MODULES)
    assert duckdb.sql(query).fetchall() == [(sum(len(r[0]) for r in before.values()),)]
    assert cs.verify(old)["notes"] == [] and cs.info(old)["notes"] == []
    for module, d in MODULES.items():
        after = as_rows(*read_pyarrow_dataset(old, module), d)
        assert all(np.array_equal(a, b) for a, b in zip(after, before[module]))
    assert cs.rewrite(old) == []
