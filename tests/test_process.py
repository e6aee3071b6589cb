"""The command line's process tuning (crowstream/process.py): huge pages, glibc and
jemalloc keeping freed memory. Each real effect is checked in a child process, which the
tuning may change for good; the tests in this process stub every step, so the pytest
process is never tuned.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from crowstream import cli, process


_HUGE_PAGE_PROBE = """
from crowstream.process import prefer_huge_pages
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
from crowstream.process import keep_freed_memory

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
from crowstream.process import keep_encoder_memory
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


def test_main_prepares_the_process_before_it_parses(monkeypatch):
    """`crowstream ...` tunes its process first, every step, before the arguments are
    parsed (so before torch or pyarrow allocate anything)."""
    calls = []
    for step in ("prefer_huge_pages", "keep_freed_memory", "keep_encoder_memory"):
        monkeypatch.setattr(process, step, lambda step=step: calls.append(step))
    monkeypatch.setattr(cli, "build_parser", lambda: calls.append("parsed") or
                        pytest.fail("stop here"))
    with pytest.raises(pytest.fail.Exception):
        cli.main(["--help"])
    assert calls == ["prefer_huge_pages", "keep_freed_memory", "keep_encoder_memory", "parsed"]


@pytest.mark.parametrize("step, variable, value", [
    ("prefer_huge_pages", "THP_MEM_ALLOC_ENABLE", "1"),
    ("keep_encoder_memory", "JE_ARROW_MALLOC_CONF", process.KEEP_ENCODER_MEMORY)])
def test_a_step_sets_its_variable_only_where_the_user_did_not(monkeypatch, step, variable, value):
    """Unset, the variable gets crowstream's value; the user's own value (even one that
    only opts out) is kept. jemalloc's live setting is stubbed: it would outlast the test."""
    import pyarrow as pa

    decay = []
    monkeypatch.setattr(pa, "jemalloc_set_decay_ms", decay.append)
    monkeypatch.setenv(variable, "")  # recorded first, so the end of the test restores it
    monkeypatch.delenv(variable)
    getattr(process, step)()
    assert os.environ[variable] == value
    assert decay == ([-1] if step == "keep_encoder_memory" else [])  # pyarrow is loaded here
    monkeypatch.setenv(variable, "0")
    before = list(decay)
    getattr(process, step)()
    assert os.environ[variable] == "0"
    assert decay == before  # the user's setting: jemalloc is left alone too
