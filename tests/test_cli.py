"""The command line end to end, in real subprocesses, on the tiny GPT-2's saved directory
and a .txt corpus. Each process pays ~5 s of imports, so there are few of them: one
capture shared by the tests, then info, verify (intact and damaged), modules, and one
failing capture.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

import crowstream as cs

N_DOCS = 20


def _command(args, script):
    if script:  # the console script installed with the package
        return [os.path.join(os.path.dirname(sys.executable), "crowstream"), *args]
    return [sys.executable, "-m", "crowstream", *args]


def _start(*args, script=False) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.Popen(_command(args, script), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def _finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def crowstream(*args, script=False) -> subprocess.CompletedProcess:
    """Run the CLI to completion; -> CompletedProcess with text stdout/stderr."""
    return _finish(_start(*args, script=script))


def error_lines(stderr: str) -> list[str]:
    """stderr lines other than third-party progress bars (e.g. transformers' 'Loading weights')."""
    return [line for line in stderr.replace("\r", "\n").splitlines()
            if line.strip() and not re.search(r"\d+%\|", line)]


@pytest.fixture(scope="module")
def corpus_txt(corpus, tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "corpus.txt"
    path.write_text("\n".join(corpus[:N_DOCS]) + "\n", encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def slow_commands(gpt2_dir, corpus_txt, tmp_path_factory):
    """The three commands that load a model, started together (they are independent, and
    most of their time is imports); -> (base dir, result(name) -> CompletedProcess)."""
    base = tmp_path_factory.mktemp("cli")
    processes = {
        "capture": _start("capture", gpt2_dir, corpus_txt, "-m", "transformer.h.*",
                          "-m", "transformer.**.mlp.c_fc", "-o", str(base / "acts"),
                          "--shard-size", "7", "--batch-size", "4", "--no-progress"),
        "modules": _start("modules", gpt2_dir),
        "unknown": _start("capture", gpt2_dir, corpus_txt, "-m", "transformer.h.1.mpl",
                          "-o", str(base / "never"), "--no-progress"),
    }
    results = {}

    def result(name):
        if name not in results:
            results[name] = _finish(processes[name])
        return results[name]

    yield base, result
    for process in processes.values():  # only if a test failed before collecting it
        if process.poll() is None:
            process.kill()
            process.communicate()


@pytest.fixture(scope="module")
def captured(slow_commands):
    base, result = slow_commands
    capture = result("capture")
    assert capture.returncode == 0, capture.stderr
    assert "Traceback" not in capture.stderr
    return str(base / "acts"), capture


def test_capture(captured, gpt2_dir, corpus_txt, tmp_path):
    out, result = captured
    modules = ["transformer.h.0", "transformer.h.1", "transformer.h.2",
               "transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc", "transformer.h.2.mlp.c_fc"]
    info = cs.info(out)
    assert list(info["modules"]) == modules  # `*` stays in one component, `**` crosses them
    assert [info["modules"][m]["d"] for m in modules] == [64] * 3 + [256] * 3
    assert info["status"] == "complete" and info["docs"] == N_DOCS and info["shards"] == 3
    rows = info["modules"]["transformer.h.0"]["rows"]
    assert result.stdout.strip() == (
        f"wrote {N_DOCS} documents to {out} ("
        + ", ".join(f"{m}: {rows:,}" for m in modules) + " rows)")
    # the same call through the Python API stores the same rows
    api = cs.capture(gpt2_dir, corpus_txt, ["transformer.h.2"], str(tmp_path / "api"),
                     batch_size=4, shard_size=7, device="cpu", progress=False)
    frames = [cs.scan(path).filter(module="transformer.h.2").sort("doc_id", "position").collect()
              for path in (out, api.path)]
    assert frames[0]["doc_id"].unique().sort().to_list() == list(range(N_DOCS))  # line numbers
    assert frames[0].select("doc_id", "position", "token").equals(frames[1].select("doc_id", "position", "token"))
    cli_vectors, api_vectors = (np.array(f["vector"].to_list(), dtype=np.float32) for f in frames)
    assert cli_vectors.shape == (info["modules"]["transformer.h.2"]["rows"], 64)
    np.testing.assert_allclose(cli_vectors, api_vectors, rtol=0, atol=1e-6)


def test_info_and_verify(captured, tmp_path):
    out, _ = captured
    result = crowstream("info", out, script=True)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert re.fullmatch(rf"{re.escape(out)}: complete \(run [0-9a-f]+\)", lines[0])
    assert f"documents: {N_DOCS} (0 skipped)" in result.stdout
    rows = cs.info(out)["modules"]["transformer.h.0"]["rows"]
    assert re.search(rf"^  transformer\.h\.0\.mlp\.c_fc: d=256 float32, {rows:,} rows in 3 file\(s\)",
                     result.stdout, re.M)

    result = crowstream("verify", out)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(rf"{re.escape(out)}: OK \(21 parts, {6 * rows:,} rows, [\d.]+ MiB checked\)\n",
                        result.stdout)

    damaged = str(tmp_path / "damaged")
    shutil.copytree(out, damaged)
    victim = "data/module=transformer.h.1/part-00000-000001-000.parquet"
    path = os.path.join(damaged, victim)
    size = os.path.getsize(path)
    pq.ParquetFile(path)  # readable before
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    result = crowstream("verify", damaged)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert f"truncated: {victim} has {size // 2:,} bytes, the manifest records {size:,}" in result.stderr
    assert result.stderr.startswith(f"crowstream verify: 1 problem(s) in {damaged}")


def test_modules(slow_commands):
    result = slow_commands[1]("modules")
    assert result.returncode == 0, result.stderr
    listing = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert re.fullmatch(r"transformer\.h\.0\s+GPT2Block\s+\(2, \d+, 64\)", listing["transformer.h.0"])
    assert re.fullmatch(r"transformer\.h\.2\.mlp\.c_fc\s+Conv1D\s+\(2, \d+, 256\)",
                        listing["transformer.h.2.mlp.c_fc"])
    assert "transformer.h" not in listing  # a ModuleList never runs: listed only with --all
    assert "transformer.wpe" not in listing  # one row for the whole batch: not capturable


def test_unknown_module_one_line_error(slow_commands):
    base, result = slow_commands
    out, result = base / "never", result("unknown")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("crowstream: error: module 'transformer.h.1.mpl' is not in GPT2LMHeadModel; "
                               "did you mean 'transformer.h.1.mlp'")
    assert result.stdout == ""
    assert not out.exists()  # nothing written


def test_every_capture_option_has_help_and_a_group():
    """`crowstream capture --help` explains every option, grouped by what it is about."""
    import argparse

    from crowstream.cli import build_parser

    parser = build_parser()
    capture = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)
                   ).choices["capture"]
    groups = {g.title: g for g in capture._action_groups}
    assert len(groups) == 7  # positional, options, and five themes
    for action in capture._actions:
        if action.dest != "help":
            assert action.help, f"{action.option_strings or action.dest} has no help"
    themed = [a for g in capture._action_groups[2:] for a in g._group_actions]
    assert len(themed) > 30 and {"--resume", "--dtype", "--tokens-field", "--packing"} <= {
        flag for a in themed for flag in a.option_strings}


_HUGE_PAGE_PROBE = """
from crowstream.cli import prefer_huge_pages
prefer_huge_pages()
import torch
tensor = torch.ones(16 << 20)  # 64 MiB: torch madvises CPU buffers of 2 MiB and more
address = tensor.data_ptr()
inside = False
for line in open("/proc/self/smaps"):
    head = line.split()[0]
    if "-" in head and ":" not in head:  # a mapping's header: start-end perms ...
        start, end = (int(x, 16) for x in head.split("-"))
        inside = start <= address < end
    elif inside and line.startswith("VmFlags:"):
        print("hg" in line.split())
        break
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="Linux only")
@pytest.mark.parametrize("setting, advised", [(None, True), ("0", False)])
def test_the_command_line_asks_torch_for_huge_pages_unless_told_not_to(setting, advised):
    """The process `prefer_huge_pages` prepares maps a large tensor with MADV_HUGEPAGE
    (the `hg` flag in smaps), whether or not the kernel then has huge pages to give; a
    user's THP_MEM_ALLOC_ENABLE=0 wins."""
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if setting is not None:
        env["THP_MEM_ALLOC_ENABLE"] = setting
    result = subprocess.run([sys.executable, "-c", _HUGE_PAGE_PROBE], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(advised)


_HEAP_PROBE = """
import ctypes, torch
from crowstream.cli import keep_freed_memory

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks",
                "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Mallinfo2
kept = keep_freed_memory()
mapped = libc.mallinfo2().hblkhd
tensor = torch.empty(64 << 20, dtype=torch.uint8)  # over glibc's largest mmap threshold
print(kept, libc.mallinfo2().hblkhd - mapped >= 64 << 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
@pytest.mark.parametrize("variable", [None, "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_"])
def test_the_command_line_keeps_freed_memory_in_the_heap_unless_told_not_to(variable):
    """After `keep_freed_memory` a 64 MiB tensor comes from the heap (glibc's mmapped bytes,
    `mallinfo2().hblkhd`, do not grow), so freeing it keeps it for the next batch; a user's
    own MALLOC_MMAP_MAX_ or MALLOC_TRIM_THRESHOLD_ leaves glibc as it was (mapped)."""
    import ctypes

    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("no glibc >= 2.33 (mallinfo2)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    if variable == "MALLOC_MMAP_MAX_":
        env[variable] = "65536"  # glibc's default
    elif variable is not None:
        env[variable] = str(128 << 10)
    result = subprocess.run([sys.executable, "-c", _HEAP_PROBE], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    kept = variable is None
    assert result.stdout.split() == [str(kept), str(not kept)]


_ENCODER_MEMORY_PROBE = """
import resource, sys, threading, time
from crowstream.cli import keep_encoder_memory
if sys.argv[1] == "first":
    keep_encoder_memory()  # as the command line: before pyarrow is loaded
from crowstream.pipeline.parts import encoder_memory_pool
import numpy as np, pyarrow as pa

if sys.argv[1] == "later":
    keep_encoder_memory()  # as the benchmarks may: after
pool = encoder_memory_pool()
pa.allocate_buffer(64, memory_pool=pool)  # this thread's arena, as the capture's main thread
faults = []

def encode_like():  # a row group's buffer, freed, then a pause longer than jemalloc's decay
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        buffer = pa.allocate_buffer(64 << 20, memory_pool=pool)
        np.frombuffer(buffer, np.uint8)[:] = 1
        faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
        del buffer
        time.sleep(1.1)
        for _ in range(3000):  # allocations are what let jemalloc's decay run
            pa.allocate_buffer(64, memory_pool=pool)

thread = threading.Thread(target=encode_like)
thread.start()
thread.join()
print(faults[-1] < 1024)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RUSAGE_THREAD is Linux's")
@pytest.mark.parametrize("setting", [None, "stats_print:false"])
@pytest.mark.parametrize("when", ["first", "later"])
def test_the_command_line_keeps_the_encoders_memory_unless_told_not_to(setting, when):
    """After `keep_encoder_memory`, a 64 MiB encode buffer freed and taken again after
    jemalloc's decay time faults in nothing (4 KiB pages: 16k faults otherwise); a user's
    own JE_ARROW_MALLOC_CONF leaves pyarrow's settings as they were."""
    import pyarrow as pa

    try:
        pa.jemalloc_memory_pool()
    except NotImplementedError:
        pytest.skip("this pyarrow has no jemalloc")
    env = {k: v for k, v in os.environ.items() if k != "JE_ARROW_MALLOC_CONF"}
    if setting is not None:
        env["JE_ARROW_MALLOC_CONF"] = setting
    result = subprocess.run([sys.executable, "-c", _ENCODER_MEMORY_PROBE, when], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(setting is None)


def test_main_keeps_the_encoders_memory_before_it_parses(monkeypatch):
    from crowstream import cli

    monkeypatch.setenv("JE_ARROW_MALLOC_CONF", "")  # so the test's end restores the original
    monkeypatch.delenv("JE_ARROW_MALLOC_CONF")
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert os.environ["JE_ARROW_MALLOC_CONF"] == cli.KEEP_ENCODER_MEMORY
    monkeypatch.setenv("JE_ARROW_MALLOC_CONF", "stats_print:false")
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert os.environ["JE_ARROW_MALLOC_CONF"] == "stats_print:false"


def test_main_keeps_freed_memory_before_it_parses(monkeypatch):
    from crowstream import cli

    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append("kept"))
    monkeypatch.setattr(cli, "build_parser", lambda: calls.append("parsed") or
                        pytest.fail("stop here"))
    with pytest.raises(pytest.fail.Exception):
        cli.main(["--help"])
    assert calls == ["kept", "parsed"]


def test_main_prefers_huge_pages_before_it_parses(monkeypatch):
    from crowstream import cli

    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "1"
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "0"
