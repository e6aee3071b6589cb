"""Commit cost benchmark: a commit writes O(1) bytes and takes O(1) time, however many
shards came before it.

    python benchmarks/commits.py            # 2,000 commits, 2 modules of d=4,096, ~1 min
    python benchmarks/commits.py --tiny     # CI: 60 commits of d=64, seconds

It calls `crowstream.pipeline.commit.commit_shard`, the function the pipeline runs, directly (no model): each shard's part files are tiny
files already in `.tmp/` (the part writers' job, not the commit's), its partial statistics
are real `ModuleStats`. Reported: the mean time per commit over the first and the last 10%
of commits and their ratio, the bytes of each commit record and statistics file (first and
last), and how often `crowstream.json` was written during the commits (never).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from crowstream.format.statistics import ModuleStats
from crowstream.format.files import fsync_and_hash
from crowstream.format.layout import module_dir, part_name, record_path, staging_path
from crowstream.format import manifest as manifest_module
from crowstream.format.manifest import Part, ShardRecord, write_manifest
from crowstream.format.recovery import create_out
from crowstream.pipeline.commit import commit_shard
from crowstream.pipeline.output import Output

TARGET_RATIO = 1.3  # the bound: last 10% no slower than 1.3x the first 10%


def stage_part(out: str, rel: str, payload: bytes) -> Part:
    path = staging_path(out, rel)
    with open(path, "wb") as f:
        f.write(payload)
    kind = "docs" if rel.startswith("docs/") else "module"
    module = None if kind == "docs" else rel.split("/")[1][len("module="):]
    return Part(path=rel, bytes=len(payload), sha256=fsync_and_hash(path), kind=kind,
                   module=module, rows=8)


def format_1_bytes(records, stats, modules) -> int:
    """The size of the manifest crowstream 0.1 wrote after the last commit: every part and
    shard so far, and mean and var of every module (json, indent=1)."""
    import json

    parts = [{**p.to_json(), "shard": r.index} for r in records for p in r.parts]
    shards = [{k: v for k, v in r.to_json().items() if k not in ("parts", "stats", "rank")}
              for r in records]
    summary = {m: {k: v for k, v in stats[m].summary().to_json().items() if k != "nonfinite"}
               for m in modules}
    return len(json.dumps({"parts": parts, "shards": shards, "stats": summary}, indent=1))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commits", type=int, default=2000)
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--tiny", action="store_true", help="60 commits of d=64 (CI)")
    parser.add_argument("--tmp", default=None, help="parent directory for the temp OUT")
    parser.add_argument("--check", action="store_true", help="exit 1 if the target is missed")
    args = parser.parse_args(argv)
    if args.tiny:
        args.commits, args.d = 60, 64
    modules = ["blocks.0", "blocks.1"]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(dir=args.tmp) as out:
        create_out(out, "fresh")
        manifest_writes = []
        manifest_module.write_manifest = lambda *a: manifest_writes.append(a)  # must stay unused
        seconds, record_bytes, stats_bytes, records = [], [], [], []
        try:
            for index in range(args.commits):
                name = part_name(0, index)
                parts = [stage_part(out, f"docs/{name}", b"d" * 512)]
                parts += [stage_part(out, f"{module_dir(m)}/{name}", b"v" * 1024) for m in modules]
                stats = {}
                for m in modules:
                    stats[m] = ModuleStats(args.d)
                    stats[m].update(rng.standard_normal((8, args.d), dtype=np.float32))
                record = ShardRecord(index=index, rank=0, source_start=index * 4,
                                        source_end=index * 4 + 4, docs=4, skipped=0, tokens=32,
                                        parts=tuple(parts))
                started = time.perf_counter()
                record = commit_shard(Output(out), "0123456789abcdef", record, stats)
                seconds.append(time.perf_counter() - started)
                record_bytes.append(os.path.getsize(os.path.join(out, record_path(index))))
                stats_bytes.append(record.stats.bytes)
                records.append(record)
        finally:
            manifest_module.write_manifest = write_manifest
    seconds = seconds[1:]  # the first commit also pays for importing pyarrow.parquet
    tenth = max(len(seconds) // 10, 1)
    first, last = statistics.mean(seconds[:tenth]), statistics.mean(seconds[-tenth:])
    ratio = last / first
    print(f"commits: {args.commits} ({len(modules)} modules, d={args.d}, 3 tiny parts each)")
    print(f"time per commit, first 10%: {first * 1e3:.2f} ms, last 10%: {last * 1e3:.2f} ms, "
          f"ratio last/first: {ratio:.2f} (target <= {TARGET_RATIO})")
    print(f"record bytes: first {record_bytes[0]}, last {record_bytes[-1]}, max {max(record_bytes)}")
    print(f"stats file bytes: first {stats_bytes[0]}, last {stats_bytes[-1]}, max {max(stats_bytes)}")
    print(f"crowstream.json writes during the commits: {len(manifest_writes)}")
    print(f"for comparison, crowstream 0.1 rewrote (and fsynced) its whole manifest at every "
          f"commit: {format_1_bytes(records, stats, modules):,} bytes at the last one")
    ok = ratio <= TARGET_RATIO and not manifest_writes
    print(f"targets: {'met' if ok else 'MISSED'}")
    if args.check and not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
