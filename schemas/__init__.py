"""The format's single source of truth, shipped inside the package as `crowstream.schemas`.

It owns `manifest.schema.json` (JSON Schema of crowstream.json) and `rows.json` (the
part-file, docs and vocab columns and Parquet settings), and builds the Arrow schemas
and Parquet writer options from them, so writer, readers, `verify` and tests agree.
"""

from __future__ import annotations

import functools
import json
from importlib import resources

import pyarrow as pa


@functools.cache
def manifest_schema() -> dict:
    return json.loads(resources.files(__name__).joinpath("manifest.schema.json").read_text())


@functools.cache
def rows_spec() -> dict:
    return json.loads(resources.files(__name__).joinpath("rows.json").read_text())


def validate_manifest(manifest: dict) -> list[str]:
    """-> every way `manifest` breaks the JSON Schema (empty when valid)."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(manifest_schema())
    return [f"{'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
            for e in sorted(validator.iter_errors(manifest), key=lambda e: list(e.absolute_path))]


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
