"""The manifest. It owns the typed manifest (`Manifest`, `ShardRecord`, `Part`, `FileRef`,
`ModuleInfo`, `Counts`, `StatsSummary`) and its JSON form, `crowstream.json` (format 2;
format 1 reads too): reading it (validated, digest checked) and replacing it atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from crowstream.errors import ManifestError
from crowstream.schemas import validate_manifest

from .files import dumps, now, read_json, write_atomic
from .layout import FORMAT_VERSION, MANIFEST_NAME, manifest_path

def _warn_mapping_access(key: str) -> None:
    import warnings

    warnings.warn(f"run.manifest[{key!r}] is deprecated (the manifest is a typed Manifest since "
                  f"crowstream 0.2): use the attribute, run.manifest.{key} (or "
                  f"run.manifest.to_json()[{key!r}] for the JSON form); mapping access goes "
                  "away in 0.4.", DeprecationWarning, stacklevel=3)


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
    """A captured module: width `d`, stored `dtype`, its partition directory `path`, and
    `order`: its place in the model's execution order among the captured modules (None in
    outputs written before crowstream 0.3)."""

    d: int
    dtype: str
    path: str
    type: str | None = None
    order: int | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, value: dict) -> ModuleInfo:
        return cls(value["d"], value["dtype"], value["path"], value.get("type"),
                   value.get("order"))


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
    position0: StatsSummary | None = None  # the same over the rows at position 0

    def to_json(self) -> dict:
        found = {"count": self.count, "mean": [_finite(x) for x in self.mean],
                 "var": [_finite(x) for x in self.var], "mean_norm": _finite(self.mean_norm),
                 "nonfinite": self.nonfinite, "clamped": self.clamped}
        if self.position0 is not None:
            found["position0"] = self.position0.to_json()
        return found

    @classmethod
    def from_json(cls, value: dict) -> StatsSummary:
        nan = float("nan")
        return cls(value["count"], tuple(nan if x is None else x for x in value["mean"]),
                   tuple(nan if x is None else x for x in value["var"]),
                   value["mean_norm"], value.get("nonfinite", 0), value.get("clamped", 0),
                   cls.from_json(value["position0"]) if "position0" in value else None)


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

    def __getitem__(self, key: str):
        """Deprecated mapping access, for scripts written against 0.1's dict manifest
        (`run.manifest["counts"]`): the JSON form of field `key`."""
        _warn_mapping_access(key)
        return self.to_json()[key]

    def get(self, key: str, default=None):
        """Deprecated, as `manifest[key]`."""
        _warn_mapping_access(key)
        return self.to_json().get(key, default)

    def module_parts(self, module: str) -> list[Part]:
        return [p for p in self.parts if p.kind == "module" and p.module == module]

    @property
    def source_done(self) -> int:
        """Source rows covered by the committed shards."""
        return sum(s.source_end - s.source_start for s in self.shards)

    def to_json(self) -> dict:
        return {
            "format": "crowstream", "format_version": self.format_version, "run_id": self.run_id,
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


def write_manifest(out: str, manifest: Manifest) -> None:
    """Replace crowstream.json atomically. Called at start, on resume and to consolidate at
    the end, on interrupt and on failure: never per shard."""
    manifest.updated = now()
    value = manifest.to_json()
    value["digest"] = manifest_digest(value)
    write_manifest_json(out, value)


def write_manifest_json(out: str, value: dict) -> None:
    """Replace crowstream.json with `value` as it is (`rewrite` uses it on format 1)."""
    write_atomic(out, MANIFEST_NAME, dumps(value).encode())


