"""Same inputs -> the same bytes: two runs write byte-identical part files, docs files,
vocab and card, whatever container the corpus comes in."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import crowstream as cs
from helpers import manifest_of, raw_manifest

MODULES = ["transformer.h.0", "transformer.h.2"]
N = 20
KW = dict(shard_size=4, batch_size=4, progress=False)
VOLATILE = {"created", "updated", "digest"}  # the only manifest fields allowed to differ (the digest covers the others)


def files(out) -> dict:
    """relative path -> bytes, for everything but the manifest (commit records included:
    the run id is derived from the configuration, so it must be equal too)."""
    found = {}
    for root, _, names in os.walk(out):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), out)
            if rel != "crowstream.json":
                with open(os.path.join(root, name), "rb") as f:
                    found[rel] = f.read()
    return found


def rows(out, module) -> dict:
    """The module's columns, read part by part in manifest order."""
    m = manifest_of(out)
    table = pa.concat_tables(pq.read_table(os.path.join(out, p.path))
                             for p in m.parts if p.module == module)
    return {c: table[c].combine_chunks() for c in table.column_names}


def capture(gpt2, data, out, **kw):
    model, tokenizer = gpt2
    return cs.capture(model, data, MODULES, str(out), tokenizer=tokenizer, **{**KW, **kw})


CONFIGS = {
    "default": dict(),
    "sampled-fp16-text": dict(sample=14, seed=5, dtype="float16", store_text=True),
    "chunked-exclusions": dict(overflow="chunk", context_size=24, exclude_special_tokens=True,
                               exclude_token_ids=[13], max_batch_tokens=80),
}


@pytest.mark.parametrize("config", CONFIGS)
def test_two_runs_write_identical_bytes(gpt2, corpus, tmp_path, config):
    docs = corpus[:N]
    a, b = tmp_path / "a", tmp_path / "b"
    run_a = capture(gpt2, docs, a, **CONFIGS[config])
    run_b = capture(gpt2, docs, b, **CONFIGS[config])
    files_a, files_b = files(a), files(b)
    assert sorted(files_a) == sorted(files_b)
    assert any(p.startswith("data/") for p in files_a) and any(p.startswith("docs/") for p in files_a)
    for rel in files_a:
        assert files_a[rel] == files_b[rel], f"{rel} differs between two identical runs"
    ma, mb = raw_manifest(a), raw_manifest(b)
    assert run_a.run_id == run_b.run_id  # derived from the configuration, so ranks agree
    assert {k: v for k, v in ma.items() if k not in VOLATILE} == \
        {k: v for k, v in mb.items() if k not in VOLATILE}
    for module in MODULES:  # and so, trivially, the rows
        ra, rb = rows(a, module), rows(b, module)
        assert all(ra[c].equals(rb[c]) for c in ra)


def test_sample_depends_on_seed_only(gpt2, corpus, tmp_path):
    docs = corpus[:N]
    capture(gpt2, docs, tmp_path / "s1", sample=8, seed=1, batch_size=5)
    capture(gpt2, docs, tmp_path / "s1-again", sample=8, seed=1, batch_size=8)
    capture(gpt2, docs, tmp_path / "s2", sample=8, seed=2)

    def doc_ids(out):
        return sorted(cs.docs(str(out)).collect()["doc_id"].to_list())

    assert doc_ids(tmp_path / "s1") == doc_ids(tmp_path / "s1-again")
    assert doc_ids(tmp_path / "s1") != doc_ids(tmp_path / "s2")
    assert len(doc_ids(tmp_path / "s2")) == 8 and set(doc_ids(tmp_path / "s2")) <= set(range(N))


def sources(docs, tmp_path):
    import datasets

    text_file = tmp_path / "corpus.txt"
    text_file.write_text("\n".join(docs) + "\n", encoding="utf-8")
    return {
        "list": lambda: list(docs),
        "dicts": lambda: [{"text": t, "id": i} for i, t in enumerate(docs)],
        "datasets.Dataset": lambda: datasets.Dataset.from_dict({"text": list(docs)}),
        "IterableDataset": lambda: datasets.Dataset.from_dict({"text": list(docs)}).to_iterable_dataset(),
        "generator": lambda: (t for t in docs),
        ".txt file": lambda: str(text_file),
    }


def test_same_rows_whatever_the_container(gpt2, corpus, tmp_path):
    docs = corpus[:12]
    assert all("\n" not in t for t in docs)
    written = {}
    for name, make in sources(docs, tmp_path).items():
        out = tmp_path / name.replace(" ", "_")
        capture(gpt2, make(), out)
        written[name] = {rel: data for rel, data in files(out).items() if rel.startswith(("data/", "docs/"))}
    first = written.pop("list")
    for name, found in written.items():
        assert found.keys() == first.keys(), name
        different = [rel for rel in first if found[rel] != first[rel]]
        assert not different, f"{name}: {different[:3]} differ from the list run's"


def test_vectors_are_stored_exactly_as_computed(gpt2, corpus, tmp_path):
    """float16 is the float32 output rounded once: no double rounding, no drift."""
    docs = corpus[:8]
    capture(gpt2, docs, tmp_path / "f32")
    capture(gpt2, docs, tmp_path / "f16", dtype="float16")
    for module in MODULES:
        r32, r16 = rows(tmp_path / "f32", module), rows(tmp_path / "f16", module)
        v32 = r32["vector"].values.to_numpy(zero_copy_only=False)
        v16 = r16["vector"].values.to_numpy(zero_copy_only=False)
        assert v16.dtype == np.float16
        np.testing.assert_array_equal(v32.astype(np.float16), v16)
