"""The benchmark scripts run (in their --tiny CI mode) and print every number they promise."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def _run(script: str, tmp_path) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, os.path.join(BENCHMARKS, script), "--tiny",
                           "--tmp", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, f"{script} --tiny exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    assert not os.listdir(tmp_path), "the benchmark left files behind"
    return done.stdout


@pytest.mark.slow
def test_throughput_tiny_prints_every_number(tmp_path):
    out = _run("throughput.py", tmp_path)
    for line in ("(1) crowstream.capture", "(2) hand-written", "(3) bare forward",
                 "(4) bare forward, packed", "ratio (1)/(2)", "ratio (1)/(3)", "ratio (1)/(4)",
                 "(1)/(4): ", "ru_maxrss", "float32:", "float16:",
                 "of the compressed vector payload", "targets:"):
        assert line in out, f"missing {line!r} in:\n{out}"
    # all four phases saw the same documents, and (3) replayed crowstream's own batches
    assert "same real tokens in (1), (2), (3), (4): True" in out, out
    assert "(doc_id order of the part files): True" in out, out


@pytest.mark.slow
def test_memory_tiny_prints_growth(tmp_path):
    out = _run("memory.py", tmp_path)
    for line in ("1x:", "8x:", "peak RSS", "RSS growth 8x docs:", "capture's own increment"):
        assert line in out, f"missing {line!r} in:\n{out}"


def test_commits_tiny_prints_constant_cost(tmp_path):
    out = _run("commits.py", tmp_path)
    for line in ("time per commit, first 10%", "ratio last/first", "record bytes: first",
                 "stats file bytes", "crowstream.json writes during the commits: 0"):
        assert line in out, f"missing {line!r} in:\n{out}"


@pytest.mark.slow
def test_scale_tiny_prints_every_number(tmp_path):
    out = _run("scale.py", tmp_path)
    for line in ("bare loop: peak RSS", "max_inflight_bytes", "above the bare loop", "row groups:",
                 "total_byte_size", "documents per batch: [4] (batch_size 4: OK)",
                 "commit time first/last 10%", "targets:"):
        assert line in out, f"missing {line!r} in:\n{out}"


def test_loader_tiny_prints_every_number(tmp_path):
    out = _run("loader.py", tmp_path)
    for line in ("(a) cs.stream shuffle_buffer=", "(b) cs.stream, no shuffling",
                 "(c) load_dataset + DataLoader(shuffle=True)", "(d) raw pyarrow",
                 "rows/s", "GB/s", "ratio (a)/(d):", "(a)/(c):"):
        assert line in out, f"missing {line!r} in:\n{out}"
    assert out.count(" 20,000 rows  ") == 3, out  # (a), (b), (d) read every row


@pytest.mark.slow
def test_pretokenized_tiny_prints_the_ratio_and_equal_rows(tmp_path):
    out = _run("pretokenized.py", tmp_path)
    for line in ("d=64 round 0: text", "pre-tokenized", "per 1M tokens", "median text/pre-tokenized"):
        assert line in out, f"missing {line!r} in:\n{out}"
    assert "rows equal: True" in out, out
