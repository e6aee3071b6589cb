"""Resume: an interrupted or failed run continues in the same OUT and ends with exactly the
rows an uninterrupted run writes; a resume that would change the rows is refused."""

from __future__ import annotations

import copy
import os
import re
import shutil
import signal

import pytest

import crowstream as cs
from crowstream.errors import Interrupted, ResumeMismatchError
from crowstream.pipeline.tracing import ModelTracer
from helpers import assert_same_rows, manifest_of, parts_of, read_rows, tree

MODULES = ["transformer.h.0", "transformer.h.2"]
N = 40                       # documents: 10 shards of 4, one batch per shard
KW = dict(shard_size=4, batch_size=4, progress=False)


# -- helpers -------------------------------------------------------------------------------

def assert_equals_reference(out, reference) -> None:
    m, ref = manifest_of(out), manifest_of(reference)
    assert m.status == "complete"
    assert m.counts == ref.counts
    assert m.shards == ref.shards
    assert parts_of(out) == parts_of(reference)  # the part files themselves are identical
    assert m.stats == ref.stats  # exactly: partial statistics re-merged in the same order
    assert_same_rows(out, reference)
    cs.verify(out)
    assert os.listdir(os.path.join(out, ".tmp")) == []


class Trace:
    """Wraps ModelTracer.run: records the documents of every forward pass, and performs
    `action` just before forward pass number `at` (1-based)."""

    def __init__(self, monkeypatch, at=None, action=None):
        self.calls, self.doc_ids = 0, []
        original = ModelTracer.run

        def run(tracer, batch):
            self.calls += 1
            self.doc_ids.extend(batch.piece_doc_ids.tolist())
            if self.calls == at:
                action()
            return original(tracer, batch)

        monkeypatch.setattr(ModelTracer, "run", run)


def send(signum):
    """Signal this process, but only while crowstream's handler is installed (the default
    SIGTERM action would kill the whole test session)."""
    def action():
        handler = signal.getsignal(signum)
        assert callable(handler) and handler is not signal.default_int_handler, \
            f"capture() has no {signal.Signals(signum).name} handler installed"
        os.kill(os.getpid(), signum)
    return action


def capture(gpt2, data, out, **kw):
    model, tokenizer = gpt2
    return cs.capture(model, data, kw.pop("modules", MODULES), out, tokenizer=tokenizer, **{**KW, **kw})


@pytest.fixture(scope="module")
def docs(corpus):
    return corpus[:N]


@pytest.fixture(scope="module")
def reference(reference_capture):
    return reference_capture(N, MODULES, **KW)  # shared with the other files that need it


def interrupted_run(monkeypatch, gpt2, data, out, *, at=5, signum=signal.SIGINT, **kw):
    """A run stopped by `signum` during forward pass `at`; -> the Interrupted error."""
    trace = Trace(monkeypatch, at, send(signum))
    with pytest.raises(Interrupted) as info:
        capture(gpt2, data, out, **kw)
    monkeypatch.undo()
    assert trace.calls == at, "the run kept taking batches after the signal"
    return info.value


# -- resume after interrupts and failures ----------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_commits_complete_shards_then_resume_is_bit_identical(
        monkeypatch, gpt2, docs, reference, tmp_path, caplog, signum):
    out = str(tmp_path / "out")
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    # one batch per shard: the signal comes during shard 4's only batch, so that batch
    # finishes and shard 4 is complete when its ShardEnd arrives after the signal: it
    # is committed (0.1 dropped it), and nothing after it is started
    error = interrupted_run(monkeypatch, gpt2, docs, out, at=5, signum=signum)
    assert re.search(rf"interrupted: committed 5 shard\(s\) to {re.escape(repr(out))}\. Rerun the "
                     r"same call with resume=True \(--resume\)", str(error))
    assert {s: signal.getsignal(s) for s in handlers} == handlers, "signal handlers not restored"
    assert f"{signal.Signals(signum).name} received" in caplog.text
    m = manifest_of(out)
    assert m.status == "interrupted" and m.error is None
    assert [s.index for s in m.shards] == [0, 1, 2, 3, 4]
    assert parts_of(out) == parts_of(reference)[:len(parts_of(out))]
    assert cs.verify(out)["parts"] == 5 * 3
    assert os.listdir(os.path.join(out, ".tmp")) == []

    trace = Trace(monkeypatch)
    run = capture(gpt2, docs, out, resume=True)
    assert min(trace.doc_ids) >= 20, "the model was re-run on committed documents"
    assert sorted(trace.doc_ids) == list(range(20, N))
    assert run.docs == N and run.run_id == m.run_id
    assert_equals_reference(out, reference)


def test_resume_rebuilds_a_shards_windows_when_it_holds_more_than_the_first_one(
        monkeypatch, gpt2, corpus, tmp_path):
    """Shards of 80 documents are sorted in two windows (the first 64, then 16). A run
    stopped in shard 2 and resumed starts there, and still cuts that shard's windows as an
    uninterrupted run did: the windows belong to the shard, not to where a process began."""
    from crowstream.pipeline.batching import window_bounds

    assert window_bounds(80) == [(0, 64), (64, 80)]
    docs, kw = corpus * 2, dict(shard_size=80, batch_size=16)  # 3 shards
    reference = str(tmp_path / "reference")
    capture(gpt2, docs, reference, **kw)
    out = str(tmp_path / "out")
    original = ModelTracer.run

    def stop_in_shard_2(tracer, batch):
        if batch.shard == 2:
            send(signal.SIGINT)()
        return original(tracer, batch)

    monkeypatch.setattr(ModelTracer, "run", stop_in_shard_2)
    with pytest.raises(Interrupted):
        capture(gpt2, docs, out, **kw)
    monkeypatch.undo()
    assert [s.index for s in manifest_of(out).shards] == [0, 1]
    capture(gpt2, docs, out, resume=True, **kw)
    assert_equals_reference(out, reference)


def test_signal_inside_a_shard_drops_only_that_open_shard(monkeypatch, gpt2, docs, tmp_path):
    out = str(tmp_path / "out")
    # two batches per shard; the signal comes during shard 4's first batch
    interrupted_run(monkeypatch, gpt2, docs, out, at=9, batch_size=2)
    assert [s.index for s in manifest_of(out).shards] == [0, 1, 2, 3]
    assert cs.verify(out)["parts"] == 4 * 3  # the open shard's files were dropped
    assert os.listdir(os.path.join(out, ".tmp")) == []


def test_second_signal_aborts_at_once_and_resume_still_completes(monkeypatch, gpt2, docs, reference,
                                                                 tmp_path):
    out = str(tmp_path / "out")
    trace = Trace(monkeypatch, 4, lambda: (send(signal.SIGINT)(), send(signal.SIGINT)()))
    with pytest.raises(KeyboardInterrupt):
        capture(gpt2, docs, out)
    monkeypatch.undo()
    assert trace.calls == 4
    m = manifest_of(out)
    assert m.status == "interrupted"
    assert len(m.shards) == 3
    cs.verify(out)
    capture(gpt2, docs, out, resume=True)
    assert_equals_reference(out, reference)


def test_failure_mid_run_is_recorded_and_resume_completes(monkeypatch, gpt2, docs, reference, tmp_path):
    out = str(tmp_path / "out")

    def boom():
        raise RuntimeError("boom: the model exploded")

    Trace(monkeypatch, 7, boom)
    with pytest.raises(RuntimeError, match="^boom: the model exploded$"):
        capture(gpt2, docs, out)
    monkeypatch.undo()
    m = manifest_of(out)
    assert m.status == "failed"
    assert m.error == "RuntimeError: boom: the model exploded"
    assert len(m.shards) == 6
    cs.verify(out)
    model = gpt2[0]
    assert not any("forward" in mod.__dict__ for mod in model.modules()), "model left wrapped"
    capture(gpt2, docs, out, resume=True)
    assert_equals_reference(out, reference)


def test_resume_deletes_stale_tmp_and_unlisted_files_and_keeps_committed_ones(
        monkeypatch, gpt2, docs, reference, tmp_path, caplog):
    out = str(tmp_path / "out")
    interrupted_run(monkeypatch, gpt2, docs, out, at=5)  # shards 0-4 committed
    committed = {p.path: os.stat(os.path.join(out, p.path)) for p in manifest_of(out).parts}
    real_part = os.path.join(out, next(iter(committed)))
    stale = {
        ".tmp/transformer.h.0.part-00000-000005-000.parquet": real_part,
        ".tmp/crowstream.json.tmp": None,
        ".tmp/junk": None,
        "data/module=transformer.h.0/part-00000-000099-000.parquet": real_part,
        "data/module=transformer.h.2/part-00000-000005-000.parquet": real_part,  # same name as a future part
        "data/module=transformer.h.0/notes.txt": None,
        "docs/part-00000-000099-000.parquet": real_part,
    }
    for rel, source in stale.items():
        path = os.path.join(out, rel)
        if source:
            shutil.copyfile(source, path)
        else:
            with open(path, "w") as f:
                f.write("half-written")
    caplog.set_level("INFO", logger="crowstream")
    capture(gpt2, docs, out, resume=True)
    assert f"resume: removed {len(stale)} uncommitted file(s)" in caplog.text
    for rel in stale:
        assert rel in caplog.text
    for rel in (".tmp/junk", "data/module=transformer.h.0/notes.txt", "docs/part-00000-000099-000.parquet",
                "data/module=transformer.h.0/part-00000-000099-000.parquet"):
        assert not os.path.exists(os.path.join(out, rel))
    for rel, st in committed.items():  # committed parts are kept, not rewritten
        now = os.stat(os.path.join(out, rel))
        assert (now.st_ino, now.st_mtime_ns, now.st_size) == (st.st_ino, st.st_mtime_ns, st.st_size)
    assert_equals_reference(out, reference)


@pytest.mark.parametrize("state", ["missing", "empty"])
def test_resume_on_missing_or_empty_out_simply_starts(gpt2, docs, reference, tmp_path, state):
    out = str(tmp_path / "out")
    if state == "empty":
        os.mkdir(out)
    run = capture(gpt2, docs, out, resume=True)
    assert run.docs == N
    assert_equals_reference(out, reference)


def test_resume_of_a_complete_run_changes_nothing(monkeypatch, gpt2, docs, reference, tmp_path):
    out = str(tmp_path / "out")
    shutil.copytree(reference, out)
    before = tree(out)
    trace = Trace(monkeypatch)
    run = capture(gpt2, docs, out, resume=True)
    assert trace.calls == 0
    assert run.docs == N and run.tokens == manifest_of(reference).counts.rows
    assert tree(out) == before


def test_resume_may_change_batch_size(monkeypatch, gpt2, docs, reference, tmp_path):
    """batch_size is not part of the rows' identity: a resume with another one is accepted
    and its rows match within float tolerance."""
    out = str(tmp_path / "out")
    interrupted_run(monkeypatch, gpt2, docs, out, at=3)
    capture(gpt2, docs, out, resume=True, batch_size=3)
    m = manifest_of(out)
    assert m.status == "complete" and m.counts == manifest_of(reference).counts
    assert_same_rows(out, reference, atol=1e-5)
    cs.verify(out)


# -- resume under every option that decides which rows are written -------------------------

OPTIONS = {
    "sample": dict(sample=18, seed=7),
    "max_docs": dict(max_docs=18),
    "max_tokens": dict(max_tokens=600),
    "chunk": dict(overflow="chunk", context_size=24),
    "float16-exclusions-text": dict(dtype="float16", exclude_special_tokens=True,
                                    exclude_token_ids=[13], store_text=True),
}


@pytest.mark.parametrize("option", OPTIONS)
def test_interrupt_and_resume_equals_uninterrupted_under_option(monkeypatch, gpt2, tmp_path, option):
    data = list(python_docs_with_specials(24))
    kw = OPTIONS[option]
    ref, out = str(tmp_path / "ref"), str(tmp_path / "out")
    capture(gpt2, data, ref, **kw)
    shards = len(manifest_of(ref).shards)
    assert shards >= 4
    if option == "max_tokens":
        assert manifest_of(ref).counts.docs < 24  # the limit really stopped the run
    interrupted_run(monkeypatch, gpt2, data, out, at=6 if option == "chunk" else 3, **kw)
    assert 1 <= len(manifest_of(out).shards) < shards
    committed = set(read_rows(out)["docs"][0].tolist())
    trace = Trace(monkeypatch)
    capture(gpt2, data, out, resume=True, **kw)
    assert trace.doc_ids and not committed & set(trace.doc_ids), "committed documents were re-run"
    assert_equals_reference(out, ref)


def python_docs_with_specials(n):
    """Real paragraphs, every fifth one with the special token in it, and a None (skipped)."""
    from crowstream.demo import python_doc_paragraphs

    for i, text in enumerate(python_doc_paragraphs(n, min_chars=1)):
        yield None if i == 11 else (text + " <|endoftext|> end" if i % 5 == 0 else text)


# -- streaming sources -----------------------------------------------------------------------

def make_source(kind, docs):
    if kind == "iterable_dataset":
        import datasets

        return datasets.Dataset.from_dict({"text": list(docs)}).to_iterable_dataset()
    return (text for text in docs)


@pytest.mark.parametrize("kind", ["iterable_dataset", "generator"])
def test_resume_over_streaming_source_does_not_rerun_committed_docs(monkeypatch, gpt2, docs, reference,
                                                                    tmp_path, kind):
    out = str(tmp_path / "out")
    interrupted_run(monkeypatch, gpt2, make_source(kind, docs), out, at=5)
    done = manifest_of(out).shards[-1].source_end
    assert done == 20
    trace = Trace(monkeypatch)
    run = capture(gpt2, make_source(kind, docs), out, resume=True)
    assert sorted(trace.doc_ids) == list(range(done, N)), "committed documents went through the model"
    assert run.docs == N
    assert manifest_of(out).counts == manifest_of(reference).counts
    assert_same_rows(out, reference)
    cs.verify(out)


# -- refusals --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def interrupted_out(gpt2, docs, tmp_path_factory):
    """A run stopped after 3 shards by a failure (status "failed"), to resume against."""
    out = str(tmp_path_factory.mktemp("resume-mismatch") / "out")
    mp = pytest.MonkeyPatch()
    try:
        Trace(mp, 4, lambda: (_ for _ in ()).throw(RuntimeError("stop")))
        with pytest.raises(RuntimeError, match="^stop$"):
            capture(gpt2, docs, out, sample=30, seed=1, max_docs=25, max_tokens=5000)
    finally:
        mp.undo()
    assert len(manifest_of(out).shards) == 3
    return out


def other_model(gpt2):
    model = copy.deepcopy(gpt2[0])
    model.config.attn_pdrop = 0.5  # changes the config fingerprint, not the modules
    return model, gpt2[1]


def other_tokenizer(gpt2):
    tokenizer = copy.deepcopy(gpt2[1])
    tokenizer.add_tokens(["zzyzx"])
    return gpt2[0], tokenizer


BASE = dict(sample=30, seed=1, max_docs=25, max_tokens=5000)
MISMATCHES = {
    "model": (dict(), other_model, None),
    "tokenizer": (dict(), other_tokenizer, None),
    "modules": (dict(modules=["transformer.h.1"]), None, None),
    "context_size": (dict(context_size=32), None, None),
    "overflow": (dict(overflow="chunk"), None, None),
    "dtype": (dict(dtype="float16"), None, None),
    "exclude_special_tokens": (dict(exclude_special_tokens=True), None, None),
    "exclude_token_ids": (dict(exclude_token_ids=[5]), None, None),
    "source": (dict(), None, lambda docs: docs[:-1] + ["a different last document"]),
    "sample": (dict(sample=31), None, None),
    "seed": (dict(seed=2), None, None),
    "max_docs": (dict(max_docs=24), None, None),
    "max_tokens": (dict(max_tokens=None), None, None),
    "store_text": (dict(store_text=True), None, None),
    "shard_size": (dict(shard_size=5), None, None),
}


@pytest.mark.parametrize("field", MISMATCHES)
def test_resume_refuses_a_different_configuration(gpt2, docs, interrupted_out, field):
    change, swap, data_change = MISMATCHES[field]
    model, tokenizer = swap(gpt2) if swap else gpt2
    data = data_change(list(docs)) if data_change else docs
    before = tree(interrupted_out)
    kw = {**KW, **BASE, **change}
    modules = kw.pop("modules", MODULES)
    with pytest.raises(ResumeMismatchError,
                       match=rf"cannot resume .*this call differs from the run recorded there "
                             rf"\({field}(\.\w+)?: manifest has .*, this call has .*\)\. Repeat the original "
                             r"call, or pass overwrite=True \(--overwrite\) / choose a new OUT"):
        cs.capture(model, data, modules, interrupted_out, tokenizer=tokenizer, resume=True, **kw)
    assert tree(interrupted_out) == before


def test_resume_mismatch_names_every_difference(gpt2, docs, interrupted_out):
    before = tree(interrupted_out)
    with pytest.raises(ResumeMismatchError) as info:
        capture(gpt2, docs, interrupted_out, resume=True, **{**BASE, "context_size": 32,
                                                            "dtype": "float16", "seed": 3})
    message = str(info.value)
    for field in ("context_size: manifest has 64, this call has 32",
                  "dtype: manifest has 'float32', this call has 'float16'",
                  "seed: manifest has 1, this call has 3"):
        assert field in message
    assert message.count("manifest has") == 3
    assert tree(interrupted_out) == before


def test_resume_without_manifest_is_refused_and_out_untouched(gpt2, docs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("not a crowstream output")
    with pytest.raises(cs.CrowstreamError, match=r"is not empty: it has no crowstream.json, so there "
                                                 r"is nothing to resume; choose another OUT"):
        capture(gpt2, docs, str(out), resume=True)
    assert tree(out) == {"mine.txt": b"not a crowstream output"}


def test_resume_refuses_a_different_iterable_dataset(monkeypatch, gpt2, docs, tmp_path):
    out = str(tmp_path / "out")
    interrupted_run(monkeypatch, gpt2, make_source("iterable_dataset", docs), out, at=3)
    other = make_source("iterable_dataset", [text.upper() for text in docs])
    with pytest.raises(ResumeMismatchError, match=r"source"):
        capture(gpt2, other, out, resume=True)


def test_signal_after_the_last_batch_still_completes(monkeypatch, gpt2, docs, reference, tmp_path):
    """A Ctrl-C that lands while the final commits drain interrupts nothing: every shard is
    committed, so the run must say complete, not ask for a resume."""
    from crowstream.pipeline import writers as pipeline

    finish = pipeline.Writers.finish

    def finish_after_a_signal(self):
        send(signal.SIGINT)()
        finish(self)

    monkeypatch.setattr(pipeline.Writers, "finish", finish_after_a_signal)
    out = str(tmp_path / "out")
    run = capture(gpt2, docs, out)
    assert run.manifest.status == "complete"
    assert manifest_of(out).status == "complete"
    assert_equals_reference(out, reference)


def test_a_second_capture_into_a_busy_out_is_refused(gpt2, docs, reference, tmp_path):
    """While one process holds OUT (its run is in flight), a resume or an overwrite from
    another must not clean up or delete its files."""
    import fcntl

    out = str(tmp_path / "out")
    shutil.copytree(reference, out)
    before = tree(out)
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # what a running capture holds
        for flag in ("resume", "overwrite"):
            with pytest.raises(cs.CrowstreamError, match=r"another crowstream process is writing "
                                                         r"to .*; let it finish"):
                capture(gpt2, docs, out, **{flag: True})
            assert tree(out) == before
    finally:
        os.close(fd)
    run = capture(gpt2, docs, out, resume=True)  # the lock died with its holder
    assert run.manifest.status == "complete"


@pytest.mark.parametrize("victim", ["part", "statistics"])
def test_resume_refuses_missing_or_resized_committed_files(gpt2, docs, interrupted_out, tmp_path,
                                                            victim):
    """A committed file that is gone or changed in size stops the resume before anything in
    OUT is deleted or renamed."""
    from crowstream.errors import ManifestError

    out = str(tmp_path / "out")
    shutil.copytree(interrupted_out, out)
    shard = manifest_of(out).shards[1]
    rel = shard.parts[1].path if victim == "part" else shard.stats.path
    if victim == "part":
        os.remove(os.path.join(out, rel))
    else:
        os.truncate(os.path.join(out, rel), 10)
    with open(os.path.join(out, ".tmp", "junk"), "w") as f:
        f.write("left by a crash")
    before = tree(out)
    with pytest.raises(ManifestError, match=rf"^cannot resume {re.escape(repr(out))}: 1 committed "
                                            rf"file\(s\) are missing or changed in size "
                                            rf"\({re.escape(rel)}\)\. `crowstream verify OUT` shows"):
        capture(gpt2, docs, out, resume=True, **BASE)
    assert tree(out) == before
