"""Several ranks writing one run into one bucket (#17; moto's S3 on loopback): 2 ranks under
torchrun (gloo, CPU), then a 2-rank run with one rank SIGKILLed mid-run, refused to a
rank of another world size while the dead rank's lease runs, and resumed by 3 ranks with
takeover. Each ends with rows, statistics and docs equal to a one-process
local capture and a clean `verify`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import crowstream as cs
from crowstream.errors import OutputError
from helpers import manifest_of, moto_bucket, corpus_file

moto_server = pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")

MODULES = ["transformer.h.0", "transformer.h.2"]
N_DOCS = 80  # 20 shards of 4 documents: 10 per rank of 2
KW = dict(shard_size=4, batch_size=4, progress=False, device="cpu")
BASE = ["--shard-size", "4", "--batch-size", "4", "--no-progress", "--device", "cpu",
        *[a for m in MODULES for a in ("-m", m)]]


@pytest.fixture(scope="module")
def server():
    """A moto S3 server on 127.0.0.1 and the fsspec storage_options that reach it."""
    yield from moto_bucket()


@pytest.fixture(scope="module")
def corpus_txt(corpus, tmp_path_factory):
    return corpus_file(corpus, tmp_path_factory.mktemp("bucket-ranks"), N_DOCS)


def environment(server) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "AWS_ACCESS_KEY_ID": server["key"], "AWS_SECRET_ACCESS_KEY": server["secret"],
            "AWS_DEFAULT_REGION": "us-east-1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "AWS_ENDPOINT_URL": server["client_kwargs"]["endpoint_url"], "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def rank(gpt2_dir, corpus_txt, url, server, rank_, world, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "crowstream", "capture", gpt2_dir, corpus_txt,
                             "-o", url, *BASE, "--rank", str(rank_), "--world-size", str(world),
                             *extra], env=environment(server), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def records(server, prefix: str) -> set[int]:
    fs = s3fs.S3FileSystem(**server)
    fs.invalidate_cache()
    names = [k.rsplit("/", 1)[-1] for k in fs.find(f"bucket/{prefix}/commits")]
    return {int(n[6:14]) for n in names if n.startswith("shard-") and n.endswith(".json")}


def kill_at_first_odd_record(process: subprocess.Popen, server) -> None:
    deadline = time.monotonic() + 120
    while not any(k % 2 for k in records(server, "ranks-killed")):
        if time.monotonic() > deadline or process.poll() is not None:
            return  # the test's assertions say what went wrong
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)


def assert_equal_to(url, server, reference) -> None:
    so = dict(storage_options=server)
    assert cs.info(url, **so)["status"] == "complete"
    want = cs.scan(reference).collect().sort("module", "doc_id", "position")
    assert cs.scan(url, **so).collect().sort("module", "doc_id", "position").equals(want)
    assert cs.docs(url, **so).collect().sort("doc_id").equals(
        cs.docs(reference).collect().sort("doc_id"))
    for module in MODULES:
        got, expected = cs.stats(url, module, **so), cs.stats(reference, module)
        assert {k: str(v) for k, v in got.items()} == {k: str(v) for k, v in expected.items()}
    cs.verify(url, **so)


@pytest.mark.crash
def test_ranks_into_a_bucket_under_torchrun_then_a_killed_rank_resumed_by_three(
        gpt2_dir, corpus_txt, server, tmp_path):
    # the rank to be killed starts first: it waits for rank 0 to create its run (on a
    # bucket rank 0 creates a new run), so its start-up overlaps the torchrun run's
    killed = "s3://bucket/ranks-killed"
    second = rank(gpt2_dir, corpus_txt, killed, server, 1, 2)
    reference = str(tmp_path / "reference")
    cs.capture(gpt2_dir, corpus_txt, MODULES, reference, **KW)
    url = "s3://bucket/ranks-torchrun"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", "-m", "crowstream", "capture", gpt2_dir,
                           corpus_txt, "-o", url, *BASE], capture_output=True, text=True,
                          env=environment(server), timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert records(server, "ranks-torchrun") == set(range(20))
    assert_equal_to(url, server, reference)

    # rank 1 SIGKILLed mid-run (its lease stays, as a dead node's does), then 3 ranks
    # resume with takeover. Only the killed rank is a process of its own: the others run
    # here, one after another, as Slurm array tasks may (process start-up dominates)
    url, so = killed, dict(storage_options=server)
    assert second.poll() is None and not records(server, "ranks-killed")  # still waiting
    killer = threading.Thread(target=kill_at_first_odd_record, args=(second, server),
                              name="killer")
    killer.start()
    run = cs.capture(gpt2_dir, corpus_txt, MODULES, url, rank=0, world_size=2, **so, **KW)
    killer.join()
    second.communicate(timeout=60)
    assert second.returncode == -signal.SIGKILL
    assert run.manifest.status == "running"
    committed = records(server, "ranks-killed")
    assert set(range(0, 20, 2)) <= committed and not set(range(1, 20, 2)) <= committed, \
        "the kill did not land mid-run"
    assert cs.info(url, **so)["status"] == "running"
    with pytest.raises(OutputError, match=r"rank 2 of 3 cannot write to 's3://bucket/ranks-killed': "
                                          r"rank\(s\) 1 of a 2-rank run hold leases"):
        cs.capture(gpt2_dir, corpus_txt, MODULES, url, rank=2, world_size=3, **so, **KW)
    for r in (1, 2, 0):
        last = cs.capture(gpt2_dir, corpus_txt, MODULES, url, rank=r, world_size=3,
                          takeover=True, **so, **KW)
    assert last.manifest.status == "complete" and len(last.manifest.shards) == 20
    assert_equal_to(url, server, reference)
    assert manifest_of(reference).run_id == cs.info(url, storage_options=server)["run_id"]


def test_a_start_killed_before_its_manifest_is_restarted_by_a_resume(gpt2_dir, corpus, server,
                                                                      tmp_path):
    """A rank 0 (or a single process) killed while it created the run leaves the vocab, the
    tokenizer, commits/run.json and the card, but no manifest and no record: a resume
    starts afresh instead of refusing the prefix forever. Anything else is still refused."""
    from crowstream.errors import OutputExistsError

    fs = s3fs.S3FileSystem(**server)
    for rel in ("vocab.parquet", "commits/run.json", "tokenizer/tokenizer.json", "README.md"):
        fs.pipe(f"bucket/ranks-unstarted/{rel}", b"cut short")
    fs.pipe("bucket/ranks-foreign/vocab.parquet", b"not ours")
    fs.pipe("bucket/ranks-foreign/notes.txt", b"not ours")
    kw = dict(storage_options=server, resume=True, **KW)
    with pytest.raises(OutputExistsError, match="holds no crowstream.json"):
        cs.capture(gpt2_dir, corpus[:8], MODULES, "s3://bucket/ranks-foreign", **kw)
    run = cs.capture(gpt2_dir, corpus[:8], MODULES, "s3://bucket/ranks-unstarted", **kw)
    assert run.manifest.status == "complete"
    reference = str(tmp_path / "reference")
    cs.capture(gpt2_dir, corpus[:8], MODULES, reference, **KW)
    assert cs.scan("s3://bucket/ranks-unstarted", storage_options=server).collect().sort(
        "module", "doc_id", "position").equals(
        cs.scan(reference).collect().sort("module", "doc_id", "position"))
    cs.verify("s3://bucket/ranks-unstarted", storage_options=server)
