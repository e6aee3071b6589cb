"""Analysis benchmark: cs.top over a large module, against reading its vector column.

    python benchmarks/analysis.py            # 2M rows at d=768 (6 GB fp32); minutes on 2 cores
    python benchmarks/analysis.py --tiny     # CI: 40k rows at d=64, seconds

No model: synthetic part files (random vectors, doc_id = row // 512, position = row % 512)
are written with crowstream's own PartWriter (its Parquet settings and row groups) into a
temp OUT with a manifest listing them. Then, each timed as rows/s:

  (1) raw read      pyarrow iter_batches of the vector column only, sequentially, decoded
                    (the floor any scan pays);
  (2) cs.top        a direction, k=20, window=None: pyarrow batches + numpy scoring + the
                    running top-k (what crowstream ships);
  (3) polars        the same query as a polars lazy streaming plan:
                    scan_parquet -> (vector * w).arr.sum() -> top_k -> collect(engine="streaming").

Then many latents (`--latents` L, default 4,096), each timed as rows/s:

  (4) bare x @ W + topk   pyarrow batches -> torch.from_numpy -> x @ W [B, L] -> a running
                          torch.topk per latent (the compute floor: no tie-break, no frame);
  (5) cs.top(W)           the [d, L] matrix, k per latent, window=None;
  (6) cs.top("neurons")   every dimension (L = d), against (1).

Targets: (2) >= 0.5x the rate of (1); (5) >= 0.5x the rate of (4); (6) >= 0.3x (1). (5)
must give the scores of (4), latent by latent. Target: (2) >= 0.5x the rate of (1). Rounds are interleaved and the best of each is shown
(the machine may be shared); the first call's imports and manifest read count in (2). Then peak RSS: cs.top runs in a fresh child process
over an OUT listing the same part files `--rss-factor` times (hard links, no extra disk),
and reports its ru_maxrss (target < 1 GiB). On Linux ru_maxrss survives exec, so a
child started from a big parent reports at least the parent's RSS at fork: it is an upper
bound; VmHWM from /proc/self/status (reset at exec) is the child's own peak. Last, a scaling curve of cs.report: its time over
growing OUTs (two modules, hard-linked parts), which the fixed row budget keeps flat.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from crowstream.format.layout import module_dir, part_name
from crowstream.format.manifest import Counts, Manifest, ModuleInfo, Part, ShardRecord, write_manifest
from crowstream.format.recovery import create_out
from crowstream.pipeline.commit import commit_shard
from crowstream.pipeline.output import Output

MODULE = "synthetic.a"
OTHER = "synthetic.b"
DOC_TOKENS = 512
TARGET_RATIO = 0.5
TARGET_LATENTS = 0.5   # cs.top(W) vs bare x @ W + topk
TARGET_NEURONS = 0.3   # cs.top("neurons") vs the raw read
TARGET_RSS = 1 << 30


def write_parts(directory: str, rows: int, d: int, rows_per_part: int) -> list[str]:
    """Synthetic part files written by crowstream's PartWriter; -> their paths."""
    from crowstream.pipeline.flatten import to_record_batch
    from crowstream.schemas import row_schema
    from crowstream.pipeline.parts import PartWriter

    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(0)
    paths, start, shard = [], 0, 0
    while start < rows:
        n = min(rows_per_part, rows - start)
        path = os.path.join(directory, f"part-00000-{shard:06d}.parquet")
        writer = PartWriter(path, row_schema(d, "float32"))
        for lo in range(start, start + n, 4096):  # batches as the pipeline writes them
            hi = min(lo + 4096, start + n)
            index = np.arange(lo, hi)
            vectors = rng.standard_normal((hi - lo, d), dtype=np.float32)
            writer.write(to_record_batch(index // DOC_TOKENS, (index % DOC_TOKENS).astype(np.int32),
                                         rng.integers(0, 1000, hi - lo).astype(np.int32),
                                         vectors, "float32"))
        writer.close()
        paths.append(path)
        start += n
        shard += 1
    return paths


def make_out(out: str, parts: list[str], d: int, *, copies: int = 1, modules=(MODULE,)) -> str:
    """An OUT whose manifest lists `parts` (hard-linked, `copies` times) for each module.
    The only place that knows the manifest's layout: port it when the manifest changes."""
    import pyarrow as pa

    from crowstream.pipeline.options import CaptureConfig
    from crowstream.schemas import vocab_schema
    from crowstream.pipeline.parts import write_table

    create_out(out, "fresh")
    infos = {m: ModuleInfo(d, "float32", module_dir(m), "Synthetic") for m in modules}
    config = CaptureConfig(model={"class": "synthetic"}, tokenizer={}, source={},
                           modules=tuple(modules), context_size=DOC_TOKENS)
    provenance = {"model": {"class": "synthetic"}, "tokenizer": {}, "versions": {}}
    run_id = "0123456789abcdef"
    records = []
    for copy in range(copies):
        for i, source in enumerate(parts):
            index = copy * len(parts) + i
            shard_parts = []
            for module in modules:
                os.makedirs(os.path.join(out, module_dir(module)), exist_ok=True)
                rel = f"{module_dir(module)}/{part_name(0, index)}"
                os.link(source, os.path.join(out, rel))
                shard_parts.append(Part(path=rel, bytes=os.path.getsize(source),
                                           sha256="0" * 64, kind="module", module=module,
                                           rows=_rows(source)))
            rows = shard_parts[0].rows
            record = ShardRecord(index=index, rank=0, source_start=index, source_end=index + 1,
                                    docs=1, skipped=0, tokens=rows, parts=tuple(shard_parts))
            records.append(commit_shard(Output(out), run_id, record, {}))  # no statistics needed
    manifest = Manifest(run_id=run_id, status="complete", config=config.to_json(),
                           shard_size=1, provenance=provenance, modules=infos, shards=records,
                           counts=Counts.of(records, infos))
    table = pa.table({"token": pa.array(np.arange(1000, dtype=np.int32)),
                      "text": pa.array([f"t{i}" for i in range(1000)]),
                      "special": pa.array(np.zeros(1000, bool))}, schema=vocab_schema())
    write_table(os.path.join(out, "vocab.parquet"), table)
    write_manifest(out, manifest)
    return out


def _rows(path: str) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


def raw_read(parts: list[str]) -> float:
    import pyarrow.parquet as pq

    started = time.perf_counter()
    for path in parts:
        for _ in pq.ParquetFile(path, pre_buffer=False).iter_batches(batch_size=8192, columns=["vector"]):
            pass
    return time.perf_counter() - started


def crowstream_top(out: str, direction: np.ndarray, k: int):
    import crowstream as cs

    started = time.perf_counter()
    found = cs.top(out, MODULE, direction, k=k, window=None)
    return time.perf_counter() - started, found


def polars_top(parts: list[str], direction: np.ndarray, k: int):
    import polars as pl

    d = len(direction)
    w = pl.lit(pl.Series([direction], dtype=pl.Array(pl.Float32, d)))
    started = time.perf_counter()
    found = (pl.scan_parquet(parts)
             .select("doc_id", "position", score=(pl.col("vector") * w).arr.sum())
             .top_k(k, by=["score", "doc_id", "position"], reverse=[False, True, True])
             .collect(engine="streaming"))
    return time.perf_counter() - started, found


def bare_matmul_topk(parts: list[str], weights: np.ndarray, k: int):
    """(4): the floor for many latents: x @ W and a running topk per latent, nothing else."""
    import pyarrow.parquet as pq
    import torch

    from crowstream.reading.catalog import vector_array

    w = torch.from_numpy(weights)
    d = weights.shape[0]
    best = torch.full((k, weights.shape[1]), -float("inf"))
    started = time.perf_counter()
    for path in parts:
        for batch in pq.ParquetFile(path, pre_buffer=False).iter_batches(batch_size=4096,
                                                                          columns=["vector"]):
            x = torch.from_numpy(vector_array(batch.column("vector"), d).copy())
            scores = torch.cat([best, x @ w])  # [k + B, L]
            best = torch.topk(scores, k, dim=0).values
    return time.perf_counter() - started, best.numpy()


def crowstream_many(out: str, score, k: int):
    import crowstream as cs

    started = time.perf_counter()
    found = cs.top(out, MODULE, score, k=k, window=None)
    return time.perf_counter() - started, found


def many_latents(parts: list[str], out: str, rows: int, d: int, latents: int, k: int,
                 repeat: int, raw: float, failures: list) -> None:
    weights = np.random.default_rng(2).standard_normal((d, latents)).astype(np.float32)
    bare = many = neurons = float("inf")
    cpu = {"bare": [], "many": [], "neurons": []}
    for _ in range(repeat):  # interleaved
        for name, run in (("bare", lambda: bare_matmul_topk(parts, weights, k)),
                          ("many", lambda: crowstream_many(out, weights, k)),
                          ("neurons", lambda: crowstream_many(out, "neurons", k))):
            before = time.process_time()
            seconds, result = run()
            cpu[name].append(time.process_time() - before)
            if name == "bare":
                bare, floor = min(bare, seconds), result
            elif name == "many":
                many, found = min(many, seconds), result
            else:
                neurons, by_neuron = min(neurons, seconds), result
    got = found["score"].to_numpy().reshape(latents, k).T  # [k, L], rank-major
    same = bool(np.allclose(got, floor, rtol=1e-4, atol=1e-4))
    print(f"many latents: L = {latents:,}, k = {k}, {rows:,} rows at d={d}")
    print(f"(4) bare x @ W + topk:     {bare:.2f} s, {rows / bare:,.0f} rows/s "
          f"(CPU {np.median(cpu['bare']):.1f} s)")
    print(f"(5) cs.top(W [d, L]):       {many:.2f} s, {rows / many:,.0f} rows/s "
          f"(CPU {np.median(cpu['many']):.1f} s)")
    print(f"(6) cs.top(\"neurons\"):     {neurons:.2f} s, {rows / neurons:,.0f} rows/s "
          f"(CPU {np.median(cpu['neurons']):.1f} s), {by_neuron['latent'].n_unique()} latents")
    print(f"ratio (5)/(4) rate: {bare / many:.2f}x (target >= {TARGET_LATENTS}x); "
          f"(6)/(1): {raw / neurons:.2f}x (target >= {TARGET_NEURONS}x); "
          f"(5) scores equal (4): {same}")
    if bare / many < TARGET_LATENTS:
        failures.append("cs.top(W) rate")
    if raw / neurons < TARGET_NEURONS:
        failures.append("cs.top(neurons) rate")
    if not same:
        failures.append("cs.top(W) scores")


def rss_child(out: str, d: int, k: int, latents: int = 0) -> dict:
    """cs.top over `out` in a fresh interpreter; -> its ru_maxrss and time."""
    code = ("import json, resource, time, numpy as np, crowstream as cs\n"
            "def hwm():  # this process's own peak RSS (reset at exec), bytes\n"
            "    with open('/proc/self/status') as f:\n"
            "        return next(int(l.split()[1]) * 1024 for l in f if l.startswith('VmHWM:'))\n"
            f"w = np.random.default_rng(1).standard_normal(({d}, {latents}) if {latents} else "
            f"{d}).astype(np.float32)\n"
            "import crowstream.reading.analysis, polars, pyarrow.parquet\n"
            "base = hwm()\n"
            "t = time.perf_counter()\n"
            f"found = cs.top({out!r}, {MODULE!r}, w, k={k}, window=None)\n"
            "t = time.perf_counter() - t\n"
            "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
            "print('RESULT ' + json.dumps({'peak': peak, 'hwm': hwm(), 'base': base, "
            "'seconds': t, 'rows': len(found)}))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    line = next(l for l in done.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def report_time(out: str, path: str) -> tuple[float, int]:
    import crowstream as cs

    started = time.perf_counter()
    done = cs.report(out, path)
    return time.perf_counter() - started, done["modules"][MODULE]["sampled_rows"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=None, help="rows (default 2,000,000; 40,000 with --tiny)")
    parser.add_argument("--d", type=int, default=None, help="vector width (default 768; 64 with --tiny)")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--latents", type=int, default=None, help="L for (4)-(6) (default 4,096; 64 with --tiny)")
    parser.add_argument("--latent-rows", type=int, default=None,
                        help="rows for (4)-(6) (default: --rows); a part-file prefix of the data")
    parser.add_argument("--rss-factor", type=int, default=4, help="the RSS run's dataset, in multiples of --rows")
    parser.add_argument("--repeat", type=int, default=2, help="timed rounds; the best of each is shown")
    parser.add_argument("--tiny", action="store_true", help="a CI smoke run in seconds")
    parser.add_argument("--tmp", default=None, help="directory for the synthetic outputs (default: system temp)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    rows = args.rows or (40_000 if args.tiny else 2_000_000)
    d = args.d or (64 if args.tiny else 768)
    rows_per_part = max(1, (256 << 20) // (4 * d))  # ~256 MiB raw per part, as the pipeline aims
    if args.tiny:
        rows_per_part = rows // 4
    tmp = tempfile.mkdtemp(prefix="crowstream-bench-analysis-", dir=args.tmp)
    failures = []
    try:
        started = time.perf_counter()
        parts = write_parts(os.path.join(tmp, "parts"), rows, d, rows_per_part)
        size = sum(os.path.getsize(p) for p in parts)
        print(f"synthetic: {rows:,} rows x d={d} float32 in {len(parts)} part file(s), "
              f"{size / 2**20:,.0f} MiB on disk, written in {time.perf_counter() - started:.1f} s")
        out = make_out(os.path.join(tmp, "out"), parts, d)
        direction = np.random.default_rng(1).standard_normal(d).astype(np.float32)

        raw_read(parts)  # warm the page cache for every contender alike
        raw = top_s = polars_s = float("inf")
        for _ in range(args.repeat):  # interleaved, best of each: the machine may be shared
            raw = min(raw, raw_read(parts))
            seconds, found = crowstream_top(out, direction, args.k)
            top_s = min(top_s, seconds)
            seconds, polars_found = polars_top(parts, direction, args.k)
            polars_s = min(polars_s, seconds)
        same = (found["doc_id"].to_list() == polars_found["doc_id"].to_list()
                and found["position"].to_list() == polars_found["position"].to_list())
        print(f"(1) raw read of the vector column: {raw:.2f} s, {rows / raw:,.0f} rows/s")
        print(f"(2) cs.top (pyarrow + numpy):      {top_s:.2f} s, {rows / top_s:,.0f} rows/s")
        print(f"(3) polars lazy, streaming engine: {polars_s:.2f} s, {rows / polars_s:,.0f} rows/s")
        ratio = raw / top_s
        print(f"ratio (2)/(1) rate: {ratio:.2f}x (target >= {TARGET_RATIO}x); "
              f"(2)/(3): {polars_s / top_s:.2f}x; same top {args.k} from (2) and (3): {same}")
        if ratio < TARGET_RATIO:
            failures.append("cs.top rate")

        latents = args.latents or (64 if args.tiny else 4096)
        some = parts
        if args.latent_rows:  # whole part files, at least one
            some = parts[:max(1, args.latent_rows // rows_per_part)]
        some_rows = sum(_rows(p) for p in some)
        some_out = make_out(os.path.join(tmp, "some"), some, d) if some != parts else out
        many_latents(some, some_out, some_rows, d, latents, args.k, args.repeat,
                     raw * some_rows / rows, failures)

        big = make_out(os.path.join(tmp, "big"), parts, d, copies=args.rss_factor)
        rss = rss_child(big, d, args.k)
        print(f"peak RSS of cs.top over {rows * args.rss_factor:,} rows "
              f"({size * args.rss_factor / 2**30:,.2f} GiB on disk): ru_maxrss "
              f"{rss['peak'] / 2**20:,.0f} MiB, VmHWM {rss['hwm'] / 2**20:,.0f} MiB (after "
              f"imports {rss['base'] / 2**20:,.0f} MiB), {rss['seconds']:.1f} s "
              f"(target < {TARGET_RSS >> 20} MiB)")
        if rss["peak"] >= TARGET_RSS:
            failures.append("peak RSS")
        rss = rss_child(big, d, args.k, latents)
        print(f"peak RSS of cs.top(W [d, {latents:,}]) over {rows * args.rss_factor:,} rows: "
              f"ru_maxrss {rss['peak'] / 2**20:,.0f} MiB, VmHWM {rss['hwm'] / 2**20:,.0f} MiB "
              f"(after imports {rss['base'] / 2**20:,.0f} MiB), {rss['seconds']:.1f} s")
        shutil.rmtree(big)

        print("cs.report scaling (two modules, fixed row budget per module):")
        for copies in (1, 2, 4, 8) if not args.tiny else (1, 2, 4):
            grown = make_out(os.path.join(tmp, f"report-{copies}"), parts, d, copies=copies,
                             modules=(MODULE, OTHER))
            seconds, sampled = report_time(grown, os.path.join(tmp, "report.html"))
            print(f"  report: {rows * copies:>12,} rows per module: {seconds:6.1f} s "
                  f"({sampled:,} rows read per module)")
            shutil.rmtree(grown)
        print(f"targets: {'all met' if not failures else 'missed ' + ', '.join(failures)}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failures and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
