"""The benchmark scripts run (in their --tiny CI mode) and print every number they promise.
Timing targets are judged by full benchmark runs only; what a tiny run can check without
timing is checked here: row and token counts agree, bytes per row are what d and the
dtype make them, and every figure printed is a finite number."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def _run(script: str, tmp_path, capsys=None) -> str:
    """`script --tiny`: in this process when `capsys` is given (benchmarks that measure
    nothing process-wide: a child process costs ~5 s of imports), else as a child."""
    args = ["--tiny", "--tmp", str(tmp_path)]
    if capsys is not None:
        from helpers import run_benchmark_here

        out = run_benchmark_here(script, args, capsys)
    else:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        done = subprocess.run([sys.executable, os.path.join(BENCHMARKS, script), *args],
                              capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, f"{script} --tiny exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        out = done.stdout
    assert not os.listdir(tmp_path), "the benchmark left files behind"
    _every_figure_finite(out)
    return out


def _every_figure_finite(out: str) -> None:
    bad = re.findall(r"(?i)(?<![\w-])(nan|-?inf(?:inity)?)(?![\w-])", out)
    assert not bad, f"non-finite figures {bad} in:\n{out}"


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def _one(pattern: str, out: str) -> tuple:
    found = re.search(pattern, out, re.M)
    assert found, f"no {pattern!r} in:\n{out}"
    return found.groups()


@pytest.fixture(scope="module")
def gpu_sh(tmp_path_factory):
    """benchmarks/gpu.sh in its CPU form, run once: -> (its table, its logs directory). Its
    throughput and loader runs are the scripts' own --tiny runs, so their tests read these
    logs instead of running them again (the suite stays under 10 minutes)."""
    tmp = tmp_path_factory.mktemp("gpu-sh")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHON": sys.executable, "LOGS": str(tmp / "logs")}
    done = subprocess.run(["bash", os.path.join(BENCHMARKS, "gpu.sh"), "--device", "cpu", "--tiny",
                           "--tmp", str(tmp)], capture_output=True, text=True, timeout=600,
                          env=env)
    assert done.returncode == 0, f"gpu.sh exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    assert sorted(os.listdir(tmp)) == ["logs"], "gpu.sh left files behind"
    return done.stdout, tmp / "logs"


def _log(gpu_sh, name: str) -> str:
    out = (gpu_sh[1] / f"{name}.log").read_text()
    _every_figure_finite(out)
    return out


@pytest.mark.slow
def test_throughput_tiny_prints_every_number(gpu_sh):
    out = _log(gpu_sh, "throughput")
    for line in ("(1) crowstream.capture", "(2) hand-written", "(3) bare forward",
                 "(4) bare forward, packed", "ratio (1)/(2)", "ratio (1)/(3)", "ratio (1)/(4)",
                 "(1)/(4): ", "(1)/(4) with (1)'s fixed cost per run", "ru_maxrss", "float32:", "float16:",
                 "of the compressed vector payload", "targets:"):
        assert line in out, f"missing {line!r} in:\n{out}"
    # all four phases saw the same documents, and (3) replayed crowstream's own batches
    assert "same real tokens in (1), (2), (3), (4): True" in out, out
    assert "(doc_id order of the part files): True" in out, out
    # every phase counts the same real tokens as the corpus line
    (tokens,) = _one(r"^  corpus: .*?, ([\d,]+) tokens after truncation", out)
    for phase in (r"\(1\) crowstream\.capture, end", r"\(2\) hand-written", r"\(3\) bare forward",
                  r"\(1'\) crowstream\.capture, dtype=float16"):
        (seen,) = _one(rf"^  {phase}.*?  ([\d,]+) (?:tokens|real of)", out)
        assert seen == tokens, (phase, seen, tokens)
    # bytes per token: raw payload is d * itemsize; disk holds the vector plus a few columns
    (d,) = _one(r"d=(\d+), \d+ heads", out)
    per_token = {}
    for module, dtype, disk, vector, size, raw, within in re.findall(
            r"^  (\S+) (float32|float16): ([\d.]+) B/token on disk; vector column ([\d.]+) B/token "
            r"compressed; raw payload d\*(\d) = (\d+) B.*\n\s+within ([\d.]+)% of the compressed "
            r"vector payload \(target <= 5%: met\)", out, re.M):
        assert int(raw) == int(d) * int(size) == int(d) * {"float32": 4, "float16": 2}[dtype]
        assert 0 < float(vector) <= float(disk) <= float(vector) * 1.05
        assert abs(float(disk) / float(vector) - 1 - float(within) / 100) < 0.001
        per_token[module, dtype] = float(disk)
    assert len(per_token) == 4, out  # 2 modules x 2 dtypes, each within 5% of its payload
    for module in {m for m, _ in per_token}:
        assert per_token[module, "float16"] < 0.6 * per_token[module, "float32"]


@pytest.mark.slow
def test_memory_tiny_prints_growth(tmp_path):
    out = _run("memory.py", tmp_path)
    for line in ("1x:", "4x:", "peak RSS", "RSS growth 4x docs:", "capture's own increment",
                 "smallest budget the writers honour: 1 module(s)", "working memory set aside"):
        assert line in out, f"missing {line!r} in:\n{out}"
    runs = {}
    for scale in (1, 4):
        docs, tokens, shards = map(_number, _one(
            rf"^  {scale}x:\s+([\d,]+) docs,\s+([\d,]+) tokens,\s+(\d+) shards", out))
        runs[scale] = docs, tokens, shards
    assert runs[4] == tuple(4 * x for x in runs[1]), runs  # 4x the corpus, all of it captured


def test_commits_tiny_prints_constant_cost(tmp_path, capsys):
    out = _run("commits.py", tmp_path, capsys)
    for line in ("time per commit, first 10%", "ratio last/first", "record bytes: first",
                 "stats file bytes", "crowstream.json writes during the commits: 0"):
        assert line in out, f"missing {line!r} in:\n{out}"
    # O(1) commits, by size: the last record and stats file are as small as the first (a
    # stats file's compressed float64 sums vary by ~1% from shard to shard; a file that
    # grew with the commits would be many times the first)
    for what in ("record bytes", "stats file bytes"):
        first, last, most = map(_number, _one(rf"^{what}: first ([\d,]+), last ([\d,]+), "
                                               r"max ([\d,]+)", out))
        assert 0 < first and most <= first * 1.05 + 32, (what, first, last, most)  # most >= last


@pytest.mark.slow
def test_scale_tiny_prints_every_number(tmp_path):
    out = _run("scale.py", tmp_path)
    for line in ("bare loop: peak RSS", "max_inflight_bytes", "above the bare loop", "row groups:",
                 "total_byte_size", "documents per batch: [4] (batch_size 4: OK)",
                 "commit time first/last 10%", "targets:"):
        assert line in out, f"missing {line!r} in:\n{out}"
    budgets = re.findall(r"^max_inflight_bytes ([\d.]+) MiB: peak RSS \+([\d.]+) MiB", out, re.M)
    assert len(budgets) >= 2 and all(float(peak) > 0 for _, peak in budgets), out
    assert out.count("(row_group_bytes 16.0 MiB: OK)") == len(budgets), out
    assert out.count("documents per batch: [4] (batch_size 4: OK)") == len(budgets), out


def test_loader_tiny_prints_every_number(gpu_sh):
    out = _log(gpu_sh, "loader")
    for line in ("d=32 float32:", "d=32 float16:", "raw pyarrow", "cs.stream", "CPU µs/row",
                 "stream/raw: rows/s", "resume cost:", "mixing P(two rows of a batch share",
                 "memory: peak RSS a stream adds", "targets:"):
        assert line in out, f"missing {line!r} in:\n{out}"


def test_ceiling_tiny_prints_every_figure_and_the_right_rows(gpu_sh):
    import re

    out = _log(gpu_sh, "ceiling")  # gpu.sh's CPU form: ceiling.py --tiny --threads 1 2 to shm
    for line in ("(t) tokenizing alone", "(a) crowstream.capture", "(b) one ParquetWriter",
                 "(c) raw write+fsync", "(f) the forward alone", "CPU-s/GB ratio (a)/(b)",
                 "with the forward counted out", "wall-clock speed-up"):
        assert line in out, f"missing {line!r} in:\n{out}"
    lines = [line for line in out.splitlines() if "encoder_threads=" in line]
    assert len(lines) == 2 * 2, out  # float32/16 x 1/2 encoder threads, to /dev/shm
    assert all(line.endswith(": OK") for line in lines), out  # rows and bytes per row
    assert "bytes per row 256 (expected 256)" in out and "bytes per row 128 (expected 128)" in out
    figures = re.findall(r"([-\w.]+) (?:GB/s|CPU-s/GB|tokens/s)", out)
    assert len(figures) >= 1 + 4 * 8 and "every figure finite: True" in out, out
    assert not any(f in ("nan", "inf", "-inf") for f in figures), out


def test_ceiling_repeats_alternate_the_thread_order_and_print_medians():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, os.path.join(BENCHMARKS, "ceiling.py"), "--tiny",
                           "--targets", "shm", "--dtypes", "float32", "--threads", "1", "2",
                           "--repeats", "2"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    order = re.findall(r"encoder_threads=(\d): rows", done.stdout)
    assert order == ["1", "2", "2", "1"], done.stdout  # the second round runs 2 first
    for threads in (1, 2):
        assert re.search(rf"median of 2 rounds, encoder_threads={threads}: \(a\)/\(b\) "
                         r"[\d.]+, forward counted out [\d.]+", done.stdout), done.stdout
    _every_figure_finite(done.stdout)


def test_cpu_paths_tiny_prints_every_microbenchmark(tmp_path):
    out = _run("cpu_paths.py", tmp_path)  # a child: it compares THP settings in children
    for line in ("1. lookup", "4 KiB pages", "huge pages", "2. 8 windows", "median ratio",
                 "3. a 300 x 64 float32 row group", "a reused one", "concat_arrays",
                 "4. row norms + subtract", "5. kept rows", "a fresh buffer"):
        assert line in out, f"missing {line!r} in:\n{out}"
    _every_figure_finite(out)


def test_compression_tiny_prints_the_table_and_a_choice(tmp_path, capsys):
    out = _run("compression.py", tmp_path, capsys)
    rows = [line for line in out.splitlines() if line.startswith(("minilm", "gpt2-random"))]
    assert len(rows) >= 2 * 3 and all(len(line.split()) == 9 for line in rows), out
    for line in rows:  # bytes per row below the raw row for zstd, at most ~4% above for none
        _, _, dtype, codec, per_row, raw, *figures = line.split()
        assert float(per_row) < 1.04 * int(raw) + 40, line
        if codec == "zstd":  # docs/performance.md: zstd stores fewer bytes than the raw row
            assert float(per_row) < int(raw), line
        assert all(float(f.replace(",", "")) > 0 for f in figures), line
    assert "choice: " in out, out


@pytest.mark.slow
def test_gpu_script_cpu_form_prints_one_table(gpu_sh):
    out = gpu_sh[0]
    for line in ("== crowstream on cpu", "-- throughput.py", "(1) crowstream.capture",
                 "-- ceiling.py", "encoder_threads=1", "encoder_threads=2", "speed-up",
                 "-- loader.py", "throughput:", "ceiling:", "loader:"):
        assert line in out, f"missing {line!r} in:\n{out}"


@pytest.mark.slow
def test_pretokenized_tiny_prints_the_ratio_and_equal_rows(tmp_path, capsys):
    out = _run("pretokenized.py", tmp_path, capsys)
    for line in ("d=64 round 0: text", "pre-tokenized", "per 1M tokens", "median text/pre-tokenized"):
        assert line in out, f"missing {line!r} in:\n{out}"
    assert "rows equal: True" in out, out


def test_forward_gate_tiny_prints_both_sides_and_equal_files(tmp_path, capsys):
    out = _run("forward_gate.py", tmp_path, capsys)
    for line in ("round 0 gated", "round 0 beside", "gated: median", "beside: median"):
        assert line in out, f"missing {line!r} in:\n{out}"
    assert "same part files: True" in out, out
