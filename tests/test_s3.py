"""Object storage: capture into `s3://bucket/run` on a real S3 server (moto, on loopback),
resume after a SIGKILL, and read back with crowstream's readers, polars and datasets."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

import crowstream as cs
from helpers import sigint_at_batch
from crowstream.format import storage
from crowstream.errors import OutputError, OutputExistsError, VerifyError
from crowstream.format.manifest import Manifest

moto_server = pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")

MODULES = ["transformer.h.0", "transformer.h.2"]
N = 24
KW = dict(shard_size=4, batch_size=4, progress=False)
SECRET = "not-a-real-secret-9f3k"


@pytest.fixture(scope="module")
def server():
    """A moto S3 server on 127.0.0.1 and the fsspec storage_options that reach it."""
    srv = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    srv.start()
    host, port = srv.get_host_and_port()
    options = {"key": "testing-key", "secret": SECRET,
               "client_kwargs": {"endpoint_url": f"http://{host}:{port}", "region_name": "us-east-1"}}
    import boto3

    boto3.client("s3", aws_access_key_id=options["key"], aws_secret_access_key=SECRET,
                 **options["client_kwargs"]).create_bucket(Bucket="bucket")
    yield options
    srv.stop()


def capture(gpt2, data, out, **kw):
    model, tokenizer = gpt2
    return cs.capture(model, data, MODULES, out, tokenizer=tokenizer, **{**KW, **kw})


@pytest.fixture(scope="module")
def docs(corpus):
    return corpus[:N]


@pytest.fixture(scope="module")
def local(reference_capture):
    return reference_capture(N, MODULES, **KW)  # shared with the other files that need it


@pytest.fixture(scope="module")
def bucket_out(gpt2, docs, server):
    url = "s3://bucket/run"
    run = capture(gpt2, docs, url, storage_options=server)
    assert run.path == url
    return url


def json_strings(text: str) -> list[str]:
    import re

    return re.findall(r'"((?:/|[A-Za-z]:\\\\)[^"]*)"', text)


def rows(frame):
    return frame.sort("module", "doc_id", "position").to_dicts()


def test_capture_to_s3_equals_local_capture(bucket_out, local, server):
    remote = cs.scan(bucket_out, storage_options=server).collect()
    assert remote.height > 0
    assert rows(remote) == rows(cs.scan(local).collect())
    m = cs.info(bucket_out, storage_options=server)
    assert m["status"] == "complete" and m["modules"] == cs.info(local)["modules"]
    fs = s3fs.S3FileSystem(**server)
    manifest_text = fs.cat("bucket/run/crowstream.json").decode()
    card = fs.cat("bucket/run/README.md").decode()
    for text in (manifest_text, card):
        assert SECRET not in text and "testing-key" not in text and "127.0.0.1" not in text
        assert os.path.dirname(local) not in text and "crowstream-spool-" not in text
        assert not any(os.path.isabs(v) for v in json_strings(text)), "an absolute local path"
    # every object in the bucket is listed (nothing left over), parts carry an attempt id
    listed = {p.path for p in Manifest.from_json(__import__("json").loads(manifest_text)).parts}
    objects = {k[len("bucket/run/"):] for k in fs.find("bucket/run")}
    assert {o for o in objects if o.startswith(("data/", "docs/"))} == listed
    assert all(p.rsplit("-", 1)[1].startswith("a") for p in listed)


def test_readers_polars_and_datasets_read_listed_parts(bucket_out, local, server, monkeypatch):
    import datasets
    import numpy as np
    import polars as pl

    # datasets refuses every remote URL when HF_HUB_OFFLINE is set (as the suite sets it)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    module = MODULES[1]
    expected = cs.load(local, module).sort(["doc_id", "position"]).with_format("numpy")
    loaded = cs.load(bucket_out, module, storage_options=server).sort(
        ["doc_id", "position"]).with_format("numpy")
    assert np.array_equal(loaded["vector"], expected["vector"])
    assert np.array_equal(loaded["token"], expected["token"])
    batches = list(cs.stream(bucket_out, module, batch_size=64, storage_options=server))
    local_batches = list(cs.stream(local, module, batch_size=64))
    assert [b["vector"].tolist() for b in batches] == [b["vector"].tolist() for b in local_batches]
    assert cs.docs(bucket_out, storage_options=server).collect().sort("doc_id").equals(
        cs.docs(local).collect().sort("doc_id"))
    assert cs.vocab(bucket_out, storage_options=server).collect().equals(cs.vocab(local).collect())
    # the plain third-party calls, on the part URLs the manifest lists
    manifest = storage.committed(bucket_out, server)
    urls = [f"{bucket_out}/{p.path}" for p in manifest.module_parts(module)]
    frame = pl.scan_parquet(urls, storage_options={
        "aws_access_key_id": server["key"], "aws_secret_access_key": server["secret"],
        "aws_endpoint_url": server["client_kwargs"]["endpoint_url"], "aws_region": "us-east-1",
        "aws_allow_http": "true"}).collect()
    assert frame.height == len(expected)
    ds = datasets.load_dataset("parquet", data_files=urls, split="train",
                              storage_options=dict(server))  # datasets adds keys to the dict
    assert len(ds) == len(expected)


def test_verify_over_s3_catches_a_deleted_and_a_truncated_object(gpt2, docs, server):
    url = "s3://bucket/verify"
    capture(gpt2, docs, url, storage_options=server)
    assert cs.verify(url, storage_options=server)["parts"] > 0
    fs = s3fs.S3FileSystem(**server)
    manifest = storage.committed(url, server)
    deleted, truncated = manifest.parts[0].path, manifest.parts[-1].path
    fs.rm(f"bucket/verify/{deleted}")
    fs.pipe(f"bucket/verify/{truncated}", fs.cat(f"bucket/verify/{truncated}")[:100])
    with pytest.raises(VerifyError) as info:
        cs.verify(url, storage_options=server)
    problems = " ".join(info.value.problems)
    assert deleted in problems and truncated in problems
    assert SECRET not in str(info.value) and "crowstream-verify-" not in str(info.value)


KILL_DRIVER = """
import os, sys, time
import crowstream as cs
from crowstream.demo import python_doc_paragraphs
from crowstream.format import mirror, records
from crowstream.pipeline import commit

original, calls = records.write_record_json, []
def stall(out, run_id, record):  # the 2nd call for shard 2 is the bucket's: parts are up
    calls.append(record.index)
    if calls.count(2) == 2:  # the spool holds no part of a published shard
        spool = [n for top in (".tmp", "data", "docs") for _, _, names in os.walk(os.path.join(out, top))
                 for n in names if n.endswith(".parquet")]
        print("READY", sum("-000000-" in n or "-000001-" in n for n in spool), flush=True)
        time.sleep(600)
    original(out, run_id, record)
commit.write_record_json = mirror.write_record_json = stall
url, model, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
cs.capture(model, python_doc_paragraphs(120, min_chars=1)[:n], %r, url, shard_size=4,
           batch_size=4, progress=False)
""" % (MODULES,)


def test_sigkill_mid_commit_then_resume_equals_local(gpt2_dir, docs, local, server, tmp_path):
    url = "s3://bucket/killed"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": server["key"], "AWS_SECRET_ACCESS_KEY": SECRET,
           "AWS_ENDPOINT_URL": server["client_kwargs"]["endpoint_url"],
           "AWS_DEFAULT_REGION": "us-east-1"}
    proc = subprocess.Popen([sys.executable, "-c", KILL_DRIVER, url, gpt2_dir, str(N)],
                            stdout=subprocess.PIPE, stderr=None, env=env)
    try:
        assert proc.stdout.readline().split() == [b"READY", b"0"]
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        proc.stdout.close()
    fs = s3fs.S3FileSystem(**server)
    objects = {k[len("bucket/killed/"):] for k in fs.find("bucket/killed")}
    committed = storage.committed(url, server)
    assert [s.index for s in committed.shards] == [0, 1]
    uncommitted = {o for o in objects if o.startswith(("data/", "docs/"))} - {p.path for p in committed.parts}
    assert uncommitted, "the kill should leave shard 2's uploaded parts behind"
    seen = cs.scan(url, storage_options=server).collect()
    assert set(seen["doc_id"].to_list()) == set(range(8))  # shards 0 and 1 only
    # resume (credentials from the environment this time) completes with the same rows
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION"):
        os.environ[name] = env[name]
    try:  # the killed writer's lease has not expired: refused, unless the user takes over
        with pytest.raises(OutputError, match=r"holds rank 0's lease .*takeover=True"):
            cs.capture(gpt2_dir, docs, MODULES, url, resume=True, **KW)
        assert {k[len("bucket/killed/"):] for k in fs.find("bucket/killed", refresh=True)} == objects
        cs.capture(gpt2_dir, docs, MODULES, url, resume=True, takeover=True, **KW)
    finally:
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION"):
            del os.environ[name]
    assert rows(cs.scan(url, storage_options=server).collect()) == rows(cs.scan(local).collect())
    final = storage.committed(url, server)
    objects = {k[len("bucket/killed/"):] for k in fs.find("bucket/killed", refresh=True)}
    assert {o for o in objects if o.startswith(("data/", "docs/"))} == {p.path for p in final.parts}
    assert not uncommitted & objects
    cs.verify(url, storage_options=server)


def test_interrupt_names_the_url_and_a_second_capture_is_refused(gpt2, docs, server, monkeypatch):
    from crowstream.errors import Interrupted

    url = "s3://bucket/interrupted"
    sigint_at_batch(monkeypatch, 3)
    with pytest.raises(Interrupted, match=r"s3://bucket/interrupted") as info:
        capture(gpt2, docs, url, storage_options=server)
    assert "crowstream-spool-" not in str(info.value)
    monkeypatch.undo()
    assert storage.committed(url, server).status == "interrupted"
    with pytest.raises(OutputExistsError, match="resume=True"):
        capture(gpt2, docs, url, storage_options=server)
    assert capture(gpt2, docs, url, storage_options=server, resume=True).manifest.status == "complete"


def test_overwrite_replaces_the_bucket_output_and_stats_and_cli_read_it(gpt2, docs, local, server,
                                                                        bucket_out):
    import glob
    import tempfile

    url = bucket_out  # its own fixture, so the test also passes alone
    spools = set(glob.glob(os.path.join(tempfile.gettempdir(), "crowstream-spool-*")))
    fs = s3fs.S3FileSystem(**server)
    fs.pipe("bucket/overwrite/data/stray.parquet", b"not ours")
    with pytest.raises(OutputExistsError, match="holds no crowstream.json"):
        capture(gpt2, docs[:8], "s3://bucket/overwrite", storage_options=server)
    run = capture(gpt2, docs[:8], "s3://bucket/other", storage_options=server)
    again = capture(gpt2, docs[:8], "s3://bucket/other", storage_options=server, overwrite=True)
    assert again.manifest.counts == run.manifest.counts
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "crowstream-spool-*"))) == spools
    objects = {k[len("bucket/other/"):] for k in fs.find("bucket/other", refresh=True)}
    assert {o for o in objects if o.startswith(("data/", "docs/"))} == \
        {p.path for p in storage.committed("s3://bucket/other", server).parts}
    remote = cs.stats(url, MODULES[0], storage_options=server)
    assert remote["count"] == cs.stats(local, MODULES[0])["count"]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": server["key"], "AWS_SECRET_ACCESS_KEY": SECRET,
           "AWS_ENDPOINT_URL": server["client_kwargs"]["endpoint_url"],
           "AWS_DEFAULT_REGION": "us-east-1"}
    for command in ("info", "verify"):
        done = subprocess.run([sys.executable, "-m", "crowstream", command, url], env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert SECRET not in done.stdout + done.stderr


def test_every_reader_works_offline_against_a_bucket(bucket_out, local, server, monkeypatch,
                                                     tmp_path):
    """Clusters run with the Hub offline and a bucket reachable: reading your own bucket is
    not Hub access (#17). `datasets` reads HF_HUB_OFFLINE once, at import: set both."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConnectionError):  # what cs.load handed to datasets before
        datasets.load_dataset("parquet", data_files=[f"{bucket_out}/crowstream.json"],
                              storage_options=dict(server), cache_dir=str(tmp_path / "raw"))
    so = dict(storage_options=server)
    module = MODULES[1]
    want = rows(cs.scan(local).collect())
    assert rows(cs.scan(bucket_out, **so).collect()) == want
    loaded = cs.load(bucket_out, module, cache_dir=str(tmp_path / "cache"), **so)
    assert loaded.num_rows == cs.info(local)["modules"][module]["rows"]
    assert loaded.with_format("numpy")[:]["vector"].tolist() == \
        cs.load(local, module, cache_dir=str(tmp_path / "local")).with_format("numpy")[:]["vector"].tolist()
    streamed = sum(len(b["vector"]) for b in cs.stream(bucket_out, module, batch_size=64, **so))
    assert streamed == loaded.num_rows
    assert cs.docs(bucket_out, **so).collect().sort("doc_id").equals(
        cs.docs(local).collect().sort("doc_id"))
    assert cs.vocab(bucket_out, **so).collect().equals(cs.vocab(local).collect())
    info = cs.info(bucket_out, **so)
    assert info["status"] == "complete" and info["partly_visible"] == []
    assert cs.verify(bucket_out, **so)["rows"] == cs.verify(local)["rows"]
