"""Crash safety with real processes.

* The kill test: a capture runs in a real child process that is SIGKILLed at seeded
  random moments (during model load, as soon as OUT appears, in the middle of a commit,
  anywhere), then resumed, over and over until it completes. At every kill point the
  output must hold only whole Parquet files and every committed part must be intact;
  at the end the dataset must equal an uninterrupted run's, bit for bit.
* SIGINT through the CLI: exit 130, the exact `--resume` command on stderr, manifest
  "interrupted"; running that command finishes the dataset.
* Exact crash points: the on-disk state at precise moments of the commit sequence is
  snapshotted and resumed from (what a SIGKILL at that instant leaves behind).
"""

from __future__ import annotations

import os
import random
import select
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

import crowstream as cs
from crowstream.errors import VerifyError
from helpers import assert_same_rows, manifest_of

MODULES = ["transformer.h.0", "transformer.h.2"]
N_DOCS = 160         # 40 shards, < 1 s of capture on 2 idle CPU cores
CLI_DOCS = 120       # the SIGINT test's corpus: the first 30 of those shards
KILLS = 16            # SIGKILLs to deliver before letting the run finish
SEED = 1234
RUN_KW = dict(shard_size=4, batch_size=4, progress=False, device="cpu")
# For the processes started here: idle OpenMP threads sleep instead of spinning, so a busy
# 2-core machine does not slow them 10x (the numbers computed are the same).
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_WAIT_POLICY": "PASSIVE"}

# A fork server: it pays for the heavy imports (~4 s) once, then each "run" forks a
# fresh child process that loads the model from disk and runs the capture with
# resume=True. The test SIGKILLs the child from outside: a real process, a real kill.
# The parent never runs torch code, so forking it is safe.
DRIVER = r"""
import os, sys, traceback
out, model_dir, n_docs, modules = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].split(",")
import jsonschema, nnsight, pyarrow.parquet, torch, tqdm.auto  # noqa: F401
import transformers.models.gpt2.modeling_gpt2  # noqa: F401  (lazy in transformers)
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast  # noqa: F401
import datasets  # noqa: F401
import crowstream as cs
import crowstream.format.integrity, crowstream.pipeline.run, crowstream.reading.readers  # noqa: F401
from crowstream.demo import python_doc_paragraphs
docs = python_doc_paragraphs(n_docs, min_chars=1)
print("READY", flush=True)
for line in sys.stdin:
    if line.strip() != "run":
        break
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            cs.capture(model_dir, docs, modules, out, resume=True, shard_size=4, batch_size=4,
                       progress=False, device="cpu")
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    print(f"CHILD {pid}", flush=True)
    _, status = os.waitpid(pid, 0)
    print(f"EXIT {os.waitstatus_to_exitcode(status)}", flush=True)
"""


def corpus_docs():
    from crowstream.demo import python_doc_paragraphs

    return python_doc_paragraphs(N_DOCS, min_chars=1)


# -- helpers -------------------------------------------------------------------------------

def files_under(out, *tops) -> list[str]:
    found = []
    for top in tops:
        for root, _, files in os.walk(os.path.join(out, top)):
            found += [os.path.join(root, f) for f in files]
    return sorted(found)


@pytest.fixture(scope="module")
def reference(gpt2_dir, tmp_path_factory):
    """The uninterrupted run, in this process, from the same saved model."""
    out = str(tmp_path_factory.mktemp("crash-ref") / "out")
    cs.capture(gpt2_dir, corpus_docs(), MODULES, out, **RUN_KW)
    return out


class Lines:
    """Line reader over a pipe with timeouts (no buffering surprises)."""

    def __init__(self, fd: int):
        self.fd, self.buffer = fd, b""

    def poll(self, timeout: float = 0.0) -> str | None:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.fd], [], [], max(left, 0))
            if not ready:
                if left <= 0:
                    return None
                continue
            chunk = os.read(self.fd, 4096)
            if not chunk:
                raise EOFError("the driver exited")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode()

    def expect(self, prefix: str, timeout: float, log_path) -> str:
        line = self.poll(timeout)
        if line is None or not line.startswith(prefix):
            with open(log_path) as f:
                log = f.read()[-3000:]
            raise AssertionError(f"expected {prefix!r} from the driver, got {line!r}; its log:\n{log}")
        return line


def check_readers_see_whole_files(out, seen: set) -> None:
    """Every file in data/ and docs/ opens and reads as Parquet (once per inode)."""
    for path in files_under(out, "data", "docs"):
        try:
            st = os.stat(path)
            key = (path, st.st_ino, st.st_size)
            if key in seen:
                continue
            table = pq.read_table(path)
        except FileNotFoundError:  # a resume removed an uncommitted file meanwhile
            continue
        assert table.num_rows == pq.read_metadata(path).num_rows  # read whole, without an error
        seen.add(key)


# -- the kill test -------------------------------------------------------------------------

@pytest.mark.crash
@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_equals_uninterrupted(gpt2_dir, reference, tmp_path):
    ref_out = reference
    ref_manifest = manifest_of(ref_out)
    ref_sha = {p.path: p.sha256 for p in ref_manifest.parts}
    shards = len(ref_manifest.shards)
    out = str(tmp_path / "out")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    log_path = tmp_path / "driver.log"
    rng = random.Random(SEED)
    # Kill kinds: "load" a few ms after the child starts (model loading), "out_appears" as
    # soon as OUT exists (creating OUT, vocab, card, first manifest), "commit" the moment a
    # new file lands in data/ or docs/ (in the middle of a commit's renames), "record" the
    # moment a new commit record appears (between the record and the renames), "random" once a seeded
    # random number of shards is committed, at a random moment within the next shard (in the
    # middle of forward passes and part writes). Random targets are in units of progress, so
    # they spread over the whole run whatever the machine's speed.
    plan = ["load", "out_appears"] + rng.sample(["commit"] * 3 + ["record"] * 3 + ["random"] * 7
                                                + ["load"], 14)
    assert len(plan) == KILLS
    # (the last target leaves room for the kills planned after it: the run must not end early)
    targets = iter(sorted(rng.sample(range(1, shards - 10), plan.count("random"))))
    stats = {"kills": 0, "mid_commit": 0, "pending": 0, "before_manifest": 0, "out_absent": 0}
    kill_points = []  # committed docs parts at each kill
    seen: set = set()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(driver), out, gpt2_dir, str(N_DOCS), ",".join(MODULES)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, bufsize=0, env=ENV)
    try:
        lines = Lines(proc.stdout.fileno())
        lines.expect("READY", 120, log_path)
        completed = False
        for attempt in range(KILLS + 5):
            kind = plan[attempt] if attempt < len(plan) else "none"
            if kind == "out_appears" and os.path.exists(out):
                kind = "commit"
            target = next(targets) if kind == "random" else None
            proc.stdin.write(b"run\n")
            proc.stdin.flush()
            child = int(lines.expect("CHILD", 30, log_path).split()[1])
            before = set(files_under(out, "data", "docs"))
            records_before = set(files_under(out, "commits"))
            started = time.monotonic()
            deadline = started + rng.uniform(0, 0.05) if kind == "load" else None
            reached = None
            exited = None
            while exited is None:
                fast = kind in ("commit", "record", "out_appears", "random")
                exited = lines.poll(0.002 if fast else 0.02)
                if exited is not None:
                    break
                now = time.monotonic()
                assert now - started < 120, "a run took far too long"
                if deadline is not None:
                    if now >= deadline or (kind == "random" and len(files_under(out, "docs")) > target):
                        break  # (or a shard later at the latest, whatever the child's pace)
                elif kind == "out_appears" and os.path.isdir(out):
                    break
                elif kind == "commit" and set(files_under(out, "data", "docs")) - before:
                    break
                elif kind == "record" and any(
                        f.endswith(".json") for f in set(files_under(out, "commits")) - records_before):
                    break
                elif kind == "random" and len(files_under(out, "docs")) >= target:
                    if reached is None:
                        reached = now
                        target += 1
                    else:  # a random moment within the next shard, at this child's own pace
                        deadline = now + rng.uniform(0, 1) * (now - reached)
                elif kind == "none":
                    check_readers_see_whole_files(out, seen)
            if exited is None:
                os.kill(child, signal.SIGKILL)
                exited = lines.expect("EXIT", 30, log_path)
            code = int(exited.split()[1])
            if code == 0:
                completed = True
                break
            assert code == -signal.SIGKILL, f"the capture failed (exit {code}); see {log_path}"
            stats["kills"] += 1
            kill_points.append(len(files_under(out, "docs")))
            # -- the state a SIGKILL left behind ------------------------------------------
            if not os.path.exists(out):
                stats["out_absent"] += 1
                continue
            check_readers_see_whole_files(out, seen)
            if not os.path.exists(os.path.join(out, "crowstream.json")):
                # Killed between creating OUT and writing the first manifest: nothing can
                # have been committed, and the next resume starts afresh in the same OUT.
                assert not files_under(out, "data", "docs")
                stats["before_manifest"] += 1
                continue
            cs.info(out)  # reads the manifest and the records through their schemas
            manifest = manifest_of(out)
            for part in manifest.parts:
                assert ref_sha.get(part.path) == part.sha256, \
                    f"committed {part.path} differs from the uninterrupted run's"
            listed = {os.path.join(out, p.path) for p in manifest.parts}
            assert set(files_under(out, "data", "docs")) <= listed, "an uncommitted part is visible"
            try:
                cs.verify(out)
            except VerifyError as error:
                # a commit in flight: its statistics file without a record (deleted on resume),
                # or a recorded shard whose parts are still in .tmp/ (rolled forward on resume;
                # the parts already moved make it partly visible to a raw glob)
                assert all(p.startswith(("pending:", "extra: commits/", "partly visible:"))
                           for p in error.problems), error.problems
                assert not any(p.startswith("partly visible:") for p in error.problems) or \
                    any(p.startswith("pending:") for p in error.problems), error.problems
                stats["mid_commit"] += 1
                stats["pending"] += any(p.startswith("pending:") for p in error.problems)
        assert completed, "the run never completed"
        proc.stdin.write(b"quit\n")
        proc.stdin.flush()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdin.close()
        proc.stdout.close()

    print(f"\nkill test: survived {stats['kills']} SIGKILLs ({stats['mid_commit']} mid-commit, "
          f"{stats['pending']} with a recorded shard still in .tmp/, "
          f"{stats['before_manifest']} before the first manifest, {stats['out_absent']} before "
          f"OUT existed); docs parts on disk at each kill: {kill_points} of {shards}")
    assert stats["kills"] == KILLS, stats
    manifest = manifest_of(out)
    assert manifest.status == "complete"
    assert manifest.counts == ref_manifest.counts
    assert [(p.path, p.rows, p.sha256) for p in manifest.parts] == \
        [(p.path, p.rows, p.sha256) for p in ref_manifest.parts]
    assert manifest.stats == ref_manifest.stats
    assert_same_rows(out, ref_out)
    assert cs.verify(out)["rows"] == cs.verify(ref_out)["rows"]
    assert os.listdir(os.path.join(out, ".tmp")) == []


# -- SIGINT through the CLI ----------------------------------------------------------------

@pytest.mark.crash
@pytest.mark.slow
def test_cli_sigint_prints_resume_command_and_resume_completes(gpt2_dir, reference, tmp_path):
    ref_out = reference
    data = tmp_path / "corpus.txt"
    data.write_text("\n".join(corpus_docs()[:CLI_DOCS]) + "\n", encoding="utf-8")
    out = str(tmp_path / "out")
    args = ["capture", gpt2_dir, str(data), "-m", MODULES[0], "-m", MODULES[1], "-o", out,
            "--shard-size", "4", "--batch-size", "4", "--device", "cpu", "--no-progress"]
    env = ENV
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "crowstream", *args], stdout=subprocess.PIPE,
                                stderr=err, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:  # wait for the first committed shard
            assert proc.poll() is None, "the capture ended before it could be interrupted"
            assert time.monotonic() < deadline, "no shard committed in time"
            if os.path.exists(os.path.join(out, "commits", "shard-00000000.json")):
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        stdout, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = err_path.read_text()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "SIGINT received" in stderr
    resume_lines = [line for line in stderr.splitlines() if line.startswith("resume with: ")]
    assert len(resume_lines) == 1, stderr
    command = shlex.split(resume_lines[0][len("resume with: "):])
    assert command == ["crowstream", *args, "--resume"]
    manifest = manifest_of(out)
    assert manifest.status == "interrupted"
    assert 1 <= len(manifest.shards) < CLI_DOCS // 4
    cs.verify(out)  # the open shard was dropped: no unlisted files, every part intact

    done = subprocess.run([sys.executable, "-m", "crowstream", *command[1:]], capture_output=True,
                          text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stderr
    assert f"wrote {CLI_DOCS} documents to {out}" in done.stdout
    manifest = manifest_of(out)
    assert manifest.status == "complete"
    ref_parts = [p for p in manifest_of(ref_out).parts if int(p.path.split("-")[2]) < CLI_DOCS // 4]
    assert [(p.path, p.rows, p.sha256) for p in manifest.parts] == \
        [(p.path, p.rows, p.sha256) for p in ref_parts]
    assert_same_rows(out, ref_out, docs_below=CLI_DOCS)
    cs.verify(out)


# -- exact crash points, in process --------------------------------------------------------

SMALL = 24  # documents: 6 shards of 4


@pytest.fixture(scope="module")
def small_reference(gpt2, tmp_path_factory):
    model, tokenizer = gpt2
    out = str(tmp_path_factory.mktemp("crash-small-ref") / "out")
    cs.capture(model, corpus_docs()[:SMALL], MODULES, out, tokenizer=tokenizer, **RUN_KW)
    return out


def snapshot_run_at(monkeypatch, gpt2, out, snap, target: str, attribute: str, nth: int, when=None):
    """Run a capture; at the `nth` call of `target.attribute` (that passes `when`), copy OUT
    to `snap` before the call proceeds: exactly what a SIGKILL at that instant leaves."""
    import importlib

    owner = importlib.import_module(target)
    original = getattr(owner, attribute)
    calls = []

    def wrapper(*args, **kwargs):
        if when is None or when(*args):
            calls.append(args)
            if len(calls) == nth:
                # atomic writes' temp files may vanish mid-copy (another thread renames
                # them); leaving them out is the state of a kill just before they were made
                shutil.copytree(out, snap, symlinks=True, ignore=_atomic_temps)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, attribute, wrapper)
    model, tokenizer = gpt2
    cs.capture(model, corpus_docs()[:SMALL], MODULES, out, tokenizer=tokenizer, **RUN_KW)
    monkeypatch.undo()
    assert os.path.isdir(snap), f"{target}.{attribute} was called only {len(calls)} time(s)"


def into(directory: str):
    return lambda src, dst, *rest: os.path.dirname(os.fspath(dst)).endswith(directory)


def part_dir(path) -> bool:
    name = os.path.basename(os.fspath(path))
    return name == "docs" or name.startswith("module=")


def record(src, dst, *rest) -> bool:
    """A shard's commit record (not `end.json`, which another thread may write)."""
    name = os.path.basename(os.fspath(dst))
    return name.startswith("shard-") and name.endswith(".json")


def stats_file(src, dst, *rest) -> bool:
    return os.fspath(dst).endswith(".stats.parquet")


CRASH_POINTS = {
    # shard 2's parts are in .tmp/, its statistics file about to be renamed into commits/
    "before-stats": ("os", "replace", 3, stats_file),
    # shard 2's statistics are in commits/, its record about to be renamed into place
    "stats-without-record": ("os", "replace", 3, record),
    # shard 2's record is written; its first rename (docs/) has not happened yet: roll forward
    "record-before-renames": ("os", "replace", 3, into("docs")),
    # shard 2's docs and first module are in place, the second module still in .tmp/
    "between-renames": ("os", "replace", 3, into("module=transformer.h.2")),
    # every file of shard 2 renamed, directories not yet fsynced
    "before-dir-fsync": ("crowstream.format.records", "fsync_dir", 3 * 2 + 1, part_dir),
    # the final manifest (status complete) is about to be written (1 at start, 2 "running")
    "before-final-manifest": ("crowstream.pipeline.session", "write_manifest", 3, None),
}


@pytest.mark.crash
@pytest.mark.parametrize("point", CRASH_POINTS)
def test_resume_from_exact_crash_point(monkeypatch, gpt2, small_reference, tmp_path, caplog, point):
    out, snap = str(tmp_path / "out"), str(tmp_path / "snap")
    snapshot_run_at(monkeypatch, gpt2, out, snap, *CRASH_POINTS[point])
    for path in files_under(snap, "data", "docs"):  # readers see whole files only
        pq.read_table(path)
    model, tokenizer = gpt2
    caplog.set_level("INFO", logger="crowstream")
    committed = {p.path for p in manifest_of(snap).parts}
    assert {os.path.relpath(p, snap) for p in files_under(snap, "data", "docs")} <= committed
    run = cs.capture(model, corpus_docs()[:SMALL], MODULES, snap, tokenizer=tokenizer,
                     resume=True, **RUN_KW)
    assert run.docs == SMALL
    resumed, reference = manifest_of(snap), manifest_of(small_reference)
    assert resumed.status == "complete"
    assert resumed.counts == reference.counts
    assert resumed.stats == reference.stats
    if point in ("record-before-renames", "between-renames"):  # shard 2 was rolled forward
        assert "resume: moved" in caplog.text and "part-00000-000002" in caplog.text
    assert_same_rows(snap, small_reference)
    cs.verify(snap)
    assert os.listdir(os.path.join(snap, ".tmp")) == []


@pytest.mark.crash
def test_kill_before_first_manifest_is_resumable(monkeypatch, gpt2, small_reference, tmp_path):
    out, snap = str(tmp_path / "out"), str(tmp_path / "snap")
    snapshot_run_at(monkeypatch, gpt2, out, snap, "crowstream.pipeline.session", "write_manifest", 1)
    assert not os.path.exists(os.path.join(snap, "crowstream.json"))
    assert os.listdir(snap)  # the skeleton (and vocab/card) exist: OUT is not empty
    model, tokenizer = gpt2
    cs.capture(model, corpus_docs()[:SMALL], MODULES, snap, tokenizer=tokenizer, resume=True,
               **RUN_KW)
    assert_same_rows(snap, small_reference)


@pytest.mark.crash
@pytest.mark.parametrize("state", [
    "manifest deleted first",
    "a part deleted first",
])
def test_kill_during_overwrite_cleanup_is_recoverable(gpt2, small_reference, tmp_path, state):
    """`capture(..., overwrite=True)` killed while deleting the previous output, then rerun."""
    out = str(tmp_path / "out")
    shutil.copytree(small_reference, out)
    if state == "manifest deleted first":
        os.remove(os.path.join(out, "crowstream.json"))
    else:
        os.remove(os.path.join(out, manifest_of(out).parts[1].path))
    model, tokenizer = gpt2
    again = dict(tokenizer=tokenizer, **RUN_KW)
    try:
        cs.capture(model, corpus_docs()[:SMALL], MODULES, out, resume=True, **again)
    except cs.CrowstreamError:  # refusing the resume is fine, if overwrite then works
        cs.capture(model, corpus_docs()[:SMALL], MODULES, out, overwrite=True, **again)
    cs.verify(out)
    assert_same_rows(out, small_reference)


def _atomic_temps(directory, names) -> list[str]:
    """Names `shutil.copytree` leaves out: atomic writes' temp files (`*.tmp` files, not the
    `.tmp/` directory itself)."""
    return [n for n in names if n.endswith(".tmp") and n != ".tmp"
            and not os.path.isdir(os.path.join(directory, n))]
