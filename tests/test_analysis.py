"""cs.top against brute force over every row, and cs.contexts against the tokenizer's own
decode of the document's token slice (GPT-2 byte-level BPE and MiniLM WordPiece)."""

from __future__ import annotations

import glob
import re
import os

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import torch

import crowstream as cs
from crowstream.reading import analysis
from crowstream.errors import ConfigError
from helpers import read_rows
from crowstream.format.recovery import inspect_out

MODULES = ["transformer.h.0", "transformer.h.2"]


@pytest.fixture(scope="module")
def chunked(gpt2_dir, corpus, tmp_path_factory):
    """Long documents chunked into 16-token windows, special tokens excluded from the rows."""
    out = str(tmp_path_factory.mktemp("chunked") / "out")
    cs.capture(gpt2_dir, corpus[:40] + ["<|endoftext|> starts with a special token"], MODULES,
               out, context_size=16, overflow="chunk", exclude_special_tokens=True,
               batch_size=8, shard_size=15, progress=False)
    return out


@pytest.fixture(scope="module")
def minilm_out(minilm_dir, corpus, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("minilm") / "out")
    cs.capture(minilm_dir, corpus[:24], ["encoder.layer.1"], out, context_size=48,
               batch_size=8, progress=False, device="cpu")
    return out


def docs_tokens(out) -> dict[int, list[int]]:
    table = pl.concat([pl.read_parquet(p) for p in glob.glob(os.path.join(out, "docs", "*.parquet"))])
    return dict(zip(table["doc_id"].to_list(), table["tokens"].to_list()))


def brute_force(out, module, scores_of, k, per_doc=None):
    """Sort every row by (score desc, doc_id, position), cap per document, take k."""
    doc_id, position, token, vector = read_rows(out)[module]
    scores = scores_of(vector).astype(np.float64)
    kept, per = [], {}
    for i in np.lexsort((position, doc_id, -scores)):
        if per_doc is not None and per.get(doc_id[i], 0) >= per_doc:
            continue
        per[doc_id[i]] = per.get(doc_id[i], 0) + 1
        kept.append(i)
        if len(kept) == k:
            break
    return doc_id[kept], position[kept], token[kept], scores[kept]


def assert_same(found, expected):
    doc_id, position, token, scores = expected
    assert found["doc_id"].to_list() == doc_id.tolist()
    assert found["position"].to_list() == position.tolist()
    assert found["token"].to_list() == token.tolist()
    np.testing.assert_allclose(found["score"].to_numpy(), scores, rtol=1e-6, atol=1e-6)


DIRECTION = np.random.default_rng(0).standard_normal(64).astype(np.float32)
SCORES = {
    "direction": (DIRECTION, lambda x: np.einsum("ij,j->i", x, DIRECTION)),
    "direction-tensor": (torch.from_numpy(DIRECTION), lambda x: np.einsum("ij,j->i", x, DIRECTION)),
    "neuron": (7, lambda x: x[:, 7]),
    "norm": ("norm", lambda x: np.sqrt(np.einsum("ij,ij->i", x, x))),
    "callable": (lambda t: torch.relu(t[:, :8]).sum(1), lambda x: np.maximum(x[:, :8], 0).sum(1)),
    # rounded scores: many exact ties, decided by (doc_id, position)
    "ties": (lambda t: torch.round(t[:, 3]), lambda x: np.round(x[:, 3])),
    "all-tied": (np.zeros(64, np.float32), lambda x: x @ np.zeros(64, np.float32)),
}


@pytest.mark.parametrize("per_doc", [None, 1, 3])
@pytest.mark.parametrize("kind", SCORES)
def test_top_matches_brute_force(chunked, kind, per_doc, monkeypatch):
    monkeypatch.setattr(analysis, "SCAN_BATCH_ROWS", 97)  # many batches, candidates carried over
    score, reference = SCORES[kind]
    for module, k in ((MODULES[0], 25), (MODULES[1], 5)):
        found = cs.top(chunked, module, score, k=k, per_doc=per_doc, window=None)
        assert found.columns == ["doc_id", "position", "token", "token_text", "score"]
        assert_same(found, brute_force(chunked, module, reference, k, per_doc))
    if kind == "ties":
        assert found["score"].n_unique() < len(found)  # the tie-break really was exercised
    if per_doc is not None:
        assert found["doc_id"].value_counts()["count"].max() <= per_doc


def test_top_more_than_all_rows_returns_all_in_order(chunked):
    rows = len(read_rows(chunked)[MODULES[0]][0])
    found = cs.top(chunked, MODULES[0], "norm", k=rows + 50, window=None)
    assert len(found) == rows
    assert_same(found, brute_force(chunked, MODULES[0], SCORES["norm"][1], rows + 50))


def test_top_over_float16_vectors(gpt2_dir, corpus, tmp_path):
    out = str(tmp_path / "fp16")
    cs.capture(gpt2_dir, corpus[:10], MODULES[:1], out, context_size=32, dtype="float16",
               progress=False)
    reference = lambda x: np.sqrt(np.einsum("ij,ij->i", x, x))  # noqa: E731
    doc_id, position, token, vector = read_rows(out)[MODULES[0]]
    assert vector.dtype == np.float16
    found = cs.top(out, MODULES[0], "norm", k=7, per_doc=2)
    assert_same(found, brute_force(out, MODULES[0], lambda x: reference(x.astype(np.float32)), 7, 2))


def test_top_keeps_enough_candidates_per_document():
    """A document that first fills the list and is later capped must not hide others."""
    best = analysis.TopK(3, per_doc=1)
    best.add(np.array([10.0, 9, 8]), np.array([0, 0, 0]), np.arange(3, dtype=np.int32), np.zeros(3, np.int32))
    best.add(np.array([5.0, 4, 7]), np.array([1, 2, 3]), np.zeros(3, np.int32), np.zeros(3, np.int32))
    best.add(np.array([11.0, 6]), np.array([0, 4]), np.array([9, 0], np.int32), np.zeros(2, np.int32))
    frame = best.frame()
    assert frame["doc_id"].to_list() == [0, 3, 4] and frame["score"].to_list() == [11, 7, 6]


CONTEXT = ["token_text", "window_start", "window_end", "window_text", "mark_start", "mark_end",
           "context"]


def test_top_with_context_and_token_text(chunked, gpt2):
    _, tokenizer = gpt2
    found = cs.top(chunked, MODULES[1], "norm", k=10, per_doc=2)
    assert found.columns == ["doc_id", "position", "token", "token_text", "score"] + CONTEXT[1:]
    tokens = docs_tokens(chunked)
    for row in found.iter_rows(named=True):
        assert tokens[row["doc_id"]][row["position"]] == row["token"]
        assert row["token_text"] == tokenizer.decode([row["token"]])
        assert row["context"].count("«") == 1 and row["context"].count("»") == 1
        text, start, end = row["window_text"], row["mark_start"], row["mark_end"]
        assert text[start:end] == row["token_text"]  # byte-level BPE: additive decode
        assert row["context"] == text[:start] + "«" + text[start:end] + "»" + text[end:]
        assert row["window_start"] <= row["position"] < row["window_end"]


def many_reference(out, module, scores_of, k):
    """Brute force for every latent: a frame ordered by latent, then rank."""
    doc_id, _, _, vector = read_rows(out)[module]
    n_latents = scores_of(vector[:1]).shape[1]
    frames = []
    for latent in range(n_latents):
        d, p, t, s = brute_force(out, module, lambda x: scores_of(x)[:, latent], k)
        frames.append(pl.DataFrame({"latent": latent, "rank": np.arange(len(d)), "doc_id": d,
                                    "position": p, "token": t,
                                    "score": np.where(np.isnan(s), -np.inf, s)}))
    return pl.concat(frames)


def assert_many_same(found, want, out, module, scores_of, exact=True):
    """Frames of many latents equal; with `exact=False` (BLAS scores: a row's float32 score
    may differ in the last bit with the batch it was computed in, even between two rows
    with identical vectors) a row may differ only where its own score ties within 1e-5."""
    for column in ("latent", "rank"):
        assert found[column].to_list() == want[column].to_list(), column
    np.testing.assert_allclose(found["score"].to_numpy(), want["score"].to_numpy(), rtol=1e-5, atol=1e-5)
    rows = ["doc_id", "position", "token"]
    same = np.ones(found.height, bool)
    for column in rows:
        same &= found[column].to_numpy() == want[column].to_numpy()
    if exact:
        assert same.all(), found.filter(~same)
        return
    doc_id, position, _, vector = read_rows(out)[module]
    where = {(d, p): i for i, (d, p) in enumerate(zip(doc_id.tolist(), position.tolist()))}
    for i in np.flatnonzero(~same).tolist():
        latent, d, p = found["latent"][i], found["doc_id"][i], found["position"][i]
        own = scores_of(vector[where[(d, p)]][None])[0, latent]
        assert abs(own - want["score"][i]) <= 1e-5, (latent, d, p)
    assert (~same).mean() < 0.05  # near ties are rare


MATRIX = np.random.default_rng(1).standard_normal((64, 37)).astype(np.float32)


def sae(t):
    """An SAE-like encoder: ReLU of an affine map, rounded: many exact ties (dead latents
    tie at 0 on every row), and a NaN latent."""
    acts = torch.round(torch.relu(t @ torch.from_numpy(MATRIX) - 1.5) * 4) / 4
    acts[:, 5] = float("nan")
    acts[:, 6] = -0.0
    return acts


MANY = {
    "matrix": (MATRIX, lambda x: x @ MATRIX),
    "neurons": ("neurons", lambda x: x),
    "sae": (sae, lambda x: sae(torch.from_numpy(x)).numpy()),
}


@pytest.mark.parametrize("kind", MANY)
def test_top_of_many_latents_matches_brute_force(chunked, kind, monkeypatch):
    from crowstream.reading import latents

    monkeypatch.setattr(latents, "LATENT_BATCH_ELEMENTS", 97 * 37)  # many batches, ties at edges
    monkeypatch.setattr(latents, "LATENT_BATCH_ROWS", 97)
    monkeypatch.setattr(analysis, "LATENT_BATCH_ROWS", 97)
    score, reference = MANY[kind]
    for module, k in ((MODULES[0], 6), (MODULES[1], 1)):
        found = cs.top(chunked, module, score, k=k, window=None)
        assert found.columns == ["latent", "rank"] + ["doc_id", "position", "token", "token_text", "score"]
        want = many_reference(chunked, module, reference, k)
        assert found["latent"].n_unique() == (64 if kind == "neurons" else 37)
        assert_many_same(found, want, chunked, module, reference, exact=kind != "matrix")
    if kind == "sae":
        assert found.filter(pl.col("latent") == 5)["score"].to_list() == [-np.inf]  # NaN last


def test_top_of_many_latents_with_contexts(chunked):
    found = cs.top(chunked, MODULES[0], MATRIX[:, :3], k=4, per_doc=None)
    assert found.columns[:2] == ["latent", "rank"] and found.height == 12
    assert found["context"].str.count_matches("«").to_list() == [1] * 12
    with pytest.raises(ConfigError, match="per_doc works with one latent only"):
        cs.top(chunked, MODULES[0], "neurons", k=4, per_doc=1)


def test_a_window_never_shows_the_previous_chunk(chunked, gpt2):
    """overflow="chunk", context_size=16: each chunk was its own forward; a row's window
    starts at its chunk's first token (and ends at its last) whatever `window` asks."""
    _, tokenizer = gpt2
    tokens = docs_tokens(chunked)
    long_doc = max(tokens, key=lambda d: len(tokens[d]))
    rows = [(long_doc, p) for p in (15, 16, 17, 31, 32, 40)]
    frame = pl.DataFrame({"doc_id": [d for d, _ in rows], "position": [p for _, p in rows]})
    found = cs.contexts(chunked, frame, window=(64, 64))
    assert found["window_start"].to_list() == [0, 16, 16, 16, 32, 32]
    assert found["window_end"].to_list() == [16, 32, 32, 32, 48, 48]
    for row in found.iter_rows(named=True):
        lo, hi = row["window_start"], row["window_end"]
        assert row["window_text"] == tokenizer.decode(tokens[long_doc][lo:hi])
    by_norm = cs.top(chunked, MODULES[1], "norm", k=30, window=(40, 0))
    assert (by_norm["window_start"] == by_norm["position"] // 16 * 16).all()


def test_docs_tokens_are_what_the_model_saw(chunked, gpt2, corpus):
    """Full sequence (all chunks), special tokens included, and every stored row's token
    sits at its position in it."""
    _, tokenizer = gpt2
    texts = corpus[:40] + ["<|endoftext|> starts with a special token"]
    tokens = docs_tokens(chunked)
    assert tokens == {i: tokenizer(t)["input_ids"] for i, t in enumerate(texts)}
    assert max(len(t) for t in tokens.values()) > 3 * 16  # chunked, not truncated
    assert tokens[40][0] == tokenizer.eos_token_id  # excluded from the rows, kept here
    for module in MODULES:
        doc_id, position, token, _ = read_rows(chunked)[module]
        assert all(tokens[d][p] == t for d, p, t in zip(doc_id.tolist(), position.tolist(), token.tolist()))
        assert 0 not in position[doc_id == 40]  # the special token's row was excluded


def test_truncated_docs_keep_only_what_was_fed(gpt2_dir, corpus, tmp_path):
    out = str(tmp_path / "out")
    cs.capture(gpt2_dir, corpus[:12], MODULES[:1], out, context_size=16, progress=False)
    tokens = docs_tokens(out)
    assert max(len(t) for t in tokens.values()) == 16
    n_tokens = pl.read_parquet(os.path.join(out, "docs")).select("doc_id", "n_tokens").rows()
    assert all(len(tokens[d]) == n for d, n in n_tokens)


def expected_context(tokenizer, ids, position, window, chunk=None):
    first, last = (position // chunk * chunk, position // chunk * chunk + chunk) if chunk else (0, len(ids))
    lo, hi = max(first, position - window[0]), min(len(ids), last, position + window[1] + 1)
    return tokenizer.decode(ids[lo:hi])


def check_contexts(out, tokenizer, rows, window, chunk=None):
    frame = pl.DataFrame({"doc_id": [d for d, _ in rows], "position": [p for _, p in rows]},
                         schema={"doc_id": pl.Int64, "position": pl.Int32})
    result = cs.contexts(out, frame, window=window)
    assert result.columns == ["doc_id", "position"] + CONTEXT
    tokens = docs_tokens(out)
    for (doc_id, position), context, token_text in zip(rows, result["context"], result["token_text"]):
        ids = tokens[doc_id]
        assert context.count("«") == 1 and context.count("»") == 1, context
        assert context.replace("«", "").replace("»", "") == expected_context(
            tokenizer, ids, position, window, chunk)
        assert token_text == tokenizer.decode([ids[position]])
    return result


@pytest.mark.parametrize("window", [(16, 4), (0, 0), (3, 40)])
def test_contexts_equal_decode_of_the_token_slice_gpt2(chunked, gpt2, window):
    _, tokenizer = gpt2
    tokens = docs_tokens(chunked)
    long_doc = max(tokens, key=lambda d: len(tokens[d]))
    n = len(tokens[long_doc])
    rows = [(0, 0), (0, len(tokens[0]) - 1), (long_doc, 0), (long_doc, 16), (long_doc, 15),
            (long_doc, n // 2), (long_doc, n - 1), (40, 0), (40, 1)]
    result = check_contexts(chunked, tokenizer, rows, window, chunk=16)
    # byte-level BPE decodes additively: the marked span is exactly the token's text
    for context, token_text in zip(result["context"], result["token_text"]):
        assert f"«{token_text}»" in context


def test_contexts_equal_decode_of_the_token_slice_wordpiece(minilm_out, minilm):
    _, tokenizer = minilm
    tokens = docs_tokens(minilm_out)
    doc = max(tokens, key=lambda d: len(tokens[d]))
    subword = next(p for p, t in enumerate(tokens[doc]) if tokenizer.convert_ids_to_tokens(t).startswith("##"))
    rows = [(doc, 0), (doc, 1), (doc, subword), (doc, len(tokens[doc]) - 1), (0, len(tokens[0]) - 1)]
    result = check_contexts(minilm_out, tokenizer, rows, (16, 4))
    assert result["context"][0].startswith("«[CLS]»")
    assert result["context"][3].endswith("«[SEP]»")


def test_contexts_without_the_model_directory(chunked, tmp_path):
    """OUT alone decodes: the tokenizer was saved in it."""
    assert sorted(os.listdir(os.path.join(chunked, "tokenizer")))
    tokenizer = analysis.load_tokenizer(chunked)
    assert len(tokenizer) == pq.ParquetFile(os.path.join(chunked, "vocab.parquet")).metadata.num_rows


def test_bad_arguments_get_one_clear_error(chunked):
    with pytest.raises(ConfigError, match=r"shape \(64,\)"):
        cs.top(chunked, MODULES[0], np.ones(5))
    with pytest.raises(ConfigError, match="out of range for d=64"):
        cs.top(chunked, MODULES[0], 64)
    with pytest.raises(ConfigError, match="'nrom' is not known"):
        cs.top(chunked, MODULES[0], "nrom")
    with pytest.raises(ConfigError, match=r"\[B\] scores \(one latent\) or \[B, L\]"):
        cs.top(chunked, MODULES[0], lambda t: t[None])
    with pytest.raises(ConfigError, match=r"must always return \[B, L\] with the same L"):
        cs.top(chunked, MODULES[0], lambda t: t[:, :len(t) % 3 + 1])
    with pytest.raises(ConfigError, match=r"\(64, L\) for this module; got \(5, 3\)"):
        cs.top(chunked, MODULES[0], np.ones((5, 3)))
    with pytest.raises(ConfigError, match="k must be a positive integer"):
        cs.top(chunked, MODULES[0], "norm", k=0)
    with pytest.raises(ConfigError, match="window must be"):
        cs.top(chunked, MODULES[0], "norm", window=5)
    with pytest.raises(ConfigError, match="has no module 'nope'"):
        cs.top(chunked, "nope", "norm")
    with pytest.raises(ConfigError, match="no token at doc_id 0, position 999"):
        cs.contexts(chunked, pl.DataFrame({"doc_id": [0], "position": [999]}))
    with pytest.raises(ConfigError, match="lacks position"):
        cs.contexts(chunked, pl.DataFrame({"doc_id": [0]}))


def test_format_1_output_explains_what_to_do(chunked, tmp_path):
    """An output as 0.1 wrote it (format 1: no tokenizer/, no tokens column) still verifies;
    window=None works; contexts raise one error naming the fix."""
    from helpers import as_format_1, manifest_of

    old = str(tmp_path / "old")
    as_format_1(chunked, old)
    assert cs.verify(old)["parts"] == len(manifest_of(old).parts)
    assert len(cs.top(old, MODULES[0], "norm", k=3, window=None)) == 3
    with pytest.raises(ConfigError, match=r"before format 2.*window=None"):
        cs.top(old, MODULES[0], "norm", k=3)

def readme_analyse_code() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "docs", "analysis.md"), encoding="utf-8") as f:
        page = f.read()
    section = page.split("\n## Analyse\n", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("```", 1)[0] for b in section.split("```python\n")[1:]]
    assert len(blocks) == 1
    return blocks[0]


def test_readme_analyse_recipes_run_as_written(chunked, capsys):
    code = readme_analyse_code()
    line = 'OUT, MODULE = "acts/", "transformer.h.6"'
    assert line in code
    namespace = {}
    exec(compile(code.replace(line, f"OUT, MODULE = {chunked!r}, {MODULES[1]!r}"), "README", "exec"),
         namespace)
    doc_id, position, token, vector = read_rows(chunked)[MODULES[1]]
    norms = np.sqrt(np.einsum("ij,ij->i", vector, vector))
    np.testing.assert_allclose(namespace["top_rows"]["norm"].to_numpy(), np.sort(norms)[::-1][:20], rtol=1e-5)
    assert namespace["top_rows_big"]["norm"].sort(descending=True).to_list() == \
        namespace["top_rows"]["norm"].to_list()
    mean = namespace["mean_per_token"]
    some = mean["token"][0]
    np.testing.assert_allclose(mean.filter(pl.col("token") == some)["mean"].to_numpy()[0],
                               vector[token == some].mean(0), rtol=1e-4, atol=1e-6)
    assert mean.columns == ["token", "count", "mean", "text", "special"]
    one_doc = namespace["one_doc"]
    assert one_doc["position"].to_list() == sorted(position[doc_id == namespace["doc"]].tolist())
    assert len(namespace["tokens"]) > one_doc["position"].max()
    assert len(namespace["hits"]) == 20 and namespace["hits"]["doc_id"].value_counts()["count"].max() <= 2
    assert namespace["top_tokens"].columns == namespace["top_tokens_big"].columns


def damaged_copy(source, tmp_path):
    import shutil

    out = str(tmp_path / "damaged")
    shutil.copytree(source, out)
    return out


def rewrite_docs_part(out, change) -> None:
    """Apply `change` to the first docs part and record its new size and checksum, so only
    the content check can notice."""
    from helpers import manifest_of, restamp_part

    rel = next(p.path for p in manifest_of(out).parts if p.kind == "docs")
    path = os.path.join(out, rel)
    pq.write_table(change(pq.read_table(path)), path)
    restamp_part(out, rel)


def verify_problems(out) -> list[str]:
    from crowstream.errors import VerifyError

    with pytest.raises(VerifyError) as info:
        cs.verify(out)
    return info.value.problems


def test_verify_checks_the_tokens_column(chunked, tmp_path):
    import pyarrow as pa

    assert cs.verify(chunked)["parts"] > 0  # intact before

    def drop_last_token_of_first_doc(table):
        tokens = table["tokens"].to_pylist()
        tokens[0] = tokens[0][:-1]
        return table.set_column(3, table.schema.field("tokens"), pa.array(tokens, table.schema.field("tokens").type))

    out = damaged_copy(chunked, tmp_path)
    rewrite_docs_part(out, drop_last_token_of_first_doc)
    [problem] = verify_problems(out)
    assert re.match(r"^tokens mismatch: docs/part-\d+-\d+-\d+\.parquet has 1 document\(s\) whose tokens length "
                    r"differs from n_tokens \(doc_id \d+: \d+ ids, n_tokens \d+\)$", problem), problem


def test_verify_refuses_a_docs_part_without_tokens(chunked, tmp_path):
    out = damaged_copy(chunked, tmp_path)
    rewrite_docs_part(out, lambda table: table.drop_columns(["tokens"]))
    [problem] = verify_problems(out)
    assert problem.startswith("schema mismatch: docs/") and "tokens: list<element: int32 not null>" in problem


def test_verify_checks_the_saved_tokenizer(chunked, tmp_path):
    import shutil

    out = damaged_copy(chunked, tmp_path)
    with open(os.path.join(out, "tokenizer", "tokenizer.json"), "w") as f:
        f.write("{ not json")
    [problem] = verify_problems(out)
    assert problem.startswith("unreadable: tokenizer/ does not load as a tokenizer ("), problem
    shutil.rmtree(os.path.join(out, "tokenizer"))
    assert verify_problems(out) == ["missing: tokenizer/ (the saved tokenizer)"]


def test_a_run_killed_before_its_first_manifest_with_the_tokenizer_saved_restarts(tmp_path):
    """The tokenizer is saved before the first manifest: a run killed between the two left
    tokenizer/ beside vocab.parquet and .tmp/; resume/overwrite must still recognise OUT."""

    out = tmp_path / "out"
    for sub in (".tmp", "data", "docs", "tokenizer"):
        (out / sub).mkdir(parents=True)
    (out / "tokenizer" / "tokenizer.json").write_text("{}")
    (out / "vocab.parquet").write_bytes(b"")
    (out / "README.md").write_text("written by crowstream")
    assert inspect_out(str(out), overwrite=False, resume=True) == "replace"
    assert inspect_out(str(out), overwrite=True, resume=False) == "replace"


def test_analysis_and_report_of_a_bucket_output(gpt2, corpus, reference_capture, tmp_path):
    """s3:// (a moto server): top with contexts, many latents, contexts and the report read
    through the catalog give what the same capture gives locally."""
    pytest.importorskip("moto.server")
    from test_s3 import server as server_fixture

    kw = dict(context_size=16, overflow="chunk", shard_size=6, batch_size=4, progress=False)
    local = reference_capture(12, MODULES, **kw)
    for options in server_fixture.__wrapped__():
        url = "s3://bucket/analysis"
        cs.capture(gpt2[0], corpus[:12], MODULES, url, tokenizer=gpt2[1], storage_options=options, **kw)
        analysis.load_tokenizer.__globals__["_REMOTE"].clear()
        for score in ("norm", MATRIX[:, :4]):
            remote = cs.top(url, MODULES[1], score, k=5, storage_options=options)
            assert remote.equals(cs.top(local, MODULES[1], score, k=5))
        frame = pl.DataFrame({"doc_id": [3, 5], "position": [17, 0]})
        assert cs.contexts(url, frame, storage_options=options).equals(cs.contexts(local, frame))
        done = cs.report(url, tmp_path / "remote.html", storage_options=options)
        page = (tmp_path / "remote.html").read_text(encoding="utf-8")
        assert done["modules"][MODULES[0]]["sampled_rows"] == done["modules"][MODULES[0]]["rows"] > 0
        assert "s3://bucket/analysis" in page and options["secret"] not in page
        assert page.count("«<b>") >= 20


def test_dashboard_tables_equal_top_and_numpy(chunked, tmp_path):
    done = cs.dashboard(chunked, MODULES[0], MATRIX, tmp_path / "dash", k=3, window=(40, 2), bins=7)
    assert done["latents"] == 37
    examples, histograms = pl.read_parquet(done["examples"]), pl.read_parquet(done["histograms"])
    assert examples.columns == ["latent", "rank", "doc_id", "position", "token", "activation",
                                "window_start", "window_tokens"]
    want = many_reference(chunked, MODULES[0], lambda x: x @ MATRIX, 3)
    assert_many_same(examples.rename({"activation": "score"}), want, chunked, MODULES[0],
                     lambda x: x @ MATRIX, exact=False)
    tokens = docs_tokens(chunked)
    for row in examples.iter_rows(named=True):
        start = row["window_start"]
        assert start == max(row["position"] - 40, row["position"] // 16 * 16)  # within the chunk
        ids = tokens[row["doc_id"]]
        assert row["window_tokens"] == ids[start:min(len(ids), start // 16 * 16 + 16, row["position"] + 3)]
        assert row["window_tokens"][row["position"] - start] == row["token"]
    _, _, _, vectors = read_rows(chunked)[MODULES[0]]
    scores = vectors @ MATRIX
    assert histograms["latent"].to_list() == list(range(37))
    for row in histograms.iter_rows(named=True):
        values = scores[:, row["latent"]]
        assert row["min"] == pytest.approx(values.min()) and row["max"] == pytest.approx(values.max())
        counts, edges = np.histogram(values[values != 0], bins=7, range=(row["min"], row["max"]))
        # BLAS may round a score at the range's ends or a bin edge the other way: +-2 per bin
        assert np.abs(np.array(row["counts"]) - counts).max() <= 2, (row["counts"], counts)
        assert sum(row["counts"]) == int((values != 0).sum())
        assert row["zeros"] == int((values == 0).sum())
        np.testing.assert_allclose(row["bin_edges"], edges, rtol=1e-6, atol=1e-7)
        assert row["fraction_active"] == pytest.approx((values > 0).mean())
    with pytest.raises(ConfigError, match="dashboard needs many latents"):
        cs.dashboard(chunked, MODULES[0], "norm", tmp_path / "one")


def test_dashboard_of_an_sae_counts_zeros_apart(chunked, tmp_path):
    done = cs.dashboard(chunked, MODULES[1], sae, tmp_path / "sae", k=2, bins=4)
    histograms = pl.read_parquet(done["histograms"])
    _, _, _, vectors = read_rows(chunked)[MODULES[1]]
    acts = sae(torch.from_numpy(vectors)).numpy()
    rows = len(acts)
    for row in histograms.iter_rows(named=True):
        values = acts[:, row["latent"]]
        finite = values[np.isfinite(values)]
        assert row["zeros"] + sum(row["counts"]) == len(finite)
        assert row["fraction_active"] == pytest.approx((finite > 0).sum() / rows)
    assert histograms.filter(pl.col("latent") == 6)["zeros"].item() == rows  # -0.0 everywhere


def test_docs_dashboard_recipe_runs_as_written(chunked, tmp_path, capsys):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "docs", "analysis.md"), encoding="utf-8") as f:
        section = f.read().split("\n## Feature dashboards\n", 1)[1].split("\n## ", 1)[0]
    [code] = [b.split("```", 1)[0] for b in section.split("```python\n")[1:]]
    line = 'OUT, MODULE, DEST = "acts/", "transformer.h.6", "dashboard/"'
    assert line in code
    namespace = {}
    exec(compile(code.replace(line, f"OUT, MODULE, DEST = {chunked!r}, {MODULES[1]!r}, "
                                     f"{str(tmp_path) + '/'!r}"), "docs", "exec"), namespace)
    assert namespace["bins"]["count"].sum() + namespace["densest"]["zeros"][0] == \
        len(read_rows(chunked)[MODULES[1]][0])
    assert capsys.readouterr().out.count("[[") == 10


@pytest.mark.parametrize("share", [1, 8, 10**9])  # always sparse, the default, always dense
def test_top_k_latents_sparse_and_dense_paths_agree_with_brute_force(share, monkeypatch):
    from crowstream.reading import latents

    monkeypatch.setattr(latents, "SPARSE_SHARE", share)
    rng = np.random.default_rng(share)
    n, n_latents, k = 1000, 13, 7
    scores = np.round(rng.standard_normal((n, n_latents)), 1).astype(np.float32)  # many ties
    scores[:, 0] = 0  # a dead latent
    scores[rng.random((n, n_latents)) < 0.01] = np.nan
    doc_id = rng.integers(0, 40, n)
    position = rng.permutation(n).astype(np.int32)  # unique (doc_id, position) pairs
    token = rng.integers(0, 500, n).astype(np.int32)
    best = latents.TopKLatents(k, n_latents)
    for lo in range(0, n, 93):
        best.add(scores[lo:lo + 93], doc_id[lo:lo + 93], position[lo:lo + 93], token[lo:lo + 93])
    frame = best.frame()
    for latent in range(n_latents):
        s = np.where(np.isnan(scores[:, latent]), -np.inf, scores[:, latent]).astype(np.float64)
        want = np.lexsort((position, doc_id, -s))[:k]
        got = frame.filter(pl.col("latent") == latent)
        assert got["doc_id"].to_list() == doc_id[want].tolist()
        assert got["position"].to_list() == position[want].tolist()
        assert got["score"].to_list() == s[want].tolist()
    small = latents.TopKLatents(k, 2)
    small.add(scores[:3, :2], doc_id[:3], position[:3], token[:3])  # fewer rows than k
    assert small.frame().height == 6 and small.frame()["doc_id"].max() < 40
