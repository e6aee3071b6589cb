"""Honest errors: each bad input gives one clear message (pinned here) and leaves OUT as it
was; disk full and OOM keep committed data intact; damaged manifests are explained, never
touched; module names cannot escape OUT; no pickle anywhere."""

from __future__ import annotations

import errno
import inspect
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

import crowstream as cs
from crowstream import errors
from crowstream.pipeline.tracing import ModelTracer
from helpers import (assert_same_rows, manifest_of, parts_of, patch_everywhere, raw_manifest,
                     save_manifest, tree)

MODULES = ["transformer.h.0", "transformer.h.2"]
KW = dict(shard_size=4, batch_size=4, progress=False)
N = 24


def capture(gpt2, data, out, **kw):
    model, tokenizer = gpt2
    modules = kw.pop("modules", MODULES)
    return cs.capture(model, data, modules, os.fspath(out), tokenizer=tokenizer, **{**KW, **kw})


def model_is_clean(model) -> bool:
    """No nnsight wrapping or hooks left on any module."""
    return not any("forward" in m.__dict__ or "__nnsight__" in m.__dict__ or m._forward_hooks
                   or m._forward_pre_hooks for m in model.modules())


@pytest.fixture(scope="module")
def docs(corpus):
    return corpus[:N]


@pytest.fixture(scope="module")
def reference(reference_capture):
    return reference_capture(N, MODULES, **KW)  # shared with the other files that need it


# -- bad inputs: one clear error, OUT as it was -------------------------------------------

def datasets_without_text():
    import datasets

    return datasets.Dataset.from_dict({"body": ["a", "b"], "title": ["x", "y"]})


BAD_INPUTS = {
    "unknown module": (
        dict(modules=["transformer.h.1.mpl"]), errors.ModuleNotFoundInModel,
        r"^module 'transformer\.h\.1\.mpl' is not in GPT2LMHeadModel; did you mean "
        r"'transformer\.h\.1\.mlp'.*\? run `crowstream modules MODEL` to list them\.$"),
    "glob matching nothing": (
        dict(modules=["transformer.h.*.mlpp"]), errors.ModuleNotFoundInModel,
        r"^module pattern 'transformer\.h\.\*\.mlpp' matches no module of GPT2LMHeadModel; .*"
        r"run `crowstream modules MODEL` to list them\.$"),
    "no modules": (dict(modules=[]), errors.ModuleNotFoundInModel, r"^no modules given"),
    "container that never runs": (
        dict(modules=["transformer.h"]), errors.ModuleOutputError,
        r"^module 'transformer\.h' did not run in the forward pass, so it has no output to capture "
        r"\(containers such as ModuleList never run\)\. Try a submodule such as 'transformer\.h\.0'"),
    "module returning a non-tensor": (
        dict(modules=["transformer"]), errors.ModuleOutputError,
        r"^module 'transformer' returns BaseModelOutputWithPastAndCrossAttentions, not a "
        r"\[batch, seq, d\] tensor; crowstream stores one d-vector per token\."),
    "empty data": (dict(data=[]), errors.DataError,
                   r"^the corpus has no documents; check data, split and max_docs\.$"),
    "missing text field (dicts)": (
        dict(data=[{"body": "some text", "title": "t"}]), errors.DataError,
        r"^document 0 has no field 'text'; available fields: body, title\. Pass text_field= "
        r"\(CLI: --text-field\)\.$"),
    "missing text field (datasets.Dataset)": (
        dict(data=datasets_without_text), errors.DataError,
        r"^text field 'text' is not a column of the dataset; available columns: body, title\. "
        r"Pass text_field=\.$"),
    "non-string text": (
        dict(data=["fine", "also fine", 42]), errors.DataError,
        r"^document 2 has type int, not str \(value '42'\); check text_field \(now 'text'\)\.$"),
    "unsupported data type": (dict(data=3.5), errors.DataError,
                              r"^data of type float is not supported"),
    "data path that does not exist": (
        dict(data="./no/such/corpus.txt"), errors.DataError,
        r"^data path './no/such/corpus\.txt' does not exist; pass an existing file or directory\.$"),
    "context_size too large": (
        dict(context_size=65), errors.ConfigError,
        r"^context_size=65 is larger than the model supports \(64 positions\); use "
        r"--context-size 64 or less"),
    "context_size zero": (dict(context_size=0), errors.ConfigError,
                          r"^context_size must be a positive integer, got 0\.$"),
    "dtype": (dict(dtype="bfloat16"), errors.ConfigError,
              r"^dtype must be one of 'float32', 'float16'; got 'bfloat16'\.$"),
    "overflow": (dict(overflow="wrap"), errors.ConfigError,
                 r"^overflow must be one of 'truncate', 'chunk'; got 'wrap'\.$"),
    "batch_size zero": (dict(batch_size=0), errors.ConfigError,
                        r"^batch_size must be a positive integer, got 0\.$"),
    "batch_size None": (dict(batch_size=None), errors.ConfigError,
                        r"^batch_size must be a positive integer, got None\.$"),
    "batch_size bool": (dict(batch_size=True), errors.ConfigError,
                        r"^batch_size must be a positive integer, got True\.$"),
    "sample zero": (dict(sample=0), errors.ConfigError, r"^sample must be a positive integer, got 0\.$"),
    "sample string": (dict(sample="5"), errors.ConfigError,
                      r"^sample must be a positive integer, got '5'\.$"),
    "max_tokens negative": (dict(max_tokens=-1), errors.ConfigError,
                            r"^max_tokens must be a positive integer, got -1\.$"),
    "max_docs float": (dict(max_docs=2.5), errors.ConfigError,
                       r"^max_docs must be a positive integer, got 2\.5\.$"),
    "shard_size zero": (dict(shard_size=0), errors.ConfigError,
                        r"^shard_size must be a positive integer, got 0\.$"),
    "seed": (dict(seed="0"), errors.ConfigError, r"^seed must be an integer, got '0'\.$"),
    "exclude_token_ids": (dict(exclude_token_ids=5), errors.ConfigError,
                          r"^exclude_token_ids must be a list of token ids, got 5\.$"),
    "sample larger than corpus": (
        dict(sample=N + 1), errors.DataError,
        rf"^sample={N + 1} is larger than the corpus \({N} documents\); lower sample or drop it\.$"),
    "no tokenizer": (dict(tokenizer=None), errors.ConfigError,
                     r"^a loaded model needs its tokenizer: pass tokenizer=\.$"),
    "not a model": (dict(model=object()), errors.ConfigError,
                    r"^model must be a hub id, a local directory or a loaded transformers model; "
                    r"got object\.$"),
    "model path that does not exist": (
        dict(model="/no/such/model-dir"), errors.ModelLoadError,
        r"^model path '/no/such/model-dir' does not exist \(or is not a directory\); pass a "
        r"directory written by save_pretrained, or a hub id\.$"),
    "hub id while offline": (
        dict(model="crowstream-tests/no-such-model"), errors.ModelLoadError,
        r"^could not load model 'crowstream-tests/no-such-model': .*Without network access, pass a "
        r"local directory \(save_pretrained output\) or set HF_HUB_OFFLINE=1 to use the local cache\.$"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
@pytest.mark.parametrize("out_state", ["missing", "empty", "overwrite"])
def test_bad_input_is_one_clear_error_and_out_is_left_as_it_was(gpt2, docs, reference, tmp_path,
                                                                monkeypatch, case, out_state):
    """OUT does not exist, is an empty directory, or holds a capture that overwrite=True
    would replace: after the error it is exactly as it was, and so is its parent."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    change, error_type, message = BAD_INPUTS[case]
    out = tmp_path / "out"
    if out_state == "empty":
        out.mkdir()
    elif out_state == "overwrite":
        shutil.copytree(reference, out)
    before = tree(tmp_path)
    model, tokenizer = gpt2
    change = dict(change)
    data = change.pop("data", docs)
    data = data() if callable(data) else data
    model = change.pop("model", model)
    tokenizer = change.pop("tokenizer", tokenizer)
    modules = change.pop("modules", MODULES)
    kw = {**KW, **change}
    with pytest.raises(error_type, match=re.compile(message, re.S)) as info:
        cs.capture(model, data, modules, str(out), tokenizer=tokenizer,
                   overwrite=out_state == "overwrite", **kw)
    assert isinstance(info.value, errors.CrowstreamError)
    assert "\n" not in str(info.value) or case == "hub id while offline"
    assert tree(tmp_path) == before, "OUT (or its parent) changed"
    assert model_is_clean(gpt2[0])


def test_existing_out_without_overwrite_or_resume_is_refused(gpt2, docs, reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    before = tree(out)
    with pytest.raises(errors.OutputExistsError,
                       match=rf"^OUT {re.escape(repr(str(out)))} is not empty: pass overwrite=True "
                             r"\(--overwrite\) to replace it, resume=True \(--resume\) to continue it, "
                             r"or choose another OUT\.$"):
        capture(gpt2, docs, out)
    assert tree(out) == before


def test_overwrite_refuses_a_directory_that_is_not_a_crowstream_output(gpt2, docs, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(errors.OutputExistsError,
                       match=rf"^refusing to overwrite {re.escape(repr(str(out)))}: it is not empty and "
                             r"holds no crowstream\.json, so it is not a crowstream output\."):
        capture(gpt2, docs, out, overwrite=True)
    assert tree(out) == {"thesis.tex": b"years of work"}


def test_overwrite_replaces_a_crowstream_output(gpt2, docs, reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    (out / "data" / "module=transformer.h.0" / "stale.parquet").write_bytes(b"x")
    capture(gpt2, docs, out, overwrite=True)
    assert parts_of(out) == parts_of(reference)
    cs.verify(out)


def test_out_that_is_a_file_is_refused(gpt2, docs, tmp_path):
    out = tmp_path / "out"
    out.write_text("precious")
    with pytest.raises(errors.OutputError, match=rf"^OUT {re.escape(repr(str(out)))} is a file, not a "
                                                 r"directory; choose another path\.$"):
        capture(gpt2, docs, out)
    assert out.read_text() == "precious"


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_out_that_is_not_writable_is_refused(gpt2, docs, tmp_path):
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        with pytest.raises(errors.OutputError, match=r"is not writable; fix its permissions or choose "
                                                     r"another OUT\.$"):
            capture(gpt2, docs, parent / "out")
        assert os.listdir(parent) == []
    finally:
        parent.chmod(0o700)


@pytest.mark.parametrize("exists", [False, True])
def test_out_that_is_not_writable_is_refused_even_as_root(monkeypatch, gpt2, docs, tmp_path, exists):
    """Root ignores permissions, so deny write access through os.access (what crowstream asks)."""
    parent = tmp_path / "locked"
    parent.mkdir()
    out = parent / "out"
    if exists:
        out.mkdir()
        (out / "crowstream.json").write_text("{}")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if mode & os.W_OK and
                        os.fspath(path).startswith(str(parent)) else real_access(path, mode, **kw))
    # (for a new OUT the message names the existing ancestor it checked, as "OUT")
    with pytest.raises(errors.OutputError, match=rf"^OUT '{re.escape(str(parent))}(/out)?' is not "
                                                 r"writable; fix its permissions or choose another OUT\.$"):
        capture(gpt2, docs, out, resume=exists)
    assert sorted(os.listdir(parent)) == (["out"] if exists else [])


def test_tokenizer_without_pad_token_is_handled_and_left_alone(gpt2, docs, tmp_path):
    model, tokenizer = gpt2
    assert tokenizer.pad_token is None
    side = tokenizer.padding_side
    run = capture(gpt2, docs[:8], tmp_path / "out", batch_size=8)
    assert run.docs == 8
    assert tokenizer.pad_token is None and tokenizer.padding_side == side
    assert model_is_clean(model)


def test_capture_writes_nothing_outside_out(gpt2, docs, tmp_path):
    (tmp_path / "neighbour.txt").write_text("x")
    capture(gpt2, docs[:8], tmp_path / "nested" / "out")
    assert sorted(os.listdir(tmp_path)) == ["neighbour.txt", "nested"]
    assert os.listdir(tmp_path / "nested") == ["out"]


def test_non_string_text_after_the_first_window_fails_cleanly(gpt2, tmp_path):
    """A bad document the first read-ahead did not reach: the run stops with the same clear
    error, records it, and what was committed stays intact and resumable."""
    from crowstream.pipeline.options import SORT_WINDOW_DOCS

    bad = SORT_WINDOW_DOCS + 6
    data = ["a b c"] * bad + [b"bytes, not text"] + ["d e"] * 3
    out = tmp_path / "out"
    with pytest.raises(errors.DataError, match=rf"^document {bad} has type bytes, not str"):
        capture(gpt2, data, out, shard_size=256, batch_size=64)
    m = manifest_of(out)
    assert m.status == "failed" and m.error.startswith("DataError: document")
    assert len(m.shards) == 4  # the 1024 documents before the bad one's shard
    cs.verify(out)


# -- disk full --------------------------------------------------------------------------------

class DiskFull:
    """After `after` successful calls to the patched writes (and, with `once`, once
    `once()` is true), every further one fails with ENOSPC (a full disk stays full until
    the test frees it)."""

    def __init__(self, after: int, once=None):
        self.after, self.calls, self.failed, self.once = after, 0, 0, once
        self.full = False

    def wrap(self, function):
        def write(*args, **kwargs):
            self.calls += 1
            self.full = self.full or (self.calls > self.after
                                      and (self.once is None or self.once()))
            if self.full:
                self.failed += 1
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return function(*args, **kwargs)
        return write


def patch_disk_full(monkeypatch, site: str, after: int, out: str | None = None) -> DiskFull:
    from crowstream.format.files import fsync_and_hash, write_atomic
    from crowstream.format.layout import record_path
    from crowstream.pipeline.parts import PartWriter

    # Parquet writes of later shards' parts may all come before shard 0's docs and stats:
    # the disk fills only once shard 0 has committed, whatever the threads' timing
    first_commit = None if out is None or site != "every Parquet write" else (
        lambda: os.path.exists(os.path.join(out, record_path(0))))
    full = DiskFull(after, first_commit)
    if site == "PartWriter.write":
        monkeypatch.setattr(PartWriter, "write", full.wrap(PartWriter.write))
    elif site == "fsync":  # small files' fsync_and_hash, and the part files' fsync at close
        from crowstream.format.files import HashingFile

        patch_everywhere(monkeypatch, fsync_and_hash, full.wrap(fsync_and_hash))
        close = full.wrap(HashingFile.close)
        monkeypatch.setattr(HashingFile, "close", lambda self: self.closed or close(self))
    elif site == "manifest":  # crowstream.json and the commit records
        patch_everywhere(monkeypatch, write_atomic, full.wrap(write_atomic))
    elif site == "every Parquet write":
        monkeypatch.setattr(pq.ParquetWriter, "write_table", full.wrap(pq.ParquetWriter.write_table))
        monkeypatch.setattr(pq.ParquetWriter, "close", full.wrap(pq.ParquetWriter.close))
    return full


DISK_SITES = {
    "PartWriter.write": 9,      # 2 writes per shard: shards 0-3 commit
    # the vocab, then 4 per shard (2 parts, docs, stats); writer threads may close the parts
    # of up to 3 later shards before the committer reaches shard 0's docs: >= 1 shard commits
    "fsync": 13,
    "manifest": 5,              # start, run.json, "running", records 0 and 1; shard 2 fails
    # a full disk stays full: the aborted part's close fails too (it must not mask the error)
    "every Parquet write": 14,  # writes and closes (docs, stats, vocab too): shard 0 commits
}
@pytest.mark.parametrize("site", DISK_SITES)
def test_disk_full_is_one_clear_error_committed_shards_intact_then_resume(
        monkeypatch, gpt2, docs, reference, tmp_path, site):
    out = str(tmp_path / "out")
    full = patch_disk_full(monkeypatch, site, DISK_SITES[site], out)
    with pytest.raises(errors.OutputError,
                       match=rf"^disk full while writing to {re.escape(repr(out))} \([\d,]+ bytes written "
                             r"so far by this run\)\. Committed shards are intact: free space, then "
                             r"rerun the same command with --resume\.$"):
        capture(gpt2, docs, out)
    assert full.failed >= 1
    staged = [n for n in os.listdir(os.path.join(out, ".tmp")) if n.endswith(".parquet")]
    assert not staged, staged  # the space the message asks to free is not held by crowstream
    monkeypatch.undo()  # the disk has space again
    m = manifest_of(out)
    assert 1 <= len(m.shards) < N // 4
    if site != "manifest":  # a manifest that could not be written still says "running"
        assert m.status == "failed"
    committed = {p.path for p in m.parts}
    try:
        cs.verify(out)
    except errors.VerifyError as error:  # a commit cut short by the full disk: unlisted files
        assert site == "manifest" and all(p.startswith("extra:") for p in error.problems), error.problems
    for path in committed:  # committed parts are whole and match the uninterrupted run's
        assert (path, next(p.sha256 for p in m.parts if p.path == path)) in \
            {(p, s) for p, _, s in parts_of(reference)}
    assert model_is_clean(gpt2[0])
    capture(gpt2, docs, out, resume=True)
    assert manifest_of(out).status == "complete"
    assert parts_of(out) == parts_of(reference)
    assert_same_rows(out, reference)
    cs.verify(out)


def test_other_write_errors_name_out_and_keep_the_errno(monkeypatch, gpt2, docs, tmp_path):
    from crowstream.pipeline.parts import PartWriter

    out = str(tmp_path / "out")
    original = PartWriter.write
    calls = []

    def write(self, batch):
        calls.append(1)
        if len(calls) > 4:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return original(self, batch)

    monkeypatch.setattr(PartWriter, "write", write)
    with pytest.raises(errors.OutputError, match=rf"^cannot write to {re.escape(repr(out))}: \[Errno "
                                                 rf"{errno.EIO}\] .*Committed shards are intact"):
        capture(gpt2, docs, out)


# -- out of memory ------------------------------------------------------------------------------

def oom_above(monkeypatch, k: int) -> list:
    """ModelTracer._trace raises CUDA OOM whenever a batch has more than k rows."""
    import torch

    original = ModelTracer._trace
    sizes = []

    def trace(self, ids, mask, index):
        sizes.append(ids.shape[0])
        if ids.shape[0] > k:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return original(self, ids, mask, index)

    monkeypatch.setattr(ModelTracer, "_trace", trace)
    return sizes


@pytest.fixture(scope="module")
def reference_batch8(gpt2, docs, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("errors-ref8") / "out")
    capture(gpt2, docs, out, batch_size=8, shard_size=8, packing="off")
    return out


def test_oom_backs_off_logs_the_new_batch_size_and_values_match(monkeypatch, gpt2, docs, reference_batch8,
                                                                tmp_path, caplog):
    caplog.set_level("WARNING", logger="crowstream")
    sizes = oom_above(monkeypatch, 3)
    run = capture(gpt2, docs, tmp_path / "out", batch_size=8, shard_size=8, packing="off")
    assert run.docs == N
    assert "out of memory at a batch of" in caplog.text and "capping forwards at" in caplog.text
    assert "--max-batch-tokens" in caplog.text
    assert max(sizes) > 3 and sizes[-1] <= 3  # backed off (by tokens: tests/test_tokens.py)
    assert_same_rows(tmp_path / "out", reference_batch8, atol=1e-5)
    cs.verify(tmp_path / "out")


def test_oom_inside_the_real_forward_pass_is_recognised(gpt2, docs, reference_batch8, tmp_path, caplog):
    """The OOM is raised by a module deep inside the nnsight trace, as on a real GPU."""
    import torch

    model = gpt2[0]

    def pre_hook(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if hidden is not None and hidden.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    handle = model.transformer.h[1].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        caplog.set_level("WARNING", logger="crowstream")
        capture(gpt2, docs, tmp_path / "out", batch_size=8, shard_size=8, packing="off")
    finally:
        handle.remove()
    assert "capping forwards at" in caplog.text
    assert_same_rows(tmp_path / "out", reference_batch8, atol=1e-5)


def test_oom_on_a_single_document_is_a_clear_error(monkeypatch, gpt2, docs, tmp_path):
    oom_above(monkeypatch, 0)
    out = tmp_path / "out"
    with pytest.raises(errors.OutOfMemory,
                       match=r"^out of memory on a single document of \d+ tokens; lower --context-size "
                             r"\(or use overflow='chunk' with a smaller one\), or use a device with more "
                             r"memory\.$") as info:
        capture(gpt2, docs, out, batch_size=8, shard_size=8, packing="off")
    assert isinstance(info.value, MemoryError)
    m = manifest_of(out)
    assert m.status == "failed" and m.error.startswith("OutOfMemory: out of memory")
    assert m.shards == [] and cs.verify(out)["parts"] == 0
    assert model_is_clean(gpt2[0])


# -- damaged manifests --------------------------------------------------------------------------

DAMAGE = {
    "garbage": (b'{"format": "crowstream", "status": "comp\x00\xff', r"is damaged \("),
    "truncated JSON": (None, r"is damaged \("),
    "not an object": (b"[1, 2, 3]", r"does not match the manifest schema: not a JSON object\."),
    "bad status": ("status", r"does not match the manifest schema: status: 'exploded' is not one of"),
    "missing shards": ("shards", r"does not match the manifest schema: \(top\): 'shards' is a "
                                 r"required property\."),
    "path escaping OUT": ("path", r"does not match the manifest schema: shards/0/parts/0/path: "
                                  r"'\.\./\.\./etc/passwd' does not match"),
}


def damage_manifest(out, kind) -> bytes:
    path = os.path.join(out, "crowstream.json")
    content, _ = DAMAGE[kind]
    raw = pathlib.Path(path).read_bytes()
    if content is None:
        data = raw[: len(raw) // 2]
    elif isinstance(content, bytes):
        data = content
    else:
        m = json.loads(raw)
        if content == "status":
            m["status"] = "exploded"
        elif content == "shards":
            del m["shards"]
        else:
            m["shards"][0]["parts"][0]["path"] = "../../etc/passwd"
        data = json.dumps(m).encode()
    pathlib.Path(path).write_bytes(data)
    return data


@pytest.mark.parametrize("kind", DAMAGE)
@pytest.mark.parametrize("action", ["resume", "verify", "info"])
def test_damaged_manifest_is_explained_and_left_untouched(gpt2, docs, reference, tmp_path, kind, action):
    out = str(tmp_path / "out")
    shutil.copytree(reference, out)
    damage_manifest(out, kind)
    before = tree(out)
    pattern = rf"^{re.escape(os.path.join(out, 'crowstream.json'))} {DAMAGE[kind][1]}.*It was left as it is"
    if kind in ("garbage", "truncated JSON"):
        pattern = (rf"^{re.escape(os.path.join(out, 'crowstream.json'))} is damaged \(.*\); it was left "
                   r"as it is\. Restore it from a backup or capture again into a new OUT\.$")
    with pytest.raises(errors.ManifestError, match=re.compile(pattern, re.S)):
        if action == "resume":
            capture(gpt2, docs, out, resume=True)
        elif action == "verify":
            cs.verify(out)
        else:
            cs.info(out)
    assert tree(out) == before


def test_missing_manifest_on_verify(tmp_path):
    with pytest.raises(errors.ManifestError, match=r"has no crowstream\.json: it is not a crowstream "
                                                   r"output \(or the run never started\)\.$"):
        cs.verify(tmp_path)


# -- the CLI: one line, no traceback, non-zero exit ---------------------------------------------

def run_cli(*args, timeout=120):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_WAIT_POLICY": "PASSIVE"}  # idle OpenMP threads sleep: fast on a busy machine
    return subprocess.run([sys.executable, "-m", "crowstream", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=timeout)


def error_lines(stderr: str) -> list[str]:
    """stderr without transformers' weight-loading progress bar."""
    return [line for line in stderr.replace("\r", "\n").splitlines()
            if line.strip() and "Loading weights" not in line]


@pytest.mark.slow
def test_cli_errors_are_one_line_without_traceback(gpt2_dir, tmp_path):
    data = tmp_path / "corpus.txt"
    data.write_text("one document\nanother one\n")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases = [
        (["capture", gpt2_dir, data, "-m", "transformer.h.9", "-o", tmp_path / "o1"],
         r"^crowstream: error: module 'transformer\.h\.9' is not in GPT2LMHeadModel; did you mean "
         r".*run `crowstream modules MODEL` to list them\.$"),
        (["capture", gpt2_dir, data, "-m", "transformer.h.0", "-o", a_file],
         rf"^crowstream: error: OUT {re.escape(repr(str(a_file)))} is a file, not a directory"),
        (["capture", gpt2_dir, data, "-m", "transformer.h.0", "-o", tmp_path / "o2", "--batch-size", "0"],
         r"^crowstream: error: batch_size must be a positive integer, got 0\.$"),
    ]
    for args, pattern in cases:
        done = run_cli(*args)
        assert done.returncode == 1, done.stderr
        assert "Traceback" not in done.stderr
        lines = error_lines(done.stderr)
        assert len(lines) == 1, done.stderr
        assert re.search(pattern, lines[0]), lines[0]
        assert done.stdout == ""
    for name in ("o1", "o2"):
        assert not (tmp_path / name).exists()
    assert a_file.read_text() == "x"


# -- security ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../x", "a/b", "..", "/etc/passwd", "a/../b", "x/..", "a\\b", "",
                                  ".hidden", "a..b", "model.layers.0/../../x", "a b", "a\x00b", "a\nb",
                                  "transformer.h.0\n"])
def test_module_names_cannot_escape_out(name):
    from crowstream.format.layout import check_module_name

    with pytest.raises(errors.ConfigError, match=r"cannot be used as a directory name; use the dotted "
                                                 r"names that `crowstream modules MODEL` lists\.$"):
        check_module_name(name)


@pytest.mark.parametrize("name", ["transformer.h.0", "model.layers.31.mlp", "encoder.layer.5",
                                  "blocks.0.hook_resid-post", "_orig_mod.h.0"])
def test_ordinary_module_names_are_accepted(name):
    from crowstream.format.layout import check_module_name

    check_module_name(name)


def test_no_pickle_and_no_remote_code_by_default():
    root = pathlib.Path(cs.__file__).parent
    sources = {p: p.read_text(encoding="utf-8") for p in root.rglob("*.py")}
    assert len(sources) > 10
    for path, text in sources.items():
        for forbidden in (r"\bpickle\b", r"\bcloudpickle\b", r"\bdill\b", r"torch\.load\b",
                          r"weights_only\s*=\s*False", r"trust_remote_code\s*=\s*True", r"(?<![.\w])eval\(",
                          r"(?<![.\w])exec\("):
            assert not re.search(forbidden, text), f"{path.name} uses {forbidden}"
    for function in (cs.capture, cs.modules):
        assert inspect.signature(function).parameters["trust_remote_code"].default is False


def failing_writes(monkeypatch, site: str) -> None:
    import crowstream.pipeline.run  # noqa: F401  (every module that binds them is imported)
    from crowstream.format.files import fsync_and_hash
    from crowstream.format.manifest import write_manifest

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if site == "fresh run: vocab":
        patch_everywhere(monkeypatch, fsync_and_hash, full)
    else:
        patch_everywhere(monkeypatch, write_manifest, full)


@pytest.mark.parametrize("site", ["fresh run: vocab", "resume: manifest"])
def test_disk_full_before_the_first_shard_is_one_clear_error(monkeypatch, gpt2, docs, reference,
                                                             tmp_path, site):
    out = tmp_path / "out"
    if site == "resume: manifest":
        shutil.copytree(reference, out)
        m = raw_manifest(out)
        m["status"] = "interrupted"
        save_manifest(out, m)
    failing_writes(monkeypatch, site)
    with pytest.raises(errors.OutputError, match=rf"^disk full while writing to "
                                                 rf"{re.escape(repr(str(out)))}"):
        capture(gpt2, docs, out, resume=site == "resume: manifest")
