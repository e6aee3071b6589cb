"""The commit. It owns `commit_shard`, the one commit protocol of a shard, which the
pipeline runs and `benchmarks/commits.py` times. Its steps, in order:

1. **stage**: every part file of the shard (each module's, and the docs part) is closed
   and fsynced in `.tmp/` at its `layout.staging_path` (done by the caller); `.tmp/`
   itself is fsynced here, so the record never lists a file a power cut could lose;
2. **statistics**: the shard's partial statistics go to `commits/shard-<k>.stats.parquet`;
3. **fence**: `Output.check_fence` refuses a writer that no longer owns the run;
4. **record**: `commits/shard-<k>.json` is written atomically. From here on the shard
   counts (locally; on a bucket, from the PUT in step 5);
5. **publish**: the parts are renamed into `data/` and `docs/` (so a glob reader never
   sees an uncommitted part), or, for a bucket, uploaded under attempt names, then the
   statistics, then the record PUT last.

A crash before 4 leaves files that a resume deletes; after 4, a resume rolls the shard
forward. The bytes written do not depend on how many shards came before (O(1) commits).
"""

from __future__ import annotations

import os

from crowstream.format.files import fsync_dir
from crowstream.format.layout import TMP_DIR
from crowstream.format.manifest import ShardRecord
from crowstream.format.records import write_record_json, write_stats_file


def commit_shard(output, run_id: str, record: ShardRecord, stats: dict) -> ShardRecord:
    """Commit shard `record` (its parts staged) with `stats` (module -> `ModuleStats`) to
    `output` (a `pipeline.output.Output`). -> the record as published."""
    fsync_dir(os.path.join(output.path, TMP_DIR))             # 1. stage (the directory)
    record = write_stats_file(output.path, record, stats)   # 2. statistics
    output.check_fence()                                      # 3. fence
    write_record_json(output.path, run_id, record)            # 4. record
    return output.publish(run_id, record)                     # 5. publish
