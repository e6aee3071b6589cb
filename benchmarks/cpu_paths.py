"""The microbenchmarks behind docs/performance.md's figures for a capture's CPU paths
(issue #16), each printed as CPU-seconds per GB (every thread of the process):

    python benchmarks/cpu_paths.py            # ~2 min
    python benchmarks/cpu_paths.py --tiny     # CI: seconds, figures not meaningful

1. huge pages: `[16, 512, d]` float32 embedding lookups in a child process with
   THP_MEM_ALLOC_ENABLE=0 and =1 (torch reads it at its first CPU allocation, so only a
   fresh process can compare the two), in alternating rounds;
2. the deepest output kept without a copy: captures of pre-tokenized windows of exactly
   the context size (every position kept), with the copy forced and not, alternating in
   one process; the median CPU ratio;
3. a row group spanning batches: pieces copied into a fresh `RowGroupBuffer`, into one whose
   pages are already touched, and `pa.concat_arrays` of the sliced pieces;
4. statistics: torch's row norms and subtract against numpy's `einsum` and `subtract` on
   256-row slices;
5. the compaction of a padded batch's kept rows into a host buffer already touched (the
   pool, once warm) and into a fresh one (the pool's first fill).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

from ceiling import build_model, build_tokenizer, cpu_seconds  # also sets up sys.path


def per_gb(function, repeats: int, nbytes: int) -> float:
    """CPU-s per GB of `nbytes` over `repeats` calls of `function`."""
    start = cpu_seconds()
    for _ in range(repeats):
        function()
    return (cpu_seconds() - start) / (repeats * nbytes / 1e9)


LOOKUP = """
import resource, sys, torch
torch.set_num_threads(1)
d, calls = int(sys.argv[1]), int(sys.argv[2])
embedding, ids = torch.nn.Embedding(2000, d), torch.randint(0, 2000, (16, 512))
cpu = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
with torch.inference_mode():
    embedding(ids)
    start = cpu()
    for _ in range(calls):
        out = embedding(ids)
        del out
print((cpu() - start) / (calls * 16 * 512 * d * 4 / 1e9))
"""


def huge_pages(d: int, calls: int, rounds: int) -> None:
    figures = {"0": [], "1": []}
    for r in range(rounds):
        for setting in ("0", "1") if r % 2 == 0 else ("1", "0"):
            env = {**os.environ, "THP_MEM_ALLOC_ENABLE": setting}
            done = subprocess.run([sys.executable, "-c", LOOKUP, str(d), str(calls)], env=env,
                                  capture_output=True, text=True, check=True, timeout=600)
            figures[setting].append(float(done.stdout))
    for setting, what in (("0", "4 KiB pages"), ("1", "huge pages")):
        print(f"1. lookup [16, 512, {d}] float32, {what}: "
              + ", ".join(f"{x:.2f}" for x in figures[setting])
              + f" CPU-s/GB; median {statistics.median(figures[setting]):.2f}")


def copy_free(d: int, windows: int, rounds: int) -> None:
    import numpy as np

    import crowstream as cs
    from crowstream.pipeline.tracing import ModelTracer

    tokenizer = build_tokenizer()
    model = build_model(d, tokenizer, "cpu")
    rng = np.random.default_rng(0)
    corpus = [{"ids": rng.integers(0, 2000, 512).tolist()} for _ in range(windows)]
    select = ModelTracer._select

    def capture(borrow: bool) -> float:
        ModelTracer._select = select if borrow else (
            lambda self, flat, index, last=False: select(self, flat, index, False))
        work = tempfile.mkdtemp(prefix="cpu-paths-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
        try:
            start = cpu_seconds()
            cs.capture(model, corpus, ["transformer.wte"], os.path.join(work, "out"),
                       tokenizer=tokenizer, tokens_field="ids", context_size=512,
                       batch_size=16, progress=False)
            return cpu_seconds() - start
        finally:
            ModelTracer._select = select
            shutil.rmtree(work)

    capture(True)  # imports and first calls
    cpu = {True: [], False: []}
    for r in range(rounds):
        for borrow in (False, True) if r % 2 == 0 else (True, False):
            cpu[borrow].append(capture(borrow))
    ratio = statistics.median(a / b for a, b in zip(cpu[True], cpu[False]))
    print(f"2. {windows} windows of 512 at d = {d}: CPU-s without the copy "
          + ", ".join(f"{x:.2f}" for x in cpu[True]) + "; with it "
          + ", ".join(f"{x:.2f}" for x in cpu[False]) + f"; median ratio {ratio:.3f}")


def row_group_buffer(d: int, rows: int, repeats: int) -> None:
    import numpy as np
    import pyarrow as pa

    from crowstream.pipeline.flatten import to_record_batch
    from crowstream.pipeline.parts import RowGroupBuffer, encoder_memory_pool

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((rows, d)).astype(np.float32)
    batch = to_record_batch(np.arange(rows, dtype=np.int64), np.arange(rows, dtype=np.int32),
                            np.zeros(rows, np.int32), vectors, "float32")
    cuts = [0, rows // 3, 2 * rows // 3, rows]
    pieces = [batch.slice(a, b - a) for a, b in zip(cuts, cuts[1:])]
    kept = RowGroupBuffer(d, "float32", rows, encoder_memory_pool())

    def fill(buffer):
        for piece in pieces:
            buffer.append(piece)
        buffer.batch()

    def reused():
        kept.rows = 0
        fill(kept)

    cases = {"a fresh RowGroupBuffer": lambda: fill(RowGroupBuffer(d, "float32", rows,
                                                                   encoder_memory_pool())),
             "a reused one": reused,
             "concat_arrays": lambda: pa.concat_arrays([p.column("vector") for p in pieces])}
    figures = {name: [] for name in cases}
    for _ in range(5):
        for name, function in cases.items():
            figures[name].append(per_gb(function, repeats, vectors.nbytes))
    print(f"3. a {rows} x {d} float32 row group from 3 pieces, CPU-s/GB: "
          + ", ".join(f"{name} {statistics.median(f):.3f}" for name, f in figures.items()))


def statistics_ops(d: int, repeats: int) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((256, d)) + 3).astype(np.float32)
    shift, work = x[:64].mean(0), np.empty_like(x)
    rows, centred, shift_t = torch.from_numpy(x), torch.from_numpy(work), torch.from_numpy(shift)

    def with_torch():
        torch.linalg.vector_norm(rows, dim=1)
        torch.sub(rows, shift_t, out=centred)

    def with_numpy():
        np.sqrt(np.einsum("ij,ij->i", x, x))
        np.subtract(x, shift, out=work)

    figures = {"torch": [], "numpy": []}
    for _ in range(5):
        figures["torch"].append(per_gb(with_torch, repeats, x.nbytes))
        figures["numpy"].append(per_gb(with_numpy, repeats, x.nbytes))
    t, n = (statistics.median(figures[k]) for k in ("torch", "numpy"))
    print(f"4. row norms + subtract on 256 x {d} float32: torch {t:.3f}, numpy {n:.3f} "
          f"CPU-s/GB ({1 - t / n:.0%} less with torch)")


def compaction(d: int, repeats: int) -> None:
    """A padded [16 x 512, d] float32 batch's kept rows (a ragged tail per row) selected
    into a host buffer whose pages are already touched, and into a fresh one."""
    import torch

    torch.set_num_threads(1)
    flat = torch.randn(16 * 512, d)
    keep = torch.arange(512) < torch.arange(400, 480, 5)[:, None]  # [16, 512]
    index = keep.reshape(-1).nonzero().squeeze(1)
    warm = torch.empty(len(index), d)

    figures = {"a buffer already touched": [], "a fresh buffer": []}
    for _ in range(5):
        figures["a buffer already touched"].append(per_gb(
            lambda: torch.index_select(flat, 0, index, out=warm), repeats, warm.nbytes))
        figures["a fresh buffer"].append(per_gb(
            lambda: torch.index_select(flat, 0, index, out=torch.empty(len(index), d)),
            repeats, warm.nbytes))
    print(f"5. kept rows of a 16 x 512 x {d} float32 batch selected, CPU-s/GB: "
          + ", ".join(f"into {name} {statistics.median(f):.3f}" for name, f in figures.items()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="CI mode: small and quick")
    parser.add_argument("--tmp", default=None, help="unused; accepted like the other benchmarks")
    args = parser.parse_args(argv)
    tiny = args.tiny
    huge_pages(256 if tiny else 4096, 2 if tiny else 20, 2 if tiny else 4)
    copy_free(64 if tiny else 1024, 8 if tiny else 240, 2 if tiny else 4)
    row_group_buffer(64 if tiny else 1024, 300 if tiny else 3000, 5 if tiny else 50)
    statistics_ops(64 if tiny else 1024, 20 if tiny else 300)
    compaction(64 if tiny else 1024, 3 if tiny else 20)
    return 0


if __name__ == "__main__":
    sys.exit(main())
