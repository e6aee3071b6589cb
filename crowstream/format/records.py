"""Commit records. It owns the files that make a shard count: its statistics file and its
record `commits/shard-<k>.json` (the commit point), the renames that put its parts in
place, `commits/end.json`, and the committed state built from them: `committed(out)`
(what `verify`, `info` and resume see) and `readable(out)` (what row readers see).

While a run is in progress `crowstream.json` says `"running"` and lists no shards: the
records are the truth. It is consolidated (every shard, counts, merged statistics) at the
end of a run, on interrupt and on failure. The commit itself, step by step, is
`crowstream.pipeline.commit.commit_shard`.
"""

from __future__ import annotations

import dataclasses
import os
import secrets

from crowstream.errors import ManifestError
from crowstream.schemas import validate_definition, validate_record

from .files import dumps, fsync_and_hash, fsync_dir, read_json, write_atomic
from .layout import (
    COMMITS_DIR,
    DATA_DIR,
    END_PATH,
    FORMAT_VERSION,
    RECORD_NAME,
    RUN_PATH,
    TMP_DIR,
    record_path,
    staging_path,
    stats_path,
)
from .manifest import Counts, FileRef, Manifest, ShardRecord, read_manifest
from .statistics import merged_stats, stats_table


def write_stats_file(out: str, record: ShardRecord, stats: dict) -> ShardRecord:
    """The shard's partial statistics (module -> `ModuleStats`) as
    `commits/shard-<index>.stats.parquet`, fsynced and renamed into place.
    -> `record` with its `stats` file."""
    import pyarrow.parquet as pq

    rel = stats_path(record.index)
    tmp = os.path.join(out, TMP_DIR, f"{os.path.basename(rel)}.{secrets.token_hex(8)}.tmp")
    pq.write_table(stats_table(stats), tmp, compression="zstd", compression_level=1)
    stats_ref = FileRef(rel, os.path.getsize(tmp), fsync_and_hash(tmp))
    os.replace(tmp, os.path.join(out, rel))
    fsync_dir(os.path.join(out, COMMITS_DIR))
    return dataclasses.replace(record, stats=stats_ref)


def write_record_json(out: str, run_id: str, record: ShardRecord) -> None:
    """Write `record` as `commits/shard-<index>.json`, atomically."""
    value = {"format": "crowstream-commit", "format_version": FORMAT_VERSION, "run_id": run_id,
             **record.to_json()}
    write_atomic(out, record_path(record.index), dumps(value).encode())


def move_into_place(out: str, parts) -> list[str]:
    """Rename each part still in `.tmp/` to its final path; fsync the directories.
    -> the paths moved (a part already in place is skipped)."""
    moved = []
    for part in parts:
        final = os.path.join(out, part.path)
        staged = staging_path(out, part.path)
        if os.path.exists(final) and not os.path.exists(staged):
            continue
        os.makedirs(os.path.dirname(final), exist_ok=True)
        os.replace(staged, final)
        moved.append(part.path)
    # data/ too: the first commit creates its module=<name> directories
    directories = {os.path.dirname(os.path.join(out, p)) for p in moved}
    for directory in sorted(directories | ({os.path.join(out, DATA_DIR)} if moved else set())):
        fsync_dir(directory)
    return moved


def read_records(out: str, run_id: str) -> list[ShardRecord]:
    """Every commit record in `commits/`, in index order; a damaged record, one of another
    run, or a gap in the indices is a `ManifestError` (records are written atomically: a
    crash leaves none of these). Gaps are expected, and allowed, once any record was
    written by one of several ranks (each commits only its own shards, at its own pace)."""
    directory = os.path.join(out, COMMITS_DIR)
    names = sorted(n for n in os.listdir(directory) if RECORD_NAME.fullmatch(n)) \
        if os.path.isdir(directory) else []
    records = []
    for name in names:
        path = os.path.join(directory, name)
        value = read_json(path)
        problems = validate_record(value) if isinstance(value, dict) else ["not a JSON object"]
        if problems:
            raise ManifestError(f"{path} does not match the commit record schema: {problems[0]}. "
                                "It was left as it is.")
        if value["run_id"] != run_id:
            raise ManifestError(f"{path} belongs to run {value['run_id']}, not to this OUT's run "
                                f"{run_id}. It was left as it is; capture again into a new OUT.")
        record = ShardRecord.from_json(value)
        if name != os.path.basename(record_path(record.index)):
            raise ManifestError(f"{path} holds the record of shard {record.index}: records were "
                                "renamed. Capture again into a new OUT.")
        records.append(record)
    ranked = any(r.world_size > 1 for r in records)
    for expected, record in enumerate(records):
        if record.index != expected and not ranked:
            raise ManifestError(f"{directory} has no record for shard {expected} (found "
                                f"{os.path.basename(record_path(record.index))}): records were "
                                "deleted or renamed. Capture again into a new OUT.")
    return records


def write_run_json(out: str, manifest: Manifest) -> None:
    """`commits/run.json`: the run's identity (config, shard size, provenance, modules),
    written once at its start, so `crowstream recover` can rebuild a lost crowstream.json
    from `commits/` alone."""
    value = {"format": "crowstream-run", "format_version": FORMAT_VERSION,
             "run_id": manifest.run_id, "config": manifest.config,
             "shard_size": manifest.shard_size, "provenance": manifest.provenance,
             "modules": {name: m.to_json() for name, m in manifest.modules.items()}}
    write_atomic(out, RUN_PATH, dumps(value).encode())


def read_run_json(out: str) -> Manifest:
    """The run `commits/run.json` records, as a running manifest with no shards."""
    from .manifest import ModuleInfo

    path = os.path.join(out, RUN_PATH)
    if not os.path.isfile(path):
        raise ManifestError(f"{path} is missing: this run was started by a crowstream that did "
                            "not record it, so its manifest cannot be rebuilt from commits/. "
                            "Capture again into a new OUT.")
    value = read_json(path)
    problems = validate_definition("run", value) if isinstance(value, dict) else ["not an object"]
    if problems:
        raise ManifestError(f"{path} does not match its schema ($defs/run): {problems[0]}. It "
                            "was left as it is.")
    modules = {n: ModuleInfo.from_json(m) for n, m in value["modules"].items()}
    return Manifest(run_id=value["run_id"], status="running", config=value["config"],
                    shard_size=value["shard_size"], provenance=value["provenance"],
                    modules=modules, counts=Counts.of([], modules))


def record_names(out: str) -> list[str]:
    """The commit records in `commits/` (file names, sorted), whatever their content."""
    directory = os.path.join(out, COMMITS_DIR)
    return sorted(n for n in os.listdir(directory) if RECORD_NAME.fullmatch(n)) \
        if os.path.isdir(directory) else []


def write_end(out: str, run_id: str, shards: int, source_rows: int) -> None:
    """Record where the corpus ends: `shards` shards over `source_rows` rows. Every rank
    that reads that far writes the same content, atomically."""
    value = {"format": "crowstream-end", "format_version": FORMAT_VERSION, "run_id": run_id,
             "shards": shards, "source_rows": source_rows}
    write_atomic(out, END_PATH, dumps(value).encode())


def read_end(out: str, run_id: str) -> int | None:
    """The corpus's shard count from `commits/end.json`, or None while no rank has
    reached the end of the corpus."""
    path = os.path.join(out, END_PATH)
    if not os.path.isfile(path):
        return None
    value = read_json(path)
    if not isinstance(value, dict) or value.get("run_id") != run_id \
            or not isinstance(value.get("shards"), int) or value["shards"] < 0:
        raise ManifestError(f"{path} is damaged or belongs to another run; it was left as it "
                            "is. Delete it: a resume records it again.")
    return value["shards"]


def consolidated(out: str, manifest: Manifest, *, stats: bool = True) -> Manifest:
    """`manifest` with every committed shard, their counts and (unless `stats=False`, which
    keeps `manifest.stats` and reads no statistics file) merged statistics, from the records
    in `commits/`."""
    shards = read_records(out, manifest.run_id)
    merged = manifest.stats
    if stats:
        merged = {n: s.summary() for n, s in merged_stats(out, shards, manifest.modules).items()}
    return dataclasses.replace(manifest, shards=shards, counts=Counts.of(shards, manifest.modules),
                               stats=merged)


def committed(out: str, *, stats: bool = True) -> Manifest:
    """The committed state of OUT, whatever its status: a consolidated `crowstream.json`
    as it is, a running (or crashed) run's consolidated with its commit records (with
    `stats=False` its statistics stay empty, which saves reading every statistics file)."""
    manifest = read_manifest(out)
    if manifest.format_version == 1 or manifest.status != "running":
        return manifest
    return consolidated(out, manifest, stats=stats)


def readable(out: str) -> Manifest:
    """`committed(out)` without any shard whose parts are not all in place yet (a commit in
    progress, or cut short by a crash until a resume rolls it forward): what readers of rows
    use. Its statistics may be empty (see `committed`)."""
    return in_place(out, committed(out, stats=False))


def in_place(out: str, manifest: Manifest) -> Manifest:
    """`manifest` (OUT's committed state) without any shard whose parts are not all in
    place yet: `readable` from a committed state already read."""
    if manifest.status == "complete":
        return manifest
    shards = [s for s in manifest.shards
              if all(os.path.isfile(os.path.join(out, p.path)) for p in s.parts)]
    return dataclasses.replace(manifest, shards=shards)
