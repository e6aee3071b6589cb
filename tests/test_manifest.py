"""The manifest and the commit layout: constant-cost commits, exact statistics, the typed
manifest's JSON (never NaN), and format-1 outputs that still read (but do not resume)."""

from __future__ import annotations

import json
import os
import re
import shutil

import numpy as np
import pytest

import crowstream as cs
from crowstream.errors import ManifestError
from crowstream.format.statistics import ModuleStats
from helpers import (as_format_1, as_format_2, manifest_of, patch_everywhere, raw_manifest, read_rows,
                     save_manifest, tree)
from crowstream.pipeline.commit import commit_shard
from crowstream.pipeline.output import Output
from crowstream.format.layout import staging_path
from crowstream.format.manifest import ShardRecord
from crowstream.format.records import readable
from crowstream.format.recovery import create_out
from crowstream.format.statistics import read_stats

MODULES = ["transformer.h.0", "transformer.h.2"]


def capture(gpt2, data, out, **kw):
    model, tokenizer = gpt2
    return cs.capture(model, data, kw.pop("modules", MODULES), str(out), tokenizer=tokenizer,
                      progress=False, **kw)


@pytest.fixture(scope="module")
def complete(gpt2, corpus, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("manifest") / "out")
    capture(gpt2, corpus[:24], out, shard_size=4, batch_size=4)
    return out


# -- constant commit cost -------------------------------------------------------------------

def test_commit_bytes_do_not_grow_with_the_shard_index(monkeypatch, gpt2, corpus, tmp_path):
    """60 one-document shards: crowstream.json is written at start, on "running" and once
    at the end (never per shard), and every commit writes a record and a statistics file of
    the same size, whatever its index."""
    writes = []  # (path relative to OUT, bytes) of every atomic JSON write
    from crowstream.format.files import write_atomic

    patch_everywhere(monkeypatch, write_atomic, lambda out, rel, data: (
        writes.append((rel, len(data))), write_atomic(out, rel, data)))
    out = tmp_path / "out"
    run = capture(gpt2, corpus[:60], out, modules=["transformer.h.1"], shard_size=1, batch_size=1)
    assert len(run.manifest.shards) == 60
    assert [rel for rel, _ in writes if not rel.startswith("commits/")] \
        == ["README.md", "crowstream.json", "crowstream.json", "README.md", "crowstream.json"]
    # the card at the start and at the end (it lists the committed files), never per shard
    assert [rel for rel, _ in writes if rel.startswith("commits/") and "shard-" not in rel] \
        == ["commits/run.json", "commits/end.json"]  # the run (for recover), where the corpus ends: once each
    records = [size for rel, size in writes if rel.startswith("commits/shard-")]
    assert len(records) == 60
    # only the digits of the numbers in a record vary (index, source range, rows, bytes)
    assert max(records) - min(records) <= 24, records
    assert max(records[-10:]) <= min(records[:10]) + 24
    stats = [s.stats.bytes for s in run.manifest.shards]
    assert max(stats) <= 1.1 * min(stats), stats  # (zstd makes it vary a little with the values)
    final = os.path.getsize(out / "crowstream.json")
    assert final > 60 * min(records) // 2  # the consolidated manifest holds them all, once


# -- statistics ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_statistics_equal_numpy_over_every_stored_row(gpt2, corpus, tmp_path, dtype):
    out = tmp_path / "out"
    run = capture(gpt2, corpus[:30], out, shard_size=4, batch_size=3, dtype=dtype)
    assert len(run.manifest.shards) == 8
    rows = read_rows(out)
    for module in MODULES:
        vectors = rows[module][3].astype(np.float64)
        stats = run.manifest.stats[module]
        assert stats.count == len(vectors) and stats.nonfinite == 0
        np.testing.assert_allclose(stats.mean, vectors.mean(0), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(stats.var, vectors.var(0), rtol=1e-6, atol=1e-9)
        assert stats.mean_norm == pytest.approx(np.linalg.norm(vectors, axis=1).mean(), rel=1e-6)
    assert manifest_of(out).stats == run.manifest.stats  # read back from JSON, exactly


def test_merged_partials_equal_one_pass_even_far_from_zero():
    """Chan's merge of many partials keeps the variance of data whose mean dwarfs its spread
    (where a global sum of squares cancels catastrophically)."""
    rng = np.random.default_rng(0)
    data = (rng.standard_normal((5000, 16)) * 0.01 + 3000.0).astype(np.float32)
    total = ModuleStats(16)
    for chunk in np.array_split(data, 37):
        partial = ModuleStats(16)
        for batch in np.array_split(chunk, 3):
            partial.update(batch)
        total.merge(partial)
    exact = data.astype(np.float64)
    summary = total.summary()
    assert summary.count == 5000
    np.testing.assert_allclose(summary.mean, exact.mean(0), rtol=1e-12)
    np.testing.assert_allclose(summary.var, exact.var(0), rtol=1e-6)


def test_non_finite_values_are_counted_and_never_written_as_nan(tmp_path):
    stats = ModuleStats(3)
    stats.update(np.array([[1, 2, np.inf], [1, np.nan, 3]], np.float32))
    stats.update(np.array([[1, 2, 3]], np.float32))
    summary = stats.summary()
    assert summary.count == 3 and summary.nonfinite == 2
    text = json.dumps(summary.to_json(), allow_nan=False)  # raises on NaN or Infinity
    value = json.loads(text)
    assert value["mean"] == [1.0, None, None] and value["var"] == [0.0, None, None]
    assert value["mean_norm"] is None and value["nonfinite"] == 2


def test_clamp_counts_merge_with_the_partials(tmp_path):
    out = str(tmp_path)
    create_out(out, "fresh")
    partial = ModuleStats(2)
    partial.update(np.ones((4, 2), np.float32), clamped=3)
    ref = commit_shard(Output(out), "0123456789abcdef", ShardRecord(0, 0, 0, 1, 1, 0, 4, ()),
                       {"m": partial}).stats
    total = ModuleStats(2)
    total.merge(read_stats(out, ref)["m"])
    total.update(np.ones((1, 2), np.float32), clamped=1)
    assert (total.count, total.clamped) == (5, 4) and total.summary().to_json()["clamped"] == 4


# -- the committed state -------------------------------------------------------------------

def test_a_running_manifest_lists_nothing_and_readers_consolidate_the_records(complete, tmp_path):
    """What a SIGKILLed run leaves: crowstream.json says running and lists no shards; every
    reader still sees all committed shards, from the records."""
    out = str(tmp_path / "out")
    shutil.copytree(complete, out)
    raw = raw_manifest(out)
    shards = raw["shards"]
    raw.update(status="running", shards=[], stats={},
               counts={"docs": 0, "skipped_docs": 0, "tokens_fed": 0, "rows": {m: 0 for m in MODULES}})
    save_manifest(out, raw)
    committed = manifest_of(out)
    assert committed.status == "running"
    assert [s.to_json() for s in committed.shards] == shards
    assert committed.counts == manifest_of(complete).counts
    assert committed.stats == manifest_of(complete).stats
    assert cs.info(out)["docs"] == 24
    assert cs.scan(out).collect().height == cs.scan(complete).collect().height
    cs.verify(out)


def test_readers_skip_a_recorded_shard_whose_parts_are_still_in_tmp(complete, tmp_path):
    out = str(tmp_path / "out")
    shutil.copytree(complete, out)
    raw = raw_manifest(out)
    raw["status"] = "running"
    save_manifest(out, raw)
    last = manifest_of(out).shards[-1]
    for part in last.parts:  # the crash came between the record and the renames
        os.replace(os.path.join(out, part.path), staging_path(out, part.path))
    assert len(manifest_of(out).shards) == 6  # committed...
    assert len(readable(out).shards) == 5  # ...but not yet readable
    assert cs.info(out)["docs"] == 24
    assert cs.docs(out).collect().height == 20
    for module in MODULES:
        assert cs.load(out, module, cache_dir=str(tmp_path / "cache")).num_rows == sum(p.rows for s in manifest_of(out).shards[:5]
                                                    for p in s.parts if p.module == module)


# -- format 1 ----------------------------------------------------------------------------------

def test_format_1_outputs_read_through_the_same_readers(complete, tmp_path):
    out = str(tmp_path / "v1")
    as_format_1(complete, out)
    assert raw_manifest(out)["format_version"] == 1 and not os.path.exists(os.path.join(out, "commits"))
    v1, v2 = manifest_of(out), manifest_of(complete)
    assert v1.format_version == 1
    assert [(p.path, p.rows, p.sha256) for p in v1.parts if p.kind == "module"] == [
        (p.path.replace("-000.parquet", ".parquet"), p.rows, p.sha256) for p in v2.parts
        if p.kind == "module"]
    assert v1.counts == v2.counts
    info = cs.info(out)
    assert info["format_version"] == 1 and info["docs"] == 24
    v1_report, v2_report = cs.verify(out), cs.verify(complete)
    assert v1_report["parts"] == v2_report["parts"] and v1_report["rows"] == v2_report["rows"]
    for module in MODULES:
        v1_rows = cs.load(out, module, cache_dir=str(tmp_path / "a")).data.table
        assert v1_rows.equals(cs.load(complete, module, cache_dir=str(tmp_path / "b")).data.table)
        assert next(iter(cs.stream(out, module)))["vector"].equal(next(iter(cs.stream(complete, module)))["vector"])
    assert cs.scan(out).collect().equals(cs.scan(complete).collect())
    assert cs.docs(out).collect().equals(cs.docs(complete).collect().drop("tokens"))


def test_resuming_a_format_1_output_is_one_clear_error(gpt2, corpus, complete, tmp_path):
    out = str(tmp_path / "v1")
    as_format_1(complete, out)
    before = tree(out)
    with pytest.raises(ManifestError, match=rf"^cannot resume {re.escape(repr(out))}: it was written "
                                            r"by crowstream 0\.1 \(format 1\), which this version reads "
                                            r"but does not continue\. Capture into a new OUT"):
        capture(gpt2, corpus[:24], out, shard_size=4, batch_size=4, resume=True)
    assert tree(out) == before


def test_a_format_2_output_reads_and_verifies_but_is_not_resumed(gpt2, corpus, complete, tmp_path):
    out = str(tmp_path / "v2")
    as_format_2(complete, out)
    assert raw_manifest(out)["format_version"] == 2
    assert cs.verify(out)["parts"] == len(manifest_of(out).parts)
    assert cs.info(out)["format_version"] == 2
    for module in manifest_of(complete).modules:
        assert read_rows(out)[module][0].tolist() == read_rows(complete)[module][0].tolist()
    assert cs.scan(out).collect().equals(cs.scan(complete).collect())
    before = tree(out)
    with pytest.raises(ManifestError, match=r"^cannot resume .*: it was written by crowstream 0\.2 "
                                            r"\(format 2\), which this version reads but does not "
                                            r"continue\. Capture into a new OUT"):
        capture(gpt2, corpus[:24], out, shard_size=4, batch_size=4, resume=True)
    assert tree(out) == before


def test_new_outputs_are_format_3(complete):
    assert raw_manifest(complete)["format_version"] == 3
    with open(os.path.join(complete, "commits", "shard-00000000.json")) as f:
        assert json.load(f)["format_version"] == 3


def test_a_capture_fingerprints_the_tokenizer_once_and_reads_library_versions_once(
        gpt2, corpus, tmp_path, monkeypatch):
    """The fingerprint (a JSON dump of the whole tokenizer) is taken once per capture and
    recorded in the config and the provenance alike; package metadata is read once per
    process, however many captures it runs."""
    import importlib.metadata as md

    from crowstream.pipeline import models, session

    fingerprints = []
    real_fingerprint = models.tokenizer_fingerprint
    monkeypatch.setattr(models, "tokenizer_fingerprint",
                        lambda t: fingerprints.append(1) or real_fingerprint(t))
    session.library_versions.cache_clear()
    for run in ("a", "b"):
        capture(gpt2, corpus[:6], str(tmp_path / run))
    assert len(fingerprints) == 2  # one per capture
    info = session.library_versions.cache_info()
    assert (info.misses, info.hits) == (1, 1)  # package metadata read by the first only
    manifest = raw_manifest(str(tmp_path / "b"))
    provenance = manifest["provenance"]
    assert provenance["tokenizer"] == manifest["config"]["tokenizer"]
    for package in ("torch", "transformers", "pyarrow"):
        assert provenance["versions"][package] == md.version(package)


def test_the_tokenizer_fingerprint_is_remembered_by_its_state_and_follows_a_change(gpt2_dir):
    """Remembered by the tokenizer's serialized state, so a second capture with the same
    tokenizer does not re-encode its vocabulary; the digest is still the one manifests
    hold (sorted-key JSON less truncation and padding), a changed vocabulary changes it,
    and truncation or padding state does not."""
    import hashlib

    from transformers import AutoTokenizer

    from crowstream.pipeline import models

    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
    models._backend_sha256.cache_clear()
    first = models.tokenizer_fingerprint(tokenizer)
    assert models.tokenizer_fingerprint(tokenizer) == first
    assert models._backend_sha256.cache_info().hits == 1
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    state.pop("truncation", None), state.pop("padding", None)
    assert first["sha256"] == hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()
    tokenizer(["a few words"], truncation=True, max_length=2)
    tokenizer.backend_tokenizer.enable_padding(length=8)
    assert models.tokenizer_fingerprint(tokenizer) == first
    tokenizer.add_tokens(["<crowstream-probe-token>"])
    assert models.tokenizer_fingerprint(tokenizer)["sha256"] != first["sha256"]


# -- the schema's fast checker ---------------------------------------------------------------

def mutations(record: dict):
    """A valid record, then one broken field at a time (what damage or a hostile edit does)."""
    import copy

    yield "valid", record
    for key in record:
        broken = copy.deepcopy(record)
        del broken[key]
        yield f"no {key}", broken
    for key in ("index", "rank", "source_start", "source_end", "docs", "skipped", "tokens"):
        for bad in (-1, "3", True, 1.5, None):
            yield f"{key}={bad!r}", {**record, key: bad}
    for bad in ("x", "../../etc/passwd", 7, None):
        yield f"run_id={bad!r}", {**record, "run_id": bad}
    yield "no parts", {**record, "parts": []}
    yield "parts not a list", {**record, "parts": {"a": 1}}
    part = record["parts"][1]
    for key, bads in (("path", ["../../etc/passwd", "data/module=a/../../x.parquet", 3]),
                      ("kind", ["other", None]), ("module", [5]), ("rows", [-1, "1"]),
                      ("bytes", [True]), ("sha256", ["abc", "A" * 64])):
        for bad in bads:
            yield f"part {key}={bad!r}", {**record, "parts": [record["parts"][0], {**part, key: bad}]}
        if key != "module":
            yield f"part without {key}", {**record, "parts": [{k: v for k, v in part.items() if k != key}]}
    for key, bad in (("path", "commits/../x.parquet"), ("bytes", -3), ("sha256", "0")):
        yield f"stats {key}={bad!r}", {**record, "stats": {**record["stats"], key: bad}}
    yield "stats not an object", {**record, "stats": "x"}


def test_the_fast_checker_agrees_with_jsonschema(complete):
    from crowstream.schemas import validate_manifest, validate_record

    with open(os.path.join(complete, "commits", "shard-00000001.json")) as f:
        record = json.load(f)
    cases = list(mutations(record))
    assert len(cases) > 60
    for name, case in cases:
        fast, thorough = validate_record(case), validate_record(case, thorough=True)
        assert bool(fast) == bool(thorough) == (name != "valid"), (name, fast, thorough)
        shard = {k: v for k, v in case.items() if k not in ("format", "format_version", "run_id")}
        manifest = {**raw_manifest(complete), "shards": [shard]}
        fast, thorough = validate_manifest(manifest), validate_manifest(manifest, thorough=True)
        assert bool(fast) == bool(thorough), (name, fast, thorough)


def test_the_statistics_vectors_are_checked_by_hand_as_jsonschema_would(complete):
    """validate_manifest checks stats mean/var (and position0's) lists itself (jsonschema
    took ~0.1 s per read per d = 4,096 module): the same verdicts, the same place named."""
    from crowstream.schemas import validate_manifest

    manifest = raw_manifest(complete)
    module = next(iter(manifest["stats"]))
    assert validate_manifest(manifest) == validate_manifest(manifest, thorough=True) == []
    entry = manifest["stats"][module]
    for key, where, bad in (("mean", (), "x"), ("var", ("position0",), True),
                            ("mean", ("position0",), [1.0]), ("var", (), {"a": 1})):
        damaged = json.loads(json.dumps(manifest))
        target = damaged["stats"][module]
        for step in where:
            target = target[step]
        target[key] = list(target[key])
        target[key][3] = bad
        fast, thorough = validate_manifest(damaged), validate_manifest(damaged, thorough=True)
        path = "/".join(("stats", module, *where, key, "3"))
        assert [p.split(":")[0] for p in fast] == [p.split(":")[0] for p in thorough] == [path]
    assert entry["mean"]  # the original is untouched
    damaged = {**manifest, "stats": {module: {**entry, "mean": "not a list"}}}
    assert validate_manifest(damaged) and validate_manifest(damaged, thorough=True)


@pytest.mark.parametrize("damage", ["other run", "gap"])
def test_foreign_or_missing_records_are_explained(complete, tmp_path, damage):
    out = str(tmp_path / "out")
    shutil.copytree(complete, out)
    path = os.path.join(out, "commits", "shard-00000002.json")
    if damage == "gap":
        os.remove(path)
        pattern = r"has no record for shard 2 \(found shard-00000003\.json\): records were deleted"
    else:
        with open(path) as f:
            record = json.load(f)
        record["run_id"] = "feedfacefeedface"
        with open(path, "w") as f:
            json.dump(record, f)
        pattern = r"belongs to run feedfacefeedface, not to this OUT's run [0-9a-f]{16}"
    before = tree(out)
    with pytest.raises(ManifestError, match=pattern):
        cs.verify(out)
    assert tree(out) == before
