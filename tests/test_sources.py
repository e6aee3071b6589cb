"""Every kind of corpus crowstream accepts, and what it records about each document:
doc_id is the 0-based row index in the source (a .txt line number; the sampled row's
index with `sample=`), `None` texts are skipped and counted, empty strings are documents
of zero tokens, `max_docs`/`max_tokens` limit the run, `store_text` keeps the text.

Each capture stores one cheap module of the tiny GPT-2; what is checked is which
documents arrive under which doc_id, through the `docs/` parts and the `token` column.
"""

from __future__ import annotations

import csv
import glob
import json
import os

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import crowstream as cs

MODULE = "transformer.h.0"


@pytest.fixture(scope="module")
def texts(corpus):
    return corpus[:12]


def run_capture(gpt2, data, out, **kwargs):
    model, tokenizer = gpt2
    kwargs.setdefault("progress", False)
    return cs.capture(model, data, [MODULE], str(out), tokenizer=tokenizer, **kwargs)


def read_parts(out, sub) -> pa.Table:
    files = sorted(glob.glob(os.path.join(out, sub, "*.parquet")))
    return pa.concat_tables([pq.ParquetFile(f).read() for f in files])


def check_docs(run, tokenizer, expected: dict[int, str], *, context_size=64, texts_stored=False):
    """The run holds exactly the documents `expected` ({doc_id: text}), each with its
    token count, its rows' tokens equal to the tokenizer's ids, in position order."""
    docs = read_parts(run.path, "docs")
    ids = {d: tokenizer(t, truncation=True, max_length=context_size)["input_ids"]
           for d, t in expected.items()}
    recorded = dict(zip(docs.column("doc_id").to_pylist(), docs.column("n_tokens").to_pylist()))
    assert recorded == {d: len(i) for d, i in ids.items()}
    stored = docs.column("text").to_pylist()
    if texts_stored:
        assert dict(zip(docs.column("doc_id").to_pylist(), stored)) == expected
    else:
        assert stored == [None] * len(stored)

    rows = read_parts(run.path, f"data/module={MODULE}")
    doc_id, position = rows.column("doc_id").to_numpy(), rows.column("position").to_numpy()
    order = np.lexsort((position, doc_id))
    want = [(d, p, tok) for d in sorted(ids) for p, tok in enumerate(ids[d])]
    got = list(zip(doc_id[order].tolist(), position[order].tolist(),
                   rows.column("token").to_numpy()[order].tolist()))
    assert got == want
    assert run.docs == len(expected)
    assert run.tokens[MODULE] == len(want) == run.manifest.counts.tokens_fed


# -- in-memory sources -----------------------------------------------------------------

def test_list_of_strings(gpt2, texts, tmp_path):
    run = run_capture(gpt2, list(texts), tmp_path / "out")
    check_docs(run, gpt2[1], dict(enumerate(texts)))
    assert run.manifest.config["source"]["kind"] == "list"


def test_list_of_dicts_with_text_field(gpt2, texts, tmp_path):
    data = [{"id": f"x{i}", "body": t} for i, t in enumerate(texts)]
    run = run_capture(gpt2, data, tmp_path / "out", text_field="body")
    check_docs(run, gpt2[1], dict(enumerate(texts)))


def test_list_of_dicts_missing_field(gpt2, texts, tmp_path):
    data = [{"body": t} for t in texts]
    with pytest.raises(cs.CrowstreamError,
                       match=r"document 0 has no field 'text'; available fields: body\. Pass text_field="):
        run_capture(gpt2, data, tmp_path / "out")


def test_datasets_dataset(gpt2, texts, tmp_path):
    ds = datasets.Dataset.from_dict({"n": list(range(len(texts))), "body": list(texts)})
    run = run_capture(gpt2, ds, tmp_path / "out", text_field="body")
    check_docs(run, gpt2[1], dict(enumerate(texts)))
    with pytest.raises(cs.CrowstreamError, match=r"text field 'text' is not a column of the dataset; "
                                                 r"available columns: n, body"):
        run_capture(gpt2, ds, tmp_path / "out2")
    with pytest.raises(cs.CrowstreamError, match=r"document 0 has type int, not str"):
        run_capture(gpt2, ds, tmp_path / "out3", text_field="n")


def test_datasets_iterable_dataset(gpt2, texts, tmp_path):
    ds = datasets.Dataset.from_dict({"text": list(texts)}).to_iterable_dataset(num_shards=3)
    run = run_capture(gpt2, ds, tmp_path / "out", shard_size=5)
    check_docs(run, gpt2[1], dict(enumerate(texts)))
    assert [s.source_end for s in run.manifest.shards] == [5, 10, 12]


def test_generator(gpt2, texts, tmp_path):
    run = run_capture(gpt2, (t for t in texts), tmp_path / "out")
    check_docs(run, gpt2[1], dict(enumerate(texts)))


# -- local files and directories ---------------------------------------------------------

def test_txt_doc_id_is_line_number(gpt2, texts, tmp_path):
    lines = [texts[0], "", texts[1], texts[2] + "\r", texts[3]]  # an empty line, a CRLF line
    path = tmp_path / "corpus.txt"
    path.write_bytes(("\n".join(lines) + "\n").encode())
    run = run_capture(gpt2, str(path), tmp_path / "out")
    check_docs(run, gpt2[1], {0: texts[0], 1: "", 2: texts[1], 3: texts[2], 4: texts[3]})
    assert run.manifest.config["source"]["kind"] == "file"


def _write(path, kind, records):
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    elif kind == "json":
        path.write_text(json.dumps(records), encoding="utf-8")
    elif kind == "parquet":
        pq.write_table(pa.Table.from_pylist(records), path)
    elif kind == "csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "csv"])
def test_structured_file(gpt2, texts, kind, tmp_path):
    # the texts hold commas and quotes, which CSV must round-trip
    assert any("," in t for t in texts) and any('"' in t or "'" in t for t in texts)
    records = [{"id": i, "content": t} for i, t in enumerate(texts)]
    path = tmp_path / f"corpus.{kind}"
    _write(path, kind, records)
    run = run_capture(gpt2, str(path), tmp_path / "out", text_field="content", store_text=True)
    check_docs(run, gpt2[1], dict(enumerate(texts)), texts_stored=True)


def test_directory(gpt2, texts, tmp_path):
    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    _write(corpus_dir / "part-a.jsonl", "jsonl", [{"text": t} for t in texts[:5]])
    _write(corpus_dir / "part-b.jsonl", "jsonl", [{"text": t} for t in texts[5:]])
    run = run_capture(gpt2, str(corpus_dir), tmp_path / "out")
    check_docs(run, gpt2[1], dict(enumerate(texts)))
    assert run.manifest.config["source"]["kind"] == "directory"


def test_bad_paths(gpt2, tmp_path):
    (tmp_path / "corpus.xml").write_text("<doc/>")
    with pytest.raises(cs.CrowstreamError, match=r"cannot read .*corpus\.xml'.*supported files are \.txt"):
        run_capture(gpt2, str(tmp_path / "corpus.xml"), tmp_path / "out")
    with pytest.raises(cs.CrowstreamError, match=r"data path .*missing\.txt' does not exist"):
        run_capture(gpt2, str(tmp_path / "missing.txt"), tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(cs.CrowstreamError, match=r"directory .*empty' holds no files"):
        run_capture(gpt2, str(tmp_path / "empty"), tmp_path / "out")
    with pytest.raises(cs.CrowstreamError, match=r"the corpus has no documents"):
        run_capture(gpt2, [], tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written for a call that failed up front


# -- sampling and limits ---------------------------------------------------------------

def _doc_ids(run) -> list[int]:
    return read_parts(run.path, "docs").column("doc_id").to_pylist()


def test_sample_reproducible_and_indexed(gpt2, corpus, tmp_path):
    source = corpus[:30]
    first = run_capture(gpt2, source, tmp_path / "a", sample=6, seed=1)
    again = run_capture(gpt2, source, tmp_path / "b", sample=6, seed=1)
    other = run_capture(gpt2, source, tmp_path / "c", sample=6, seed=2)
    picked = _doc_ids(first)
    assert len(picked) == 6 and len(set(picked)) == 6 and all(0 <= d < 30 for d in picked)
    assert picked == _doc_ids(again) and set(picked) != set(_doc_ids(other))
    check_docs(first, gpt2[1], {d: source[d] for d in picked})  # doc_id = the source index
    check_docs(other, gpt2[1], {d: source[d] for d in _doc_ids(other)})
    # same call, same rows, bit for bit
    a = read_parts(first.path, f"data/module={MODULE}").sort_by([("doc_id", "ascending"), ("position", "ascending")])
    b = read_parts(again.path, f"data/module={MODULE}").sort_by([("doc_id", "ascending"), ("position", "ascending")])
    assert a.equals(b)


def test_sample_from_streaming_file(gpt2, corpus, tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(corpus[:30]) + "\n", encoding="utf-8")
    run = run_capture(gpt2, str(path), tmp_path / "out", sample=5, seed=7)
    picked = _doc_ids(run)
    assert len(set(picked)) == 5
    check_docs(run, gpt2[1], {d: corpus[d] for d in picked})


def test_sample_larger_than_corpus(gpt2, texts, tmp_path):
    with pytest.raises(cs.CrowstreamError, match=r"sample=50 is larger than the corpus \(12 documents\)"):
        run_capture(gpt2, list(texts), tmp_path / "out", sample=50)


def test_sample_from_generator_is_refused(gpt2, texts, tmp_path):
    """sample= must count the corpus first, which a one-shot generator cannot survive."""
    with pytest.raises(cs.CrowstreamError, match=r"sample= reads the corpus twice .* list\(your_iterable\)"):
        run_capture(gpt2, (t for t in texts), tmp_path / "out", sample=4, seed=0)
    assert not (tmp_path / "out").exists()


def test_max_docs(gpt2, texts, tmp_path):
    run = run_capture(gpt2, list(texts), tmp_path / "list", max_docs=5)
    check_docs(run, gpt2[1], dict(enumerate(texts[:5])))
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    run = run_capture(gpt2, str(path), tmp_path / "txt", max_docs=7, shard_size=3)
    check_docs(run, gpt2[1], dict(enumerate(texts[:7])))


@pytest.mark.parametrize("shard_size", [None, 2])
def test_max_tokens_keeps_crossing_document_whole(gpt2, texts, shard_size, tmp_path):
    tokenizer = gpt2[1]
    lengths = [len(tokenizer(t, truncation=True, max_length=64)["input_ids"]) for t in texts]
    cumsum = np.cumsum(lengths)
    # one token past the first 5 documents: the 6th document crosses and is kept whole
    run = run_capture(gpt2, list(texts), tmp_path / "cross", max_tokens=int(cumsum[4]) + 1,
                      shard_size=shard_size)
    check_docs(run, tokenizer, dict(enumerate(texts[:6])))
    assert run.manifest.counts.tokens_fed == cumsum[5]
    # exactly the first 5 documents' tokens: stop after them
    run = run_capture(gpt2, list(texts), tmp_path / "exact", max_tokens=int(cumsum[4]),
                      shard_size=shard_size)
    check_docs(run, tokenizer, dict(enumerate(texts[:5])))


def test_none_skipped_and_empty_kept(gpt2, texts, tmp_path):
    data = [texts[0], None, "", texts[1], None, texts[2]]
    run = run_capture(gpt2, data, tmp_path / "out", store_text=True, shard_size=2)
    check_docs(run, gpt2[1], {0: texts[0], 2: "", 3: texts[1], 5: texts[2]}, texts_stored=True)
    assert run.manifest.counts.skipped_docs == 2
    assert cs.info(run.path)["skipped_docs"] == 2
    assert sum(s.skipped for s in run.manifest.shards) == 2


def test_store_text(gpt2, texts, tmp_path):
    run = run_capture(gpt2, list(texts[:4]), tmp_path / "out", store_text=True)
    check_docs(run, gpt2[1], dict(enumerate(texts[:4])), texts_stored=True)
    stored = cs.docs(run.path).sort("doc_id").collect()
    assert stored["text"].to_list() == list(texts[:4])
