"""The manifest and the output directory's layout. It owns:

- the typed manifest (`Manifest`, `ShardRecord`, `Part`, `FileRef`, `ModuleInfo`, `Counts`,
  `StatsSummary`) and its JSON form, `crowstream.json` (format 2; format 1 reads too);
- the commit protocol (`commit`): one small record per shard in `commits/`, so a commit
  writes O(1) bytes however long the run (see `commit` for the order);
- the committed state (`committed`): `crowstream.json` consolidated with the records,
  which is what readers, `verify` and resume see;
- recovery before a resume (`recover`): roll committed shards forward, delete the rest;
- the dataset card `README.md`, preparing OUT for a fresh run, and the advisory lock.

While a run is in progress `crowstream.json` says `"running"` and lists no shards: the
records are the truth. It is consolidated (every shard, counts, merged statistics) at the
end of a run, on interrupt and on failure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import re
import shutil

from crowstream.schemas import validate_manifest, validate_record

from .config import (COMMITS_DIR, DATA_DIR, DOCS_DIR, FORMAT_VERSION, INPUT_DIR_SUFFIX,
                     MANIFEST_NAME, TMP_DIR, TOKENIZER_DIR, VOCAB_NAME, base_module)
from .errors import ManifestError, OutputError, OutputExistsError

RECORD_NAME = re.compile(r"shard-(\d{8})\.json")


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# -- the typed manifest ---------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FileRef:
    """A file in OUT (path relative to OUT) with its size and checksum."""

    path: str
    bytes: int
    sha256: str

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, value: dict) -> FileRef:
        return cls(value["path"], value["bytes"], value["sha256"])


@dataclasses.dataclass(frozen=True)
class Part(FileRef):
    """A committed part file: `kind` "module" (with `module`) or "docs"; `rows` rows."""

    kind: str = "module"
    module: str | None = None
    rows: int = 0

    def to_json(self) -> dict:
        value = {"path": self.path, "kind": self.kind, "module": self.module, "rows": self.rows,
                 "bytes": self.bytes, "sha256": self.sha256}
        if self.module is None:
            del value["module"]
        return value

    @classmethod
    def from_json(cls, value: dict) -> Part:
        return cls(value["path"], value["bytes"], value["sha256"], value["kind"],
                   value.get("module"), value["rows"])


@dataclasses.dataclass(frozen=True)
class ShardRecord:
    """One committed shard: the deterministic range of source rows it covers, what it fed
    the model, its part files and its partial statistics file (`None` in format 1).

    `rank` is the process that wrote it, out of `world_size` ranks (shard k goes to rank
    k mod world_size). This is also the content of `commits/shard-<index:08d>.json`.
    """

    index: int
    rank: int
    source_start: int
    source_end: int
    docs: int
    skipped: int
    tokens: int
    parts: tuple[Part, ...]
    stats: FileRef | None = None
    world_size: int = 1

    def to_json(self) -> dict:
        value = {"index": self.index, "rank": self.rank, "source_start": self.source_start,
                 "source_end": self.source_end, "docs": self.docs, "skipped": self.skipped,
                 "tokens": self.tokens, "parts": [p.to_json() for p in self.parts]}
        if self.stats is not None:
            value["stats"] = self.stats.to_json()
        if self.world_size != 1:  # single-process records stay byte-identical to before
            value["world_size"] = self.world_size
        return value

    @classmethod
    def from_json(cls, value: dict) -> ShardRecord:
        stats = value.get("stats")
        return cls(value["index"], value.get("rank", 0), value["source_start"],
                   value["source_end"], value["docs"], value["skipped"], value["tokens"],
                   tuple(Part.from_json(p) for p in value["parts"]),
                   FileRef.from_json(stats) if stats else None, value.get("world_size", 1))


@dataclasses.dataclass(frozen=True)
class ModuleInfo:
    """A captured module: width `d`, stored `dtype`, its partition directory `path`."""

    d: int
    dtype: str
    path: str
    type: str | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, value: dict) -> ModuleInfo:
        return cls(value["d"], value["dtype"], value["path"], value.get("type"))


@dataclasses.dataclass
class Counts:
    """Totals over the committed shards; `rows` maps module -> rows stored."""

    docs: int = 0
    skipped_docs: int = 0
    tokens_fed: int = 0
    rows: dict[str, int] = dataclasses.field(default_factory=dict)

    @classmethod
    def of(cls, shards, modules) -> Counts:
        rows = {name: 0 for name in modules}
        for shard in shards:
            for part in shard.parts:
                if part.kind == "module":
                    rows[part.module] = rows.get(part.module, 0) + part.rows
        return cls(sum(s.docs for s in shards), sum(s.skipped for s in shards),
                   sum(s.tokens for s in shards), rows)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, value: dict) -> Counts:
        return cls(value["docs"], value["skipped_docs"], value["tokens_fed"], dict(value["rows"]))


@dataclasses.dataclass(frozen=True)
class StatsSummary:
    """Per-module statistics as the manifest states them: `mean`, `var` (population) per
    dimension and `mean_norm`, over `count` rows. Entries that are not finite (because
    `nonfinite` stored values were NaN or infinite) are `None` in JSON. `clamped` counts
    values clamped into float16's range before they were stored."""

    count: int
    mean: tuple
    var: tuple
    mean_norm: float | None
    nonfinite: int = 0
    clamped: int = 0

    def to_json(self) -> dict:
        return {"count": self.count, "mean": [_finite(x) for x in self.mean],
                "var": [_finite(x) for x in self.var], "mean_norm": _finite(self.mean_norm),
                "nonfinite": self.nonfinite, "clamped": self.clamped}

    @classmethod
    def from_json(cls, value: dict) -> StatsSummary:
        nan = float("nan")
        return cls(value["count"], tuple(nan if x is None else x for x in value["mean"]),
                   tuple(nan if x is None else x for x in value["var"]),
                   value["mean_norm"], value.get("nonfinite", 0), value.get("clamped", 0))


def _finite(x):
    """JSON has no NaN or Infinity: such a value becomes null (and is counted elsewhere)."""
    import math

    return x if x is not None and math.isfinite(x) else None


@dataclasses.dataclass
class Manifest:
    """Everything crowstream knows about one OUT (`crowstream.json`, typed).

    `shards` are the committed shards in index order; `parts` lists their files. Get the
    committed state of any OUT (running, interrupted, crashed or complete) with
    `committed(out)`; `read_manifest(out)` gives the file alone.
    """

    run_id: str
    status: str
    config: dict
    shard_size: int
    provenance: dict
    modules: dict[str, ModuleInfo]
    shards: list[ShardRecord] = dataclasses.field(default_factory=list)
    counts: Counts = dataclasses.field(default_factory=Counts)
    stats: dict[str, StatsSummary] = dataclasses.field(default_factory=dict)
    error: str | None = None
    created: str = dataclasses.field(default_factory=now)
    updated: str = dataclasses.field(default_factory=now)
    format_version: int = FORMAT_VERSION

    @property
    def parts(self) -> list[Part]:
        return [part for shard in self.shards for part in shard.parts]

    def module_parts(self, module: str) -> list[Part]:
        return [p for p in self.parts if p.kind == "module" and p.module == module]

    @property
    def source_done(self) -> int:
        """Source rows covered by the committed shards."""
        return sum(s.source_end - s.source_start for s in self.shards)

    def to_json(self) -> dict:
        return {
            "format": "crowstream", "format_version": FORMAT_VERSION, "run_id": self.run_id,
            "status": self.status, "error": self.error, "created": self.created,
            "updated": self.updated, "config": self.config, "shard_size": self.shard_size,
            "provenance": self.provenance,
            "modules": {name: m.to_json() for name, m in self.modules.items()},
            "shards": [s.to_json() for s in self.shards], "counts": self.counts.to_json(),
            "stats": {name: s.to_json() for name, s in self.stats.items()},
        }

    @classmethod
    def from_json(cls, value: dict) -> Manifest:
        """Format 2 as written, or format 1 (one file with flat `parts`) converted."""
        shards = value["shards"]
        if value["format_version"] == 1:
            by_shard: dict = {}
            for part in value["parts"]:
                by_shard.setdefault(part["shard"], []).append(part)
            shards = [{**s, "rank": 0, "parts": by_shard.get(s["index"], [])} for s in shards]
        return cls(
            run_id=value["run_id"], status=value["status"], config=value["config"],
            shard_size=value["shard_size"], provenance=value["provenance"],
            modules={n: ModuleInfo.from_json(m) for n, m in value["modules"].items()},
            shards=[ShardRecord.from_json(s) for s in shards],
            counts=Counts.from_json(value["counts"]),
            stats={n: StatsSummary.from_json(s) for n, s in value["stats"].items()},
            error=value.get("error"), created=value["created"], updated=value["updated"],
            format_version=value["format_version"])


# -- files --------------------------------------------------------------------------------------

def manifest_path(out: str) -> str:
    return os.path.join(out, MANIFEST_NAME)


def record_path(index: int) -> str:
    """The commit record of shard `index`, relative to OUT."""
    return f"{COMMITS_DIR}/shard-{index:08d}.json"


END_PATH = f"{COMMITS_DIR}/end.json"  # where the corpus ends, once a rank has read that far


def stats_path(index: int) -> str:
    """The partial statistics of shard `index`, relative to OUT."""
    return f"{COMMITS_DIR}/shard-{index:08d}.stats.parquet"


def part_name(rank: int, shard: int, seq: int = 0) -> str:
    """File name of part `seq` of one shard (a module may roll over several per shard)."""
    return f"part-{rank:05d}-{shard:06d}-{seq:03d}.parquet"


def module_dir(module: str) -> str:
    """`data/module=<module>`; a module's input `<module>:input` -> `data/module=<module>@input`."""
    if base_module(module) != module:
        module = base_module(module) + INPUT_DIR_SUFFIX
    return f"{DATA_DIR}/module={module}"


def staging_path(out: str, rel: str) -> str:
    """Where the part file that will be committed as `rel` is written: in `.tmp/`, under a
    flat name derived from `rel` (so a resume can roll a committed shard forward)."""
    return os.path.join(out, TMP_DIR, rel.replace("/", "__"))


def read_manifest(out: str) -> Manifest:
    """Parse and validate OUT/crowstream.json alone; a damaged manifest is explained, never
    fixed. While a run is in progress it lists no shards: use `committed(out)`."""
    path = manifest_path(out)
    if not os.path.isfile(path):
        raise ManifestError(f"{out!r} has no {MANIFEST_NAME}: it is not a crowstream output "
                            "(or the run never started).")
    value = read_json(path)
    version = value.get("format_version") if isinstance(value, dict) else None
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise ManifestError(f"{path} is format version {version}, written by a newer crowstream "
                            f"(this one reads up to {FORMAT_VERSION}); upgrade crowstream "
                            "(pip install -U crowstream). It was left as it is.")
    problems = validate_manifest(value) if isinstance(value, dict) else ["not a JSON object"]
    if problems:
        raise ManifestError(f"{path} does not match the manifest schema: {problems[0]}"
                            + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
                            + ". It was left as it is.")
    if "digest" in value and value["digest"] != manifest_digest(value):
        raise ManifestError(f"{path} changed after crowstream wrote it (its digest does not match): "
                            "it is damaged, or was edited by hand. Restore it from a backup; if you "
                            'edited it on purpose, delete its "digest" field. It was left as it is.')
    return Manifest.from_json(value)


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's JSON without its `digest` field, keys sorted: it tells the
    manifest crowstream wrote from a damaged or hand-edited one (zstd and JSON both
    accept most flipped bytes silently)."""
    body = {key: value for key, value in manifest.items() if key != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ManifestError(f"{path} is damaged ({error}); it was left as it is. Restore it from "
                            "a backup or capture again into a new OUT.") from error


def write_manifest(out: str, manifest: Manifest) -> None:
    """Replace crowstream.json atomically. Called at start, on resume and to consolidate at
    the end, on interrupt and on failure: never per shard."""
    manifest.updated = now()
    value = manifest.to_json()
    value["digest"] = manifest_digest(value)
    write_manifest_json(out, value)


def write_manifest_json(out: str, value: dict) -> None:
    """Replace crowstream.json with `value` as it is (`rewrite` uses it on format 1)."""
    _write_atomic(out, MANIFEST_NAME, _dumps(value).encode())


def _dumps(value) -> str:
    return json.dumps(value, allow_nan=False, separators=(",", ":"))


def _write_atomic(out: str, rel: str, data: bytes) -> None:
    """tmp in .tmp/, fsync, os.replace to `rel`, fsync its directory. The temp name holds
    the pid: ranks may write the same file (`end.json`) at once."""
    tmp = os.path.join(out, TMP_DIR, f"{os.path.basename(rel)}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    final = os.path.join(out, rel)
    os.replace(tmp, final)
    fsync_dir(os.path.dirname(final))


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- the commit -------------------------------------------------------------------------------

def commit(out: str, run_id: str, record: ShardRecord, stats: dict) -> ShardRecord:
    """Commit one shard whose part files are closed and fsynced at their `staging_path`s.

    The order (each step's files are fsynced and renamed atomically):
    1. the shard's partial statistics (`stats`, module -> `writer.ModuleStats`) go to
       `commits/shard-<index>.stats.parquet`;
    2. the record `commits/shard-<index>.json` is written: from here on the shard counts;
    3. the parts are renamed from `.tmp/` into `data/` and `docs/`.
    A crash before 2 leaves files that a resume deletes; after 2, a resume rolls the shard
    forward. Readers that glob `data/` therefore never see an uncommitted part. The bytes
    written do not depend on how many shards came before. -> the record, with its stats file.
    """
    record = write_record(out, run_id, record, stats)
    move_into_place(out, record.parts)
    return record


def write_record(out: str, run_id: str, record: ShardRecord, stats: dict) -> ShardRecord:
    """Steps 1 and 2 of `commit`: the statistics file, then the record. -> the record."""
    import pyarrow.parquet as pq

    from .writer import fsync_and_hash

    rel = stats_path(record.index)
    tmp = os.path.join(out, TMP_DIR, os.path.basename(rel))
    pq.write_table(stats_table(stats), tmp, compression="zstd", compression_level=1)
    stats_ref = FileRef(rel, os.path.getsize(tmp), fsync_and_hash(tmp))
    os.replace(tmp, os.path.join(out, rel))
    fsync_dir(os.path.join(out, COMMITS_DIR))
    record = dataclasses.replace(record, stats=stats_ref)
    write_record_json(out, run_id, record)
    return record


def write_record_json(out: str, run_id: str, record: ShardRecord) -> None:
    """Write `record` as `commits/shard-<index>.json`, atomically."""
    value = {"format": "crowstream-commit", "format_version": FORMAT_VERSION, "run_id": run_id,
             **record.to_json()}
    _write_atomic(out, record_path(record.index), _dumps(value).encode())


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


def stats_table(stats: dict):
    """Partial statistics as a small table: one row per module (count, mean[d], m2[d],
    norm_sum in float64; nonfinite, clamped)."""
    import pyarrow as pa

    names = list(stats)
    return pa.table({
        "module": pa.array(names, pa.string()),
        "count": pa.array([stats[n].count for n in names], pa.int64()),
        "mean": pa.array([stats[n].mean for n in names], pa.list_(pa.float64())),
        "m2": pa.array([stats[n].m2 for n in names], pa.list_(pa.float64())),
        "norm_sum": pa.array([stats[n].norm_sum for n in names], pa.float64()),
        "nonfinite": pa.array([stats[n].nonfinite for n in names], pa.int64()),
        "clamped": pa.array([stats[n].clamped for n in names], pa.int64()),
    })


def read_stats(out: str, ref: FileRef) -> dict:
    """A shard's partial statistics: module -> `writer.ModuleStats`."""
    import numpy as np
    import pyarrow.parquet as pq

    from .writer import ModuleStats

    table = pq.read_table(os.path.join(out, ref.path)).to_pydict()
    found = {}
    for i, name in enumerate(table["module"]):
        found[name] = ModuleStats.of(table["count"][i], np.asarray(table["mean"][i], np.float64),
                                     np.asarray(table["m2"][i], np.float64),
                                     table["norm_sum"][i], table["nonfinite"][i],
                                     table["clamped"][i])
    return found


def merged_stats(out: str, shards, modules) -> dict:
    """module -> `writer.ModuleStats` over `shards`, merged in index order (Chan et al.)."""
    return merge_partials((read_stats(out, shard.stats) for shard in shards), modules)


def merge_partials(partials, modules) -> dict:
    """Shards' partial statistics (each module -> `writer.ModuleStats`), merged in order."""
    from .writer import ModuleStats

    total = {name: ModuleStats(info.d) for name, info in modules.items()}
    for partial in partials:
        for name, stats in partial.items():
            total[name].merge(stats)
    return total


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


def write_end(out: str, run_id: str, shards: int, source_rows: int) -> None:
    """Record where the corpus ends: `shards` shards over `source_rows` rows. Every rank
    that reads that far writes the same content, atomically."""
    value = {"format": "crowstream-end", "format_version": FORMAT_VERSION, "run_id": run_id,
             "shards": shards, "source_rows": source_rows}
    _write_atomic(out, END_PATH, _dumps(value).encode())


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
    manifest = committed(out, stats=False)
    if manifest.status == "complete":
        return manifest
    shards = [s for s in manifest.shards
              if all(os.path.isfile(os.path.join(out, p.path)) for p in s.parts)]
    return dataclasses.replace(manifest, shards=shards)


# -- recovery before a resume -------------------------------------------------------------------

def recover(out: str, manifest: Manifest, owned=None) -> tuple[Manifest, list[str], list[str]]:
    """Prepare OUT for a resume: roll forward every committed shard whose parts are still in
    `.tmp/`, then delete every file no record lists (in `.tmp/`, `data/`, `docs/` and
    `commits/`). -> (the committed manifest, paths rolled forward, paths removed).
    With `owned` (shard index -> bool; one rank of several), only unlisted files of the
    shards it owns are deleted: the other ranks' files in flight are theirs.

    Raises `ManifestError` when a listed part is missing or not of its recorded size
    (before anything is deleted)."""
    state = consolidated(out, manifest, stats=False)  # the run merges them as it starts
    mine = state if owned is None else dataclasses.replace(
        state, shards=[s for s in state.shards if owned(s.index)])  # others may be committing
    rolled = move_into_place(out, [p for p in mine.parts
                                   if os.path.exists(staging_path(out, p.path))])
    damaged = damaged_parts(out, mine)
    if damaged:
        raise ManifestError(
            f"cannot resume {out!r}: {len(damaged)} committed file(s) are missing or "
            f"changed in size ({', '.join(damaged[:3])}{', ...' if len(damaged) > 3 else ''}). "
            "`crowstream verify OUT` shows the damage; capture again with overwrite=True "
            "(--overwrite) or into a new OUT.")
    listed = listed_paths(state)
    removed = [rel for rel in _files(out, TMP_DIR, DATA_DIR, DOCS_DIR, COMMITS_DIR)
               if rel not in listed and (owned is None or _owned_file(rel, owned))]
    for rel in removed:
        os.remove(os.path.join(out, rel))
    for sub in (TMP_DIR, DATA_DIR, DOCS_DIR, COMMITS_DIR):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    return state, rolled, removed


_SHARD_OF_FILE = re.compile(r"part-\d{5}-(\d{6})-\d{3}\.parquet|shard-(\d{8})\.(?:json|stats\.parquet)")


def _owned_file(rel: str, owned) -> bool:
    """Whether `rel` is a file of a shard that `owned` (index -> bool) accepts."""
    found = _SHARD_OF_FILE.search(rel.rsplit("/", 1)[-1].rsplit("__", 1)[-1])
    return found is not None and owned(int(found.group(1) or found.group(2)))


def _files(out: str, *tops: str) -> list[str]:
    """Every file under the given top-level directories, relative to OUT, sorted."""
    found = []
    for top in tops:
        for root, _, files in os.walk(os.path.join(out, top)):
            found += [os.path.relpath(os.path.join(root, n), out).replace(os.sep, "/") for n in files]
    return sorted(found)


def listed_paths(manifest: Manifest) -> set[str]:
    """Every file a committed shard lists, relative to OUT: parts, statistics files, commit
    records and `end.json` (the last two in format 2)."""
    listed = {f.path for f in committed_files(manifest)}
    if manifest.format_version != 1:
        listed |= {record_path(s.index) for s in manifest.shards} | {END_PATH}
    return listed


def committed_files(manifest: Manifest) -> list:
    """The part and statistics files of the committed shards (`FileRef`s)."""
    return manifest.parts + [s.stats for s in manifest.shards if s.stats is not None]


def unlisted_files(out: str, manifest: Manifest) -> list[str]:
    """Files in `data/`, `docs/` and `commits/` that no committed shard lists."""
    listed = listed_paths(manifest)
    return [rel for rel in _files(out, DATA_DIR, DOCS_DIR, COMMITS_DIR) if rel not in listed]


def damaged_parts(out: str, manifest: Manifest, sizes: dict | None = None) -> list[str]:
    """Listed part and statistics files that are missing or not of their recorded size
    (a cheap check: `verify` reads them). `sizes` (path -> bytes, e.g. a bucket listing)
    replaces looking at the files under `out`."""
    if sizes is None:
        sizes = {f.path: os.path.getsize(os.path.join(out, f.path))
                 for f in committed_files(manifest) if os.path.isfile(os.path.join(out, f.path))}
    return [f.path for f in committed_files(manifest) if sizes.get(f.path) != f.bytes]


# -- OUT as a whole -----------------------------------------------------------------------------

def config_name(module: str) -> str:
    """The dataset card's config name of a module: its directory name after `module=`
    (`datasets` refuses `:` in config names, so an input is `<module>@input` there)."""
    return module_dir(module).split("=", 1)[1]


def inspect_out(out: str, *, overwrite: bool, resume: bool) -> str:
    """Decide what to do with OUT, changing nothing: -> "fresh", "resume" or "replace".

    Refuses a file and a non-empty directory unless `resume` (which needs a manifest)
    or `overwrite` (which only ever deletes a crowstream output).
    """
    if os.path.exists(out) and not os.path.isdir(out):
        raise OutputError(f"OUT {out!r} is a file, not a directory; choose another path.")
    existing = [n for n in os.listdir(out) if n != LOCKS_DIR] if os.path.isdir(out) else []
    if not existing:
        parent = os.path.dirname(os.path.abspath(out))
        _check_writable(out if os.path.isdir(out) else _existing_ancestor(parent))
        return "fresh"
    _check_writable(out)
    if resume and MANIFEST_NAME in existing:
        return "resume"
    if overwrite and MANIFEST_NAME in existing:
        return "replace"
    if (resume or overwrite) and _uncommitted_layout(out, existing):
        return "replace"  # killed before its first manifest, or while being replaced
    if overwrite:
        raise OutputExistsError(f"refusing to overwrite {out!r}: it is not empty and holds no "
                                f"{MANIFEST_NAME}, so it is not a crowstream output. Choose "
                                "another OUT or empty it yourself.")
    hint = ("it has no crowstream.json, so there is nothing to resume; choose another OUT"
            if resume else "pass overwrite=True (--overwrite) to replace it, resume=True "
            "(--resume) to continue it, or choose another OUT")
    raise OutputExistsError(f"OUT {out!r} is not empty: {hint}.")


def _uncommitted_layout(out: str, existing: list[str]) -> bool:
    """True when OUT holds only what a crowstream run leaves before its first manifest (or
    an overwrite killed mid-delete): crowstream's own names and part files, nothing else.
    Without a manifest nothing was committed, so starting afresh loses nothing."""
    names = set(existing)
    ours = {"README.md", VOCAB_NAME, DATA_DIR, DOCS_DIR, TMP_DIR, COMMITS_DIR, TOKENIZER_DIR}
    if not names <= ours or not names & {TMP_DIR, DATA_DIR}:
        return False
    card = os.path.join(out, "README.md")
    if os.path.isfile(card):
        with open(card, encoding="utf-8", errors="replace") as f:
            if "crowstream" not in f.read():
                return False
    patterns = {DATA_DIR: re.compile(r"module=[^/]+/part-\d{5}-\d{6}(-\d{3,})?\.parquet"),
                DOCS_DIR: re.compile(r"part-\d{5}-\d{6}(-\d{3,})?\.parquet"),
                COMMITS_DIR: re.compile(r"shard-\d{8}\.(json|stats\.parquet)|end\.json")}
    for top, pattern in patterns.items():
        for root, _, files in os.walk(os.path.join(out, top)):
            for name in files:
                rel = os.path.relpath(os.path.join(root, name), os.path.join(out, top))
                if not pattern.fullmatch(rel.replace(os.sep, "/")):
                    return False
    return True


def create_out(out: str, mode: str) -> None:
    """Make OUT's skeleton. For mode "replace", delete the old output first, its manifest
    last, so an overwrite killed midway is still recognised as a crowstream output."""
    if mode == "replace":
        for name in os.listdir(out):
            if name not in (MANIFEST_NAME, LOCKS_DIR):
                path = os.path.join(out, name)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        if os.path.exists(manifest_path(out)):
            os.remove(manifest_path(out))
    try:
        for sub in (TMP_DIR, DATA_DIR, DOCS_DIR, COMMITS_DIR):
            os.makedirs(os.path.join(out, sub), exist_ok=True)
    except OSError as error:
        raise OutputError(f"cannot create OUT {out!r}: {error}. Choose a writable path.") from error


def _existing_ancestor(path: str) -> str:
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


LOCKS_DIR = ".locks"  # one lock file per rank of a multi-rank run


@contextlib.contextmanager
def exclusive(out: str, *, wait: float = 0):
    """Hold an advisory lock on the OUT directory, so two captures never write (or clean
    up, or overwrite) the same OUT at once. Released when the process dies. A single
    process holds it for its whole run; a rank of several only while it creates or joins
    the run and while it finalizes, waiting up to `wait` seconds for it."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no advisory locks to take
        yield
        return
    fd = os.open(out, os.O_RDONLY)
    try:
        _flock(fd, wait, f"another crowstream process is writing to {out!r}; let it finish "
                         "(or stop it) before resuming or overwriting.")
        yield
    finally:
        os.close(fd)


def _flock(fd: int, wait: float, message: str) -> None:
    import fcntl
    import time

    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError as error:
            if time.monotonic() >= deadline:
                raise OutputError(message) from error
            time.sleep(0.05)


def _lock_path(out: str, rank: int) -> str:
    return os.path.join(out, LOCKS_DIR, f"rank-{rank:05d}.lock")


class RankLock:
    """The lock of one rank of a multi-rank run: `OUT/.locks/rank-<rank>.lock`, held from
    the start of the rank's run until `release` (or the process's death)."""

    def __init__(self, out: str, rank: int):
        os.makedirs(os.path.join(out, LOCKS_DIR), exist_ok=True)
        self.fd: int | None = os.open(_lock_path(out, rank), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _flock(self.fd, 0, f"another crowstream process is writing to {out!r} as rank "
                               f"{rank}; let it finish (or stop it) first.")
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def busy_ranks(out: str, *, besides: int | None = None) -> list[int]:
    """Ranks whose lock another process holds right now (`besides`: the caller's own)."""
    try:
        import fcntl
    except ImportError:
        return []
    directory = os.path.join(out, LOCKS_DIR)
    names = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
    busy = []
    for name in names:
        found = re.fullmatch(r"rank-(\d{5})\.lock", name)
        if not found or int(found.group(1)) == besides:
            continue
        fd = os.open(os.path.join(directory, name), os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            busy.append(int(found.group(1)))
        finally:
            os.close(fd)
    return busy


def _check_writable(out: str) -> None:
    if not os.access(out, os.W_OK):
        raise OutputError(f"OUT {out!r} is not writable; fix its permissions or choose another OUT.")


CARD_NAME = "README.md"


def write_card(out: str, manifest: Manifest) -> None:
    """OUT/README.md: the dataset card, replaced atomically and durably."""
    _write_atomic(out, CARD_NAME, card_text(manifest).encode())


def card_text(manifest: Manifest) -> str:
    """The dataset card: one `configs:` entry per module, docs and vocab, and a summary."""
    lines = ["---", "configs:"]
    for name in manifest.modules:
        lines += [f"- config_name: {json.dumps(config_name(name))}", "  data_files:", "  - split: train",
                  f"    path: {json.dumps(module_dir(name) + '/*.parquet')}"]
    lines += ["- config_name: docs", "  data_files:", "  - split: train", f"    path: {DOCS_DIR}/*.parquet",
              "- config_name: vocab", "  data_files:", "  - split: train", f"    path: {VOCAB_NAME}",
              "tags:", "- activations", "- interpretability", "- crowstream", "---", ""]
    config = manifest.config
    model = manifest.provenance["model"]
    lines += [
        "# Activation dataset", "",
        f"Written by crowstream from model `{model.get('name_or_path') or model.get('class')}` "
        f"(context {config['context_size']}, {config['dtype']}).", "",
        "| module | d | path |", "|---|---|---|",
        *[f"| `{n}` | {m.d} | `{m.path}/` |" for n, m in manifest.modules.items()], "",
        "Each row is one token: `doc_id` (row index in the source), `position` (token index in "
        "the document), `token` (id; join `vocab.parquet`), `vector` (the module output).", "",
        "```python", "import datasets",
        f"ds = datasets.load_dataset(OUT, {json.dumps(next(iter(manifest.modules)))}, split=\"train\")",
        "```", "", "`crowstream.json` lists every committed part file with its checksum and the "
        "per-module statistics (count, mean, var, mean_norm) once the run has ended; while it "
        "runs, each committed shard has a record in `commits/`.", "",
    ]
    return "\n".join(lines)
