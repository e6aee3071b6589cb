"""Several ranks writing one run, without torch.distributed (Slurm arrays, several shells):
`--rank i --world-size n` in separate processes, then `finalize`; a missing share; a rank
SIGKILLed mid-run, then resumed by one process. Every result must equal a single-process
run row for row, vectors bit-identical on CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import crowstream as cs
from crowstream.errors import IncompleteRunError, ResumeMismatchError
from helpers import assert_same_rows, manifest_of, corpus_file
from crowstream.format.layout import RECORD_NAME

MODULES = ["transformer.h.0", "transformer.h.2"]
N_DOCS = 120  # 30 shards of 4 documents: 15 per rank
KW = dict(shard_size=4, batch_size=4, progress=False, device="cpu")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


@pytest.fixture(scope="module")
def corpus_txt(corpus, tmp_path_factory):
    return corpus_file(corpus, tmp_path_factory.mktemp("ranks"), N_DOCS)


@pytest.fixture(scope="module")
def reference(gpt2_dir, corpus_txt, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ranks-ref") / "out")
    cs.capture(gpt2_dir, corpus_txt, MODULES, out, **KW)
    return out


def start_rank(gpt2_dir, corpus_txt, out, rank, world, *extra) -> subprocess.Popen:
    args = [sys.executable, "-m", "crowstream", "capture", gpt2_dir, corpus_txt, "-o", str(out),
            "--shard-size", "4", "--batch-size", "4", "--no-progress", "--device", "cpu",
            "--rank", str(rank), "--world-size", str(world), *extra]
    for module in MODULES:
        args += ["-m", module]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def finish(process: subprocess.Popen) -> str:
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    return stdout


def record_ranks(out) -> dict[int, int]:
    """shard index -> rank, from the commit records on disk."""
    found = {}
    for name in os.listdir(os.path.join(out, "commits")):
        if RECORD_NAME.fullmatch(name):
            with open(os.path.join(out, "commits", name)) as f:
                record = json.load(f)
            found[record["index"]] = record["rank"]
    return found


def test_two_ranks_in_separate_processes_equal_one_process(gpt2_dir, corpus_txt, reference,
                                                           tmp_path):
    out = tmp_path / "out"
    ranks = [start_rank(gpt2_dir, corpus_txt, out, rank, 2) for rank in (0, 1)]
    for process in ranks:
        finish(process)
    done = subprocess.run([sys.executable, "-m", "crowstream", "finalize", str(out)],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == 0 and "complete (30 shards" in done.stdout, done.stderr
    owners = record_ranks(out)
    assert owners == {k: k % 2 for k in range(30)}  # shard k was written by rank k mod 2
    parts = {os.path.basename(p.path)[:10] for p in manifest_of(out).parts}
    assert parts == {"part-00000", "part-00001"}
    assert manifest_of(out).status == "complete"
    assert manifest_of(out).run_id == manifest_of(reference).run_id  # from the configuration
    assert_same_rows(out, reference)
    assert manifest_of(out).counts == manifest_of(reference).counts
    assert manifest_of(out).stats == manifest_of(reference).stats  # merged in shard order
    cs.verify(out)


def test_finalize_refuses_a_missing_share_and_a_different_rank_is_refused(
        gpt2_dir, corpus_txt, reference, tmp_path):
    out = str(tmp_path / "out")
    run = cs.capture(gpt2_dir, corpus_txt, MODULES, out, rank=0, world_size=2, **KW)
    assert run.manifest.status == "running" and run.docs == 60
    with pytest.raises(IncompleteRunError) as refused:
        cs.finalize(out)
    assert refused.value.missing == list(range(1, 30, 2))
    assert "15 of 30 shard(s) are not committed (shard(s) 1, 3, 5," in str(refused.value)
    cli = subprocess.run([sys.executable, "-m", "crowstream", "finalize", out],
                         capture_output=True, text=True, env=ENV, timeout=120)
    assert cli.returncode == 1 and "shard(s) 1, 3, 5" in cli.stderr
    # readers see the committed half meanwhile: the gaps of a multi-rank run are no damage
    assert sorted(s.index for s in manifest_of(out).shards) == list(range(0, 30, 2))
    with pytest.raises(ResumeMismatchError, match=r"rank 1 cannot join .*dtype: manifest has "
                                                  r"'float32', this call has 'float16'"):
        cs.capture(gpt2_dir, corpus_txt, MODULES, out, rank=1, world_size=2,
                   **{**KW, "dtype": "float16"})
    last = cs.capture(gpt2_dir, corpus_txt, MODULES, out, rank=1, world_size=2, **KW)
    assert last.manifest.status == "complete"  # the last rank to finish finalizes
    assert_same_rows(out, reference)
    cs.verify(out)


SLOW_START = r"""
import os, sys, time
import crowstream as cs
from crowstream.pipeline import session
model, corpus, out, marker = sys.argv[1:5]
original = session.write_tokenizer
def slow(path, tokenizer):  # the run half-created (vocab written, no manifest yet)
    vocab = os.path.join(path, "vocab.parquet")
    before = os.stat(vocab).st_ino
    open(marker, "w").close()
    locks = os.path.join(path, ".locks")
    deadline = time.monotonic() + 120
    while "rank-00000.lock" not in os.listdir(locks):  # rank 0 has arrived
        assert time.monotonic() < deadline, "rank 0 never arrived"
        time.sleep(0.02)
    deadline = time.monotonic() + 6  # its model loads, then it reaches the directory lock
    while time.monotonic() < deadline:
        if not os.path.exists(vocab) or os.stat(vocab).st_ino != before:
            sys.exit("vocab.parquet was deleted while this rank created the run")
        time.sleep(0.02)
    original(path, tokenizer)
session.write_tokenizer = slow
cs.capture(model, corpus, ["transformer.h.0", "transformer.h.2"], out, rank=1, world_size=2,
           shard_size=4, batch_size=4, progress=False, device="cpu")
"""


def test_a_rank_that_arrives_while_another_creates_the_run_waits_and_deletes_nothing(
        gpt2_dir, corpus_txt, reference, tmp_path):
    """Rank 1 creates the run and is slow about it; rank 0 arrives meanwhile. It must wait
    for the manifest (the lock is held until then), not take the half-created OUT for a
    start killed before its manifest and delete what rank 1 is writing."""
    out, marker, script = tmp_path / "out", tmp_path / "inside", tmp_path / "slow.py"
    script.write_text(SLOW_START)
    slow = subprocess.Popen([sys.executable, str(script), gpt2_dir, corpus_txt, str(out),
                             str(marker)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert time.monotonic() < deadline and slow.poll() is None, slow.communicate()
        time.sleep(0.02)
    finish(start_rank(gpt2_dir, corpus_txt, out, 0, 2))
    finish(slow)
    assert manifest_of(out).status == "complete"
    assert_same_rows(out, reference)
    cs.verify(out)


def test_one_rank_resumes_after_a_two_rank_crash(gpt2_dir, corpus_txt, reference, tmp_path):
    out = tmp_path / "out"
    first, second = (start_rank(gpt2_dir, corpus_txt, out, rank, 2) for rank in (0, 1))
    deadline = time.monotonic() + 240
    while 1 not in record_ranks(out).values() if (out / "commits").is_dir() else True:
        assert time.monotonic() < deadline and second.poll() is None, "rank 1 never committed"
        time.sleep(0.01)
    second.send_signal(signal.SIGKILL)  # mid-run: a crash, not an interrupt
    second.communicate(timeout=60)
    finish(first)
    written = record_ranks(out)
    assert set(range(0, 30, 2)) <= set(written) and not set(range(1, 30, 2)) <= set(written), \
        "the kill did not land mid-run"
    assert manifest_of(out).status == "running"
    run = cs.capture(gpt2_dir, corpus_txt, MODULES, str(out), resume=True, **KW)
    assert run.manifest.status == "complete" and len(run.manifest.shards) == 30
    assert_same_rows(out, reference)
    assert manifest_of(out).stats == manifest_of(reference).stats
    cs.verify(out)


def test_ranks_come_from_the_environment_and_are_checked(monkeypatch):
    from crowstream.pipeline import ranks
    from crowstream.errors import ConfigError, ManifestError

    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert ranks.resolve(None, None) == (3, 4)
    assert ranks.resolve(1, 2) == (1, 2)
    with pytest.raises(ConfigError, match=r"rank must be in \[0, world_size\); got rank 3, world_size 2"):
        ranks.resolve(None, 2)
    with pytest.raises(ManifestError, match="has no crowstream.json"):
        cs.finalize("no-such-out")
    with pytest.raises(ConfigError, match="max_tokens"):
        ranks.check_options(2, max_tokens=10, overwrite=False, device_map=None)
    with pytest.raises(ConfigError, match="device_map='auto'"):
        ranks.check_options(2, max_tokens=None, overwrite=False, device_map="auto")


def test_torchrun_two_ranks_with_gloo_equal_one_process(gpt2_dir, corpus_txt, reference, tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "crowstream", "capture", gpt2_dir, corpus_txt, "-o", str(out), "--shard-size", "4",
            "--batch-size", "4", "--no-progress", "--device", "cpu"]
    for module in MODULES:
        args += ["-m", module]
    env = {k: v for k, v in ENV.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 2  # one line per rank
    assert record_ranks(out) == {k: k % 2 for k in range(30)}
    assert manifest_of(out).status == "complete"  # rank 0 finalized after the barrier
    assert_same_rows(out, reference)
    assert manifest_of(out).stats == manifest_of(reference).stats
    cs.verify(out)


FAILING_RANK = r"""
import os, sys
import crowstream as cs
model, corpus, out = sys.argv[1:4]
with open(corpus, encoding="utf-8") as f:
    docs = f.read().split("\n")[:-1]
def texts():
    for i, doc in enumerate(docs):
        if os.environ["RANK"] == "1" and i == 70:
            raise RuntimeError("rank 1 fails on purpose")
        yield doc
cs.capture(model, texts(), ["transformer.h.0", "transformer.h.2"], out, shard_size=4,
           batch_size=4, progress=False, device="cpu")
"""


def test_torchrun_a_failing_rank_stops_the_others_cleanly(gpt2_dir, corpus_txt, reference,
                                                          tmp_path):
    out, script = tmp_path / "out", tmp_path / "fail.py"
    script.write_text(FAILING_RANK)
    env = {k: v for k, v in ENV.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", str(script), gpt2_dir, corpus_txt, str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode != 0 and "rank 1 fails on purpose" in done.stderr
    committed = manifest_of(out)
    assert committed.status == "running" and 0 < len(committed.shards) < 30
    assert all(os.path.getsize(os.path.join(out, p.path)) == p.bytes for p in committed.parts)
    with open(corpus_txt, encoding="utf-8") as f:
        docs = f.read().split("\n")[:-1]
    run = cs.capture(gpt2_dir, (d for d in docs), MODULES, str(out), resume=True, **KW)
    assert run.manifest.status == "complete"
    assert_same_rows(out, reference)
    cs.verify(out)


def test_a_file_url_with_ranks_is_a_local_path(gpt2_dir, tmp_path, monkeypatch):
    """(Ranks into a bucket URL work since #17: tests/test_bucket_ranks.py.)"""
    monkeypatch.chdir(tmp_path)
    run = cs.capture(gpt2_dir, ["a b"], MODULES, f"file://{tmp_path}/out", **KW)
    assert run.path == f"{tmp_path}/out" and run.manifest.status == "complete"
    assert os.listdir(tmp_path) == ["out"]


def test_a_run_started_by_three_ranks_is_finished_by_two(gpt2_dir, corpus_txt, reference,
                                                          tmp_path):
    out = str(tmp_path / "out")
    cs.capture(gpt2_dir, corpus_txt, MODULES, out, rank=2, world_size=3, **KW)
    assert set(record_ranks(out)) == set(range(2, 30, 3))
    first = cs.capture(gpt2_dir, corpus_txt, MODULES, out, rank=0, world_size=2, **KW)
    assert first.manifest.status == "running"
    # rank 0 of 2 took the even shards rank 2 of 3 had not committed: 2, 8, 14, ... stay rank 2's
    assert {k for k, r in record_ranks(out).items() if r == 0} == \
        {k for k in range(0, 30, 2) if k % 3 != 2}
    last = cs.capture(gpt2_dir, corpus_txt, MODULES, out, rank=1, world_size=2, **KW)
    assert last.manifest.status == "complete" and len(last.manifest.shards) == 30
    assert_same_rows(out, reference)
    assert manifest_of(out).stats == manifest_of(reference).stats
    cs.verify(out)
