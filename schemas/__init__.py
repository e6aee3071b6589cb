"""The format's single source of truth, shipped inside the package as `crowstream.schemas`.

It owns `manifest.schema.json` (JSON Schema of crowstream.json, format 2, and in its
`$defs/commit` of the commit records in `commits/`), `manifest-v1.schema.json` (format 1,
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
def manifest_schema(version: int = 2) -> dict:
    name = "manifest.schema.json" if version == 2 else f"manifest-v{version}.schema.json"
    return json.loads(resources.files(__name__).joinpath(name).read_text())


@functools.cache
def _validator(kind: str):
    import jsonschema

    if kind == "commit":
        schema = {"$defs": manifest_schema()["$defs"], "$ref": "#/$defs/commit"}
    else:
        schema = manifest_schema(1 if kind == "manifest-v1" else 2)
    return jsonschema.Draft202012Validator(schema)


@functools.cache
def rows_spec() -> dict:
    return json.loads(resources.files(__name__).joinpath("rows.json").read_text())


def validate_manifest(manifest: dict) -> list[str]:
    """-> every way `manifest` breaks the JSON Schema of its format version (empty when valid)."""
    return _problems("manifest-v1" if manifest.get("format_version") == 1 else "manifest", manifest)


def validate_record(record: dict) -> list[str]:
    """-> every way a commit record (`commits/shard-*.json`) breaks its schema."""
    return _problems("commit", record)


def _problems(kind: str, document: dict) -> list[str]:
    errors = _validator(kind).iter_errors(document)
    return [f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
            for e in sorted(errors, key=lambda e: list(e.absolute_path))]


def row_schema(d: int, dtype: str) -> pa.Schema:
    """Arrow schema of a module's part files: doc_id, position, token, vector[d]."""
    value = {"float32": pa.float32(), "float16": pa.float16()}[dtype]
    return pa.schema([
        pa.field("doc_id", pa.int64(), nullable=False),
        pa.field("position", pa.int32(), nullable=False),
        pa.field("token", pa.int32(), nullable=False),
        pa.field("vector", pa.list_(pa.field("element", value, nullable=False), d), nullable=False),
    ])


def docs_schema() -> pa.Schema:
    return pa.schema([pa.field("doc_id", pa.int64(), nullable=False),
                      pa.field("n_tokens", pa.int32(), nullable=False),
                      pa.field("text", pa.string())])


def vocab_schema() -> pa.Schema:
    return pa.schema([pa.field("token", pa.int32(), nullable=False),
                      pa.field("text", pa.string(), nullable=False),
                      pa.field("special", pa.bool_(), nullable=False)])


def parquet_options() -> dict:
    """Keyword arguments for `pyarrow.parquet.ParquetWriter`, from rows.json."""
    spec = rows_spec()["parquet"]
    return {
        "compression": spec["compression"],
        "compression_level": spec["compression_level"],
        "use_byte_stream_split": spec["byte_stream_split"],
        "use_dictionary": spec["dictionary"],
        "write_statistics": spec["statistics"],
    }


ROW_GROUP_BYTES: int = rows_spec()["parquet"]["row_group_bytes"]
