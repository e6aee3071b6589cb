"""Random SIGKILLs of a 2-rank capture into a bucket (#17): either rank, at any moment
(start-up, a write, an upload, a record PUT, finalize), each followed by a resume of the
killed rank with `--takeover`. The final rows, statistics and docs must be bit-identical to an
uninterrupted one-process local capture, and `verify` clean.

    python benchmarks/kills.py --kills 20      # ~20 rounds of two CLI processes: minutes
    python benchmarks/kills.py --kills 1       # one kill, then the resume

Runs a moto S3 server on loopback, the tiny GPT-2 of tests/conftest.py and a corpus of
real paragraphs (no network). First an uninterrupted 2-rank capture measures S (the time
to a rank's first commit record) and T (the whole run); each kill then lands at a moment
drawn uniformly from [S/4, S] after the previous one, on a random live rank
(start-up, a write, an upload, a record PUT, finalize); a rank that stopped is restarted at
once (its resume) while the other runs on. When a capture completes before all kills are
spent, the next starts in a fresh prefix; every capture is compared. Exits non-zero on any
difference or unexpected failure.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

MODULES = ["transformer.h.0", "transformer.h.2"]
KW = dict(shard_size=4, batch_size=4, progress=False, device="cpu")


class Bucket:
    """A moto S3 server on loopback with one bucket, and how to reach it."""

    def __init__(self):
        import boto3
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.options = {"key": "k", "secret": "s", "client_kwargs": {
            "endpoint_url": self.endpoint, "region_name": "us-east-1"}}
        boto3.client("s3", aws_access_key_id="k", aws_secret_access_key="s",
                     endpoint_url=self.endpoint, region_name="us-east-1").create_bucket(Bucket="kills")

    def env(self) -> dict:
        return {**os.environ, "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": self.endpoint,
                "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": ROOT}

    def exists(self, rel: str) -> bool:
        import s3fs

        fs = s3fs.S3FileSystem(**self.options)
        fs.invalidate_cache()
        return fs.exists(f"kills/{rel}")

    def records(self, prefix: str) -> set[int]:
        import s3fs

        fs = s3fs.S3FileSystem(**self.options)
        fs.invalidate_cache()
        names = [k.rsplit("/", 1)[-1] for k in fs.find(f"kills/{prefix}/commits")]
        return {int(n[6:14]) for n in names if n.startswith("shard-") and n.endswith(".json")}


def start_rank(bucket: Bucket, model: str, corpus: str, url: str, rank: int) -> subprocess.Popen:
    """Rank `rank` of 2, resuming whatever is committed (`--takeover`: a killed rank's lease
    is taken over at once)."""
    return subprocess.Popen([sys.executable, "-m", "crowstream", "capture", model, corpus, "-o",
                             url, "--shard-size", "4", "--batch-size", "4", "--no-progress",
                             "--device", "cpu", "--world-size", "2", "--rank", str(rank),
                             "--takeover", *[a for m in MODULES for a in ("-m", m)]],
                            env=bucket.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def wait(processes) -> list[int]:
    codes = []
    for process in processes:
        try:
            _, stderr = process.communicate(timeout=900)
        except ValueError:  # communicated before: its stderr was read then
            stderr = ""
        if process.returncode not in (0, -signal.SIGKILL):
            sys.exit(f"a rank failed unexpectedly ({process.returncode}):\n{stderr[-3000:]}")
        codes.append(process.returncode)
    return codes


def compare(url: str, bucket: Bucket, reference: str) -> None:
    """Rows, statistics, docs and the card's counts bit-identical; verify clean."""
    import crowstream as cs

    so = dict(storage_options=bucket.options)
    info = cs.info(url, **so)
    assert info["status"] == "complete", info["status"]
    key = ("module", "doc_id", "position")
    assert cs.scan(url, **so).collect().sort(*key).equals(cs.scan(reference).collect().sort(*key))
    assert cs.docs(url, **so).collect().sort("doc_id").equals(
        cs.docs(reference).collect().sort("doc_id"))
    for module in MODULES:
        got, want = cs.stats(url, module, **so), cs.stats(reference, module)
        assert {k: repr(v) for k, v in got.items()} == {k: repr(v) for k, v in want.items()}
        assert info["modules"][module] == cs.info(reference)["modules"][module]
    cs.verify(url, **so)


def measure(bucket: Bucket, model: str, corpus: str, reference: str) -> tuple[float, float]:
    """An uninterrupted 2-rank capture: -> (S, T), and check it."""
    started, first = time.monotonic(), None
    ranks = [start_rank(bucket, model, corpus, "s3://kills/clean", r) for r in (0, 1)]
    while any(p.poll() is None for p in ranks):
        if first is None and bucket.records("clean"):
            first = time.monotonic() - started
        time.sleep(0.02)
    assert wait(ranks) == [0, 0]
    compare("s3://kills/clean", bucket, reference)
    return first or 0.0, time.monotonic() - started


def complete(bucket: Bucket, prefix: str) -> bool:
    import crowstream as cs

    if not bucket.exists(f"{prefix}/crowstream.json"):
        return False
    return cs.info(f"s3://kills/{prefix}", storage_options=bucket.options)["status"] == "complete"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--docs", type=int, default=200, help="paragraphs (4 per shard)")
    parser.add_argument("--seed", type=int, default=17)
    args = parser.parse_args(argv)
    import crowstream as cs
    from conftest import build_tiny_gpt2, python_paragraphs

    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="crowstream-kills-") as tmp:
        model, corpus = os.path.join(tmp, "gpt2"), os.path.join(tmp, "corpus.txt")
        build_tiny_gpt2(model)
        docs = python_paragraphs(args.docs)
        with open(corpus, "w", encoding="utf-8") as f:
            f.write("\n".join(d.replace("\n", " ") for d in docs) + "\n")
        reference = os.path.join(tmp, "reference")
        cs.capture(model, corpus, MODULES, reference, **KW)
        bucket = Bucket()
        try:
            s, t = measure(bucket, model, corpus, reference)
            print(f"uninterrupted 2-rank capture: first record after {s:.1f} s, done after "
                  f"{t:.1f} s; equal to the one-process capture", flush=True)
            kills, capture, starts = 0, 0, 0
            while kills < args.kills:
                capture += 1
                prefix = f"killed-{capture}"
                url = f"s3://kills/{prefix}"
                ranks = [start_rank(bucket, model, corpus, url, r) for r in (0, 1)]
                starts += 2
                while any(p.poll() is None for p in ranks) or not complete(bucket, prefix):
                    if kills < args.kills:
                        time.sleep(rng.uniform(s / 4, s))
                    live = [r for r, p in enumerate(ranks) if p.poll() is None]
                    if kills < args.kills and live and not complete(bucket, prefix):
                        victim = rng.choice(live)
                        before = len(bucket.records(prefix))
                        os.kill(ranks[victim].pid, signal.SIGKILL)
                        kills += 1
                        print(f"kill {kills}: rank {victim} of capture {capture} with {before} "
                              "shard(s) committed", flush=True)
                    idle = all(p.poll() is not None for p in ranks)
                    for r, process in enumerate(ranks):  # resume each rank that was killed
                        if process.poll() is None or complete(bucket, prefix):
                            continue
                        if wait([process]) == [-signal.SIGKILL] or idle:
                            ranks[r] = start_rank(bucket, model, corpus, url, r)
                            starts += 1
                    if kills >= args.kills:  # after the restarts: a rank may wait for rank 0
                        wait(ranks)
                compare(url, bucket, reference)
                print(f"capture {capture}: complete, bit-identical to the one-process capture "
                      "(rows, statistics, docs), verify clean", flush=True)
            print(f"RESULT: {kills} SIGKILLs over {capture} capture(s), {starts} rank starts: every "
                  "capture bit-identical to the uninterrupted one-process capture")
        finally:
            bucket.server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
