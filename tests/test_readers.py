"""Reading a capture back: `datasets.load_dataset`, `cs.load`, `cs.stream`, `cs.scan`
(+ `vocab`/`docs` joins), plain polars hive scans, `cs.info`, the manifest's schema and
the Parquet settings of the part files. The truth each reader is compared with is the
part files read directly with pyarrow.
"""

from __future__ import annotations

import glob
import json
import os

import datasets
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

import crowstream as cs
from crowstream.schemas import docs_schema, row_schema, validate_manifest, validate_record, vocab_schema

MODULES = ["transformer.h.0", "transformer.h.2"]


def read_rows(out, module) -> dict[str, np.ndarray]:
    """A module's rows in file order (part files sorted by name), read with pyarrow."""
    files = sorted(glob.glob(os.path.join(out, "data", f"module={module}", "*.parquet")))
    assert files
    table = pa.concat_tables([pq.ParquetFile(f).read() for f in files])
    vector = table.column("vector").combine_chunks()
    return {"doc_id": table.column("doc_id").to_numpy(),
            "position": table.column("position").to_numpy(),
            "token": table.column("token").to_numpy(),
            "vector": vector.flatten().to_numpy(zero_copy_only=False).reshape(-1, vector.type.list_size)}


def by_key(doc_id, position, vectors) -> dict[tuple[int, int], np.ndarray]:
    return {(int(d), int(p)): v for d, p, v in zip(doc_id, position, vectors)}


@pytest.fixture(scope="module")
def out32(gpt2, corpus, tmp_path_factory):
    """Two modules of the same width, float32, three shards (three part files each)."""
    out = str(tmp_path_factory.mktemp("readers") / "out32")
    run = cs.capture(gpt2[0], corpus[:30], MODULES, out, tokenizer=gpt2[1], shard_size=10,
                     progress=False)
    assert len(run.manifest.shards) == 3
    return run


@pytest.fixture(scope="module")
def out16(gpt2, corpus, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("readers") / "out16")
    return cs.capture(gpt2[0], corpus[:20], ["transformer.h.1"], out, tokenizer=gpt2[1],
                      dtype="float16", shard_size=8, progress=False)


@pytest.fixture(scope="module")
def mixed(gpt2, corpus, tmp_path_factory):
    """Modules of different widths: a block (64) and the MLP's first projection (256)."""
    out = str(tmp_path_factory.mktemp("readers") / "mixed")
    return cs.capture(gpt2[0], corpus[:10], ["transformer.h.0", "transformer.h.1.mlp.c_fc"], out,
                      tokenizer=gpt2[1], progress=False)


# -- datasets ------------------------------------------------------------------------

def test_load_dataset_gives_torch_batches(out32, tmp_path):
    module = "transformer.h.2"
    ds = datasets.load_dataset(out32.path, module, split="train", cache_dir=str(tmp_path))
    ds = ds.with_format("torch")
    truth = read_rows(out32.path, module)
    assert ds.num_rows == len(truth["doc_id"]) == out32.tokens[module]
    assert ds.column_names == ["doc_id", "position", "token", "vector"]  # no hive column
    batch = ds[:16]
    assert batch["vector"].shape == (16, 64) and batch["vector"].dtype == torch.float32
    sizes = []
    for i, batch in enumerate(ds.iter(batch_size=500)):
        assert batch["vector"].dtype == torch.float32 and batch["vector"].shape[1] == 64
        sl = slice(i * 500, i * 500 + len(batch["vector"]))
        np.testing.assert_array_equal(batch["vector"].numpy(), truth["vector"][sl])
        np.testing.assert_array_equal(batch["doc_id"].numpy(), truth["doc_id"][sl])
        np.testing.assert_array_equal(batch["position"].numpy(), truth["position"][sl])
        np.testing.assert_array_equal(batch["token"].numpy(), truth["token"][sl])
        sizes.append(len(batch["vector"]))
    assert sum(sizes) == ds.num_rows


def test_float16_reads(out16, tmp_path):
    module = "transformer.h.1"
    ds = datasets.load_dataset(out16.path, module, split="train", cache_dir=str(tmp_path))
    assert ds.features["vector"].feature.dtype == "float16"
    truth = read_rows(out16.path, module)
    assert truth["vector"].dtype == np.float16
    vectors = ds.with_format("torch")[:]["vector"]
    assert vectors.shape == (out16.tokens[module], 64)
    assert vectors.is_floating_point()  # datasets' torch formatter upcasts floats to float32
    np.testing.assert_array_equal(vectors.float().numpy(), truth["vector"].astype(np.float32))
    via_cs = cs.load(out16.path, module, cache_dir=str(tmp_path / "cs"))
    assert via_cs.data.table.equals(ds.data.table)


def test_cs_load_equals_load_dataset(out32, tmp_path):
    for module in MODULES:
        direct = datasets.load_dataset(out32.path, module, split="train", cache_dir=str(tmp_path / "a"))
        ours = cs.load(out32.path, module, cache_dir=str(tmp_path / "b"))
        assert isinstance(ours, datasets.Dataset)
        assert ours.num_rows == out32.tokens[module]
        assert ours.data.table.equals(direct.data.table)
    with pytest.raises(cs.CrowstreamError, match=r"has no module 'transformer\.h\.1'; it has "
                                                 r"'transformer\.h\.0', 'transformer\.h\.2'"):
        cs.load(out32.path, "transformer.h.1")


def test_cs_load_reads_only_committed_parts_after_a_crash(out32, tmp_path):
    """A kill between a part's rename and the manifest update leaves an unlisted part in
    data/: cs.load must not return its rows (the manifest is the truth), nor does
    load_dataset(OUT, module) through the card, which lists the committed files (#17)."""
    import shutil

    out = str(tmp_path / "crashed")
    shutil.copytree(out32.path, out)
    module_dir = os.path.join(out, "data", f"module={MODULES[0]}")
    shutil.copy(sorted(glob.glob(os.path.join(module_dir, "*.parquet")))[0],
                os.path.join(module_dir, "part-00000-000099-000.parquet"))
    raw = datasets.load_dataset(out, MODULES[0], split="train", cache_dir=str(tmp_path / "a"))
    ours = cs.load(out, MODULES[0], cache_dir=str(tmp_path / "b"))
    globbed = datasets.load_dataset("parquet", data_files=f"{module_dir}/*.parquet", split="train",
                                    cache_dir=str(tmp_path / "c"))
    assert globbed.num_rows > out32.tokens[MODULES[0]]  # what the 0.2 card's glob read
    assert raw.num_rows == ours.num_rows == out32.tokens[MODULES[0]]


def test_bare_load_dataset_names_the_configs(out32, tmp_path):
    """Without a config, datasets refuses to merge modules and lists every config."""
    with pytest.raises(ValueError, match=r"Config name is missing") as error:
        datasets.load_dataset(out32.path, cache_dir=str(tmp_path))
    for config in [*MODULES, "docs", "vocab"]:
        assert repr(config) in str(error.value)


def test_docs_and_vocab_configs(out32, gpt2, tmp_path):
    docs = datasets.load_dataset(out32.path, "docs", split="train", cache_dir=str(tmp_path))
    assert sorted(docs["doc_id"]) == list(range(30))
    assert sum(docs["n_tokens"]) == out32.manifest.counts.tokens_fed
    vocab = datasets.load_dataset(out32.path, "vocab", split="train", cache_dir=str(tmp_path))
    assert vocab.num_rows == len(gpt2[1])


def test_dataset_card_has_one_config_per_module(out32):
    with open(os.path.join(out32.path, "README.md"), encoding="utf-8") as f:
        text = f.read()
    assert text.startswith("---\n")
    card = yaml.safe_load(text.split("---\n")[1])
    configs = {c["config_name"]: c["data_files"] for c in card["configs"]}
    assert list(configs) == [*MODULES, "docs", "vocab"]
    for module in MODULES:  # the committed files by name (#17: a glob sees partial shards)
        assert configs[module] == [{"split": "train", "path": [
            p.path for p in out32.manifest.module_parts(module)]}]


# -- polars ----------------------------------------------------------------------------

def test_scan_module_column_and_vocab_join(out32, gpt2):
    frame = cs.scan(out32.path)
    assert isinstance(frame, pl.LazyFrame)
    df = frame.collect()
    assert df.columns == ["module", "doc_id", "position", "token", "vector"]
    assert df.schema["vector"] == pl.Array(pl.Float32, 64)
    counts = dict(df.group_by("module").len().iter_rows())
    assert counts == out32.tokens
    for module in MODULES:
        truth = read_rows(out32.path, module)
        part = df.filter(pl.col("module") == module)
        got = by_key(part["doc_id"], part["position"], part["vector"].to_numpy())
        want = by_key(truth["doc_id"], truth["position"], truth["vector"])
        assert got.keys() == want.keys()
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])

    vocab = cs.vocab(out32.path).collect()
    assert vocab.schema == pl.Schema({"token": pl.Int32, "text": pl.String, "special": pl.Boolean})
    assert vocab.height == len(gpt2[1])
    eos = gpt2[1].eos_token_id
    assert vocab.filter(pl.col("special"))["token"].to_list() == [eos]
    joined = frame.join(cs.vocab(out32.path), on="token", how="inner").collect()
    assert joined.height == df.height
    sample = joined.head(50)
    assert sample["text"].to_list() == [gpt2[1].decode([t]) for t in sample["token"].to_list()]

    per_doc = (frame.filter(pl.col("module") == MODULES[0]).group_by("doc_id").len()
               .join(cs.docs(out32.path), on="doc_id").collect())
    assert per_doc.height == 30
    assert (per_doc["len"] == per_doc["n_tokens"]).all()


def test_scan_mixed_widths(mixed):
    df = cs.scan(mixed.path).collect()
    assert dict(df.group_by("module").len().iter_rows()) == mixed.tokens
    assert mixed.modules == {"transformer.h.0": 64, "transformer.h.1.mlp.c_fc": 256}
    for module, d in mixed.modules.items():
        part = df.filter(pl.col("module") == module).sort("doc_id", "position")
        assert set(part["vector"].list.len().to_list()) == {d}
        truth = read_rows(mixed.path, module)
        order = np.lexsort((truth["position"], truth["doc_id"]))
        np.testing.assert_array_equal(np.array(part["vector"].to_list(), dtype=np.float32),
                                      truth["vector"][order])


def test_plain_polars_hive_scan(out32):
    """With modules of one width, `pl.scan_parquet(OUT/data)` works with no help."""
    df = pl.scan_parquet(os.path.join(out32.path, "data")).collect()
    assert "module" in df.columns
    assert dict(df.group_by("module").len().iter_rows()) == out32.tokens
    truth = read_rows(out32.path, "transformer.h.2")
    part = df.filter(pl.col("module") == "transformer.h.2").sort("doc_id", "position")
    order = np.lexsort((truth["position"], truth["doc_id"]))
    np.testing.assert_array_equal(part["vector"].to_numpy(), truth["vector"][order])


# -- stream ----------------------------------------------------------------------------

@pytest.mark.parametrize("shuffle_buffer", [0, 300])
def test_stream_covers_every_row_once(out32, shuffle_buffer):
    module = "transformer.h.0"
    truth = read_rows(out32.path, module)
    n = len(truth["doc_id"])
    batches = list(cs.stream(out32.path, module, batch_size=64, shuffle_buffer=shuffle_buffer,
                             seed=3, columns=("doc_id", "position", "vector")))
    sizes = [len(b["vector"]) for b in batches]
    assert sizes == [64] * (n // 64) + ([n % 64] if n % 64 else [])
    for b in batches:
        assert b["vector"].dtype == torch.float32 and b["vector"].shape[1] == 64
        assert b["doc_id"].dtype == torch.int64 and b["doc_id"].shape == b["vector"].shape[:1]
    doc_id = torch.cat([b["doc_id"] for b in batches]).numpy()
    position = torch.cat([b["position"] for b in batches]).numpy()
    vectors = torch.cat([b["vector"] for b in batches]).numpy()
    got = by_key(doc_id, position, vectors)
    assert len(got) == n  # every row exactly once
    want = by_key(truth["doc_id"], truth["position"], truth["vector"])
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])
    in_file_order = (np.array_equal(doc_id, truth["doc_id"])
                     and np.array_equal(position, truth["position"]))
    assert in_file_order == (shuffle_buffer == 0)
    if shuffle_buffer:
        again = cs.stream(out32.path, module, batch_size=64, shuffle_buffer=shuffle_buffer,
                          seed=3, columns=("doc_id",))
        assert np.array_equal(torch.cat([b["doc_id"] for b in again]).numpy(), doc_id)


def test_stream_float16(out16):
    module = "transformer.h.1"
    truth = read_rows(out16.path, module)
    batches = list(cs.stream(out16.path, module, batch_size=100))
    assert list(batches[0]) == ["vector", "batch_index"]  # batch_index: for resume (0.3)
    assert batches[0]["vector"].dtype == torch.float16 and batches[0]["vector"].shape == (100, 64)
    np.testing.assert_array_equal(torch.cat([b["vector"] for b in batches]).numpy(), truth["vector"])
    cast = next(iter(cs.stream(out16.path, module, batch_size=10, dtype=torch.float32)))
    assert cast["vector"].dtype == torch.float32
    np.testing.assert_array_equal(cast["vector"].numpy(), truth["vector"][:10].astype(np.float32))


# -- info, manifest, part files -------------------------------------------------------------

def test_info(out32):
    info = cs.info(out32.path)
    assert info["status"] == "complete" and info["error"] is None
    assert info["run_id"] == out32.run_id
    assert (info["docs"], info["skipped_docs"], info["shards"], info["shard_size"]) == (30, 0, 3, 10)
    assert info["context_size"] == 64 and info["overflow"] == "truncate"
    assert info["tokens_fed"] == out32.manifest.counts.tokens_fed
    on_disk = 0
    for module in MODULES:
        files = glob.glob(os.path.join(out32.path, "data", f"module={module}", "*.parquet"))
        m = info["modules"][module]
        assert (m["d"], m["dtype"], m["rows"], m["files"]) == (64, "float32", out32.tokens[module], 3)
        assert m["bytes"] == sum(os.path.getsize(f) for f in files)
        on_disk += m["bytes"]
        vectors = read_rows(out32.path, module)["vector"].astype(np.float64)
        assert m["mean_norm"] == pytest.approx(np.linalg.norm(vectors, axis=1).mean(), rel=1e-6)
        stats = out32.manifest.stats[module]
        assert stats.count == len(vectors)
        np.testing.assert_allclose(stats.mean, vectors.mean(0), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(stats.var, vectors.var(0), rtol=1e-4, atol=1e-9)
    docs = glob.glob(os.path.join(out32.path, "docs", "*.parquet"))
    assert info["bytes"] == on_disk + sum(os.path.getsize(f) for f in docs)


def test_manifest_validates(out32, out16):
    for run in (out32, out16):
        with open(os.path.join(run.path, "crowstream.json"), encoding="utf-8") as f:
            manifest = json.load(f)
        assert validate_manifest(manifest) == []
        assert manifest["format_version"] == 3 and manifest["status"] == "complete"
        for shard in manifest["shards"]:
            for part in shard["parts"]:
                assert os.path.getsize(os.path.join(run.path, part["path"])) == part["bytes"]
        broken = {k: v for k, v in manifest.items() if k != "run_id"}
        assert validate_manifest(broken)  # the schema is not vacuous
        for name in sorted(os.listdir(os.path.join(run.path, "commits"))):
            if name.startswith("shard-") and name.endswith(".json"):  # end.json: the corpus end
                with open(os.path.join(run.path, "commits", name), encoding="utf-8") as f:
                    assert validate_record(json.load(f)) == []


def test_layout_only_parts_under_data(out32):
    data = os.path.join(out32.path, "data")
    assert sorted(os.listdir(data)) == [f"module={m}" for m in sorted(MODULES)]
    for module in MODULES:
        names = os.listdir(os.path.join(data, f"module={module}"))
        assert sorted(names) == [f"part-00000-{i:06d}-000.parquet" for i in range(3)]
    assert not os.listdir(os.path.join(out32.path, ".tmp"))


@pytest.mark.parametrize("which", ["out32", "out16"])
def test_part_file_parquet_settings(which, request):
    run = request.getfixturevalue(which)
    dtype = run.manifest.config["dtype"]
    files = glob.glob(os.path.join(run.path, "data", "module=*", "*.parquet"))
    assert files
    for path in files:
        parquet = pq.ParquetFile(path)
        assert parquet.schema_arrow.equals(row_schema(64, dtype))
        meta = parquet.metadata
        for g in range(meta.num_row_groups):
            columns = {meta.row_group(g).column(i).path_in_schema: meta.row_group(g).column(i)
                       for i in range(meta.num_columns)}
            assert set(columns) == {"doc_id", "position", "token", "vector.list.element"}
            for name, column in columns.items():
                assert column.compression == "ZSTD", (path, name)
                assert not {"PLAIN_DICTIONARY", "RLE_DICTIONARY"} & set(column.encodings), (path, name)
                assert column.is_stats_set == (name != "vector.list.element"), (path, name)
            # BYTE_STREAM_SPLIT on float32 only: DuckDB cannot read it on float16
            split = "BYTE_STREAM_SPLIT" in columns["vector.list.element"].encodings
            assert split == (dtype == "float32"), columns["vector.list.element"].encodings
        module = os.path.basename(os.path.dirname(path)).removeprefix("module=")
        assert meta.metadata[b"crowstream.module"] == module.encode()
        assert meta.metadata[b"crowstream.dtype"] == dtype.encode()
        assert meta.metadata[b"crowstream.d"] == b"64"
        assert meta.metadata[b"crowstream.format_version"] == b"3"
        assert b"run_id" not in b"".join(meta.metadata)
    for path in glob.glob(os.path.join(run.path, "docs", "*.parquet")):
        assert pq.ParquetFile(path).schema_arrow.equals(docs_schema())
    assert pq.ParquetFile(os.path.join(run.path, "vocab.parquet")).schema_arrow.equals(vocab_schema())
