"""The process the command line owns, tuned before torch allocates and before anything is
encoded: huge pages for large CPU tensors, glibc keeping freed memory, and pyarrow's
jemalloc keeping the encoders' (each unless the user set its variables). `crowstream.cli`
calls `prepare_process` first; the benchmarks call it to measure what the command line
runs. The Python API never calls it: a library leaves its caller's process as it is.
"""

from __future__ import annotations

import os
import sys


HUGE_PAGES_VARIABLE = "THP_MEM_ALLOC_ENABLE"


def prefer_huge_pages() -> None:
    """Ask torch to back CPU tensors of 2 MiB and more with transparent huge pages
    (`madvise`), unless the user has set THP_MEM_ALLOC_ENABLE (0 opts out). A CPU forward
    writes a fresh `[B, T, d]` output per batch; on 4 KiB pages its page faults cost
    0.74-0.82 CPU-s per GB of a d = 4,096 embedding output on the 2-core machine, 0.18 on
    huge pages (docs/performance.md). torch reads the variable at its first CPU allocation,
    so this helps only before torch allocates: the command line, which owns its process,
    calls it first; a script does it by setting the variable before it starts."""
    os.environ.setdefault(HUGE_PAGES_VARIABLE, "1")


# glibc's mallopt parameters (malloc.h) and the variables through which a user sets them
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
MALLOC_VARIABLES = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")
KEPT_FREE_BYTES = 1 << 30  # free memory at the heap's top kept before any goes back


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep the memory a process frees for its next allocations, unless
    the user has set MALLOC_MMAP_MAX_ or MALLOC_TRIM_THRESHOLD_; -> whether it did (Linux
    with glibc only). By default glibc maps every allocation over 32 MiB anew and unmaps it
    on free, so a CPU forward's fresh `[B, T, d]` output (128 MiB at d = 4,096) and a
    batch's other large buffers fault in new, zeroed pages every batch; on a VM that hands
    free pages back to its host that cost up to 20% of a ceiling capture's CPU. With mmap
    off and the trim threshold at 1 GiB, freed blocks stay in the heap and are reused:
    0.90-0.96x the CPU of ceiling captures (docs/performance.md). The price is that the
    process keeps its peak heap until it exits, which suits the command line (it owns its
    process and runs one capture); a library must not do it to its caller's process."""
    if not sys.platform.startswith("linux") or any(v in os.environ for v in MALLOC_VARIABLES):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except AttributeError:  # a libc without mallopt: nothing to tune
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, KEPT_FREE_BYTES))


# pyarrow's jemalloc reads its settings from this variable at its first allocation
ENCODER_MEMORY_VARIABLE = "JE_ARROW_MALLOC_CONF"
KEEP_ENCODER_MEMORY = "dirty_decay_ms:-1,muzzy_decay_ms:-1"


def keep_encoder_memory() -> None:
    """Make pyarrow's jemalloc, the pool part files encode in, keep the pages it frees for
    the next row group instead of handing them back within about a second, unless the user
    has set JE_ARROW_MALLOC_CONF. An encoder frees its buffers after every row group, so
    by default it faulted in ~440k fresh pages per 150k-token d = 4,096 float16 capture,
    and 10k with this (docs/performance.md). The price is that the encoders' peak memory,
    which the in-flight budget already counts, stays in the process until it exits: the
    command line's choice, as for glibc's heap (`keep_freed_memory`). jemalloc reads the
    variable once, at its first allocation; where pyarrow is already loaded the same goes
    to the arenas jemalloc creates from now on, which the encoder threads will use."""
    if ENCODER_MEMORY_VARIABLE in os.environ:
        return
    os.environ[ENCODER_MEMORY_VARIABLE] = KEEP_ENCODER_MEMORY
    if "pyarrow" in sys.modules:
        import pyarrow as pa

        try:
            pa.jemalloc_set_decay_ms(-1)
        except NotImplementedError:  # a pyarrow built without jemalloc
            pass


def prepare_process() -> None:
    """Tune the process the command line owns, before torch allocates and before anything
    is encoded: huge pages for large CPU tensors, glibc keeping freed memory, and pyarrow's
    jemalloc keeping the encoders' (each unless the user set its variables). The
    benchmarks call it too, to measure what the command line runs."""
    prefer_huge_pages()
    keep_freed_memory()
    keep_encoder_memory()
