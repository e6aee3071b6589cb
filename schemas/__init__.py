"""The format's single source of truth, shipped inside the package as `crowstream.schemas`.

It owns `manifest.schema.json` (JSON Schema of crowstream.json, format 3, and in its
`$defs/commit` of the commit records in `commits/`), `manifest-v1.schema.json` and `manifest-v2.schema.json` (formats 1 and 2,
still read) and `rows.json` (the
part-file, docs and vocab columns and Parquet settings), and builds the Arrow schemas
and Parquet writer options from them, so writer, readers, `verify` and tests agree.
"""

from __future__ import annotations

import functools
import json
from importlib import resources

import pyarrow as pa


@functools.cache
def manifest_schema(version: int = 3) -> dict:
    name = "manifest.schema.json" if version == 3 else f"manifest-v{version}.schema.json"
    return json.loads(resources.files(__name__).joinpath(name).read_text())


@functools.cache
def _validator(kind: str):
    import jsonschema

    if kind in ("commit", "run", "lease"):
        schema = {"$defs": manifest_schema()["$defs"], "$ref": f"#/$defs/{kind}"}
    else:
        schema = manifest_schema({"manifest-v1": 1, "manifest-v2": 2}.get(kind, 3))
    return jsonschema.Draft202012Validator(schema)


@functools.cache
def rows_spec() -> dict:
    return json.loads(resources.files(__name__).joinpath("rows.json").read_text())


def validate_manifest(manifest: dict, *, thorough: bool = False) -> list[str]:
    """-> every way `manifest` breaks the JSON Schema of its format version (empty when valid).

    Format 2's shards, the bulk of a long run's manifest, go through `shard_problems`, which
    checks the same rules ~50x faster than jsonschema (~0.1 ms per part file, paid on every
    read); `thorough=True` uses jsonschema for everything.
    """
    if manifest.get("format_version") == 1:
        return _problems("manifest-v1", manifest)
    kind = "manifest-v2" if manifest.get("format_version") == 2 else "manifest"
    if thorough or not isinstance(manifest.get("shards"), list):
        return _problems(kind, manifest)
    stats, problems = _stats_vectors(manifest.get("stats"))
    problems = _problems(kind, {**manifest, "shards": [], "stats": stats}) + problems
    for i, shard in enumerate(manifest["shards"]):
        problems += shard_problems(shard, f"shards/{i}")
    return problems


def _stats_vectors(stats):
    """-> (`stats` with each module's `mean` and `var` (and its position0's) emptied, the
    problems of those lists): jsonschema took ~0.1 s per read of one d = 4,096 module's
    ~16k numbers, checked here in ~1 ms. Anything not shaped as expected is left whole
    for jsonschema to word."""
    if not isinstance(stats, dict):
        return stats, []
    problems, kept = [], {}
    for module, entry in stats.items():
        kept[module] = _entry_vectors(entry, f"stats/{module}", problems)
    return kept, problems


def _entry_vectors(entry, where: str, problems: list):
    if not isinstance(entry, dict):
        return entry
    entry = dict(entry)
    for key in ("mean", "var"):
        values = entry.get(key)
        if not isinstance(values, list):
            continue
        for i, value in enumerate(values):
            if not (value is None or type(value) in (float, int)):
                problems.append(f"{where}/{key}/{i}: {value!r} is not of type 'number', 'null'")
                break
        entry[key] = []
    if "position0" in entry:
        entry["position0"] = _entry_vectors(entry["position0"], f"{where}/position0", problems)
    return entry


def validate_record(record: dict, *, thorough: bool = False) -> list[str]:
    """-> every way a commit record (`commits/shard-*.json`) breaks its schema
    (`$defs/commit`); fast as `validate_manifest`'s shards unless `thorough`."""
    if thorough:
        return _problems("commit", record)
    problems = []
    if record.get("format") != "crowstream-commit":
        problems.append("format: 'crowstream-commit' was expected")
    if record.get("format_version") not in (2, 3):
        problems.append("format_version: 2 or 3 was expected")
    if not _matches(record.get("run_id"), "run_id"):
        problems.append(f"run_id: {record.get('run_id')!r} does not match "
                        f"{_pattern('run_id')!r}")
    return problems + shard_problems(record)


def validate_definition(kind: str, document: dict) -> list[str]:
    """-> every way `document` breaks `$defs/<kind>` ("run": commits/run.json, "lease")."""
    return _problems(kind, document)


def shard_problems(shard, where: str = "") -> list[str]:
    """The rules of `$defs/shard` (and its parts and statistics file), checked by hand;
    patterns come from the schema itself. -> problems, as jsonschema words them."""
    def at(key):
        return f"{where}/{key}" if where else key

    if not isinstance(shard, dict):
        return [f"{where or '(top)'}: {shard!r} is not of type 'object'"]
    problems = [p for key in ("index", "rank", "source_start", "source_end", "docs", "skipped",
                              "tokens") for p in _count(shard, key, at)]
    world = shard.get("world_size", 2)
    if isinstance(world, bool) or not isinstance(world, int) or world < 2:
        problems.append(f"{at('world_size')}: {world!r} is not an integer >= 2")
    parts = shard.get("parts")
    if not isinstance(parts, list) or not parts:
        problems.append(f"{at('parts')}: {parts!r} is not a non-empty array")
    else:
        for j, part in enumerate(parts):
            problems += _file_problems(part, "part", at(f"parts/{j}"))
    if "stats" not in shard:
        problems.append(f"{where or '(top)'}: 'stats' is a required property")
    else:
        problems += _file_problems(shard["stats"], "stats_file", at("stats"))
    return problems


def _file_problems(value, kind: str, where: str) -> list[str]:
    if not isinstance(value, dict):
        return [f"{where}: {value!r} is not of type 'object'"]
    counts = ("rows", "bytes") if kind == "part" else ("bytes",)
    problems = [p for key in counts for p in _count(value, key, lambda k: f"{where}/{k}")]
    for key, definition in (("path", kind), ("sha256", "sha256")):
        pattern = _pattern(definition, "path" if key == "path" else None)
        if not _matches(value.get(key), definition, "path" if key == "path" else None):
            problems.append(f"{where}/{key}: {value.get(key)!r} does not match {pattern!r}")
    if kind == "part":
        if value.get("kind") not in ("module", "docs"):
            problems.append(f"{where}/kind: {value.get('kind')!r} is not one of ['module', 'docs']")
        if "module" in value and not isinstance(value["module"], str):
            problems.append(f"{where}/module: {value['module']!r} is not of type 'string'")
    return problems


def _count(value: dict, key: str, at) -> list[str]:
    if key not in value:
        return [f"{at(key)}: missing (a required property)"]
    number = value[key]
    if isinstance(number, bool) or not isinstance(number, int) or number < 0:
        return [f"{at(key)}: {number!r} is not an integer >= 0"]
    return []


@functools.cache
def _pattern(definition: str, prop: str | None = None) -> str:
    spec = manifest_schema()["$defs"][definition]
    return (spec["properties"][prop] if prop else spec)["pattern"]


@functools.cache
def _regex(definition: str, prop: str | None = None):
    import re

    return re.compile(_pattern(definition, prop))


def _matches(value, definition: str, prop: str | None = None) -> bool:
    return isinstance(value, str) and _regex(definition, prop).search(value) is not None


def _problems(kind: str, document: dict) -> list[str]:
    errors = _validator(kind).iter_errors(document)
    return [f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
            for e in sorted(errors, key=lambda e: list(e.absolute_path))]


@functools.cache  # built per module per batch by flatten: one schema object per (d, dtype)
def row_schema(d: int, dtype: str) -> pa.Schema:
    """Arrow schema of a module's part files: doc_id, position, token, vector[d]."""
    value = {"float32": pa.float32(), "float16": pa.float16()}[dtype]
    return pa.schema([
        pa.field("doc_id", pa.int64(), nullable=False),
        pa.field("position", pa.int32(), nullable=False),
        pa.field("token", pa.int32(), nullable=False),
        pa.field("vector", pa.list_(pa.field("element", value, nullable=False), d), nullable=False),
    ])


def docs_schema(format_version: int = 2) -> pa.Schema:
    """Arrow schema of the docs part files; format 1 had no `tokens` column."""
    fields = [pa.field("doc_id", pa.int64(), nullable=False),
              pa.field("n_tokens", pa.int32(), nullable=False),
              pa.field("text", pa.string())]
    if format_version >= 2:
        fields.append(pa.field("tokens", pa.list_(pa.field("element", pa.int32(), nullable=False)),
                               nullable=False))
    return pa.schema(fields)


def vocab_schema() -> pa.Schema:
    return pa.schema([pa.field("token", pa.int32(), nullable=False),
                      pa.field("text", pa.string(), nullable=False),
                      pa.field("special", pa.bool_(), nullable=False)])


def parquet_options(dtype: str, compression: str | None = None) -> dict:
    """Keyword arguments for `pyarrow.parquet.ParquetWriter` of a module's part files whose
    vectors are `dtype`, from rows.json (BYTE_STREAM_SPLIT on float32 only); `compression`
    is one of rows.json's `compression_choices` (default: its `compression`)."""
    spec = rows_spec()["parquet"]
    codec = compression or spec["compression"]
    if codec not in spec["compression_choices"]:
        raise ValueError(f"unknown compression {codec!r}")
    base = {k: v for k, v in table_options().items() if not k.startswith("compression")}
    return {
        **base,
        **spec["compression_choices"][codec],
        "use_byte_stream_split": spec["byte_stream_split"][dtype] or False,
        "use_dictionary": spec["dictionary"],
        "write_statistics": spec["statistics"],
    }


def table_options() -> dict:
    """Keyword arguments for every other Parquet file crowstream writes (docs, vocab)."""
    spec = rows_spec()["parquet"]
    return {"compression": spec["compression"], "compression_level": spec["compression_level"],
            "write_page_checksum": spec["page_checksum"]}


def part_metadata(module: str, d: int, dtype: str, model: str, format_version: int) -> dict:
    """The footer key-value metadata of a module part file (keys in rows.json)."""
    values = {"format_version": format_version, "module": module, "d": d, "dtype": dtype,
              "model": model}
    keys = rows_spec()["footer_metadata"]["keys"]
    assert set(keys) == {f"crowstream.{k}" for k in values}, "rows.json and part_metadata disagree"
    return {f"crowstream.{key}": str(value) for key, value in values.items()}


def part_schema(module: str, d: int, dtype: str, model: str, format_version: int) -> pa.Schema:
    """`row_schema` carrying `part_metadata` (pyarrow writes it into the Parquet footer)."""
    return row_schema(d, dtype).with_metadata(part_metadata(module, d, dtype, model, format_version))


ROW_GROUP_BYTES: int = rows_spec()["parquet"]["row_group_bytes"]
