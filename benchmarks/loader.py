"""Loader throughput: how fast training batches come out of a crowstream dataset.

Writes a synthetic dataset (random float32 vectors, crowstream's own part-file writer and
Parquet settings, no model) into a temp dir, then in one run times:
  (a) cs.stream with shuffle_buffer=1_000_000 (fixed shuffle pool, shuffled row groups)
  (b) cs.stream without shuffling
  (c) datasets.load_dataset(...).with_format("torch") through
      DataLoader(ds, batch_size=4096, shuffle=True) (default collation), capped at
      --hf-batches batches; its one-off Arrow cache build is timed separately
  (d) the raw limit: pyarrow.parquet reading the vector column of every part file
      sequentially into numpy
and prints rows/s and GB/s (of float32 vector payload) for each, and the ratio (a)/(d)
(target >= 0.7).

    python benchmarks/loader.py                 # 2M rows x 768 (6 GiB raw; ~2.4 GiB on disk)
    python benchmarks/loader.py --tiny          # CI smoke run, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import uuid

import numpy as np
from crowstream.format.card import write_card
from crowstream.format.layout import module_dir, part_name
from crowstream.format.manifest import (Counts, Manifest, ModuleInfo, Part, ShardRecord,
                                        manifest_digest, write_manifest)
from crowstream.format.statistics import merged_stats
from crowstream.pipeline.commit import commit_shard
from crowstream.pipeline.output import Output


def write_synthetic(out: str, *, rows: int, d, files: int, modules=("synthetic",),
                    doc_tokens: int = 64, dtype: str = "float32", seed: int = 0,
                    part_rows=None, position0: bool = True) -> None:
    """A crowstream output without a model: `files` shards of `rows` rows in all, per module,
    written by crowstream's PartWriter (its row groups and Parquet settings). Documents have
    `doc_tokens` rows each (positions 0..doc_tokens-1), rows are grouped by document as a
    capture writes them, and every module has the same (doc_id, position) rows. `d` is one
    width, or {module: width}. `part_rows` (one count or {module: count}) rolls a module's
    part files over every that many rows, as a capture does by size (so modules of
    different widths have different part files). `position0` also records the statistics
    of the position-0 rows apart (the manifest's `position0`)."""
    from crowstream.format.layout import DATA_DIR, DOCS_DIR, TMP_DIR
    from crowstream.pipeline.flatten import to_record_batch
    from crowstream.schemas import row_schema
    from crowstream.format.statistics import ModuleStats
    from crowstream.pipeline.parts import PartWriter

    rng = np.random.default_rng(seed)
    for sub in (TMP_DIR, DATA_DIR, DOCS_DIR):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    widths = d if isinstance(d, dict) else {m: d for m in modules}
    parts, stats = {}, {}  # shard -> [manifest.Part], shard -> {module: ModuleStats}
    p0 = {m: ModuleStats(widths[m]) for m in modules}  # position-0 rows, all shards
    bounds = np.linspace(0, rows, files + 1).astype(np.int64)
    for shard in range(files):
        index = np.arange(bounds[shard], bounds[shard + 1])
        doc_ids, positions = index // doc_tokens, (index % doc_tokens).astype(np.int32)
        tokens = (index * 7919 % 50_000).astype(np.int32)
        parts[shard] = []
        stats[shard] = {m: ModuleStats(widths[m]) for m in modules}
        for module in modules:
            d = widths[module]
            per = part_rows.get(module) if isinstance(part_rows, dict) else part_rows
            edges = list(range(0, len(index), per or len(index))) + [len(index)]
            for seq, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
                rel = f"{module_dir(module)}/{part_name(0, shard, seq)}"
                writer = PartWriter(os.path.join(out, TMP_DIR, f"part-{shard}"),
                                    row_schema(d, dtype))
                for start in range(lo, hi, 8192):
                    block = slice(start, min(start + 8192, hi))
                    # a per-row offset that grows with the doc, so rows are not all alike
                    vectors = rng.standard_normal((len(index[block]), d), dtype=np.float32)
                    vectors += (doc_ids[block] % 17)[:, None].astype(np.float32) * 0.1
                    vectors = vectors.astype(dtype)
                    writer.write(to_record_batch(doc_ids[block], positions[block],
                                                 tokens[block], vectors, dtype))
                    stats[shard][module].update(vectors)
                    first = positions[block] == 0
                    if position0:
                        p0[module].update(vectors[first])
                info = writer.close()
                os.makedirs(os.path.join(out, module_dir(module)), exist_ok=True)
                os.replace(info.tmp_path, os.path.join(out, rel))
                parts[shard].append(Part(path=rel, bytes=info.bytes, sha256=info.sha256,
                                         kind="module", module=module, rows=info.rows))
        docs = len(np.unique(doc_ids))
        parts[shard] = (parts[shard], docs, len(index))
    _write_manifest(out, modules, widths, dtype, parts, stats, p0 if position0 else None)


def _write_manifest(out, modules, widths, dtype, parts, stats, p0=None) -> None:
    """Commit records and the consolidated manifest of a synthetic output (the one place
    this script knows the layout): each shard committed as a capture commits it."""
    import dataclasses


    os.makedirs(os.path.join(out, "commits"), exist_ok=True)
    fingerprint = {"name_or_path": "synthetic", "class": "none"}
    config = {"model": fingerprint, "tokenizer": fingerprint, "source": {"kind": "synthetic"},
              "modules": list(modules), "context_size": 64, "overflow": "truncate",
              "dtype": dtype, "batch_size": 1, "seed": 0, "exclude_special_tokens": False,
              "exclude_token_ids": [], "store_text": False}
    infos = {m: ModuleInfo(widths[m], dtype, module_dir(m), "Synthetic") for m in modules}
    run_id = uuid.uuid4().hex[:16]
    records, start = [], 0
    for shard, (shard_parts, docs, n) in sorted(parts.items()):
        record = ShardRecord(index=shard, rank=0, source_start=start, source_end=start + docs,
                                docs=docs, skipped=0, tokens=n, parts=tuple(shard_parts))
        records.append(commit_shard(Output(out), run_id, record, stats[shard]))
        start += docs
    merged = merged_stats(out, records, infos)
    manifest = Manifest(run_id=run_id, status="complete", config=config, shard_size=1,
                           provenance={"model": fingerprint, "tokenizer": fingerprint,
                                       "versions": {}},
                           modules=infos, shards=records, counts=Counts.of(records, infos),
                           stats={m: s.summary() for m, s in merged.items()})
    write_card(out, manifest)
    write_manifest(out, dataclasses.replace(manifest))
    if p0 is not None:  # the reserved position0 statistics, beside each module's totals
        path = os.path.join(out, "crowstream.json")
        with open(path) as f:
            value = json.load(f)
        for m, summary in p0.items():
            value["stats"][m]["position0"] = summary.summary().to_json()
        value["digest"] = manifest_digest(value)
        with open(path, "w") as f:
            json.dump(value, f, indent=1)


def _timed(label, batches, row_bytes, limit=None):
    """Drain `batches` (dicts of tensors or arrays); -> (rows, seconds). Prints a line."""
    rows, started, first = 0, time.perf_counter(), None
    cpu = time.process_time()
    for i, batch in enumerate(batches):
        x = batch["vector"] if isinstance(batch, dict) else batch
        rows += len(x)
        first = first or time.perf_counter() - started
        if limit is not None and i + 1 >= limit:
            break
    seconds = time.perf_counter() - started
    cpu = time.process_time() - cpu
    print(f"{label:<58} {rows:>10,} rows {seconds:7.2f} s  {rows / seconds:>11,.0f} rows/s "
          f"{rows * row_bytes / seconds / 1e9:6.2f} GB/s  cpu {cpu:6.1f} s  (first batch "
          f"{first or 0:.2f} s, load {os.getloadavg()[0]:.1f})", flush=True)
    return rows, seconds


def raw_pyarrow(files: list[str], d: int):
    """(d): every part file's vector column, row group by row group, into numpy."""
    import pyarrow.parquet as pq

    for path in files:
        parquet = pq.ParquetFile(path)
        for group in range(parquet.num_row_groups):
            column = parquet.read_row_group(group, columns=["vector"]).column("vector")
            for chunk in column.chunks:
                yield chunk.flatten().to_numpy().reshape(-1, d)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--shuffle-buffer", type=int, default=1_000_000)
    parser.add_argument("--read-threads", type=int, default=4)
    parser.add_argument("--hf-batches", type=int, default=50,
                        help="cap on (c)'s batches: a shuffled Arrow dataset reads slowly")
    parser.add_argument("--tmp", help="directory for the temp dataset (default: system temp)")
    parser.add_argument("--tiny", action="store_true", help="CI smoke run (numbers meaningless)")
    parser.add_argument("--check", action="store_true", help="exit 1 if (a) < 0.7 x (d)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.rows, args.d, args.files, args.batch_size = 20_000, 32, 4, 512
        args.shuffle_buffer, args.hf_batches = 5_000, 5

    import datasets
    import torch
    from torch.utils.data import DataLoader

    import crowstream as cs
    from crowstream.reading.catalog import Catalog

    torch.manual_seed(0)
    datasets.disable_progress_bars()
    tmp = tempfile.mkdtemp(prefix="crowstream-loader-bench-", dir=args.tmp)
    try:
        out = os.path.join(tmp, "out")
        started = time.perf_counter()
        write_synthetic(out, rows=args.rows, d=args.d, files=args.files)
        files = list(Catalog(out).module("synthetic").paths)
        disk = sum(os.path.getsize(f) for f in files)
        print(f"dataset: {args.rows:,} rows x d={args.d} float32 in {args.files} part files, "
              f"{args.rows * args.d * 4 / 2**30:.2f} GiB raw, {disk / 2**30:.2f} GiB on disk; "
              f"written in {time.perf_counter() - started:.1f} s")
        print(f"batch size {args.batch_size}; load average {os.getloadavg()[0]:.2f} on "
              f"{os.cpu_count()} CPUs")
        row_bytes = args.d * 4
        module = "synthetic"
        results = {}
        next(raw_pyarrow(files[:1], args.d))  # warm-up: imports, first decode
        results["d"] = _timed("(d) raw pyarrow, vector column -> numpy, sequential",
                              raw_pyarrow(files, args.d), row_bytes)
        results["a"] = _timed(f"(a) cs.stream shuffle_buffer={args.shuffle_buffer:,}",
                              cs.stream(out, module, batch_size=args.batch_size,
                                        shuffle_buffer=args.shuffle_buffer,
                                        read_threads=args.read_threads), row_bytes)
        results["b"] = _timed("(b) cs.stream, no shuffling",
                              cs.stream(out, module, batch_size=args.batch_size,
                                        read_threads=args.read_threads), row_bytes)
        cache = os.path.join(tmp, "hf-cache")
        started = time.perf_counter()
        ds = cs.load(out, module, cache_dir=cache).with_format("torch")
        print(f"(c) load_dataset Arrow cache build (once): {time.perf_counter() - started:.1f} s")
        loader = DataLoader(ds, batch_size=args.batch_size, shuffle=True)
        results["c"] = _timed(f"(c) load_dataset + DataLoader(shuffle=True), first "
                              f"{args.hf_batches} batches", loader, row_bytes,
                              limit=args.hf_batches)
        rate = {k: rows / seconds for k, (rows, seconds) in results.items()}
        ratio = rate["a"] / rate["d"]
        print(f"ratio (a)/(d): {ratio:.2f} (target >= 0.7); (b)/(d): {rate['b'] / rate['d']:.2f}; "
              f"(a)/(c): {rate['a'] / rate['c']:.1f}x")
        return 1 if args.check and ratio < 0.7 else 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
