"""Pre-tokenized corpora (`tokens_field`) and the tokenizing reader thread: the rows of a
capture from token ids equal those of the same corpus captured from text, whatever the
container (a list, a `datasets.Dataset`, a Parquet file, a crowstream output's docs)."""

from __future__ import annotations

import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import crowstream as cs
from crowstream.errors import ConfigError, DataError
from crowstream.pipeline.threads import prefetch
from helpers import assert_same_rows, manifest_of, raw_manifest

MODULES = ["transformer.h.0", "transformer.h.2"]
N = 24
KW = dict(shard_size=8, batch_size=4, progress=False)


@pytest.fixture(scope="module")
def text_run(gpt2, corpus, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("text") / "out")
    cs.capture(gpt2[0], corpus[:N], MODULES, out, tokenizer=gpt2[1], overflow="chunk", **KW)
    return out


@pytest.fixture(scope="module")
def token_ids(gpt2, corpus):
    """The corpus as its tokenizer feeds it (special tokens included, untruncated)."""
    return [list(ids) for ids in gpt2[1](corpus[:N], add_special_tokens=True)["input_ids"]]


def test_list_of_ids_equals_text(gpt2, token_ids, text_run, tmp_path):
    out = str(tmp_path / "out")
    rows = [{"input_ids": ids, "other": "x"} for ids in token_ids]
    cs.capture(gpt2[0], rows, MODULES, out, tokenizer=gpt2[1], overflow="chunk",
               tokens_field="input_ids", **KW)
    assert_same_rows(out, text_run)
    config = raw_manifest(out)["config"]
    assert config["tokens_field"] == "input_ids"
    assert config["source"]["tokens_field"] == "input_ids"
    assert raw_manifest(text_run)["config"]["tokens_field"] is None


def test_parquet_and_dataset_of_ids_equal_text(gpt2, token_ids, text_run, tmp_path):
    import datasets

    path = str(tmp_path / "ids.parquet")
    pq.write_table(pa.table({"input_ids": pa.array(token_ids, pa.list_(pa.int32()))}), path)
    for data, name in ((path, "parquet"),
                       (datasets.Dataset.from_dict({"input_ids": token_ids}), "dataset")):
        out = str(tmp_path / name)
        cs.capture(gpt2[0], data, MODULES, out, tokenizer=gpt2[1], overflow="chunk",
                   tokens_field="input_ids", **KW)
        assert_same_rows(out, text_run)


def test_pandas_frame_of_ids_equals_text(gpt2, token_ids, text_run, tmp_path):
    import pandas as pd

    out = str(tmp_path / "out")
    frame = pd.DataFrame({"input_ids": token_ids})
    cs.capture(gpt2[0], frame, MODULES, out, tokenizer=gpt2[1], overflow="chunk",
               tokens_field="input_ids", **KW)
    assert_same_rows(out, text_run)


def test_truncate_applies_to_ids(gpt2, corpus, token_ids, tmp_path):
    kw = dict(tokenizer=gpt2[1], context_size=16, **KW)
    text, ids = str(tmp_path / "text"), str(tmp_path / "ids")
    cs.capture(gpt2[0], corpus[:N], MODULES, text, **kw)
    cs.capture(gpt2[0], [{"ids": t} for t in token_ids], MODULES, ids, tokens_field="ids", **kw)
    assert_same_rows(ids, text)
    assert manifest_of(ids).counts.tokens_fed == sum(min(len(t), 16) for t in token_ids)


def test_an_outputs_docs_are_a_pretokenized_corpus(gpt2, text_run, tmp_path):
    again = str(tmp_path / "again")
    cs.capture(gpt2[0], text_run, MODULES, again, tokenizer=gpt2[1], overflow="chunk",
               tokens_field="tokens", **KW)
    assert_same_rows(again, text_run)


def test_store_text_is_refused():
    with pytest.raises(ConfigError, match="store_text=True keeps each document's text.*drop store_text"):
        cs.capture("unused", ["x"], ["h"], "unused", tokens_field="input_ids", store_text=True)


@pytest.mark.parametrize("rows, match", [
    ([{"ids": "some text"}], r"document 0: tokens field 'ids' holds 'some text', not a list of token ids"),
    ([{"ids": [1, -2]}], r"not a list of token ids \(non-negative integers\)"),
    ([{"ids": [[1, 2]]}], "not a list of token ids"),
    ([{"ids": [1, 2]}, {"text": "a"}], r"document 1 has no field 'ids'.*tokens_field="),
    ([{"ids": [1, 10 ** 6]}], r"document 0 holds token id 1000000, beyond the tokenizer's"),
])
def test_bad_ids_are_one_clear_error(gpt2, tmp_path, rows, match):
    with pytest.raises(DataError, match=match):
        cs.capture(gpt2[0], rows, MODULES, str(tmp_path / "out"), tokenizer=gpt2[1],
                   tokens_field="ids", **KW)


def test_text_file_with_tokens_field_is_refused(gpt2, tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("one\ntwo\n")
    with pytest.raises(DataError, match="is a text file: it has no column of token ids"):
        cs.capture(gpt2[0], str(path), MODULES, str(tmp_path / "out"), tokenizer=gpt2[1],
                   tokens_field="ids", **KW)


def test_resume_refuses_another_tokens_field(gpt2, token_ids, tmp_path):
    out = str(tmp_path / "out")
    rows = [{"a": ids, "b": ids} for ids in token_ids]
    cs.capture(gpt2[0], rows, MODULES, out, tokenizer=gpt2[1], tokens_field="a", **KW)
    with pytest.raises(cs.errors.ResumeMismatchError, match="tokens_field"):
        cs.capture(gpt2[0], rows, MODULES, out, tokenizer=gpt2[1], tokens_field="b",
                   resume=True, **KW)


def test_prefetch_runs_ahead_by_cost_and_stops_when_closed():
    produced = []

    def items():
        for i in range(100):
            produced.append(i)
            yield i

    stream = prefetch(items(), 10, cost=lambda i: 3)
    assert next(stream) == 0
    deadline = time.monotonic() + 5
    while len(produced) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)
    # 4 items of cost 3 wait (12 >= 10) after the one taken; the 6th is read, then held
    assert 5 <= len(produced) <= 6
    stream.close()
    assert not [t for t in threading.enumerate() if t.name == "crowstream-reader"]


def test_prefetch_reraises_the_readers_failure():
    def items():
        yield 1
        raise ValueError("broken corpus")

    stream = prefetch(items(), 10, cost=lambda i: 1)
    assert next(stream) == 1
    with pytest.raises(ValueError, match="broken corpus"):
        next(stream)


# -- OOM back-off in tokens ---------------------------------------------------------------

def oom_above_tokens(monkeypatch, limit: int) -> list:
    """ModelTracer._trace raises CUDA OOM on any batch of more than `limit` padded tokens;
    -> the [B, T] shapes of every forward tried."""
    import torch

    from crowstream.pipeline.tracing import ModelTracer

    original, shapes = ModelTracer._trace, []

    def trace(self, ids, *args, **kwargs):
        shapes.append(tuple(ids.shape))
        if ids.numel() > limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return original(self, ids, *args, **kwargs)

    monkeypatch.setattr(ModelTracer, "_trace", trace)
    return shapes


LONG_AND_SHORT = ["alpha beta gamma delta " * 40] * 8 + ["short one"] * 8


@pytest.fixture(scope="module")
def no_oom_run(gpt2, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("no-oom") / "out")
    cs.capture(gpt2[0], LONG_AND_SHORT, MODULES, out, tokenizer=gpt2[1], batch_size=8,
               shard_size=16, progress=False)
    return out


def test_oom_caps_tokens_and_short_batches_after_it_are_not_cut(monkeypatch, gpt2, no_oom_run,
                                                               tmp_path, caplog):
    caplog.set_level("WARNING", logger="crowstream")
    shapes = oom_above_tokens(monkeypatch, 300)
    out = str(tmp_path / "out")
    cs.capture(gpt2[0], LONG_AND_SHORT, MODULES, out, tokenizer=gpt2[1], batch_size=8,
               shard_size=16, progress=False, packing="off")  # padded: packed has its own test
    # [8, 64] = 512 tokens fails; the cap becomes 256: two [4, 64] forwards; then the batch
    # of 8 short documents (8 x 2 tokens) runs whole (a cap in documents would cut it to 4)
    assert shapes == [(8, 64), (4, 64), (4, 64), (8, shapes[-1][1])], shapes
    assert "out of memory at a batch of 512 padded tokens (8 x 64); capping forwards at 256 " \
           "padded tokens" in caplog.text
    assert_same_rows(out, no_oom_run, atol=1e-5)


def test_the_token_cap_doubles_after_clean_forwards_up_to_max_batch_tokens(
        monkeypatch, gpt2, no_oom_run, tmp_path, caplog):
    from crowstream.pipeline import session

    caplog.set_level("INFO", logger="crowstream")
    monkeypatch.setattr(session, "OOM_RECOVERY_BATCHES", 2)
    shapes = oom_above_tokens(monkeypatch, 150)
    out = str(tmp_path / "out")
    cs.capture(gpt2[0], LONG_AND_SHORT * 2, MODULES, out, tokenizer=gpt2[1], batch_size=8,
               shard_size=16, max_batch_tokens=1024, progress=False, packing="off")
    assert "capping forwards at 256 padded tokens" in caplog.text
    assert "capping forwards at 128 padded tokens" in caplog.text
    assert "no out of memory for 2 forwards: cap now 256 padded tokens" in caplog.text
    # the second shard's long batch is tried at the doubled cap (256) before it OOMs again
    assert shapes.count((4, 64)) >= 2 and shapes.count((2, 64)) >= 8


def test_oom_splits_packed_batches_down_to_one_row_and_rows_stay_equal(
        monkeypatch, gpt2, no_oom_run, tmp_path):
    import torch

    from crowstream.pipeline.tracing import ModelTracer

    original, seen = ModelTracer.run, []

    def run(self, batch):  # OOM on more than 4 documents in a forward, packed or not
        seen.append((tuple(batch.input_ids.shape), batch.n_pieces))
        if batch.n_pieces > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return original(self, batch)

    monkeypatch.setattr(ModelTracer, "run", run)
    out = str(tmp_path / "out")
    cs.capture(gpt2[0], LONG_AND_SHORT, MODULES, out, tokenizer=gpt2[1], batch_size=8,
               shard_size=16, packing="auto", progress=False)
    # the 8 short documents (6 tokens each) share one packed row: backing off splits that
    # row's documents into two rows of 4
    assert seen[-3:] == [((1, 48), 8), ((1, 24), 4), ((1, 24), 4)], seen
    assert_same_rows(out, no_oom_run, atol=1e-5)


# -- the tokenizer's fast path ------------------------------------------------------------

@pytest.mark.parametrize("overflow", ["truncate", "chunk"])
@pytest.mark.parametrize("which", ["gpt2", "minilm", "gpt2 with a BOS", "gpt2 truncating itself",
                                   "gpt2 truncating on the left"])
def test_tokenizing_gives_the_tokenizers_own_ids_on_either_path(gpt2, minilm, corpus, which,
                                                                overflow):
    """Texts go straight to the `tokenizers` backend only where that cannot change the ids
    (no special tokens added, truncation from the right, no truncation or padding set on
    the backend); a BERT, a tokenizer adding a BOS, one that truncates by itself and one
    that truncates on the left take the tokenizer's own call.
    Either way the ids equal `tokenizer(texts)` (truncated to context_size or not)."""
    import copy

    from tokenizers.processors import TemplateProcessing

    from crowstream.pipeline.batching import Tokenizing, _plain_backend
    from crowstream.pipeline.options import CaptureConfig

    tokenizer = copy.deepcopy(minilm[1] if which == "minilm" else gpt2[1])
    if which == "gpt2 with a BOS":
        eos = tokenizer.eos_token
        tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
            single=f"{eos} $A", special_tokens=[(eos, tokenizer.eos_token_id)])
    if which == "gpt2 truncating itself":
        tokenizer.backend_tokenizer.enable_truncation(7)
    if which == "gpt2 truncating on the left":
        tokenizer.truncation_side = "left"
    assert (_plain_backend(tokenizer) is not None) == (which == "gpt2")
    texts = [*corpus[:20], "", " leading space", "x" * 300]
    config = CaptureConfig(model="m", tokenizer="t", source="s", modules=("a",), context_size=16,
                           overflow=overflow)
    got = Tokenizing(tokenizer, config).encode(texts)
    truncate = overflow == "truncate"
    want = tokenizer(texts, add_special_tokens=True, truncation=truncate,
                     max_length=16 if truncate else None)["input_ids"]
    assert [ids.tolist() for ids in got] == want
    assert any(len(ids) > 16 for ids in want) != truncate  # long documents were there


@pytest.mark.parametrize("which", ["gpt2", "minilm", "minilm cleaning up spaces"])
def test_the_vocabulary_decodes_as_batch_decode_does(gpt2, minilm, which):
    """Straight from the backend, or through the tokenizer where it cleans up spaces."""
    import copy

    from crowstream.pipeline.tables import decode_each

    tokenizer = copy.deepcopy(gpt2[1] if which == "gpt2" else minilm[1])
    tokenizer.clean_up_tokenization_spaces = which.endswith("spaces")
    size = len(tokenizer)
    assert decode_each(tokenizer, size) == tokenizer.batch_decode([[i] for i in range(size)])


def test_no_document_is_tokenized_twice_and_the_rows_are_the_same(gpt2, corpus, tmp_path,
                                                                   monkeypatch):
    """The shard-size estimate's documents (the first 64) are tokenized once: the stream
    takes their ids from the estimate. The rows equal those of a run given its shard size,
    which tokenizes every document in the stream."""
    import collections

    from crowstream.pipeline import batching
    from crowstream.pipeline.options import SHARD_TARGET_TOKENS

    texts = corpus[:100]
    tokenized = []
    real = batching.Tokenizing._encode

    def counting(self, documents, doc_ids):
        tokenized.extend(documents)
        return real(self, documents, doc_ids)

    monkeypatch.setattr(batching.Tokenizing, "_encode", counting)
    model, tokenizer = gpt2
    estimated = cs.capture(model, texts, MODULES, str(tmp_path / "estimated"), tokenizer=tokenizer,
                           batch_size=4, progress=False)
    context = estimated.manifest.config["context_size"]
    lengths = [min(len(tokenizer(t)["input_ids"]), context) for t in texts[:batching.ESTIMATE_DOCS]]
    assert estimated.manifest.shard_size == int(SHARD_TARGET_TOKENS / sum(lengths) * len(lengths))
    assert collections.Counter(tokenized) == collections.Counter(texts)
    given = cs.capture(model, texts, MODULES, str(tmp_path / "given"), tokenizer=tokenizer,
                       batch_size=4, progress=False, shard_size=estimated.manifest.shard_size)
    assert_same_rows(str(given.path), str(estimated.path))


def test_each_shard_starts_with_a_small_window_so_the_first_forward_starts_early(gpt2, corpus):
    """A shard's first sorting window is its first FIRST_WINDOW_DOCS rows (then windows of
    SORT_WINDOW_DOCS): its batches hold only those documents, and the stream hands out the
    first batch while later windows are still being tokenized. Every shard starts the same
    way, so a resumed run rebuilds the same batches."""
    from crowstream.pipeline import batching
    from crowstream.pipeline.batching import Batch, ShardEnd, Tokenizing, shard_stream
    from crowstream.pipeline.options import FIRST_WINDOW_DOCS, CaptureConfig

    assert batching.window_bounds(0) == []
    assert batching.window_bounds(FIRST_WINDOW_DOCS + 1) == [
        (0, FIRST_WINDOW_DOCS), (FIRST_WINDOW_DOCS, FIRST_WINDOW_DOCS + 1)]
    assert batching.window_bounds(3000) == [(0, 64), (64, 1088), (1088, 2112), (2112, 3000)]

    released = threading.Event()
    tokenized: list[int] = []

    class Slow(Tokenizing):
        def _encode(self, documents, doc_ids):
            if doc_ids and doc_ids[0] % 100 >= FIRST_WINDOW_DOCS:  # a later window waits
                assert released.wait(30), "the first batch never came"
            tokenized.extend(doc_ids)
            return super()._encode(documents, doc_ids)

    config = CaptureConfig(model={}, tokenizer={}, source={}, modules=("x",), context_size=32,
                           batch_size=8)
    texts = [corpus[i % len(corpus)] for i in range(200)]
    shards = [(k, list(enumerate(texts))[k * 100:(k + 1) * 100]) for k in range(2)]
    stream = shard_stream(shards, Slow(gpt2[1], config), shard_size=100, tokens_before=0)
    first = next(stream)
    assert isinstance(first, Batch) and set(first.piece_doc_ids) <= set(range(FIRST_WINDOW_DOCS))
    assert max(tokenized) < FIRST_WINDOW_DOCS  # the rest of shard 0 is not tokenized yet
    released.set()
    items = [first, *stream]
    for k in range(2):
        batches = [b for b in items if isinstance(b, Batch) and b.shard == k]
        start = k * 100
        firsts = FIRST_WINDOW_DOCS // config.batch_size
        assert all(set(b.piece_doc_ids) < set(range(start, start + FIRST_WINDOW_DOCS))
                   for b in batches[:firsts])
        assert all(set(b.piece_doc_ids) <= set(range(start + FIRST_WINDOW_DOCS, start + 100))
                   for b in batches[firsts:])
    assert [e.index for e in items if isinstance(e, ShardEnd)] == [0, 1]
